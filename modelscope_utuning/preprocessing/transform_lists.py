"""ModelScope's ``image-classification-preprocessor`` transform lists, read onto our transforms.

:func:`build_modelscope_list` maps a list (``Rename``, ``load-image``, ``Resize``, ``CenterCrop``, ``RandomResizedCrop``,
``RandomHorizontalFlip``, ``ColorJitter``, ``ImageToTensor``, ``Normalize``, ``Filter``, ``ToTensor``, ``Identity``)
onto :mod:`.transforms`, working on dict items as ModelScope does. :func:`draws_random_numbers` tells whether a
transform (ours or a list) can give one image two outputs.
"""
from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image

from .image_io import load_image
from .transforms import (CenterCrop, ColorJitter, Compose, Normalize, RandomHorizontalFlip, RandomResizedCrop, Resize,
                         ResizeCenterCrop, ToTensor, to_tensor)

def _as_image(value: Any) -> Image.Image:
    return value if isinstance(value, Image.Image) and value.mode == 'RGB' else load_image(value)


class _ItemOp:
    """Apply an image transform to ``item[input_key]`` and store it under ``output_key`` (ModelScope's keys)."""

    def __init__(self, fn: Callable, input_key: Optional[str] = None, output_key: Optional[str] = None,
                 image_input: bool = True):
        self.fn, self.image_input = fn, image_input
        self.input_key, self.output_key = input_key or 'img', output_key or 'img'

    def __call__(self, item: Dict[str, Any]) -> Dict[str, Any]:
        if self.input_key not in item:
            raise ValueError(f'{self.fn!r}: the item has no {self.input_key!r} (keys: {sorted(item)}); '
                             "is a 'load-image' or 'Rename' step missing?")
        value = item[self.input_key]
        item[self.output_key] = self.fn(_as_image(value) if self.image_input else value)
        return item

    def __repr__(self):
        return repr(self.fn)


class _TensorOrImage:
    """ModelScope's ImageToTensor: a PIL image becomes (3, H, W) float in [0, 1]; a tensor becomes float."""

    def __call__(self, value: Any) -> torch.Tensor:
        if isinstance(value, torch.Tensor):
            return value.float() if value.is_floating_point() else value.float().div(255)
        return to_tensor(_as_image(value))

    def __repr__(self):
        return 'ImageToTensor()'


class _Rename:
    def __init__(self, input_keys: Sequence[str] = (), output_keys: Sequence[str] = ()):
        self.pairs = list(zip(input_keys, output_keys))

    def __call__(self, item):
        for src, dst in self.pairs:
            if src in item and dst not in item:
                item[dst] = item.pop(src)
        return item

    def __repr__(self):
        return f'Rename({self.pairs})'


class _Filter:
    def __init__(self, reserved_keys: Sequence[str]):
        self.keys = list(reserved_keys)

    def __call__(self, item):
        return {k: item[k] for k in self.keys if k in item}

    def __repr__(self):
        return f'Filter({self.keys})'


class _Identity:
    def __call__(self, item):
        return item

    def __repr__(self):
        return 'Identity()'


class _LoadImage:
    """ModelScope's load-image: ``item['img'] = RGB image of item['filename']``."""

    def __init__(self, mode: str = 'rgb', backend: str = 'pillow', max_pixels: Optional[int] = None):
        if str(mode).lower() != 'rgb':
            raise ValueError(f"load-image mode={mode!r}: only 'rgb' is supported (the model takes 3 channels)")
        self.max_pixels = max_pixels

    def __call__(self, item):
        if 'filename' not in item:
            raise ValueError(f"load-image: the item has no 'filename' (keys: {sorted(item)}); expected a "
                             "Rename of 'img_path:FILE' to 'filename' before it")
        item['img'] = load_image(item['filename'], self.max_pixels)
        return item

    def __repr__(self):
        return 'LoadImage()'


class _ToTensorKeys:
    """ModelScope's ToTensor: convert ``keys`` (all when None) to tensors; images become (3, H, W) in [0, 1]."""

    def __init__(self, keys: Optional[Sequence[str]] = None):
        self.keys = None if keys is None else list(keys)

    @staticmethod
    def _convert(v):
        if isinstance(v, torch.Tensor):
            return v
        if isinstance(v, Image.Image):
            return to_tensor(_as_image(v))
        if isinstance(v, np.ndarray):
            return torch.from_numpy(v)
        if isinstance(v, numbers.Number) and not isinstance(v, bool):
            return torch.tensor(v)
        return v

    def __call__(self, item):
        for k in (list(item) if self.keys is None else self.keys):
            if k in item:
                item[k] = self._convert(item[k])
        return item

    def __repr__(self):
        return f'ToTensor(keys={self.keys})'


