"""Readers that turn image-classification sources into :class:`ImageRowsDataset`.

Sources: an image folder (one sub-directory per class), CSV / JSONL manifests, VTAB-1K ``"path label"`` lists,
FGVC json splits (VPT benchmark layout), Hugging Face datasets and ModelScope ``MsDataset`` (FME benchmark rows).
Labels are checked here, with the offending file and line (or key / row) named. What the readers share (column names,
labels against class names, assembly) is :mod:`.entries`; Hugging Face and ModelScope sources are :mod:`.hub_datasets`.
"""
from __future__ import annotations

import csv
import json
import os
from typing import Any, Dict, List, Optional, Union

from .datasets import LABEL_KEY, PATH_KEY, ImageRowsDataset
from .entries import (CLASS_NAME_FILES, IMAGE_EXTENSIONS, LABEL_COLUMNS, PATH_COLUMNS,  # noqa: F401  (re-exported)
                      _SPLIT_ALIASES, _SPLIT_EXTENSIONS, _SPLIT_LIKE_NAMES, ClassesArg, Entry, Transform, _base,
                      _build, _classes_arg, _pick_column, _preview, _record_entry, from_rows, labels_by_classes,
                      logger, read_class_names)
from .hub_datasets import _is_msdataset, from_hf_dataset, from_msdataset  # noqa: F401


# -- readers ---------------------------------------------------------------------------------------------------
def walk_images(top: str, boundary: Optional[str] = None) -> List[str]:
    """Image files under ``top``, sorted, hidden entries skipped, each real file once.

    Linked directories are followed once each (by their real path), so a link loop ends. A link that leads back
    into ``boundary`` (the dataset root) but out of ``top`` (one class's folder) is not followed: its images
    belong to another class, which reads them itself; following it would label them wrongly.
    """
    top_real = os.path.realpath(top)
    bound_real = os.path.realpath(boundary) if boundary else None
    seen_dirs, seen_files, out = set(), set(), []

    def inside(path: str, root: str) -> bool:
        return path == root or path.startswith(root.rstrip(os.sep) + os.sep)

    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs or (bound_real and inside(real, bound_real) and not inside(real, top_real)):
            if real not in seen_dirs:
                logger.warning(f'{dirpath}: a link into another part of {boundary!r}; not followed')
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith('.'))
        for filename in sorted(filenames):
            if filename.startswith('.') or os.path.splitext(filename)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            path = os.path.join(dirpath, filename)
            real_file = os.path.realpath(path)
            if real_file not in seen_files:
                seen_files.add(real_file)
                out.append(path)
    return out


