"""Fixed augmented views: a random training transform made to produce one of K fixed outputs per image.

Each time image ``i`` is read, a view ``v`` in ``0..K-1`` is drawn (from the data loader's own random numbers, as any
augmentation draws), and the transform then runs on a random-number stream seeded by ``(seed, i, v)``: the same view
of the same image is the same tensor every time. What that buys: the frozen features of each view can be cached
(``train.feature_cache.views``, :mod:`..training.feature_cache`) while training still sees K augmentations per image.
All our transforms draw from torch's generator, which is the one seeded here (forked: the caller's stream goes on as
if this had not run).
"""
from __future__ import annotations

import contextlib
import hashlib
from typing import Iterator, Optional, Tuple

import torch


def view_seed(seed: int, index: int, view: int) -> int:
    """A 63-bit seed for view ``view`` of image ``index`` in a run seeded ``seed``."""
    digest = hashlib.blake2b(f'{seed}/{index}/{view}'.encode(), digest_size=8).digest()
    return int.from_bytes(digest, 'little') >> 1


@contextlib.contextmanager
def fixed_view(views: Optional[Tuple[int, int]], index: int) -> Iterator[None]:
    """Run the body (the transform of image ``index``) as one of its ``views = (K, seed)`` fixed views; a no-op
    when ``views`` is None."""
    if not views:
        yield
        return
    k, seed = views
    view = int(torch.randint(k, ())) if k > 1 else 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(view_seed(seed, index, view))
        yield