_IMAGE_ARGS = {'input_key', 'output_key', 'backend'}
_LIST_OPS: Dict[str, Tuple[set, Callable]] = {
    'Rename': ({'input_keys', 'output_keys'}, lambda a: _Rename(a.get('input_keys', ()), a.get('output_keys', ()))),
    'load-image': ({'mode', 'backend'}, lambda a: _LoadImage(**a)),
    'Filter': ({'reserved_keys'}, lambda a: _Filter(a['reserved_keys'])),
    'ToTensor': ({'keys'}, lambda a: _ToTensorKeys(a.get('keys'))),
    'Identity': (set(), lambda a: _Identity()),
    'Resize': ({'size', 'interpolation'} | _IMAGE_ARGS,
               lambda a: Resize(a['size'], a.get('interpolation', 'bilinear'))),
    'CenterCrop': ({'size'} | _IMAGE_ARGS, lambda a: CenterCrop(a['size'])),
    'RandomResizedCrop': ({'size', 'scale', 'ratio', 'interpolation'} | _IMAGE_ARGS,
                          lambda a: RandomResizedCrop(a['size'], a.get('scale', (0.08, 1.0)),
                                                      a.get('ratio', (3 / 4, 4 / 3)),
                                                      a.get('interpolation', 'bilinear'))),
    'RandomHorizontalFlip': ({'p'} | _IMAGE_ARGS, lambda a: RandomHorizontalFlip(a.get('p', 0.5))),
    'ColorJitter': ({'brightness', 'contrast', 'saturation', 'hue'} | _IMAGE_ARGS,
                    lambda a: ColorJitter(**{k: v for k, v in a.items() if k not in _IMAGE_ARGS})),
    'ImageToTensor': (_IMAGE_ARGS, lambda a: _TensorOrImage()),
    'Normalize': ({'mean', 'std'} | _IMAGE_ARGS, lambda a: Normalize(a['mean'], a['std'])),
}
_REQUIRED = {'Filter': ('reserved_keys',), 'Resize': ('size',), 'CenterCrop': ('size',),
             'RandomResizedCrop': ('size',), 'Normalize': ('mean', 'std')}
_ON_ITEM_KEYS = {'Resize', 'CenterCrop', 'RandomResizedCrop', 'RandomHorizontalFlip', 'ColorJitter', 'ImageToTensor',
                 'Normalize'}
LIST_TYPES = tuple(_LIST_OPS)


def build_modelscope_list(entries: Sequence[Mapping], where: str = 'preprocessor',
                          max_pixels: Optional[int] = None) -> Compose:
    """A ModelScope transform list (``[{type: ..., ...}, ...]``) -> a Compose over dict items.

    ``backend`` is accepted and ignored: everything runs on PIL, so a list written for the cv2 backend gets PIL's
    resampling (the same sizes, slightly different pixels).
    """
    if not isinstance(entries, Sequence) or isinstance(entries, str):
        raise ValueError(f'{where}: expected a list of transforms, got {type(entries).__name__}')
    ops = []
    for i, entry in enumerate(entries):
        at = f'{where}[{i}]'
        if not isinstance(entry, Mapping) or 'type' not in entry:
            raise ValueError(f'{at}: expected a dict with a "type", got {entry!r}')
        args = {k: v for k, v in entry.items() if k != 'type'}
        kind = entry['type']
        if kind not in _LIST_OPS:
            raise ValueError(f'{at}: unknown transform type {kind!r}; supported: {list(LIST_TYPES)}')
        allowed, make = _LIST_OPS[kind]
        unknown = set(args) - allowed
        if unknown:
            raise ValueError(f'{at} ({kind}): unknown argument(s) {sorted(unknown)}; expected {sorted(allowed)}')
        missing = [k for k in _REQUIRED.get(kind, ()) if k not in args]
        if missing:
            raise ValueError(f'{at} ({kind}): missing argument(s) {missing}')
        op = make(args)
        if isinstance(op, _LoadImage):
            op.max_pixels = max_pixels
        if kind in _ON_ITEM_KEYS:
            op = _ItemOp(op, args.get('input_key'), args.get('output_key'),
                         image_input=kind not in ('Normalize', 'ImageToTensor'))
        ops.append(op)
    return Compose(_fuse_resize_crop(ops))


def _fuse_resize_crop(ops: List[Callable]) -> List[Callable]:
    """Adjacent Resize + CenterCrop on the same item key become one ResizeCenterCrop (bounded memory)."""
    out: List[Callable] = []
    for op in ops:
        prev = out[-1] if out else None
        if isinstance(op, _ItemOp) and isinstance(op.fn, CenterCrop) and isinstance(prev, _ItemOp) and \
                isinstance(prev.fn, Resize) and prev.output_key == op.input_key:
            fused = ResizeCenterCrop(prev.fn.size, op.fn.size, prev.fn.interpolation)
            out[-1] = _ItemOp(fused, prev.input_key, op.output_key, image_input=True)
            continue
        out.append(op)
    return out


_DETERMINISTIC = (Resize, ResizeCenterCrop, CenterCrop, ToTensor, Normalize, _TensorOrImage, _Rename, _Filter,
                  _Identity, _LoadImage, _ToTensorKeys)


def draws_random_numbers(transform: Any) -> Optional[bool]:
    """Whether ``transform`` (ours, a :class:`Compose` of ours, a ModelScope list) can give one input two outputs;
    None when it cannot be told (a callable of someone else's)."""
    if isinstance(transform, Compose):
        answers = [draws_random_numbers(t) for t in transform.transforms]
        return True if True in answers else None if None in answers else False
    if isinstance(transform, _ItemOp):
        return draws_random_numbers(transform.fn)
    if isinstance(transform, RandomResizedCrop):
        return True
    if isinstance(transform, RandomHorizontalFlip):
        return 0 < transform.p < 1
    if isinstance(transform, ColorJitter):
        return any(r is not None for r in (transform.brightness, transform.contrast, transform.saturation,
                                           transform.hue))
    return False if isinstance(transform, _DETERMINISTIC) else None
