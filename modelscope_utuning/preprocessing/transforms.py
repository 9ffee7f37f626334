"""Image transforms with pillow + torch only, giving torchvision's numbers on PIL images.

Eval: resize the shorter side (bilinear) -> center crop -> tensor in [0, 1] -> ImageNet normalisation; the same
floats as torchvision's ``Resize(256) / CenterCrop(224) / ToTensor / Normalize``, which on a PIL image call
``Image.resize`` with the same filter and sizes. Train: torchvision's ``RandomResizedCrop`` sampling (with torch's
global RNG, so a seeded run picks the same crops) + horizontal flip, optional colour jitter.

ModelScope's transform lists are read onto these by :mod:`.transform_lists`.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, Callable, List, Optional, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageEnhance

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_CROP_PCT = 0.875  # 224 / 256
INTERPOLATIONS = {
    'nearest': Image.NEAREST, 'bilinear': Image.BILINEAR, 'bicubic': Image.BICUBIC,
    'lanczos': Image.LANCZOS, 'box': Image.BOX, 'hamming': Image.HAMMING,
}
Size = Union[int, Sequence[int]]


def interpolation_of(name: Union[str, int]) -> int:
    """PIL resampling filter for ``'bilinear'`` etc. (a PIL filter constant passes through)."""
    if isinstance(name, str) and name.lower() in INTERPOLATIONS:
        return INTERPOLATIONS[name.lower()]
    if isinstance(name, int) and not isinstance(name, bool) and name in INTERPOLATIONS.values():
        return name
    raise ValueError(f'interpolation={name!r}: expected one of {sorted(INTERPOLATIONS)}')


def resize_for(img_size: int, crop_pct: float = DEFAULT_CROP_PCT) -> int:
    """Shorter side before the eval center crop: ``floor(img_size / crop_pct)`` as timm (224 -> 256, 384 -> 438)."""
    if not 0 < crop_pct <= 1:
        raise ValueError(f'crop_pct={crop_pct!r}: expected 0 < crop_pct <= 1')
    return int(math.floor(img_size / crop_pct + 1e-9))  # the epsilon keeps exact quotients exact


def _pair(size: Size, name: str) -> Tuple[int, int]:
    """int -> (s, s); [s] -> (s, s); [h, w] -> (h, w)."""
    if isinstance(size, numbers.Integral) and not isinstance(size, bool):
        size = (int(size), int(size))
    elif isinstance(size, Sequence) and not isinstance(size, str) and len(size) == 1:
        size = (size[0], size[0])
    if not (isinstance(size, Sequence) and len(size) == 2
            and all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s > 0 for s in size)):
        raise ValueError(f'{name}={size!r}: expected a positive int or [height, width]')
    return int(size[0]), int(size[1])


def shorter_side_size(width: int, height: int, size: int) -> Tuple[int, int]:
    """(new_w, new_h) with the shorter side = ``size``; the longer side truncated with int() as torchvision."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


# A resize that would produce more pixels than this is refused (a shorter-side resize of an image of extreme aspect
# ratio grows its long side without bound: 1 x 100000 px to a shorter side of 256 is 6.5 gigapixels). Resize +
# CenterCrop pairs never get there: they only compute the crop (ResizeCenterCrop).
MAX_RESIZED_PIXELS = 1 << 26


def _resized_size(w: int, h: int, size: Size) -> Tuple[int, int]:
    if isinstance(size, Sequence) and not isinstance(size, str) and len(size) == 2:
        new_h, new_w = _pair(size, 'size')
        return new_w, new_h
    return shorter_side_size(w, h, _pair(size, 'size')[0])


def resize(img: Image.Image, size: Size, interpolation: Union[str, int] = 'bilinear') -> Image.Image:
    """int (or [int]): shorter side to ``size``, aspect kept; [h, w]: exactly that size."""
    w, h = img.size
    new_w, new_h = _resized_size(w, h, size)
    if (new_w, new_h) == (w, h):
        return img
    if new_w * new_h > MAX_RESIZED_PIXELS:
        raise ValueError(f'resizing a {w}x{h} image to {new_w}x{new_h} would make {new_w * new_h:,} pixels (limit '
                         f'{MAX_RESIZED_PIXELS:,}): an image of extreme aspect ratio; crop it first')
    return img.resize((new_w, new_h), interpolation_of(interpolation))


