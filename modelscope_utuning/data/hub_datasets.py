"""Hugging Face ``datasets`` and ModelScope ``MsDataset`` sources (the FME benchmark's rows) as
:class:`ImageRowsDataset`."""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Tuple, Union

from .datasets import IMAGE_KEY, LABEL_KEY, PATH_KEY, ImageRowsDataset
from .entries import (LABEL_COLUMNS, PATH_COLUMNS, ClassesArg, Transform, _base, _build, _classes_arg, _labels,
                      _pick_column, from_rows)

# -- Hugging Face and ModelScope -------------------------------------------------------------------------------
class _HFImageRows:
    """Rows of a Hugging Face dataset's Image column, decoded only when a row is fetched."""

    def __init__(self, ds: Any, column: str, labels: List[int], source: str):
        from datasets import Image
        feature = ds.features[column]
        self._ds = ds.select_columns([column])
        if not getattr(feature, 'decode', True):
            self._ds = self._ds.cast_column(column, Image())
        self._column = column
        self._source = source
        self._raw = None
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        index = int(index)
        return {IMAGE_KEY: self._ds[index][self._column], LABEL_KEY: self.labels[index]}

    def describe(self, index: int) -> str:
        """The stored file name of the image, else ``source[index]``; reads without decoding."""
        from datasets import Image
        if self._raw is None:
            self._raw = self._ds.cast_column(self._column, Image(decode=False))
        try:
            stored = self._raw[int(index)][self._column] or {}
        except Exception:  # noqa: BLE001  (only for a message)
            stored = {}
        return stored.get('path') or f'{self._source}[{index}]'

    def paths(self) -> List[Optional[str]]:
        """The stored file name of every row's image (None where the image is stored as bytes only)."""
        from datasets import Image
        if self._raw is None:
            self._raw = self._ds.cast_column(self._column, Image(decode=False))
        return [(stored or {}).get('path') for stored in self._raw[self._column]]

    def select(self, indices: List[int]) -> '_HFImageRows':
        rows = _HFImageRows.__new__(_HFImageRows)
        rows.__dict__.update(self.__dict__)
        rows._ds = self._ds.select(indices)
        rows._raw = None
        rows.labels = [self.labels[i] for i in indices]
        return rows


def _hf_source(ds: Any) -> str:
    name = getattr(getattr(ds, 'info', None), 'dataset_name', None) or f'datasets.{type(ds).__name__}'
    split = getattr(ds, 'split', None)
    return f'{name}[{split}]' if split else str(name)


def _detect_columns(features: Dict[str, Any], image_column: Optional[str],
                    label_column: Optional[str], source: str) -> Tuple[str, str]:
    from datasets import ClassLabel, Image, Value

    def is_string(f: Any) -> bool:
        return isinstance(f, Value) and f.dtype in ('string', 'large_string')

    def is_int(f: Any) -> bool:
        return isinstance(f, Value) and f.dtype.startswith(('int', 'uint'))

    if image_column is None:
        images = [k for k, f in features.items() if isinstance(f, Image)]
        if len(images) > 1:
            raise ValueError(f'{source}: several Image columns {images}; pass image_column=')
        if not images:
            path_col = _pick_column([k for k, f in features.items() if is_string(f)], PATH_COLUMNS)
            images = [path_col] if path_col else []
        if not images:
            raise ValueError(f'{source}: no Image column nor image path column (one of {", ".join(PATH_COLUMNS)}) '
                             f'among {dict(features)}; pass image_column=')
        image_column = images[0]
    if label_column is None:
        class_labels = [k for k, f in features.items() if isinstance(f, ClassLabel)]
        if len(class_labels) == 1:
            label_column = class_labels[0]
        else:
            candidates = class_labels or [k for k, f in features.items()
                                          if k != image_column and (is_int(f) or is_string(f))]
            label_column = _pick_column(candidates, LABEL_COLUMNS)
            ints = [k for k in candidates if is_int(features[k]) or isinstance(features[k], ClassLabel)]
            if label_column is None and len(ints) == 1:
                label_column = ints[0]
        if label_column is None:
            raise ValueError(f'{source}: cannot tell the label column among {dict(features)}; pass label_column=')
    for column in (image_column, label_column):
        if column not in features:
            raise ValueError(f'{source}: no column {column!r}; columns: {list(features)}')
    return image_column, label_column


