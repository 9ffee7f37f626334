"""Joint image + mask transforms (Pillow and numpy only).

An image and its mask move together: the image is resampled bilinearly, the mask with nearest neighbour (class
ids are labels, not intensities), and padding of the mask is 255 (ignored).

- train: random scale in ``scale_range`` (both sides), random crop of ``S x S`` (padding where the scaled image
  is smaller), random horizontal flip;
- eval / inference: the whole image resized to ``S x S``; the mask is left at the image's own size, where the
  metric and the pipeline's output live.
Random draws come from torch's global generator, so the trainer's seed and its saved RNG state reproduce them.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

IGNORE_INDEX = 255


MASK_MODES = ('P', 'L', 'I', 'I;16', 'I;16B', 'I;16L', '1')


class MaskUnreadable(ValueError):
    """A mask file that cannot be read at all (missing, truncated, not an image)."""


def read_mask(path: str, expected_size: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """A PNG (or any single-channel image) of class ids -> ``(H, W)`` int64; 255 means ignore.

    Palette ('P') PNGs are read as their indices, grey ('L', 'I', 'I;16') as their values. ``expected_size``
    (W, H): the image's size, which the mask must have. Errors name the file."""
    try:
        with Image.open(path) as opened:
            mode, size = opened.mode, opened.size
            array = np.asarray(opened if mode != '1' else opened.convert('L'), dtype=np.int64) \
                if mode in MASK_MODES else None
    except Exception as e:  # missing, truncated, not an image: Pillow raises assorted errors (OSError, struct.error)
        raise MaskUnreadable(f'mask {os.fspath(path)!r} cannot be read: {type(e).__name__}: {e}') from e
    if array is None:
        raise ValueError(f'mask {os.fspath(path)!r} is a {mode} image; expected one channel of class ids '
                         '(a palette or greyscale PNG)')
    if expected_size is not None and tuple(size) != tuple(expected_size):
        raise ValueError(f'mask {os.fspath(path)!r} is {size[0]}x{size[1]} but its image is '
                         f'{expected_size[0]}x{expected_size[1]}; a mask must have its image\'s size')
    return array


def normalize(image: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """RGB image -> ``(3, H, W)`` float32, ``(x / 255 - mean) / std``."""
    x = np.asarray(image, dtype=np.float32) / 255.0
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def resize_image(image: Image.Image, size: int) -> Image.Image:
    return image.resize((size, size), Image.BILINEAR)


def random_scale_crop_flip(image: Image.Image, mask: np.ndarray, size: int, scale_range: Tuple[float, float],
                           flip: bool) -> Tuple[Image.Image, np.ndarray, Tuple[int, int]]:
    """The training augmentation -> (image crop, mask crop ``(S, S)``, (valid h, valid w)): the crop's top-left
    ``valid`` part is image, the rest padding (its mask is 255, its image is filled by the caller)."""
    low, high = scale_range
    scale = low + (high - low) * float(torch.rand(()))
    w, h = image.size
    # the shorter side scaled to S * scale (scenes of any aspect ratio land on the same object scale)
    factor = size * scale / min(w, h)
    new_w, new_h = max(1, round(w * factor)), max(1, round(h * factor))
    image = image.resize((new_w, new_h), Image.BILINEAR)
    mask = np.asarray(Image.fromarray(mask.astype(np.int32)).resize((new_w, new_h), Image.NEAREST), dtype=np.int64)
    top = int(torch.randint(0, max(new_h - size, 0) + 1, ()))
    left = int(torch.randint(0, max(new_w - size, 0) + 1, ()))
    image = image.crop((left, top, left + min(size, new_w), top + min(size, new_h)))
    mask = mask[top:top + size, left:left + size]
    if flip and float(torch.rand(())) < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
        mask = mask[:, ::-1]
    padded = np.full((size, size), IGNORE_INDEX, dtype=np.int64)
    padded[:mask.shape[0], :mask.shape[1]] = mask
    return image, padded, (mask.shape[0], mask.shape[1])