def resize_center_crop(img: Image.Image, size: Size, crop: Size,
                       interpolation: Union[str, int] = 'bilinear') -> Image.Image:
    """``center_crop(resize(img, size), crop)``, computing only the cropped region when the resized image would be
    much larger than the crop (more than 4x its pixels): PIL's resampling of that region (``resize(box=...)``) with
    the full resize's scale per axis, so memory stays bounded whatever the aspect ratio. Otherwise the plain
    resize-then-crop runs, which gives torchvision's pixels exactly."""
    w, h = img.size
    new_w, new_h = _resized_size(w, h, size)
    th, tw = _pair(crop, 'crop')
    if new_w * new_h <= 4 * tw * th or tw > new_w or th > new_h:
        return center_crop(resize(img, size, interpolation), crop)
    top = int(round((new_h - th) / 2.0))
    left = int(round((new_w - tw) / 2.0))
    sx, sy = w / new_w, h / new_h  # source pixels per resized pixel, per axis
    box = (left * sx, top * sy, (left + tw) * sx, (top + th) * sy)
    return img.resize((tw, th), interpolation_of(interpolation), box=box)


def center_crop(img: Image.Image, size: Size) -> Image.Image:
    """Center crop to ``size``; an image smaller than the crop is zero-padded first (torchvision's offsets)."""
    th, tw = _pair(size, 'size')
    w, h = img.size
    # torchvision pads (crop - image) // 2 on the left/top and then crops at 0 along a padded axis; PIL's crop
    # outside the image fills with zeros, which is the same picture.
    top = -((th - h) // 2) if th > h else int(round((h - th) / 2.0))
    left = -((tw - w) // 2) if tw > w else int(round((w - tw) / 2.0))
    return img.crop((left, top, left + tw, top + th))


def random_resized_crop_params(width: int, height: int, scale: Sequence[float] = (0.08, 1.0),
                               ratio: Sequence[float] = (3 / 4, 4 / 3)) -> Tuple[int, int, int, int]:
    """(top, left, h, w) sampled exactly as torchvision's ``RandomResizedCrop.get_params`` (torch global RNG)."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = torch.randint(0, height - h + 1, size=(1,)).item()
            left = torch.randint(0, width - w + 1, size=(1,)).item()
            return top, left, h, w
    # ten misses: the largest central crop within the ratio range
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 (3, H, W) in [0, 1] (uint8 / 255, as torchvision's ToTensor)."""
    if img.mode != 'RGB':
        img = img.convert('RGB')
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous().to(torch.float32).div(255)


def normalize(t: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(t - mean) / std per channel, float32 (new tensor)."""
    m = torch.as_tensor(mean, dtype=t.dtype).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=t.dtype).view(-1, 1, 1)
    return t.sub(m).div(s)


def _mean_std(mean: Sequence[float], std: Sequence[float]) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    for name, v in (('mean', mean), ('std', std)):
        if not (isinstance(v, Sequence) and len(v) == 3 and all(isinstance(x, numbers.Real) for x in v)):
            raise ValueError(f'{name}={v!r}: expected 3 numbers (R, G, B)')
    if any(float(x) == 0 for x in std):
        raise ValueError(f'std={std!r}: must not contain 0')
    # float32 values, as the built-in's np.float32 arrays give torchvision
    return (tuple(float(np.float32(x)) for x in mean), tuple(float(np.float32(x)) for x in std))


# -- transform objects (callables on PIL images, then on tensors) --------------------------------------------------
class Resize:
    def __init__(self, size: Size, interpolation: Union[str, int] = 'bilinear'):
        _pair(size, 'Resize.size')
        self.size, self.interpolation = size, interpolation_of(interpolation)

    def __call__(self, img: Image.Image) -> Image.Image:
        return resize(img, self.size, self.interpolation)

    def __repr__(self):
        return f'Resize(size={self.size}, interpolation={self.interpolation})'


class ResizeCenterCrop:
    """``Resize(size)`` then ``CenterCrop(crop)`` in one step, in bounded memory (see :func:`resize_center_crop`)."""

    def __init__(self, size: Size, crop: Size, interpolation: Union[str, int] = 'bilinear'):
        _pair(size, 'Resize.size')
        self.size, self.crop = size, _pair(crop, 'CenterCrop.size')
        self.interpolation = interpolation_of(interpolation)

    def __call__(self, img: Image.Image) -> Image.Image:
        return resize_center_crop(img, self.size, self.crop, self.interpolation)

    def __repr__(self):
        return f'Resize(size={self.size}, interpolation={self.interpolation}), CenterCrop(size={self.crop})'


class CenterCrop:
    def __init__(self, size: Size):
        self.size = _pair(size, 'CenterCrop.size')

    def __call__(self, img: Image.Image) -> Image.Image:
        return center_crop(img, self.size)

    def __repr__(self):
        return f'CenterCrop(size={self.size})'


class RandomResizedCrop:
    def __init__(self, size: Size, scale: Sequence[float] = (0.08, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                 interpolation: Union[str, int] = 'bilinear'):
        self.size = _pair(size, 'RandomResizedCrop.size')
        for name, v in (('scale', scale), ('ratio', ratio)):
            if not (isinstance(v, Sequence) and len(v) == 2 and 0 < float(v[0]) <= float(v[1])):
                raise ValueError(f'RandomResizedCrop.{name}={v!r}: expected [low, high] with 0 < low <= high')
        self.scale, self.ratio = (float(scale[0]), float(scale[1])), (float(ratio[0]), float(ratio[1]))
        self.interpolation = interpolation_of(interpolation)

    def __call__(self, img: Image.Image) -> Image.Image:
        top, left, h, w = random_resized_crop_params(img.size[0], img.size[1], self.scale, self.ratio)
        img = img.crop((left, top, left + w, top + h))
        return resize(img, list(self.size), self.interpolation)

    def __repr__(self):
        return f'RandomResizedCrop(size={self.size}, scale={self.scale}, ratio={self.ratio})'


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        if not 0 <= float(p) <= 1:
            raise ValueError(f'RandomHorizontalFlip.p={p!r}: expected 0 <= p <= 1')
        self.p = float(p)

    def __call__(self, img: Image.Image) -> Image.Image:
        if torch.rand(1) < self.p:  # one draw per call, as torchvision
            return img.transpose(Image.FLIP_LEFT_RIGHT)
        return img

    def __repr__(self):
        return f'RandomHorizontalFlip(p={self.p})'


class ColorJitter:
    """Random brightness / contrast / saturation / hue in random order (torchvision's sampling and PIL ops).

    Each of brightness, contrast, saturation is a factor spread ``x`` (-> [max(0, 1-x), 1+x]) or [low, high];
    hue is ``x`` in [0, 0.5] (-> [-x, x]) or [low, high] within [-0.5, 0.5].
    """

    def __init__(self, brightness: Any = 0, contrast: Any = 0, saturation: Any = 0, hue: Any = 0):
        self.brightness = self._range(brightness, 'brightness', 1.0, (0.0, math.inf))
        self.contrast = self._range(contrast, 'contrast', 1.0, (0.0, math.inf))
        self.saturation = self._range(saturation, 'saturation', 1.0, (0.0, math.inf))
        self.hue = self._range(hue, 'hue', 0.0, (-0.5, 0.5))

    @staticmethod
    def _range(v: Any, name: str, center: float, bound: Tuple[float, float]) -> Optional[Tuple[float, float]]:
        if isinstance(v, numbers.Real) and not isinstance(v, bool):
            if v < 0:
                raise ValueError(f'ColorJitter.{name}={v!r}: must be non-negative')
            lo, hi = center - float(v), center + float(v)
            if center == 1.0:
                lo = max(lo, 0.0)
        elif isinstance(v, Sequence) and len(v) == 2:
            lo, hi = float(v[0]), float(v[1])
        else:
            raise ValueError(f'ColorJitter.{name}={v!r}: expected a number or [low, high]')
        if not bound[0] <= lo <= hi <= bound[1]:
            raise ValueError(f'ColorJitter.{name}={v!r}: range [{lo}, {hi}] must lie within {list(bound)}')
        return None if lo == hi == center else (lo, hi)

    def __call__(self, img: Image.Image) -> Image.Image:
        order = torch.randperm(4).tolist()
        factors = [None if r is None else float(torch.empty(1).uniform_(r[0], r[1]))
                   for r in (self.brightness, self.contrast, self.saturation, self.hue)]
        for i in order:
            f = factors[i]
            if f is None:
                continue
            if i == 0:
                img = ImageEnhance.Brightness(img).enhance(f)
            elif i == 1:
                img = ImageEnhance.Contrast(img).enhance(f)
            elif i == 2:
                img = ImageEnhance.Color(img).enhance(f)
            else:
                h, s, v = img.convert('HSV').split()
                shifted = np.asarray(h, dtype=np.uint8) + np.uint8(np.int32(f * 255) & 0xFF)  # wraps: hue is cyclic
                img = Image.merge('HSV', (Image.fromarray(shifted.astype(np.uint8)), s, v)).convert('RGB')
        return img

    def __repr__(self):
        return (f'ColorJitter(brightness={self.brightness}, contrast={self.contrast}, '
                f'saturation={self.saturation}, hue={self.hue})')


class ToTensor:
    def __call__(self, img: Image.Image) -> torch.Tensor:
        return to_tensor(img)

    def __repr__(self):
        return 'ToTensor()'


class Normalize:
    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.mean, self.std = _mean_std(mean, std)

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f'Normalize expects a (3, H, W) tensor, got {type(t).__name__}; put ImageToTensor '
                             'before it')
        return normalize(t, self.mean, self.std)

    def __repr__(self):
        return f'Normalize(mean={self.mean}, std={self.std})'


class Compose:
    """Apply transforms in order; ``output_size`` is the (H, W) it produces when known (else None)."""

    def __init__(self, transforms: List[Callable], output_size: Optional[Tuple[int, int]] = None):
        self.transforms, self.output_size = list(transforms), output_size

    def __call__(self, x):
        for t in self.transforms:
            x = t(x)
        return x

    def __repr__(self):
        return 'Compose(' + ', '.join(map(repr, self.transforms)) + ')'


def eval_transform(img_size: Size = 224, resize_to: Optional[Size] = None, crop_pct: Optional[float] = None,
                   interpolation: str = 'bilinear', mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = IMAGENET_STD) -> Compose:
    """PIL RGB image -> float32 (3, H, W): shorter side to ``resize_to`` (default ``floor(min(H, W) / crop_pct)``,
    crop_pct 0.875), center crop ``img_size``, /255, normalise."""
    h, w = _pair(img_size, 'img_size')
    if resize_to is None:
        resize_to = resize_for(min(h, w), DEFAULT_CROP_PCT if crop_pct is None else float(crop_pct))
    return Compose([ResizeCenterCrop(resize_to, (h, w), interpolation), ToTensor(), Normalize(mean, std)],
                   output_size=(h, w))


def parse_color_jitter(cfg: Any) -> Optional[ColorJitter]:
    """None / 0 -> None; x -> ColorJitter(x, x, x); [b, c, s] or [b, c, s, h]; or a dict of those names."""
    if cfg is None or (isinstance(cfg, numbers.Real) and not isinstance(cfg, bool) and cfg == 0):
        return None
    if isinstance(cfg, numbers.Real) and not isinstance(cfg, bool):
        return ColorJitter(cfg, cfg, cfg)
    if isinstance(cfg, Sequence) and not isinstance(cfg, str) and len(cfg) in (3, 4):
        return ColorJitter(*cfg)
    if isinstance(cfg, Mapping):
        unknown = set(cfg) - {'brightness', 'contrast', 'saturation', 'hue'}
        if unknown:
            raise ValueError(f'color_jitter: unknown key(s) {sorted(unknown)}; expected brightness, contrast, '
                             'saturation, hue')
        return ColorJitter(**cfg)
    raise ValueError(f'color_jitter={cfg!r}: expected a number, [b, c, s(, h)] or a dict')


def train_transform(img_size: Size = 224, scale: Sequence[float] = (0.08, 1.0),
                    ratio: Sequence[float] = (3 / 4, 4 / 3), hflip: float = 0.5, color_jitter: Any = None,
                    interpolation: str = 'bilinear', mean: Sequence[float] = IMAGENET_MEAN,
                    std: Sequence[float] = IMAGENET_STD) -> Compose:
    """PIL RGB image -> float32 (3, H, W): random resized crop, flip with probability ``hflip``, optional colour
    jitter, /255, normalise."""
    size = _pair(img_size, 'img_size')
    ops: List[Callable] = [RandomResizedCrop(size, scale, ratio, interpolation)]
    if hflip:
        ops.append(RandomHorizontalFlip(hflip))
    jitter = parse_color_jitter(color_jitter)
    if jitter is not None:
        ops.append(jitter)
    ops += [ToTensor(), Normalize(mean, std)]
    return Compose(ops, output_size=size)
