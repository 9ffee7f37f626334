"""Turn ``model.backbone`` of configuration.json into VisionTransformer arguments and tuner specs.

Accepts our keys and the built-in's legacy ones; ``type`` (e.g. "VitB16_Adapter") is informational. Unknown
keys are an error that names them, so a typo never silently changes the architecture.
"""
from __future__ import annotations

import inspect
from typing import Any, Dict, List, Tuple

from .backbone.vit import VisionTransformer
from .tuners.spec import LEGACY_INFO_KEYS, LEGACY_KEYS, TunerSpec, legacy_entries, parse_tuners

VIT_ARGS = tuple(p for p in inspect.signature(VisionTransformer.__init__).parameters if p != 'self')
# Built-in arguments that only choose its code paths; our backbone has one code path for each.
IGNORED_LEGACY_ARGS = ('type', 'weight_init', 'embed_layer', 'norm_layer', 'act_layer', 'block_fn',
                       'sidetune_type') + LEGACY_INFO_KEYS
OUR_KEYS = ('tuners', 'pretrained_weights', 'bypass')


def split_backbone_config(cfg: Dict[str, Any]) -> Tuple[Dict[str, Any], List[Dict[str, Any]], Dict[str, Any]]:
    """-> (VisionTransformer kwargs, tuner entries (explicit + legacy), our extra options)."""
    cfg = dict(cfg or {})
    unknown = set(cfg) - set(VIT_ARGS) - set(IGNORED_LEGACY_ARGS) - set(LEGACY_KEYS) - set(OUR_KEYS)
    if unknown:
        raise ValueError(f'model.backbone: unknown key(s) {sorted(unknown)}; expected ViT arguments '
                         f'{sorted(VIT_ARGS)}, "tuners", "pretrained_weights" or legacy '
                         f'{sorted(LEGACY_KEYS + LEGACY_INFO_KEYS)}')
    entries = list(cfg.get('tuners') or []) + legacy_entries(cfg)
    extras = {k: cfg[k] for k in OUR_KEYS if k in cfg and k != 'tuners'}
    vit_kwargs = {k: v for k, v in cfg.items() if k in VIT_ARGS}
    return vit_kwargs, entries, extras


def build_backbone(vit_kwargs: Dict[str, Any], entries: List[Dict[str, Any]]):
    """-> (VisionTransformer with tuners attached, parsed specs)."""
    from .tuners import apply_tuners
    vit = VisionTransformer(**vit_kwargs)
    specs: List[TunerSpec] = parse_tuners(entries, vit.depth, vit.embed_dim)
    apply_tuners(vit, specs, act=vit_kwargs.get('act', 'gelu'))
    return vit, specs


def enable_bypass(vit, specs: List[TunerSpec]) -> None:
    """Switch on the bypass path; only parallel adapter / prefix / prompt tuners can live on it."""
    bad = [s.source for s in specs if not (s.type in ('adapter', 'prefix', 'prompt') and s.form == 'parallel')]
    if bad or not specs:
        raise ValueError('model.backbone.bypass needs parallel adapter / prefix / prompt tuners only '
                         f'(they read detached backbone features); not supported: {bad or "no tuners"}')
    vit.bypass = True
