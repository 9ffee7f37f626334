"""Turn ``model.backbone`` of configuration.json into VisionTransformer arguments, tuner entries and our options.

Accepts our keys and the built-in's legacy ones (each answered by the tuner kind that declares it); ``type``
(e.g. "VitB16_Adapter") is informational. Unknown keys are an error that names them, so a typo never silently
changes the architecture.
"""
from __future__ import annotations

import inspect
from typing import Any, Dict, List, Tuple

from .backbone.vit import VisionTransformer, check_arguments
from .tuners.base import legacy_keys, tuner_kinds
from .tuners.spec import legacy_entries

VIT_ARGS = tuple(p for p in inspect.signature(VisionTransformer.__init__).parameters if p != 'self')
# Built-in arguments that only choose its code paths; our backbone has one code path for each.
IGNORED_LEGACY_ARGS = ('type', 'weight_init', 'embed_layer', 'norm_layer', 'act_layer', 'block_fn')
OUR_KEYS = ('tuners', 'pretrained_weights', 'bypass')


def split_backbone_config(cfg: Dict[str, Any]) -> Tuple[Dict[str, Any], List[Dict[str, Any]], Dict[str, Any]]:
    """-> (VisionTransformer kwargs, tuner entries (explicit + legacy), our extra options)."""
    cfg = dict(cfg or {})
    legacy = legacy_keys()
    unknown = set(cfg) - set(VIT_ARGS) - set(IGNORED_LEGACY_ARGS) - set(legacy) - set(OUR_KEYS)
    if unknown:
        raise ValueError(f'model.backbone: unknown key(s) {sorted(unknown)}; expected ViT arguments '
                         f'{sorted(VIT_ARGS)}, "tuners", "pretrained_weights", "bypass" or legacy '
                         f'{sorted(legacy)}')
    entries = list(cfg.get('tuners') or []) + legacy_entries(cfg)
    extras = {k: cfg[k] for k in OUR_KEYS if k in cfg and k != 'tuners'}
    vit_kwargs = {k: v for k, v in cfg.items() if k in VIT_ARGS}
    defaults = {k: p.default for k, p in inspect.signature(VisionTransformer.__init__).parameters.items()
                if k in VIT_ARGS}
    check_arguments('model.backbone.', **{**defaults, **vit_kwargs})  # named as the configuration names them
    return vit_kwargs, entries, extras


def base_config(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The backbone configuration without its tuners (explicit entries and legacy keys): the frozen base."""
    legacy = set(legacy_keys())
    return {k: v for k, v in (cfg or {}).items() if k != 'tuners' and k not in legacy and k != 'type'}


def without_kinds(cfg: Dict[str, Any], kinds) -> Dict[str, Any]:
    """The backbone configuration with every entry and legacy key of ``kinds`` removed (e.g. after merging)."""
    kinds = set(kinds)
    out = dict(cfg)
    for kind, cls in tuner_kinds().items():
        if kind in kinds:
            for key in cls.legacy_keys:
                out.pop(key, None)
    if out.get('tuners'):
        out['tuners'] = [e for e in out['tuners'] if not (isinstance(e, dict) and e.get('type') in kinds)]
    return out
