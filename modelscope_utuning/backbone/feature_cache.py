"""A bounded in-memory cache of the frozen pass of bypass mode, keyed by the images' pixels.

In bypass mode the frozen backbone's per-block results (:class:`~.vit.FrozenStep`) depend on the image and the frozen
weights only, never on the tuners. A training run whose images repeat (a deterministic training transform, or a fixed
number of augmented views per image) can therefore compute them once and read them back in later epochs.

- Key: a BLAKE2b digest of each image's bytes (with its shape and dtype). An image that changes in any pixel is a
  miss, so the cache cannot return features of another image, whatever produced the batch.
- Value: only the step fields that the tuners and heads read (``needs``, per block): under class-token pooling that
  is one row per block, a few kilobytes per image; dense heads keep every row.
- The cache empties itself when what it holds would no longer be right: another frozen-weight version (any in-place
  change of a frozen parameter bumps its version counter), another set of fields, another row count.
- In a batch, the images held are read back and only the others run the frozen pass (a batch of new images runs it
  whole); new images are stored while ``max_bytes`` allows. Nothing is evicted: under shuffled access an eviction
  policy would only trade one miss for another.

Numbers: a hit returns exactly the values computed when the image was first seen. A run without the cache recomputes
them each epoch in another batch composition, which moves matrix-product roundings by ~1e-6; so does computing only
a batch's new images. The cached run and the uncached one are bitwise equal when the batches repeat (see
tests/test_feature_cache.py).
"""
from __future__ import annotations

import hashlib
from typing import Callable, Dict, Iterable, Iterator, List, Tuple

import torch

from .block import FrozenStep

FIELDS = FrozenStep._fields


def image_key(image: torch.Tensor) -> bytes:
    """A digest of one image's bytes, shape and dtype."""
    t = image.detach().contiguous().cpu().reshape(-1)
    digest = hashlib.blake2b(t.view(torch.uint8).numpy().tobytes(), digest_size=20)
    digest.update(repr((tuple(image.shape), str(image.dtype))).encode())
    return digest.digest()


class FrozenFeatureCache:
    """Image -> its frozen per-block features (see the module docstring). ``max_bytes``: the most it stores."""

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f'max_bytes={max_bytes!r}: expected >= 0')
        self.max_bytes = int(max_bytes)
        self._entries: Dict[bytes, List[Dict[str, torch.Tensor]]] = {}
        self._signature = None
        self._fields: Tuple[Tuple[str, ...], ...] = ()  # per block, the fields kept (>= what any reader asked)
        self.bytes = 0
        self.hits = self.misses = self.not_stored = self.clears = 0

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        if self._entries:
            self.clears += 1
        self._entries.clear()
        self.bytes = 0

    def summary(self) -> Dict[str, float]:
        """What the cache holds and did: images, megabytes, hits / misses (images), images it had no room for."""
        return {'images': len(self._entries), 'mb': round(self.bytes / 2 ** 20, 1), 'hits': self.hits,
                'misses': self.misses, 'not_stored': self.not_stored, 'clears': self.clears}

    def steps(self, vit, images: torch.Tensor, layout: Tuple,
              compute: Callable[[torch.Tensor], Iterator[FrozenStep]]) -> Iterable[FrozenStep]:
        """The frozen steps of ``images`` (B, 3, H, W): the held images' read back, the others' ``compute(images)``d
        and stored. ``layout``: ``(rows, needs)``, the row count the steps keep and, per block, the fields read (a
        reader may ask for fewer fields than are kept: several tasks' tuners read one cache, :mod:`..training.tasks`).
        """
        if vit.frozen_path_is_random():
            raise RuntimeError('the frozen pass draws random numbers (dropout in the backbone): its features cannot '
                               'be cached; set the backbone dropout rates to 0 or take the cache off')
        rows, needs = layout
        signature = (rows, images.dtype, str(images.device), _weights_version(vit))
        if signature != self._signature:
            self.clear()
            self._signature, self._fields = signature, needs
        elif any(set(want) - set(have) for want, have in zip(needs, self._fields)):
            self.clear()  # a reader wants fields not kept: keep both sets from now on
            self._fields = tuple(tuple(sorted(set(a) | set(b))) for a, b in zip(needs, self._fields))
        keys = [image_key(img) for img in images]
        found = [self._entries.get(k) for k in keys]
        held = sum(f is not None for f in found)
        self.hits += held
        self.misses += len(keys) - held
        if held == len(keys):
            return [_stack([f[i] for f in found], fields) for i, fields in enumerate(needs)]
        # The images not held (each once) run the frozen pass; the held ones are read back beside them.
        new: Dict[bytes, int] = {}
        for b, f in enumerate(found):
            if f is None and keys[b] not in new:
                new[keys[b]] = b
        todo = list(new.values())
        source = compute(images if held == 0 and len(todo) == len(keys) else images[todo])
        return self._merged(source, needs, keys, found, list(new))

    def _merged(self, steps: Iterator[FrozenStep], needs, keys: List[bytes], found: list, new_keys: List[bytes]
                ) -> Iterator[FrozenStep]:
        """Per block: the computed rows of the new images and the held rows of the others, in batch order (the fields
        ``needs`` asks for); the new images' kept fields are stored once the pass is complete."""
        position = {k: j for j, k in enumerate(new_keys)}
        recorded: List[List[Dict[str, torch.Tensor]]] = [[] for _ in new_keys]
        whole = len(new_keys) == len(keys)
        for i, step in enumerate(steps):
            fields = {}
            for entry in recorded:
                entry.append({})
            for f in self._fields[i]:
                computed = getattr(step, f)
                for j, entry in enumerate(recorded):
                    entry[i][f] = computed[j].clone()
            for f in needs[i]:
                computed = getattr(step, f)
                if whole:
                    fields[f] = computed
                else:
                    fields[f] = torch.stack([computed[position[k]] if e is None else e[i][f]
                                             for k, e in zip(keys, found)])
            yield step if whole else FrozenStep(**{f: fields.get(f) for f in FIELDS})
        for key, entry in zip(new_keys, recorded):
            size = sum(t.numel() * t.element_size() for layer in entry for t in layer.values())
            if self.bytes + size > self.max_bytes:
                self.not_stored += 1
                continue
            self._entries[key] = entry
            self.bytes += size


def _stack(per_image: List[Dict[str, torch.Tensor]], fields: Tuple[str, ...]) -> FrozenStep:
    values = {f: torch.stack([e[f] for e in per_image]) for f in fields}
    return FrozenStep(**{f: values.get(f) for f in FIELDS})


def _weights_version(vit) -> Tuple:
    """Identity and in-place version of every frozen parameter: any change to the frozen weights changes it."""
    return tuple((id(p), p._version) for p in vit.frozen_parameters())
