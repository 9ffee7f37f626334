"""``VisionEfficientTuningPreprocessor``: dataset rows or bare images -> ``{'imgs': (3, H, W), 'labels': ()}``.

Configuration (the ``preprocessor`` section of configuration.json; every key optional)::

    {"type": "vision-efficient-tuning-preprocessor",
     "img_size": 224,              # crop size; default model.backbone.img_size
     "resize": 256,                # eval: shorter side before the center crop; default floor(img_size / crop_pct)
     "crop_pct": 0.875,
     "interpolation": "bilinear",  # nearest | bilinear | bicubic | lanczos | box | hamming
     "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
     "train": {"scale": [0.08, 1.0], "ratio": [0.75, 1.3333], "hflip": 0.5,
               "color_jitter": null, "interpolation": "bilinear",
               "augment": true},           # false: train on the evaluation transform (no random numbers drawn)
     "val": {"resize": 256, "crop_pct": 0.875, "interpolation": "bilinear"}}

``train`` / ``val`` may instead be ModelScope transform lists, as in its ``image-classification-preprocessor``
(``{"type": "image-classification-preprocessor", "train": [...], "val": [...]}``), which is read the same way.
"""
from __future__ import annotations

import copy
import numbers
from collections.abc import Mapping
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from modelscope.preprocessors.base import Preprocessor
from modelscope.utils.constant import ModeKeys
from modelscope.utils.logger import get_logger

from ..checkpoint.hub_layout import read_configuration
from ..registration import register_class
from .image_io import IMAGE_KEYS, ImageInputError, describe, load_image
from .transform_lists import build_modelscope_list, draws_random_numbers
from .transforms import IMAGENET_MEAN, IMAGENET_STD, Compose, eval_transform, interpolation_of, train_transform

logger = get_logger()

OUR_TYPE = 'vision-efficient-tuning-preprocessor'
MODELSCOPE_TYPE = 'image-classification-preprocessor'
MODES = (ModeKeys.TRAIN, ModeKeys.EVAL, ModeKeys.INFERENCE)
TRAIN_KEYS = ('scale', 'ratio', 'hflip', 'color_jitter', 'interpolation', 'augment')
EVAL_KEYS = ('resize', 'crop_pct', 'interpolation')
LABEL_KEYS = ('label', 'labels')
# Keys ModelScope's own builders may hand a preprocessor; they carry nothing for us.
TOLERATED_KEYS = ('training',)
DEFAULT_IMG_SIZE = 224


