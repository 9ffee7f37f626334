"""Segmentation scenes composed from real object images (a seeded, exact-mask data set that installs offline).

Fashion-MNIST items are grey objects on black, so a threshold gives each one's exact silhouette. A scene is a
textured background (smooth random colour noise) with 2-5 items pasted at random positions and scales (later
items cover earlier ones), each tinted with a random colour; its mask holds, per pixel, 0 for background or
1 + the item's class. Used by the tests, ``modelscope-utuning demo --segmentation`` (the items shipped in
``demo_data/``) and ``benchmarks/segmentation.py`` (Debian's full ``dataset-fashion-mnist``).
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

SHIPPED_ITEMS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'demo_data',
                             'fashion_mnist_subset.npz')
THRESHOLD = 40  # an item pixel is one brighter than this (of 255); the background of Fashion-MNIST is 0


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth colour noise: a coarse random grid upsampled bicubically, plus fine grain."""
    coarse = rng.uniform(40, 200, (4, 4, 3)).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), dtype=np.float32)
    return np.clip(smooth + rng.normal(0, 12, (size, size, 3)), 0, 255)


def compose(items: np.ndarray, labels: np.ndarray, rng: np.random.Generator, size: int = 224,
            count: Tuple[int, int] = (2, 5), scale: Tuple[float, float] = (0.25, 0.6)
            ) -> Tuple[Image.Image, Image.Image]:
    """One scene -> (RGB image, 'L' mask of class ids: 0 background, 1 + label for an item)."""
    image = _background(rng, size)
    mask = np.zeros((size, size), dtype=np.uint8)
    for _ in range(int(rng.integers(count[0], count[1] + 1))):
        i = int(rng.integers(len(items)))
        side = max(8, int(size * rng.uniform(*scale)))
        item = np.asarray(Image.fromarray(items[i]).resize((side, side), Image.BILINEAR), dtype=np.float32)
        top, left = (int(rng.integers(0, size - side + 1)) for _ in range(2))
        where = item > THRESHOLD
        tint = rng.uniform(0.4, 1.0, 3)
        patch = image[top:top + side, left:left + side]
        patch[where] = (item[where, None] * tint)  # the item's own shading, tinted
        mask[top:top + side, left:left + side][where] = 1 + int(labels[i])
    return Image.fromarray(image.astype(np.uint8)), Image.fromarray(mask, mode='L')


def write_scenes(out_dir: str, items: np.ndarray, labels: np.ndarray, class_names: Sequence[str], n: int,
                 seed: int = 0, size: int = 224, **kwargs) -> str:
    """``n`` scenes as ``out_dir/images/NNNN.png`` + ``out_dir/masks/NNNN.png`` + ``classes.txt`` (background
    first); returns ``out_dir``."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(out_dir, 'images'), exist_ok=True)
    os.makedirs(os.path.join(out_dir, 'masks'), exist_ok=True)
    for k in range(n):
        image, mask = compose(items, labels, rng, size, **kwargs)
        image.save(os.path.join(out_dir, 'images', f'{k:04d}.png'))
        mask.save(os.path.join(out_dir, 'masks', f'{k:04d}.png'))
    with open(os.path.join(out_dir, 'classes.txt'), 'w', encoding='utf-8') as f:
        f.write('\n'.join(scene_classes(class_names)) + '\n')
    return out_dir


def scene_classes(class_names: Sequence[str]) -> List[str]:
    return ['background'] + [str(c) for c in class_names]


def shipped_items(classes: Optional[Sequence[int]] = None) -> Tuple[np.ndarray, np.ndarray, List[str]]:
    """The Fashion-MNIST items shipped with the package (``demo_data/``) -> (images, labels renumbered 0..,
    names), optionally only the given original classes."""
    data = np.load(SHIPPED_ITEMS)
    images, labels, names = data['images'], data['labels'], [str(c) for c in data['class_names']]
    if classes is not None:
        keep = np.isin(labels, list(classes))
        remap = {c: i for i, c in enumerate(classes)}
        return images[keep], np.array([remap[int(x)] for x in labels[keep]]), [names[c] for c in classes]
    return images, labels, names
