"""The eval preprocessing as data: what ``preprocessing.json`` (written beside an ONNX export) holds, so that a
runtime without this package prepares the same float32 tensor as ``pipeline()``.

It is computed from the preprocessor the pipeline itself builds from configuration.json (ours, or ModelScope's
``image-classification-preprocessor`` transform lists of a hub-layout model), so every model gets one. Schema
(``schema: "modelscope-utuning/preprocessing"``, ``schema_version: 2``)::

    {"schema": ..., "schema_version": 2,
     "written_by": {"package": "modelscope-utuning", "version": "...", "pillow": "..."},
     "input": {"name": "imgs", "shape": ["batch", 3, H, W], "dtype": "float32", "layout": "NCHW"},
     "classes": [...] | null,
     "load": {...},      # image -> 8-bit RGB (below)
     "steps": [...],     # 8-bit RGB -> float32 (3, H, W), in order (below)
     "left_out": [...]}  # what the file does not describe

``load`` (:mod:`.image_io`'s rules, the table its code dispatches on):

- ``decode``: files, bytes and URLs are decoded with Pillow (``Image.open`` + ``load()``); the mode rules below
  apply to the mode Pillow decodes to (e.g. a 16-bit gray PNG is ``I;16``, a 16-bit RGB PNG is already 8-bit RGB);
- ``exif_orientation``: applied to encoded inputs and to a ``PIL.Image`` fresh from ``Image.open`` (its
  ``format`` is set), never to arrays or images made in memory: orientation = ``Image.getexif()[0x0112]``, and
  ``transpose`` maps it to the ``Image.Transpose`` member applied (1 or absent: nothing);
- ``modes``: per PIL mode, a rule (``channels`` / ``bilevel`` / ``palette`` / ``scale`` / ``clip`` / ``float`` /
  ``cmyk`` / ``pillow_convert``) and its parameters (see :data:`.image_io.MODE_RULES` for their meaning);
  ``other_modes`` covers every mode not listed; ``float_rule`` is the float rule;
- ``arrays``: numpy inputs (OpenCV layout): which channels become R, G, B, and the dtype rules;
- ``limits``: inputs above ``max_pixels`` (width x height) are refused, as is a plain resize above
  ``max_resized_pixels``.

``steps`` (``op``):

- ``resize_center_crop``: ``resize`` (``{"shorter_side": S}`` or ``{"height": H, "width": W}``) then
  ``crop`` ``{"height", "width"}`` with Pillow filter ``interpolation`` (``pillow_filter``: its number). The
  resized size of a ``w x h`` image: shorter side S: ``(S, floor(S * h / w))`` when ``w <= h``, else
  ``(floor(S * w / h), S)`` (integer floor division). If ``new_w * new_h <= region_above * crop_w * crop_h`` or
  the crop is larger than the resized image: ``img.resize((new_w, new_h), filter)`` (skipped when the size is
  unchanged) then ``center_crop``; otherwise only the cropped region is resampled:
  ``top = round_half_even((new_h - crop_h) / 2)``, ``left`` likewise,
  ``img.resize((crop_w, crop_h), filter, box=(left * w / new_w, top * h / new_h, (left + crop_w) * w / new_w,
  (top + crop_h) * h / new_h))`` (float64).
- ``resize``: the resize alone (same size rule; skipped when the size is unchanged).
- ``center_crop``: ``top = round_half_even((h - crop_h) / 2)`` when ``crop_h <= h``, else ``-((crop_h - h) // 2)``
  (``left`` likewise); ``img.crop((left, top, left + crop_w, top + crop_h))``: pixels outside the image are 0.
- ``to_float``: uint8 HWC -> float32 CHW, ``x / 255`` in float32.
- ``normalize``: ``(x - mean[c]) / std[c]`` in float32 (``mean`` / ``std`` are written as the float32 values).

Then the (3, H, W) tensors are stacked along a batch axis. :func:`describe` refuses (ValueError naming the step) an
eval transform it cannot describe exactly (a random augmentation in the eval list), rather than write a file that
would be wrong.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import PIL
from PIL import Image

from .. import __version__
from . import image_io
from .transform_lists import _Filter, _Identity, _ItemOp, _LoadImage, _Rename, _TensorOrImage, _ToTensorKeys
from .transforms import (INTERPOLATIONS, MAX_RESIZED_PIXELS, CenterCrop, Compose, Normalize, Resize,
                         ResizeCenterCrop, ToTensor)

SCHEMA = 'modelscope-utuning/preprocessing'
SCHEMA_VERSION = 2
# resize_center_crop resamples only the cropped region when the resized image has more than this many times the
# crop's pixels (transforms.resize_center_crop)
REGION_ABOVE = 4
LEFT_OUT = [
    'decoding itself: the pixels of a compressed file are those Pillow decodes (another JPEG decoder may differ by '
    'a level or two; a 16-bit RGB PNG is decoded to 8-bit RGB by Pillow)',
    'URL downloads (timeouts, size limit) and the error messages of refused inputs',
    "ModelScope's dict inputs ({'img_path:FILE': ...} / {'image': ...}) are the image they hold",
]


def _filter_name(value: int) -> str:
    return {v: k for k, v in INTERPOLATIONS.items()}[value]


def _size(size: Any) -> Dict[str, int]:
    if isinstance(size, Sequence) and not isinstance(size, str) and len(size) == 2:
        return {'height': int(size[0]), 'width': int(size[1])}
    return {'shorter_side': int(size[0] if isinstance(size, Sequence) else size)}


def _step(t: Any) -> Optional[Dict[str, Any]]:
    """One transform as a step; None for dict plumbing (ModelScope's Rename, Filter, ...); ValueError when it
    cannot be described."""
    if isinstance(t, _ItemOp):
        t = t.fn
    if isinstance(t, (_Rename, _Filter, _Identity, _ToTensorKeys, _LoadImage)):
        return None  # keys of the row dict; load-image is the loader described under "load"
    if isinstance(t, ResizeCenterCrop):
        return {'op': 'resize_center_crop', 'resize': _size(t.size),
                'crop': {'height': t.crop[0], 'width': t.crop[1]},
                'interpolation': _filter_name(t.interpolation), 'pillow_filter': int(t.interpolation),
                'region_above': REGION_ABOVE}
    if isinstance(t, Resize):
        return {'op': 'resize', 'resize': _size(t.size), 'interpolation': _filter_name(t.interpolation),
                'pillow_filter': int(t.interpolation)}
    if isinstance(t, CenterCrop):
        return {'op': 'center_crop', 'height': t.size[0], 'width': t.size[1]}
    if isinstance(t, (ToTensor, _TensorOrImage)):
        return {'op': 'to_float', 'divide_by': 255, 'dtype': 'float32', 'layout': 'CHW'}
    if isinstance(t, Normalize):
        return {'op': 'normalize', 'mean': list(t.mean), 'std': list(t.std), 'dtype': 'float32'}
    raise ValueError(f'the eval preprocessing step {t!r} cannot be written to preprocessing.json (it is random or '
                     'unknown to the description); use a deterministic eval transform (resize, center crop, '
                     'to tensor, normalize)')


def describe_steps(transform: Compose) -> List[Dict[str, Any]]:
    """The eval transform (ours or a ModelScope list) as steps (see the module docstring)."""
    steps = [s for s in (_step(t) for t in transform.transforms) if s is not None]
    ops = [s['op'] for s in steps]
    if 'to_float' not in ops:
        raise ValueError(f'the eval preprocessing {transform!r} has no to-tensor step; expected ImageToTensor')
    return steps


def describe_loading(max_pixels: Optional[int] = None) -> Dict[str, Any]:
    """How any accepted input becomes 8-bit RGB (:mod:`.image_io`), as data."""
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    return {
        'order': ['decode', 'exif_orientation', 'modes'],
        'decode': {'library': 'Pillow', 'call': 'Image.open(file); image.load()'},
        'exif_orientation': {
            'applies_to': ['files, bytes and URLs', 'a PIL.Image straight from Image.open (its format is set)'],
            'not_applied_to': ['numpy arrays', 'PIL images made in memory (format None)'],
            'tag': image_io.EXIF_ORIENTATION_TAG, 'read_with': 'Image.getexif()',
            'transpose': {str(k): v for k, v in image_io.EXIF_TRANSPOSE.items()},
            'on_unreadable_exif': 'not applied (a warning)'},
        'modes': {m: dict(r) for m, r in image_io.MODE_RULES.items()},
        'other_modes': dict(image_io.OTHER_MODES),
        'float_rule': dict(image_io.FLOAT_RULE),
        'arrays': {
            'shapes': ['HxW gray', 'HxWx1 gray', 'HxWx3 BGR', 'HxWx4 BGRA'],
            'rgb_from_channels': {'HxW': image_io.GRAY, 'HxWx1': image_io.GRAY,
                                  'HxWx3': image_io.ARRAY_CHANNELS[3], 'HxWx4': image_io.ARRAY_CHANNELS[4]},
            'alpha': 'dropped (no compositing)',
            'dtypes': {'uint8': 'as is',
                       'other integers': 'every value must lie in 0..255 (else refused), then cast to uint8',
                       'floats': 'float_rule', 'others (bool, complex, object)': 'refused'},
            'exif_orientation': False},
        'limits': {'max_pixels': limit, 'max_resized_pixels': MAX_RESIZED_PIXELS},
    }


def describe(preprocessor, input_shape: Sequence[int], classes: Optional[Sequence[str]] = None,
             input_name: str = 'imgs') -> Dict[str, Any]:
    """The whole preprocessing.json for ``preprocessor`` (the pipeline's eval preprocessor) feeding an input of
    ``input_shape`` (H, W). ValueError when a step cannot be described or the steps end at another size."""
    steps = describe_steps(preprocessor.eval_transform)
    out_hw = _output_size(steps)
    h, w = int(input_shape[0]), int(input_shape[1])
    if out_hw is not None and out_hw != (h, w):
        raise ValueError(f'the eval preprocessing ends at {out_hw[0]}x{out_hw[1]} but the model takes {h}x{w}; fix '
                         'the preprocessor section of configuration.json')
    if out_hw is None:
        raise ValueError('the eval preprocessing has no crop or fixed-size resize, so its output size depends on the '
                         f'image; the model takes {h}x{w}')
    return {'schema': SCHEMA, 'schema_version': SCHEMA_VERSION,
            'written_by': {'package': 'modelscope-utuning', 'version': __version__, 'pillow': PIL.__version__},
            'input': {'name': input_name, 'shape': ['batch', 3, h, w], 'dtype': 'float32', 'layout': 'NCHW'},
            'classes': list(classes) if classes is not None else None,
            'load': describe_loading(getattr(preprocessor, 'max_pixels', None)),
            'steps': steps, 'left_out': list(LEFT_OUT)}


def _output_size(steps: List[Dict[str, Any]]) -> Optional[tuple]:
    size = None
    for s in steps:
        if s['op'] == 'resize_center_crop':
            size = (s['crop']['height'], s['crop']['width'])
        elif s['op'] == 'resize':
            size = (s['resize']['height'], s['resize']['width']) if 'height' in s['resize'] else None
        elif s['op'] == 'center_crop':
            size = (s['height'], s['width'])
    return size


__all__ = ['SCHEMA', 'SCHEMA_VERSION', 'describe', 'describe_loading', 'describe_steps']
