"""Reading a weights file into a flat ``{name: tensor}`` map: ``.safetensors``, torch files (``weights_only=True``, their
``state_dict`` / ``model`` / ``backbone_weight`` ... containers unwrapped) and ``.npz`` (``allow_pickle=False``)."""
from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np
import torch

TORCH_EXTENSIONS = ('.bin', '.pth', '.pt', '.ckpt')
EXTENSIONS = ('.safetensors', '.npz') + TORCH_EXTENSIONS
# Containers unwrapped by read_state_dict, in order of preference.
CONTAINER_KEYS = ('backbone_weight', 'state_dict', 'model_state_dict', 'model', 'module', 'teacher', 'params')


def _few(keys, n: int = 8) -> str:
    keys = list(keys)
    return ', '.join(repr(k) for k in keys[:n]) + (f', ... ({len(keys)} in all)' if len(keys) > n else '')


class WeightsFileNotFoundError(FileNotFoundError, ValueError):
    """The pretrained weights file does not exist (a ValueError too, like every other loading problem)."""


def _is_tensor_map(obj: Any) -> bool:
    return isinstance(obj, Mapping) and any(isinstance(v, torch.Tensor) for v in obj.values())


def _unwrap(obj: Any, path: str) -> Tuple[Dict[str, torch.Tensor], Optional[str]]:
    """Descend through known containers to the tensor dict; returns (tensors, outermost container key).

    A mapping that holds tensors itself is the state dict; otherwise the first of :data:`CONTAINER_KEYS` that
    holds a mapping is opened (e.g. the hub layout's ``backbone_weight`` beside ``head_weight`` and ``CLASSES``).
    """
    outer = None
    for _ in range(4):
        if not isinstance(obj, Mapping) or _is_tensor_map(obj):
            break
        key = next((k for k in CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            break
        outer = outer or key
        obj = obj[key]
    if not isinstance(obj, Mapping):
        raise ValueError(f'pretrained weights {path!r}: expected a dict of tensors, got {type(obj).__name__}')
    state = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise ValueError(f'pretrained weights {path!r}: no tensors found (keys: {_few(list(obj))}; '
                         f'containers looked into: {CONTAINER_KEYS})')
    return state, outer


def _read(path: str) -> Tuple[Dict[str, torch.Tensor], Optional[str]]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsFileNotFoundError(f'pretrained weights file {path!r} does not exist')
    ext = os.path.splitext(path)[1].lower()
    if ext not in EXTENSIONS:
        raise ValueError(f'pretrained weights {path!r}: unknown extension {ext!r}; expected one of {EXTENSIONS}')
    what = 'a weights_only torch file' if ext in TORCH_EXTENSIONS else ext[1:]
    try:
        if ext == '.safetensors':
            from safetensors.torch import load_file
            obj = load_file(path, device='cpu')
        elif ext == '.npz':
            with np.load(path, allow_pickle=False) as z:
                obj = {k: torch.from_numpy(np.ascontiguousarray(z[k])) for k in z.files}
        else:
            obj = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the path and the format expected
        raise ValueError(f'pretrained weights {path!r} could not be read as {what}: {e}') from e
    return _unwrap(obj, path)


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """The tensors of a weights file (containers unwrapped, non-tensor entries dropped) on the CPU."""
    return _read(path)[0]
