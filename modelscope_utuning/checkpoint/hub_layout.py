"""ModelScope's hub checkpoint layout for vision-efficient-tuning models.

``pytorch_model.pt`` holds ``{'backbone_weight': state dict, 'head_weight': {'fc.weight', 'fc.bias'},
'CLASSES': [names], optional 'backbone_cfg' / 'head_cfg'}``. The built-in names its tuners differently from us;
:func:`from_builtin_names` / :func:`to_builtin_names` translate, so the original-form tuners we save can be read
by the built-in and its checkpoints by us. Parallel tuners have no built-in counterpart and keep our names.
"""
from __future__ import annotations

import os
import re
from typing import Any, Dict, List, Optional

import torch

from ..fileio import atomic_write

CHECKPOINT_FILE = 'pytorch_model.pt'

# (built-in name, our name) of each tuner parameter the built-in has; inside ``blocks.N.`` for all but the
# side network. Both directions of the translation are derived from this one table.
_BLOCK_NAMES = [('adapter.ln1.', 'ffn_adapter.down.'), ('adapter.ln2.', 'ffn_adapter.up.'),
                ('attn.prefix.prefix_key', 'mha_prefix.key'), ('attn.prefix.prefix_value', 'mha_prefix.value'),
                ('attn.lora.', 'mha_lora.'), ('prompt.prompt_token', 'block_prompt.tokens')]
_TOP_NAMES = [('sidetune.side.', 'side.net.'), ('sidetune.alpha', 'side.alpha')]
# Modules whose built-in name means the sequential form (ours may be parallel under the same slot).
_TWO_FORM_MODULES = ('ffn_adapter', 'mha_prefix', 'block_prompt')


def _rules(reverse: bool):
    def pattern(name, block):
        exact = '' if name.endswith('.') else '$'
        return (r'^blocks\.(\d+)\.' if block else '^') + re.escape(name) + exact

    def replacement(name, block):
        return (r'blocks.\1.' if block else '') + name

    rules = []
    for table, block in ((_BLOCK_NAMES, True), (_TOP_NAMES, False)):
        for builtin, ours in table:
            src, dst = (ours, builtin) if reverse else (builtin, ours)
            rules.append((pattern(src, block), replacement(dst, block)))
    return rules


_BUILTIN_TO_OURS = _rules(reverse=False)
_OURS_TO_BUILTIN = _rules(reverse=True)


def _rename(name: str, rules) -> str:
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    return name


def from_builtin_names(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {_rename(k, _BUILTIN_TO_OURS): v for k, v in state.items()}


def to_builtin_names(state: Dict[str, torch.Tensor], sequential_only: Optional[set] = None) -> Dict[str, Any]:
    """Our backbone names -> the built-in's, for the tuners the built-in has (sequential ffn adapter,
    sequential mha prefix, mha LoRA, sequential block prompt, side-tuning); ``sequential_only`` names the
    modules (e.g. ``blocks.0.ffn_adapter``) whose form the built-in shares; other two-form tuners (parallel
    ones) keep our names, since the built-in would read them as its sequential tuner."""
    out = {}
    for k, v in state.items():
        two_form = any(f'.{m}.' in f'.{k}' for m in _TWO_FORM_MODULES)
        shared = not two_form or sequential_only is None or any(k.startswith(m + '.') for m in sequential_only)
        out[_rename(k, _OURS_TO_BUILTIN) if shared else k] = v
    return out


def read_checkpoint(path: str) -> Dict[str, Any]:
    """Load a hub-layout ``pytorch_model.pt`` safely (``weights_only=True``: tensors, lists, dicts only)."""
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
        if 'state_dict' in ckpt or any(k.startswith(('backbone.', 'head.')) for k in ckpt):
            return split_model_state(ckpt.get('state_dict', ckpt), ckpt.get('CLASSES'))
        raise ValueError(f'checkpoint {path!r}: no backbone_weight / head_weight keys '
                         f'(found {sorted(ckpt)[:8]}...)')
    return ckpt


def split_model_state(state: Dict[str, torch.Tensor], classes: Optional[List[str]] = None) -> Dict[str, Any]:
    """A whole-model state dict (``backbone.*`` / ``head.*``, e.g. a trainer's epoch file) -> hub layout."""
    state = {k[len('model.'):] if k.startswith('model.') else k: v for k, v in state.items()}
    out = {'backbone_weight': {k[len('backbone.'):]: v for k, v in state.items() if k.startswith('backbone.')},
           'head_weight': {k[len('head.'):]: v for k, v in state.items() if k.startswith('head.')}}
    if classes is not None:
        out['CLASSES'] = list(classes)
    return out


def atomic_torch_save(obj: Any, path: str) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def write_checkpoint(path: str, backbone_state: Dict[str, torch.Tensor], head_state: Dict[str, torch.Tensor],
                     classes: Optional[List[str]] = None, sequential_modules: Optional[set] = None) -> None:
    """Save in the hub layout with the built-in's names where the built-in has the same tuner."""
    obj: Dict[str, Any] = {
        'backbone_weight': {k: v.detach().cpu().contiguous()
                            for k, v in to_builtin_names(backbone_state, sequential_modules).items()},
        'head_weight': {k: v.detach().cpu().contiguous() for k, v in head_state.items()},
    }
    if classes is not None:
        obj['CLASSES'] = [str(c) for c in classes]
    atomic_torch_save(obj, path)
