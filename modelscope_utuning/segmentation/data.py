"""Segmentation datasets: rows ``{'img_path:FILE': image, 'mask_path:FILE': PNG of class ids}`` and their readers.

Sources (:func:`load_segmentation_dataset`):
- a folder with ``images/`` and ``masks/`` (a mask per image, matched by file stem; ``classes.txt`` beside them
  gives the class names, one per line, in id order);
- a CSV / TSV manifest with an image column (``img_path:FILE``, ``image``, ``path`` ...) and a mask column
  (``mask_path:FILE``, ``mask``, ``label``); relative paths against the manifest's folder;
- a list of row dicts; a Hugging Face dataset / ``MsDataset`` with those columns;
- a :class:`SegmentationRowsDataset` (used as it is, never changed: the trainer takes copies).
"""
from __future__ import annotations

import csv
import os
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch.utils.data import Dataset

from ..data.readers import IMAGE_EXTENSIONS, PATH_COLUMNS, read_class_names
from .preprocessor import MASK_KEY

IMAGE_PATH_KEY = 'img_path:FILE'
MASK_COLUMNS = ('mask_path:file', 'mask', 'mask_path', 'label', 'annotation', 'seg')
CLASS_FILES = ('classes.txt', 'class_names.txt', 'classes.json')


class SegmentationRowsDataset(Dataset):
    """Rows of (image, mask) paths; ``__getitem__`` returns the transformed row (see the preprocessor)."""

    def __init__(self, rows: Sequence[Dict[str, Any]], classes: Optional[Sequence[str]] = None,
                 transform: Optional[Callable[[Dict[str, Any]], Any]] = None, source: str = '<rows>'):
        self.rows = list(rows)
        self.classes = list(classes) if classes is not None else None
        self.transform = transform
        self.source = source
        for i, row in enumerate(self.rows):
            if not isinstance(row, dict) or MASK_KEY not in row or not (IMAGE_PATH_KEY in row or 'image' in row):
                raise ValueError(f'{source}: row {i} needs {IMAGE_PATH_KEY!r} (or image) and {MASK_KEY!r}, got '
                                 f'{row!r}')

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Any:
        row = dict(self.rows[index])
        return self.transform(row) if self.transform is not None else row

    def with_transform(self, transform) -> 'SegmentationRowsDataset':
        other = SegmentationRowsDataset.__new__(SegmentationRowsDataset)
        other.__dict__.update(self.__dict__)
        other.transform = transform
        return other

    def without(self, indices: Sequence[int]) -> 'SegmentationRowsDataset':
        """A copy without the rows at ``indices`` (this dataset unchanged)."""
        drop = set(indices)
        other = self.with_transform(self.transform)
        other.rows = [row for i, row in enumerate(self.rows) if i not in drop]
        if not other.rows:
            raise ValueError(f'{self.source}: no readable rows left')
        return other

    def image_paths(self) -> List[str]:
        return [str(row.get(IMAGE_PATH_KEY, row.get('image'))) for row in self.rows]

    def mask_paths(self) -> List[str]:
        return [str(row[MASK_KEY]) for row in self.rows]

    def __repr__(self) -> str:
        return f'SegmentationRowsDataset({len(self)} rows, source={self.source!r})'


def _classes_beside(folder: str) -> Optional[List[str]]:
    for name in CLASS_FILES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return read_class_names(path)
    return None


def from_folder(root: str) -> SegmentationRowsDataset:
    images, masks = os.path.join(root, 'images'), os.path.join(root, 'masks')
    if not (os.path.isdir(images) and os.path.isdir(masks)):
        raise ValueError(f'{root}: a segmentation folder holds images/ and masks/ (a mask per image, same stem)')
    by_stem = {os.path.splitext(n)[0]: os.path.join(masks, n) for n in sorted(os.listdir(masks))
               if not n.startswith('.')}
    rows, missing = [], []
    for name in sorted(os.listdir(images)):
        if name.startswith('.') or not name.lower().endswith(IMAGE_EXTENSIONS):
            continue
        mask = by_stem.get(os.path.splitext(name)[0])
        if mask is None:
            missing.append(name)
        rows.append({IMAGE_PATH_KEY: os.path.join(images, name), MASK_KEY: mask})
    if missing:
        raise ValueError(f'{root}: no mask in masks/ for image(s) {missing[:5]}' +
                         (f' (and {len(missing) - 5} more)' if len(missing) > 5 else ''))
    if not rows:
        raise ValueError(f'{root}: no images in images/')
    return SegmentationRowsDataset(rows, _classes_beside(root), source=root)


