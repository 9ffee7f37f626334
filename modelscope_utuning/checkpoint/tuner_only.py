"""Tuner-only export: the few trained weights of a tuned model, apart from the frozen backbone they apply to.

A folder holds

- ``adapter_model.safetensors``: the tuner parameters (adapters, prefixes, prompts, LoRA, side network), the
  BitFit biases and the classification head, under our names relative to the network
  (``backbone.blocks.0.mha_adapter.down.weight``, ``backbone.blocks.3.attn.qkv.bias``, ``head.fc.weight`` ...);
- ``adapter_config.json``::

    {"format_version": 1,
     "tuners": [...],      # the model's tuner entries, legacy *_length keys translated to entries
     "base": {...},        # the backbone's ViT arguments (and pretrained_weights, when the model had it)
     "head": {"num_classes": C, "dim": D},
     "CLASSES": [...] | null}

:func:`save_tuners` writes both atomically (a temporary file in the same folder, then ``os.replace``);
:func:`load_tuners` loads them into a model built on the same base (strict: everything missing, unexpected or
mismatched is reported in one ValueError); :func:`model_from_tuners` builds that model from the JSON.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional

import torch

from ..fileio import atomic_write

WEIGHTS_FILE = 'adapter_model.safetensors'
CONFIG_FILE = 'adapter_config.json'
FORMAT_VERSION = 1
_NOT_BASE = ('tuners', 'type', 'adapter_length', 'prefix_length', 'prompt_length', 'lora_length',
             'sidetune_length', 'adapter_type', 'prefix_type', 'prompt_type', 'lora_type', 'sidetune_type')


def _network(model):
    """(network with .backbone / .head / .specs, the ModelScope wrapper or None)."""
    net = getattr(model, 'model', None)
    if net is not None and hasattr(net, 'backbone') and hasattr(net, 'head'):
        return net, model
    if hasattr(model, 'backbone') and hasattr(model, 'head'):
        return model, None
    raise TypeError(f'expected a VisionEfficientTuningModel (or its .model), got {type(model).__name__}')


def tuner_state_dict(model) -> Dict[str, torch.Tensor]:
    """The weights a tuner-only file holds: tuners, BitFit biases and the head (names relative to the network)."""
    from ..tuners import bitfit_parameter_names, is_tuner_parameter
    net, _ = _network(model)
    bitfit = set(bitfit_parameter_names(net.backbone, net.specs))
    out = {f'backbone.{k}': v for k, v in net.backbone.state_dict().items() if is_tuner_parameter(k) or k in bitfit}
    out.update({f'head.{k}': v for k, v in net.head.state_dict().items()})
    return out


def _base_config(model) -> Dict[str, Any]:
    net, wrapper = _network(model)
    cfg = dict(getattr(wrapper, 'backbone_config', None) or getattr(net, 'backbone_config', None) or {})
    base = {k: v for k, v in cfg.items() if k not in _NOT_BASE}
    vit = net.backbone
    # The backbone-level head may have been inferred from a hub checkpoint: record it, the base must say it.
    base.setdefault('num_classes', vit.head.out_features if isinstance(vit.head, torch.nn.Linear) else 0)
    for key, value in (('embed_dim', vit.embed_dim), ('depth', vit.depth), ('num_heads', vit.num_heads)):
        base.setdefault(key, value)
    return base


def tuner_config(model) -> Dict[str, Any]:
    net, wrapper = _network(model)
    classes = getattr(wrapper, 'CLASSES', None) if wrapper is not None else getattr(net, 'CLASSES', None)
    return {
        'format_version': FORMAT_VERSION,
        'tuners': [spec.to_config() for spec in net.specs],
        'base': _base_config(model),
        'head': {'num_classes': net.head.num_classes, 'dim': net.head.dim},
        'CLASSES': list(classes) if classes is not None else None,
    }


def save_tuners(model, folder: str) -> Dict[str, str]:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` into ``folder``; returns their paths."""
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in tuner_state_dict(model).items()}
    config = tuner_config(model)
    text = json.dumps(config, indent=2, ensure_ascii=False, default=_json_default) + '\n'
    weights, cfg_path = os.path.join(folder, WEIGHTS_FILE), os.path.join(folder, CONFIG_FILE)
    atomic_write(weights, lambda tmp: save_file(state, tmp, metadata={'format': 'pt',
                                                                       'format_version': str(FORMAT_VERSION)}))

    def write_json(tmp: str) -> None:
        with open(tmp, 'w', encoding='utf-8') as f:
            f.write(text)
    atomic_write(cfg_path, write_json)
    return {'weights': weights, 'config': cfg_path}


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (tuple, set)):
        return list(obj)
    if hasattr(obj, 'item'):
        return obj.item()
    raise TypeError(f'{type(obj).__name__} is not JSON serialisable')


def read_tuner_config(folder: str) -> Dict[str, Any]:
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(path):
        raise ValueError(f'no tuner-only export in {folder!r}: {CONFIG_FILE} is missing')
    with open(path, encoding='utf-8') as f:
        try:
            cfg = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f'{path!r} is not valid JSON: {e}') from e
    if not isinstance(cfg, dict) or 'tuners' not in cfg or 'head' not in cfg:
        raise ValueError(f'{path!r}: expected a tuner-only config with "tuners", "base" and "head"')
    if cfg.get('format_version', FORMAT_VERSION) > FORMAT_VERSION:
        raise ValueError(f'{path!r}: format_version {cfg["format_version"]} is newer than this code '
                         f'({FORMAT_VERSION})')
    return cfg


