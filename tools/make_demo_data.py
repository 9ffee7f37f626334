#!/usr/bin/env python
"""Build ``modelscope_utuning/demo_data/fashion_mnist_subset.npz``, the real images the embedded demo runs on.

Source: the Fashion-MNIST IDX files (MIT licence, Zalando Research), e.g. as Debian's ``dataset-fashion-mnist``
installs them under /usr/share/datasets/fashion-mnist. The subset is deterministic and stratified (a seeded
permutation per class, the first k of each):

===============  ======================  =========  ===============================================
split            classes                 per class  from
===============  ======================  =========  ===============================================
pretrain_train   0-4 (tops, trousers...) 400        train set   ("pre-training" the tiny backbone)
pretrain_val     0-4                     40         test set
fewshot_train    5-9 (sandal ... boot)   20         train set   (unseen classes, few-shot U-Tuning)
fewshot_val      5-9                     60         test set
===============  ======================  =========  ===============================================

Arrays: ``images`` uint8 (N, 28, 28), ``labels`` int64 (N,) (Fashion-MNIST's own 0-9), ``split`` (N,) str,
``source_index`` int64 (N,) (row in the IDX file of its ``split``'s source), ``class_names`` (10,) str.

Usage: python tools/make_demo_data.py [--source DIR] [--out FILE]
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import struct
import sys

import numpy as np

CLASS_NAMES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag',
               'Ankle boot')
DEFAULT_SOURCE = '/usr/share/datasets/fashion-mnist'
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           'modelscope_utuning', 'demo_data', 'fashion_mnist_subset.npz')
PRETRAIN_CLASSES = (0, 1, 2, 3, 4)
FEWSHOT_CLASSES = (5, 6, 7, 8, 9)
# split -> (source file set, classes, images per class)
PLAN = (
    ('pretrain_train', 'train', PRETRAIN_CLASSES, 400),
    ('pretrain_val', 't10k', PRETRAIN_CLASSES, 40),
    ('fewshot_train', 'train', FEWSHOT_CLASSES, 20),
    ('fewshot_val', 't10k', FEWSHOT_CLASSES, 60),
)
SEED = 20230301  # the paper's arXiv month


def read_idx(path: str) -> np.ndarray:
    """An IDX file (optionally gzipped) as a numpy array of its declared shape (uint8 data only)."""
    opener = gzip.open if path.endswith('.gz') else open
    with opener(path, 'rb') as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack('>HBB', data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f'{path}: not an unsigned-byte IDX file (magic {data[:4]!r})')
    shape = struct.unpack('>' + 'I' * ndim, data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f'{path}: {arr.size} values for shape {shape}')
    return arr.reshape(shape)


def load_set(source: str, prefix: str):
    def find(kind: str) -> str:
        for name in (f'{prefix}-{kind}-idx{3 if kind == "images" else 1}-ubyte.gz',
                     f'{prefix}-{kind}-idx{3 if kind == "images" else 1}-ubyte'):
            if os.path.isfile(os.path.join(source, name)):
                return os.path.join(source, name)
        raise FileNotFoundError(f'{source}: no {prefix} {kind} IDX file (install dataset-fashion-mnist, or pass '
                                '--source)')
    images, labels = read_idx(find('images')), read_idx(find('labels'))
    if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
        raise ValueError(f'{source}: unexpected {prefix} shapes {images.shape} / {labels.shape}')
    return images, labels.astype(np.int64)


def build(source: str):
    sets = {name: load_set(source, name) for name in ('train', 't10k')}
    rng = np.random.default_rng(SEED)
    order = {name: rng.permutation(len(labels)) for name, (_, labels) in sets.items()}
    taken = {name: set() for name in sets}
    images, labels, splits, index = [], [], [], []
    for split, set_name, classes, per_class in PLAN:
        src_images, src_labels = sets[set_name]
        for c in classes:
            rows = [int(i) for i in order[set_name] if src_labels[i] == c and int(i) not in taken[set_name]]
            rows = rows[:per_class]
            if len(rows) < per_class:
                raise ValueError(f'{set_name}: only {len(rows)} images of class {c}')
            taken[set_name].update(rows)
            images.append(src_images[rows])
            labels += [c] * len(rows)
            splits += [split] * len(rows)
            index += rows
    return dict(images=np.concatenate(images).astype(np.uint8), labels=np.asarray(labels, dtype=np.int64),
                split=np.asarray(splits), source_index=np.asarray(index, dtype=np.int64),
                class_names=np.asarray(CLASS_NAMES))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--source', default=DEFAULT_SOURCE, help='folder with the Fashion-MNIST IDX files')
    parser.add_argument('--out', default=DEFAULT_OUT, help='npz file to write')
    args = parser.parse_args(argv)
    arrays = build(args.source)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + '.tmp.npz'
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, args.out)
    with open(args.out, 'rb') as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    counts = {s: int((arrays['split'] == s).sum()) for s, *_ in PLAN}
    print(f'wrote {args.out}: {len(arrays["labels"])} images {counts}, {os.path.getsize(args.out) / 1e6:.2f} MB, '
          f'sha256 {digest}...')
    return 0


if __name__ == '__main__':
    sys.exit(main())