class VisionEfficientTuningPreprocessor(Preprocessor):
    """Rows / images -> model inputs; ``self.mode == ModeKeys.TRAIN`` picks the train transform, else eval.

    Args:
        mode: ``ModeKeys.TRAIN`` | ``EVAL`` | ``INFERENCE``.
        img_size: output crop (int or [h, w]); default ``model.backbone.img_size`` read from ``model_dir``, else 224.
        resize, crop_pct, interpolation, mean, std: see the module docstring.
        train, val: a dict of options (``TRAIN_KEYS`` / ``EVAL_KEYS``) or a ModelScope transform list.
        model_dir: the model folder (only read for img_size when none is given).
        max_pixels: images above this many pixels are refused (default: PIL's ``Image.MAX_IMAGE_PIXELS``).
    """

    def __init__(self, mode: str = ModeKeys.INFERENCE, img_size: Union[int, Sequence[int], None] = None,
                 resize: Union[int, Sequence[int], None] = None, crop_pct: Optional[float] = None,
                 interpolation: str = 'bilinear', mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, train: Any = None, val: Any = None,
                 model_dir: Optional[str] = None, max_pixels: Optional[int] = None, **kwargs):
        kwargs.pop('type', None)
        unknown = sorted(set(kwargs) - set(TOLERATED_KEYS))
        if unknown:
            raise ValueError(f'preprocessor: unknown key(s) {unknown}; expected img_size, resize, crop_pct, '
                             'interpolation, mean, std, train, val')
        if mode not in MODES:
            raise ValueError(f'preprocessor mode={mode!r}: expected one of {list(MODES)}')
        super().__init__(mode=mode)
        self.model_dir = model_dir
        if img_size is None:
            img_size = _backbone_img_size(_read_config(model_dir)) if model_dir else DEFAULT_IMG_SIZE
        self.img_size = img_size
        self.max_pixels = max_pixels
        interpolation_of(interpolation)
        shared = dict(img_size=img_size, interpolation=interpolation, mean=mean, std=std)
        self.eval_transform = self._build('val', val, shared, dict(resize_to=resize, crop_pct=crop_pct))
        self.train_transform = self._build('train', train, shared, {})

    def _build(self, name: str, spec: Any, shared: Dict[str, Any], eval_extra: Dict[str, Any]) -> Compose:
        if isinstance(spec, (list, tuple)):
            return build_modelscope_list(spec, where=f'preprocessor.{name}', max_pixels=self.max_pixels)
        if spec is not None and not isinstance(spec, Mapping):
            raise ValueError(f'preprocessor.{name}: expected a dict of options or a transform list, got '
                             f'{type(spec).__name__}')
        opts = dict(spec or {})
        allowed = TRAIN_KEYS if name == 'train' else EVAL_KEYS
        unknown = sorted(set(opts) - set(allowed))
        if unknown:
            raise ValueError(f'preprocessor.{name}: unknown key(s) {unknown}; expected {list(allowed)}')
        if name == 'train':
            augment = opts.pop('augment', True)
            if not isinstance(augment, bool):
                raise ValueError(f'preprocessor.train.augment={augment!r}: expected true or false')
            if not augment:
                if opts:
                    raise ValueError(f'preprocessor.train.augment=false trains on the evaluation transform; '
                                     f'the augmentation key(s) {sorted(opts)} would be ignored: remove them')
                return self.eval_transform
            return train_transform(**{**shared, **opts})
        if 'resize' in opts:
            opts['resize_to'] = opts.pop('resize')
        return eval_transform(**{**shared, **eval_extra, **{k: v for k, v in opts.items() if v is not None}})

    def train_is_random(self) -> Optional[bool]:
        """Whether the training transform can give one image two outputs (None: cannot be told)."""
        return draws_random_numbers(self.train_transform)

    @property
    def output_size(self) -> Optional[Tuple[int, int]]:
        """(H, W) of the eval output when it is known without running (None for ModelScope lists)."""
        return self.eval_transform.output_size

    @classmethod
    def from_model_dir(cls, model_dir: Optional[str] = None, cfg: Any = None, mode: str = ModeKeys.INFERENCE,
                       img_size: Union[int, Sequence[int], None] = None, **overrides
                       ) -> 'VisionEfficientTuningPreprocessor':
        """Build from configuration.json (``cfg``: the whole configuration as a dict / ModelScope Config, read
        from ``model_dir`` when None). The ``preprocessor`` section may be ours, ModelScope's
        ``image-classification-preprocessor``, per-mode ``{train: {type...}, val: {type...}}``, or absent.
        ``img_size`` (e.g. the loaded model's) wins over the section's, which wins over ``model.backbone``'s."""
        full = _read_config(model_dir) if cfg is None else _to_dict(cfg)
        section = _select_section(full.get('preprocessor'), mode)
        kind = section.pop('type', None)
        if kind not in (None, OUR_TYPE, MODELSCOPE_TYPE):
            raise ValueError(f'configuration.json preprocessor.type={kind!r} is not supported; expected '
                             f'{OUR_TYPE!r}, {MODELSCOPE_TYPE!r} or no preprocessor section')
        section.pop('mode', None)  # the caller's mode wins (ModelScope saves 'inference' here)
        section.pop('model_dir', None)
        own = section.pop('img_size', None)
        if img_size is None:
            img_size = own if own is not None else _backbone_img_size(full)
        elif own is not None and _as_pair(own) != _as_pair(img_size):
            logger.warning(f'preprocessor.img_size={own} differs from the model\'s {img_size}; using {img_size}')
        section.update(overrides)
        return cls(mode=mode, img_size=img_size, model_dir=model_dir, **section)

    # -- calling ---------------------------------------------------------------------------------------------------
    def __call__(self, data: Any, **kwargs) -> Dict[str, torch.Tensor]:
        """``data``: a row dict (``'img_path:FILE'`` or ``'image'``, optional ``'label'`` / ``'labels'``) or a bare
        image (see :func:`load_image`). Returns ``{'imgs': float32 (3, H, W)}`` plus ``'labels'``: int64 scalar
        when the row has a label."""
        row = _as_row(data)
        label = _label_of(row)
        transform = self.train_transform if self.mode == ModeKeys.TRAIN else self.eval_transform
        if transform.output_size is None:  # a ModelScope list: it works on the row dict
            item = {k: v for k, v in row.items()}
            if item.get('img_path:FILE') is None:  # the lists start from 'img_path:FILE'
                item['img_path:FILE'] = item.pop('image')
            out = transform(item)
            imgs = out.get('imgs', out.get('img')) if isinstance(out, Mapping) else None
            where = f'the configured {"train" if self.mode == ModeKeys.TRAIN else "val"} transform list'
        else:
            imgs = transform(load_image(data if not isinstance(data, Mapping) else row, self.max_pixels))
            where = 'the transform'
        if not (isinstance(imgs, torch.Tensor) and imgs.ndim == 3 and imgs.shape[0] == 3
                and imgs.is_floating_point()):
            got = f'{type(imgs).__name__} {tuple(imgs.shape)}' if isinstance(imgs, torch.Tensor) else repr(type(imgs))
            raise ValueError(f"{where} must produce 'imgs' (or 'img') as a float (3, H, W) tensor; got {got}")
        result = {'imgs': imgs.float()}
        if label is not None:
            result['labels'] = label
        return result

    def __repr__(self):
        return (f'{type(self).__name__}(mode={self.mode!r}, img_size={self.img_size}, '
                f'eval={self.eval_transform!r}, train={self.train_transform!r})')