def _base_differences(saved: Dict[str, Any], ours: Dict[str, Any]) -> List[str]:
    keys = (set(saved) | set(ours)) - {'pretrained_weights', 'drop_rate', 'attn_drop_rate', 'drop_path_rate'}
    from ..backbone_config import VIT_ARGS
    import inspect
    from ..backbone.vit import VisionTransformer
    defaults = {k: p.default for k, p in inspect.signature(VisionTransformer.__init__).parameters.items()
                if k in VIT_ARGS}
    diffs = []
    for k in sorted(keys):
        a, b = saved.get(k, defaults.get(k)), ours.get(k, defaults.get(k))
        if a != b:
            diffs.append(f'{k}: file {a!r} vs model {b!r}')
    return diffs


def _tuner_signature(entries, vit) -> List[tuple]:
    """What the entries compute (type, op, form, per-layer sizes, scale, act, alpha, net), order-free; the
    initial values (scale_init) and the spelling of the entries do not matter."""
    from ..tuners.spec import parse_tuners
    try:
        specs = parse_tuners(entries, vit.depth, vit.embed_dim)
    except ValueError as e:
        return [('invalid', str(e))]
    return sorted((s.type, s.op or '', s.form or '', tuple(s.sizes), s.scale if s.form == 'parallel' else '',
                   s.act or '', s.alpha if s.alpha is not None else -1.0, s.net) for s in specs)


def load_tuners(model, folder: str, strict: bool = True) -> Dict[str, Any]:
    """Load a tuner-only export into ``model`` (built on the same base, with the same tuners).

    Raises one ValueError listing every missing / unexpected / mismatched weight and any difference of the
    base ViT arguments or of the tuner entries. Sets ``model.CLASSES`` from the file. Returns the config.
    """
    from safetensors.torch import load_file
    cfg = read_tuner_config(folder)
    path = os.path.join(folder, WEIGHTS_FILE)
    if not os.path.isfile(path):
        raise ValueError(f'no tuner-only export in {folder!r}: {WEIGHTS_FILE} is missing')
    try:
        state = load_file(path, device='cpu')
    except Exception as e:  # noqa: BLE001
        raise ValueError(f'{path!r} could not be read as safetensors: {e}') from e
    net, wrapper = _network(model)
    own = tuner_state_dict(model)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f'{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}'
                  for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    base_diffs = _base_differences(cfg.get('base') or {}, _base_config(model))
    ours = [spec.to_config() for spec in net.specs]
    tuner_diff = _tuner_signature(cfg['tuners'], net.backbone) != _tuner_signature(ours, net.backbone)
    if strict and (missing or unexpected or mismatched or base_diffs or tuner_diff):
        raise ValueError(
            f'tuner-only export {folder!r} does not fit the model:'
            + (f'\n  missing weights: {missing}' if missing else '')
            + (f'\n  unexpected weights: {unexpected}' if unexpected else '')
            + (f'\n  shape mismatches: {mismatched}' if mismatched else '')
            + (f'\n  base differs: {base_diffs}' if base_diffs else '')
            + (f'\n  tuners: file {cfg["tuners"]} vs model {ours}' if tuner_diff else '')
            + '\n(build the model from the same base and tuner entries, e.g. with model_from_tuners)')
    with torch.no_grad():
        for k, v in state.items():
            if k in own and tuple(v.shape) == tuple(own[k].shape):
                own[k].copy_(v.to(own[k].dtype))
    if cfg.get('CLASSES') is not None:
        target = wrapper if wrapper is not None else net
        target.CLASSES = list(cfg['CLASSES'])
    return cfg


def model_from_tuners(folder: str, pretrained_weights: Optional[str] = None, **kwargs):
    """Build a :class:`~modelscope_utuning.model.VisionEfficientTuningModel` from a tuner-only export.

    The base backbone weights come from ``pretrained_weights`` (else the base's own ``pretrained_weights``
    entry, when it names an existing file); the tuners, BitFit biases and head come from the export.
    Extra ``kwargs`` go to the model (e.g. ``freeze_cfg``).
    """
    from ..model import VisionEfficientTuningModel
    cfg = read_tuner_config(folder)
    backbone = dict(cfg.get('base') or {})
    if pretrained_weights is not None:
        backbone['pretrained_weights'] = pretrained_weights
    elif backbone.get('pretrained_weights') and not os.path.isfile(backbone['pretrained_weights']):
        raise ValueError(f'the base weights {backbone["pretrained_weights"]!r} recorded in {folder!r} do not '
                         'exist here; pass pretrained_weights=')
    backbone['tuners'] = list(cfg['tuners'])
    model = VisionEfficientTuningModel(model_dir=None, backbone=backbone, head=dict(cfg['head']),
                                       CLASSES=cfg.get('CLASSES'), **kwargs)
    load_tuners(model, folder)
    return model
