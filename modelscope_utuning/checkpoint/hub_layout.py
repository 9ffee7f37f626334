"""ModelScope's hub checkpoint layout for vision-efficient-tuning models.

``pytorch_model.pt`` holds ``{'backbone_weight': state dict, 'head_weight': {'fc.weight', 'fc.bias'},
'CLASSES': [names], optional 'backbone_cfg' / 'head_cfg'}``. ``backbone_weight`` holds the ViT's weights and
every tuner's, the side network's included (the built-in keeps it on its backbone). The built-in names its tuners
differently from us; each tuner kind declares its names there (``Tuner.hub_names``: built-in name, our name, the
form the built-in means), and the translation both ways is derived from those declarations here. Tuners the
built-in does not have (every parallel form) keep our names.

A network's state dict (``backbone.*``, ``head.*`` and network-level tuners such as ``side.*``) and a hub
checkpoint convert into each other with :func:`network_state_from_hub` and :func:`hub_from_network_state`.
"""
from __future__ import annotations

import os
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from ..fileio import atomic_write, read_json_object
from ..tuners.base import tuner_kinds

CHECKPOINT_FILE = 'pytorch_model.pt'
CONFIGURATION_FILE = 'configuration.json'
_BLOCK = r'^blocks\.(\d+)\.'


def _rules() -> List[Tuple[str, str, Optional[str], bool]]:
    """``(built-in name, our name, form or None, inside a block)`` from every kind's declaration."""
    return [(builtin, ours, form, cls.level == 'block')
            for cls in tuner_kinds().values() for builtin, ours, form in cls.hub_names]


def _match(name: str, rule_name: str, block: bool) -> Optional[Tuple[str, str]]:
    """(block prefix, rest after rule_name) when ``name`` is ``[blocks.N.]rule_name...``."""
    prefix = ''
    if block:
        m = re.match(_BLOCK, name)
        if not m:
            return None
        prefix, name = m.group(0), name[m.end():]
    exact = not rule_name.endswith('.')
    if (exact and name == rule_name) or (not exact and name.startswith(rule_name)):
        return prefix, name[len(rule_name):]
    return None


def from_builtin_name(name: str) -> Tuple[str, Optional[str]]:
    """A hub ``backbone_weight`` name -> (our name, the form it means or None when it is not a built-in tuner
    name or the kind has one form)."""
    for builtin, ours, form, block in _rules():
        hit = _match(name, builtin, block)
        if hit:
            return hit[0] + ours + hit[1], form
    return name, None