def _pick(header: Sequence[str], aliases: Sequence[str]) -> Optional[str]:
    lowered = {str(k).strip().lower(): k for k in header}
    return next((lowered[a] for a in aliases if a in lowered), None)


def from_manifest(path: str) -> SegmentationRowsDataset:
    base = os.path.dirname(os.path.abspath(path))
    with open(path, newline='', encoding='utf-8-sig') as f:
        reader = csv.DictReader(f, delimiter='\t' if path.lower().endswith('.tsv') else ',')
        header = reader.fieldnames or []
        image_col = _pick(header, PATH_COLUMNS)
        mask_col = _pick(header, MASK_COLUMNS)
        if image_col is None or mask_col is None:
            raise ValueError(f'{path}:1: header {header} needs an image column ({", ".join(PATH_COLUMNS)}) and a '
                             f'mask column ({", ".join(MASK_COLUMNS)})')
        rows = []
        for record in reader:
            image, mask = (record.get(image_col) or '').strip(), (record.get(mask_col) or '').strip()
            if not image or not mask:
                raise ValueError(f'{path}:{reader.line_num}: an image path and a mask path are needed')
            rows.append({IMAGE_PATH_KEY: os.path.join(base, image), MASK_KEY: os.path.join(base, mask)})
    if not rows:
        raise ValueError(f'{path}: no rows')
    return SegmentationRowsDataset(rows, _classes_beside(base), source=path)


def _normalise_rows(rows: Sequence[Dict[str, Any]], source: str) -> SegmentationRowsDataset:
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f'{source}: row {i}: expected a dict, got {row!r}')
        image_key = _pick(list(row), PATH_COLUMNS + ('image',))
        mask_key = _pick(list(row), MASK_COLUMNS)
        if image_key is None or mask_key is None:
            raise ValueError(f'{source}: row {i} needs an image ({IMAGE_PATH_KEY}) and a mask ({MASK_KEY}); keys: '
                             f'{sorted(map(str, row))}')
        image, mask = row[image_key], row[mask_key]
        image = image[0] if isinstance(image, (list, tuple)) and len(image) == 1 else image
        mask = mask[0] if isinstance(mask, (list, tuple)) and len(mask) == 1 else mask
        out.append({IMAGE_PATH_KEY if isinstance(image, (str, os.PathLike)) else 'image': image, MASK_KEY: mask})
    if not out:
        raise ValueError(f'{source}: no rows')
    return SegmentationRowsDataset(out, source=source)


def load_segmentation_dataset(source: Any) -> SegmentationRowsDataset:
    """Read ``source`` (see the module docstring)."""
    if isinstance(source, SegmentationRowsDataset):
        return source
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isdir(path):
            return from_folder(path)
        if os.path.isfile(path) and path.lower().endswith(('.csv', '.tsv')):
            return from_manifest(path)
        raise ValueError(f'segmentation data {path!r}: expected a folder with images/ and masks/, or a .csv / .tsv '
                         'manifest' + ('' if os.path.exists(path) else ' (it does not exist)'))
    try:
        from modelscope.msdatasets import MsDataset
        if isinstance(source, MsDataset):
            source = source.ds_instance
    except ImportError:  # pragma: no cover
        pass
    if hasattr(source, 'features') and hasattr(source, 'to_list'):  # a Hugging Face dataset
        return _normalise_rows(source.to_list(), 'datasets.Dataset')
    if isinstance(source, (list, tuple)):
        return _normalise_rows(source, '<rows>')
    raise TypeError(f'cannot read segmentation data from {type(source).__name__}: expected a folder (images/, '
                    'masks/), a .csv manifest, a list of {img_path:FILE, mask_path:FILE} rows or a datasets.Dataset')


def collate(batch: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Stack ``imgs``; stack ``masks`` when they share a size (training crops), else keep them as a list
    (evaluation masks at each image's own size)."""
    out: Dict[str, Any] = {'imgs': torch.stack([b['imgs'] for b in batch])}
    if 'masks' in batch[0]:
        masks = [b['masks'] for b in batch]
        same = all(m.shape == masks[0].shape for m in masks)
        out['masks'] = torch.stack(masks) if same else masks
    return out