def from_image_folder(root: Union[str, os.PathLike], *, classes: ClassesArg = None, transform: Transform = None,
                      on_error: str = 'raise') -> ImageRowsDataset:
    """``root/<class name>/**/<image>``: classes are the sub-directory names, sorted (or ordered as ``classes``).

    Image extensions match case-insensitively; hidden files and directories are ignored.
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise ValueError(f'image folder {root!r} does not exist or is not a directory')
    found = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith('.'))
    names = _classes_arg(classes)
    if names is None:
        names = found
    else:
        unknown = [d for d in found if d not in names]
        if unknown:
            raise ValueError(f'image folder {root!r}: sub-directories {unknown} are not among classes= '
                             f'({_preview(names)})')
    if found and set(found) <= _SPLIT_LIKE_NAMES:
        # A dataset root with train/ and val/ would otherwise be read as a 2-class dataset.
        logger.warning(f'image folder {root!r}: the class sub-directories {found} look like splits; '
                       f'pass the split folder itself, or split= to load_dataset_any')
    base = os.path.abspath(root)
    rows = []
    for label, name in enumerate(names):
        class_dir = os.path.join(base, name)
        if not os.path.isdir(class_dir):
            continue  # a class of classes= with no folder here (e.g. absent from this split)
        rows += [{PATH_KEY: path, LABEL_KEY: label} for path in walk_images(class_dir, boundary=base)]
    if not rows:
        raise ValueError(f'image folder {root!r} holds no images: expected one sub-directory per class with '
                         f'files ending in {", ".join(IMAGE_EXTENSIONS)}')
    used = {row[LABEL_KEY] for row in rows}
    empty = [name for name in found if names.index(name) not in used]
    if empty:
        logger.warning(f'image folder {root!r}: class folders without images: {empty}')
    return ImageRowsDataset(rows, names, transform=transform, on_error=on_error, source=root)


def from_manifest(path: Union[str, os.PathLike], root: Optional[Union[str, os.PathLike]] = None, *,
                  classes: ClassesArg = None, transform: Transform = None,
                  on_error: str = 'raise') -> ImageRowsDataset:
    """A CSV / TSV (with a header) or JSONL manifest, or a .json list of objects.

    Path column: one of ``img_path:FILE``, ``image``, ``path``, ``filepath`` (and a few synonyms); label column:
    ``label``, ``class`` or ``category``, holding ints or class names (mapped by their sorted order unless
    ``classes`` is given). Relative paths resolve against the manifest's folder, or ``root``.
    """
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext in ('.csv', '.tsv'):
        entries = _read_csv(path, '\t' if ext == '.tsv' else ',')
    elif ext in ('.jsonl', '.ndjson'):
        entries = _read_jsonl(path)
    elif ext == '.json':
        with open(path, encoding='utf-8') as f:
            data = json.load(f)
        if not isinstance(data, list):
            raise ValueError(f'{path}: a json manifest must be a list of objects (an FGVC split, a '
                             f'{{path: label}} object, is read by from_fgvc_json)')
        entries = [_record_entry(f'{path}: item {i}', r) for i, r in enumerate(data)]
    else:
        raise ValueError(f'{path}: unknown manifest type {ext!r} (expected .csv, .tsv, .jsonl or .json)')
    return _build(entries, _base(root, path), path, _classes_arg(classes), transform, on_error)


def _read_csv(path: str, delimiter: str) -> List[Entry]:
    with open(path, newline='', encoding='utf-8-sig') as f:  # -sig: tolerate the BOM spreadsheets write
        reader = csv.DictReader(f, delimiter=delimiter)
        header = reader.fieldnames
        if not header:
            raise ValueError(f'{path}: empty file, expected a header line')
        path_col = _pick_column(header, PATH_COLUMNS)
        label_col = _pick_column(header, LABEL_COLUMNS)
        if path_col is None:
            raise ValueError(f'{path}:1: header {header} has no image path column (one of '
                             f'{", ".join(PATH_COLUMNS)})')
        if label_col is None:
            raise ValueError(f'{path}:1: header {header} has no label column (one of {", ".join(LABEL_COLUMNS)})')
        entries = []
        for record in reader:
            where = f'{path}:{reader.line_num}'
            if record.get(path_col) is None or record.get(label_col) is None:
                raise ValueError(f'{where}: too few fields for header {header}')
            entries.append((where, record[path_col], record[label_col]))
    return entries


def _read_jsonl(path: str) -> List[Entry]:
    entries = []
    with open(path, encoding='utf-8') as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f'{path}:{lineno}'
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f'{where}: invalid json: {err}') from None
            entries.append(_record_entry(where, record))
    return entries


def from_vtab_list(path: Union[str, os.PathLike], root: Optional[Union[str, os.PathLike]] = None, *,
                   classes: ClassesArg = None, transform: Transform = None,
                   on_error: str = 'raise') -> ImageRowsDataset:
    """A VTAB-1K split list: lines ``"relative/path.jpg 3"``, split on the last whitespace (paths may hold
    spaces); blank lines are skipped. Paths resolve against the list's folder, or ``root``."""
    path = os.fspath(path)
    entries = []
    with open(path, encoding='utf-8') as f:
        for lineno, line in enumerate(f, 1):
            text = line.strip()
            if not text:
                continue
            parts = text.rsplit(None, 1)
            if len(parts) != 2:
                raise ValueError(f'{path}:{lineno}: expected "<image path> <label>", got {text!r}')
            entries.append((f'{path}:{lineno}', parts[0], parts[1]))
    return _build(entries, _base(root, path), path, _classes_arg(classes), transform, on_error)


def from_fgvc_json(path: Union[str, os.PathLike], root: Optional[Union[str, os.PathLike]] = None, *,
                   classes: ClassesArg = None, transform: Transform = None,
                   on_error: str = 'raise') -> ImageRowsDataset:
    """An FGVC split as the VPT benchmark ships it: a json object ``{"relative/image/path": label}``.

    Paths resolve against ``root``; without it, against the json's folder or its ``images`` / ``Images``
    sub-folder (the CUB / NABirds / Stanford Dogs layouts), whichever holds the first image. Class names come
    from ``classes`` or, when present and consistent with the labels, a sibling file such as ``classes.txt``.
    Labels are kept as they are (VPT renumbers them per split; we do not, so splits stay consistent).
    """
    path = os.fspath(path)
    with open(path, encoding='utf-8') as f:
        data = json.load(f)
    if isinstance(data, list):
        return from_manifest(path, root, classes=classes, transform=transform, on_error=on_error)
    if not isinstance(data, dict):
        raise ValueError(f'{path}: expected a json object {{"relative/image/path": label}}')
    entries = [(f'{path} (key {key!r})', key, value) for key, value in data.items()]
    base = _base(root, path) if root is not None else _fgvc_base(path, list(data)[:1])
    if classes is not None:
        return _build(entries, base, path, _classes_arg(classes), transform, on_error)
    sibling = next((os.path.join(os.path.dirname(os.path.abspath(path)), name) for name in CLASS_NAME_FILES
                    if os.path.isfile(os.path.join(os.path.dirname(os.path.abspath(path)), name))), None)
    if sibling is not None:
        try:
            return _build(entries, base, path, read_class_names(sibling), transform, on_error)
        except ValueError as err:
            # An optional extra: a class-name file that does not fit the labels is ignored, not fatal.
            logger.warning(f'{path}: ignoring class names in {sibling}: {err}')
    return _build(entries, base, path, None, transform, on_error)