def from_hf_dataset(ds: Any, image_column: Optional[str] = None, label_column: Optional[str] = None, *,
                    root: Optional[Union[str, os.PathLike]] = None, classes: ClassesArg = None,
                    transform: Transform = None, on_error: str = 'raise',
                    source: Optional[str] = None) -> ImageRowsDataset:
    """A ``datasets.Dataset`` with an Image column (rows ``{'image', 'label'}``, decoded lazily) or an image path
    column (rows ``{'img_path:FILE', 'label'}``, relative paths against ``root``), and a ClassLabel (its names
    become ``classes``) or int label column. Columns not given are detected from the feature types."""
    import datasets
    source = source or _hf_source(ds)
    if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        raise ValueError(f'{source}: a dataset dict with splits {list(ds)}; pass one split '
                         f'(or use load_dataset_any(ds, split=...))')
    if isinstance(ds, datasets.IterableDataset):
        # No random access: materialise the rows (decoded images are then held in memory).
        if not ds.features:
            raise ValueError(f'{source}: an iterable dataset without features; cast it to known features first')
        image_column, label_column = _detect_columns(ds.features, image_column, label_column, source)
        names = getattr(ds.features[label_column], 'names', None)
        entries = [(f'{source} row {i}', r[image_column], r[label_column]) for i, r in enumerate(ds)]
        return _build(entries, _base(root, '') if root is not None else None, source,
                      _classes_arg(classes) or names, transform, on_error)
    if not isinstance(ds, datasets.Dataset):
        raise TypeError(f'expected a datasets.Dataset, got {type(ds).__name__}')

    image_column, label_column = _detect_columns(ds.features, image_column, label_column, source)
    names = getattr(ds.features[label_column], 'names', None)  # ClassLabel
    explicit = _classes_arg(classes)
    raw = list(ds[label_column])  # the label column alone: no image is decoded
    wheres = [f'{source} row {i}' for i in range(len(raw))]
    if isinstance(ds.features[image_column], datasets.Image):
        if not raw:
            raise ValueError(f'{source}: no rows')
        labels, found, tokens = _labels(list(zip(wheres, raw)), explicit or names)
        rows = _HFImageRows(ds, image_column, labels, source)
        return ImageRowsDataset(rows, found, transform=transform, on_error=on_error, source=source,
                                label_tokens=tokens)
    entries = list(zip(wheres, list(ds[image_column]), raw))
    return _build(entries, _base(root, '') if root is not None else None, source, explicit or names, transform,
                  on_error)


def _is_msdataset(obj: Any) -> bool:
    try:
        from modelscope.msdatasets import MsDataset
    except ImportError:  # pragma: no cover
        return False
    return isinstance(obj, MsDataset)


def from_msdataset(ms: Any, *, root: Optional[Union[str, os.PathLike]] = None, classes: ClassesArg = None,
                   transform: Transform = None, on_error: str = 'raise') -> ImageRowsDataset:
    """ModelScope FME benchmark rows (``img_path:FILE``, ``label``) from what ``MsDataset.load`` returns: an
    ``MsDataset``, its Hugging Face dataset, or a list of row dicts. A ClassLabel ``label`` gives ``classes``."""
    import datasets
    if isinstance(ms, (list, tuple)):
        return from_rows(ms, root, classes=classes, transform=transform, on_error=on_error, source='MsDataset rows')
    if isinstance(ms, dict):
        raise ValueError(f'a dict of splits {list(ms)}; pass one split (or use load_dataset_any(..., split=...))')
    source = 'MsDataset'
    if _is_msdataset(ms):
        inner = ms.ds_instance
        source = f'MsDataset({_hf_source(inner)})'
    else:
        inner = ms
    if not isinstance(inner, (datasets.Dataset, datasets.IterableDataset)):
        raise TypeError(f'{source}: expected an MsDataset backed by a Hugging Face dataset (not yet turned into a '
                        f'custom dataset), got {type(inner).__name__}')
    features = inner.features or {}
    image_column = PATH_KEY if PATH_KEY in features else None
    label_column = LABEL_KEY if LABEL_KEY in features else None
    return from_hf_dataset(inner, image_column, label_column, root=root, classes=classes, transform=transform,
                           on_error=on_error, source=source)