def from_builtin_names(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {from_builtin_name(k)[0]: v for k, v in state.items()}


def to_builtin_name(name: str, form_of: Mapping[str, str]) -> str:
    """Our name -> the built-in's, for the tuners the built-in has in the form it has them. ``form_of`` maps a
    tuner module's path (``blocks.0.ffn_adapter``) to its form."""
    for builtin, ours, form, block in _rules():
        hit = _match(name, ours, block)
        if hit:
            module = hit[0] + ours.split('.')[0]
            if form is None or form_of.get(module) == form:
                return hit[0] + builtin + hit[1]
    return name


def has_builtin_tuner_name(name: str) -> bool:
    """Whether ``name`` (anywhere under a prefix) is a built-in tuner weight's name."""
    for builtin, _, _, block in _rules():
        pattern = (r'(^|\.)blocks\.\d+\.' if block else r'(^|\.)') + re.escape(builtin)
        if re.search(pattern, name):
            return True
    return False


def network_level_slots() -> Tuple[str, ...]:
    return tuple(cls.kind for cls in tuner_kinds().values() if cls.level == 'network')


def network_state_from_hub(ckpt: Mapping[str, Any]) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """A hub checkpoint -> (network state dict, {network key: form} for the keys that came under a built-in
    tuner name and so mean that form)."""
    state: Dict[str, torch.Tensor] = {}
    forms: Dict[str, str] = {}
    top = network_level_slots()
    for k, v in (ckpt.get('backbone_weight') or {}).items():
        ours, form = from_builtin_name(k)
        key = ours if ours.split('.', 1)[0] in top else 'backbone.' + ours
        state[key] = v
        if form is not None and ours != k:
            forms[key] = form
    for k, v in (ckpt.get('head_weight') or {}).items():
        state['head.' + k] = v
    return state, forms


def hub_from_network_state(state: Mapping[str, torch.Tensor], form_of: Mapping[str, str],
                           classes: Optional[List[str]] = None) -> Dict[str, Any]:
    """A network state dict -> the hub checkpoint dict; ``form_of`` maps tuner module paths relative to the
    backbone (``blocks.0.ffn_adapter``) or the network (``side``) to their form."""
    backbone, head = {}, {}
    top = network_level_slots()
    for k, v in state.items():
        t = v.detach().cpu().contiguous()
        if k.startswith('head.'):
            head[k[len('head.'):]] = t
        elif k.startswith('backbone.'):
            backbone[to_builtin_name(k[len('backbone.'):], form_of)] = t
        elif k.split('.', 1)[0] in top:
            backbone[to_builtin_name(k, form_of)] = t
        else:
            raise ValueError(f'{k!r} belongs to neither the backbone, a network-level tuner nor the head')
    obj: Dict[str, Any] = {'backbone_weight': backbone, 'head_weight': head}
    if classes is not None:
        obj['CLASSES'] = [str(c) for c in classes]
    return obj


def read_checkpoint(path: str) -> Dict[str, Any]:
    """Load a hub-layout ``pytorch_model.pt`` safely (``weights_only=True``: tensors, lists, dicts only). A
    trainer's whole-model state (``epoch_N.pth``: ``state_dict`` of ``model.backbone.*`` / ``model.head.*``) is
    turned into the hub layout."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint {path!r} does not exist')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the path and what was expected
        raise ValueError(f'checkpoint {path!r} could not be read as a weights-only torch file '
                         f'(expected the hub layout: backbone_weight, head_weight, CLASSES): {e}') from e
    if not isinstance(ckpt, dict):
        raise ValueError(f'checkpoint {path!r}: expected a dict with backbone_weight / head_weight, '
                         f'got {type(ckpt).__name__}')
    if 'backbone_weight' not in ckpt and 'head_weight' not in ckpt:
        inner = ckpt.get('state_dict', ckpt)
        if isinstance(inner, dict) and any(str(k).startswith(('backbone.', 'head.', 'model.')) for k in inner):
            meta = ckpt.get('meta') if isinstance(ckpt.get('meta'), dict) else {}
            return split_model_state(inner, ckpt.get('CLASSES', meta.get('CLASSES')))
        raise ValueError(f'checkpoint {path!r}: no backbone_weight / head_weight keys '
                         f'(found {sorted(map(str, ckpt))[:8]}...)')
    return ckpt


def split_model_state(state: Dict[str, torch.Tensor], classes: Optional[List[str]] = None) -> Dict[str, Any]:
    """A whole-network state dict (``backbone.*`` / ``head.*`` / ``side.*``, optionally under ``model.``) -> the
    hub layout."""
    state = {k[len('model.'):] if k.startswith('model.') else k: v for k, v in state.items()
             if isinstance(v, torch.Tensor)}
    top = network_level_slots()
    out: Dict[str, Any] = {
        'backbone_weight': {k[len('backbone.'):] if k.startswith('backbone.') else k: v for k, v in state.items()
                            if k.startswith('backbone.') or k.split('.', 1)[0] in top},
        'head_weight': {k[len('head.'):]: v for k, v in state.items() if k.startswith('head.')}}
    if classes is not None:
        out['CLASSES'] = list(classes)
    return out


def atomic_torch_save(obj: Any, path: str) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def write_checkpoint(path: str, state: Mapping[str, torch.Tensor], form_of: Mapping[str, str],
                     classes: Optional[List[str]] = None) -> None:
    """Save a network state dict in the hub layout with the built-in's names where it has the same tuner."""
    atomic_torch_save(hub_from_network_state(state, form_of, classes), path)


def read_configuration(model_dir: Optional[str], required: bool = True) -> Dict[str, Any]:
    """The ``configuration.json`` of a model folder as a dict: the one reader every caller uses. ``{}`` when the
    folder is None or has none and ``required`` is False; a ValueError naming the folder when it is required and
    missing, or names the file when it is not a JSON object."""
    path = os.path.join(model_dir, CONFIGURATION_FILE) if model_dir else None
    if path is None or not os.path.isfile(path):
        if required:
            raise ValueError(f'model folder {model_dir!r} has no {CONFIGURATION_FILE}')
        return {}
    return read_json_object(path)