def _fgvc_base(path: str, first_key: List[str]) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    if first_key:
        for candidate in (folder, os.path.join(folder, 'images'), os.path.join(folder, 'Images')):
            if os.path.exists(os.path.join(candidate, first_key[0])):
                return candidate
    return folder


# -- dispatch --------------------------------------------------------------------------------------------------
def _pick_split(splits: Dict[str, Any], split: Optional[str], source: str) -> Any:
    if split is None:
        if len(splits) == 1:
            return next(iter(splits.values()))
        raise ValueError(f'{source}: several splits {list(splits)}; pass split=')
    for name in (split,) + _SPLIT_ALIASES.get(split, ()):
        if name in splits:
            return splits[name]
    raise ValueError(f'{source}: no split {split!r}; splits: {list(splits)}')


def _split_file(folder: str, split: str) -> Optional[str]:
    for name in (split,) + _SPLIT_ALIASES.get(split, ()):
        for ext in _SPLIT_EXTENSIONS:
            candidate = os.path.join(folder, name + ext)
            if os.path.isfile(candidate):
                return candidate
    return None


def load_dataset_any(source: Any, split: Optional[str] = None, **kwargs: Any) -> ImageRowsDataset:
    """Read ``source`` with the reader that fits it; ``kwargs`` (root, classes, transform, on_error) go to it.

    - folder: with ``split``, its sub-folder ``split`` (an image folder) or its file ``split.{csv,tsv,jsonl,txt,
      json}`` (VTAB-1K's ``train800val200.txt`` / ``val200.txt`` also answer 'train' / 'val'); without, an
      image folder;
    - file: .csv / .tsv / .jsonl manifest, .txt VTAB-1K list, .json FGVC split (or a list of objects);
    - ``datasets.Dataset`` / ``DatasetDict``, ``MsDataset`` / dict of them (``split`` picks one), a list of row
      dicts, or an ImageRowsDataset (returned as is).
    ``split`` is ignored where the source is a single split already.
    """
    if isinstance(source, ImageRowsDataset):
        return source
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isdir(path):
            if split is None:
                return from_image_folder(path, **kwargs)
            if os.path.isdir(os.path.join(path, split)):
                return load_dataset_any(os.path.join(path, split), **kwargs)
            found = _split_file(path, split)
            if found is None:
                raise ValueError(f'{path}: no split {split!r}: expected a sub-folder {split}/ or a file '
                                 f'{split}{{{",".join(_SPLIT_EXTENSIONS)}}}')
            return load_dataset_any(found, **kwargs)
        if not os.path.isfile(path):
            raise FileNotFoundError(f'dataset source {path!r} does not exist')
        ext = os.path.splitext(path)[1].lower()
        if ext in ('.csv', '.tsv', '.jsonl', '.ndjson'):
            return from_manifest(path, **kwargs)
        if ext == '.txt':
            return from_vtab_list(path, **kwargs)
        if ext == '.json':
            return from_fgvc_json(path, **kwargs)
        raise ValueError(f'{path}: unknown dataset file type {ext!r} (expected .csv, .tsv, .jsonl, .txt or .json)')
    if _is_msdataset(source):
        return from_msdataset(source, **kwargs)
    import datasets
    if isinstance(source, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        return load_dataset_any(_pick_split(dict(source), split, 'dataset dict'), **kwargs)
    if isinstance(source, dict) and source and all(_is_msdataset(v) or isinstance(v, datasets.Dataset)
                                                   for v in source.values()):
        return load_dataset_any(_pick_split(source, split, 'dict of splits'), **kwargs)
    if isinstance(source, (datasets.Dataset, datasets.IterableDataset)):
        return from_hf_dataset(source, **kwargs)
    if isinstance(source, (list, tuple)):
        return from_rows(source, **kwargs)
    raise TypeError(f'cannot read a dataset from {type(source).__name__}: expected a folder, a .csv / .tsv / '
                    f'.jsonl / .txt / .json file, a datasets.Dataset, an MsDataset or a list of rows')