# -- helpers -----------------------------------------------------------------------------------------------------------
def _as_pair(size: Any) -> Any:
    if isinstance(size, numbers.Integral):
        return (int(size), int(size))
    if isinstance(size, (list, tuple)) and len(size) == 1:
        return (size[0], size[0])
    return tuple(size) if isinstance(size, (list, tuple)) else size


def _to_dict(cfg: Any) -> Dict[str, Any]:
    if hasattr(cfg, 'to_dict'):
        cfg = cfg.to_dict()
    if not isinstance(cfg, Mapping):
        raise ValueError(f'cfg: expected the configuration as a dict or ModelScope Config, got {type(cfg).__name__}')
    return copy.deepcopy(dict(cfg))


def _read_config(model_dir: Optional[str]) -> Dict[str, Any]:
    return {} if model_dir is None else read_configuration(model_dir)


def _backbone_img_size(cfg: Mapping) -> Union[int, Sequence[int]]:
    model = cfg.get('model') if isinstance(cfg, Mapping) else None
    backbone = model.get('backbone') if isinstance(model, Mapping) else None
    size = backbone.get('img_size') if isinstance(backbone, Mapping) else None
    return DEFAULT_IMG_SIZE if size is None else size


def _select_section(section: Any, mode: str) -> Dict[str, Any]:
    if section is None:
        return {}
    if hasattr(section, 'to_dict'):
        section = section.to_dict()
    if not isinstance(section, Mapping):
        raise ValueError(f'configuration.json preprocessor: expected a dict, got {type(section).__name__}')
    section = copy.deepcopy(dict(section))
    per_mode = 'type' not in section and any(isinstance(section.get(k), Mapping) and 'type' in section[k]
                                             for k in ('train', 'val'))
    if per_mode:  # ModelScope's {train: {type: ...}, val: {type: ...}} form: one sub-section per mode
        sub = section.get('train' if mode == ModeKeys.TRAIN else 'val')
        return copy.deepcopy(dict(sub)) if isinstance(sub, Mapping) else {}
    return section


def _as_row(data: Any) -> Mapping:
    if isinstance(data, Mapping):
        if not any(k in data and data[k] is not None for k in IMAGE_KEYS):
            present = [k for k in IMAGE_KEYS if k in data]
            what = f'{present[0]!r} is None' if present else f'no image key; expected one of {list(IMAGE_KEYS)}'
            raise ImageInputError(f'{describe(data)}: {what}')
        return data
    if data is None:
        raise ImageInputError('image input is None; expected an image or a row dict with '
                              f'{list(IMAGE_KEYS)}')
    return {'img_path:FILE': data}


def _label_of(row: Mapping) -> Optional[torch.Tensor]:
    for key in LABEL_KEYS:
        if key in row and row[key] is not None:
            return _to_label(row[key], key)
    return None


def _to_label(value: Any, key: str) -> torch.Tensor:
    v = value
    if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.is_floating_point() and v.dtype != torch.bool:
        v = v.reshape(-1)[0].item()
    elif isinstance(v, np.ndarray) and v.size == 1 and v.dtype.kind in 'iu':
        v = v.reshape(-1)[0].item()
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral) or int(v) < 0:
        shown = repr(value) if isinstance(value, (numbers.Number, str)) else describe(value)
        raise ValueError(f'row[{key!r}]={shown}: expected a non-negative integer class index')
    return torch.tensor(int(v), dtype=torch.long)


register_class(VisionEfficientTuningPreprocessor)
