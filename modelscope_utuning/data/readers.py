"""Readers that turn image-classification sources into :class:`ImageRowsDataset`.

Sources: an image folder (one sub-directory per class), CSV / JSONL manifests, VTAB-1K ``"path label"`` lists,
FGVC json splits (VPT benchmark layout), Hugging Face datasets and ModelScope ``MsDataset`` (FME benchmark rows).
Labels are checked here, with the offending file and line (or key / row) named.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from .datasets import IMAGE_KEY, LABEL_KEY, PATH_KEY, ImageRowsDataset

logger = logging.getLogger('modelscope.utuning.data')

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff', '.ppm', '.pgm', '.pbm')
# Accepted column names, in order of preference, compared case-insensitively.
PATH_COLUMNS = ('img_path:file', 'image', 'path', 'filepath', 'img_path', 'image_path', 'file_path', 'filename',
                'file')
LABEL_COLUMNS = ('label', 'class', 'category', 'labels', 'class_name', 'target')
# File names that may hold class names beside an FGVC json split (one name per line, or a json list / dict).
CLASS_NAME_FILES = ('classes.txt', 'class_names.txt', 'classnames.txt', 'classes.json', 'class_names.json')
_SPLIT_ALIASES = {'train': ('train800val200',), 'val': ('validation', 'val200'), 'validation': ('val', 'val200'),
                  'test': ()}
_SPLIT_EXTENSIONS = ('.csv', '.tsv', '.jsonl', '.txt', '.json')
_SPLIT_LIKE_NAMES = {'train', 'val', 'valid', 'validation', 'test', 'eval'}
_INT_RE = re.compile(r'[+-]?\d+')

ClassesArg = Union[None, Sequence[str], str, os.PathLike]
Transform = Optional[Callable[[Dict[str, Any]], Any]]
# (where, image path / image object, raw label): ``where`` is "file:line" or similar, for error messages.
Entry = Tuple[str, Any, Any]


# -- labels and class names ------------------------------------------------------------------------------------
def _as_int(value: Any) -> Optional[int]:
    """The integer a label stands for, or None when it is not integer-like (a class name, or garbage)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if hasattr(value, 'item') and not isinstance(value, (str, bytes)):  # numpy / torch scalars
        return _as_int(value.item())
    if isinstance(value, float) and value.is_integer():
        return int(value)  # pandas writes int columns with a missing value as floats
    if isinstance(value, str) and _INT_RE.fullmatch(value.strip()):
        return int(value.strip())
    return None


def _is_name(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip()) and _as_int(value) is None


def labels_by_classes(raw: Sequence[Tuple[str, Any]], classes: Sequence[str], source: str = '') -> List[int]:
    """The one rule that turns a source's raw labels into indices of a known class list ``classes``.

    Decided per source, never per row, so that one file cannot mix two readings:
    - every label is the text of a class name -> by name (``"3"`` is the class *named* "3" when there is one);
      if the same labels also read as valid indices that mean other classes, a warning says which reading won;
    - else every label must be an integer index in ``[0, len(classes))`` (a CSV of indices with a "0" that is
      no class name reads as indices throughout); a name the list lacks is named.
    Errors name the entry's location.
    """
    index = {str(name): i for i, name in enumerate(classes)}

    def text(value: Any) -> Optional[str]:
        return value.strip() if isinstance(value, str) else None

    if raw and all(text(v) in index for _, v in raw):
        labels = [index[text(v)] for _, v in raw]
        as_indices = [_as_int(v) for _, v in raw]
        if all(i is not None and 0 <= i < len(classes) for i in as_indices) and as_indices != labels:
            logger.warning(f'{source or raw[0][0]}: labels such as {raw[0][1]!r} are both class names and class '
                           f'indices; read as class names (as pipeline() reports them), e.g. {raw[0][1]!r} -> class '
                           f'{labels[0]} {classes[labels[0]]!r}, not class {as_indices[0]}')
        return labels
    labels = []
    for where, value in raw:
        label = _as_int(value)
        if label is None:
            if _is_name(value):
                raise ValueError(f'{where}: unknown class name {value!r} (known: {_preview(list(classes))})')
            raise ValueError(f'{where}: label must be an int or a class name, got {value!r}')
        if not 0 <= label < len(classes):
            raise ValueError(f'{where}: label {label} is not in [0, {len(classes)}) ({len(classes)} classes)')
        labels.append(label)
    return labels


def _labels(raw: Sequence[Tuple[str, Any]], classes: Optional[List[str]]
            ) -> Tuple[List[int], Optional[List[str]], Optional[List[str]]]:
    """Map raw labels (ints, digit strings or class names) to ints and check them -> (labels, classes, tokens).

    With ``classes``: :func:`labels_by_classes`. Without: all-int labels must be non-negative; all-name labels
    define the classes as their sorted set. ``tokens``: the labels as text when the source wrote them as text
    (digit strings read as ints here may turn out to be class names once the model's classes are known),
    else None. Errors name the entry's location.
    """
    if classes is not None:
        return labels_by_classes(raw, classes), list(classes), None

    first_name = next(((w, v) for w, v in raw if _is_name(v)), None)
    if first_name is not None:
        for where, value in raw:
            if not _is_name(value):
                raise ValueError(f'{where}: label {value!r} is not a class name, but {first_name[0]} uses class '
                                 f'name {first_name[1]!r}; use one kind of label, or pass classes=')
        names = sorted({v.strip() for _, v in raw})
        index = {name: i for i, name in enumerate(names)}
        return [index[v.strip()] for _, v in raw], names, None

    labels = []
    for where, value in raw:
        label = _as_int(value)
        if label is None:
            raise ValueError(f'{where}: label must be an int or a class name, got {value!r}')
        if label < 0:
            raise ValueError(f'{where}: label {label} is negative')
        labels.append(label)
    tokens = [v.strip() for _, v in raw] if all(isinstance(v, str) for _, v in raw) else None
    return labels, None, tokens


def _preview(names: Sequence[str], n: int = 8) -> str:
    shown = ', '.join(repr(x) for x in names[:n])
    return shown + (f', ... ({len(names)} in all)' if len(names) > n else '')


def read_class_names(path: Union[str, os.PathLike]) -> List[str]:
    """Class names from a file: text, one per line (a leading ``"<number> "`` is dropped, as in CUB's
    classes.txt); or json, a list of names, ``{name: index}`` or ``{index: name}``."""
    path = os.fspath(path)
    if path.lower().endswith('.json'):
        with open(path, encoding='utf-8') as f:
            data = json.load(f)
        if isinstance(data, list) and all(isinstance(x, str) for x in data):
            return list(data)
        if isinstance(data, dict) and data:
            if all(_as_int(v) is not None for v in data.values()):
                return [name for name, _ in sorted(data.items(), key=lambda kv: _as_int(kv[1]))]
            if all(_as_int(k) is not None for k in data):
                return [str(name) for _, name in sorted(data.items(), key=lambda kv: _as_int(kv[0]))]
        raise ValueError(f'{path}: expected a list of class names, {{name: index}} or {{index: name}}')
    with open(path, encoding='utf-8') as f:
        lines = [line.strip() for line in f if line.strip()]
    if not lines:
        raise ValueError(f'{path}: no class names')
    numbered = [re.fullmatch(r'\d+\s+(.+)', line) for line in lines]
    if all(numbered):
        return [m.group(1).strip() for m in numbered]
    return lines


def _classes_arg(classes: ClassesArg) -> Optional[List[str]]:
    if classes is None:
        return None
    if isinstance(classes, (str, os.PathLike)):
        return read_class_names(classes)
    return [str(c) for c in classes]


# -- paths and assembly ----------------------------------------------------------------------------------------
def _resolve(value: Any, base: Optional[str], where: str) -> str:
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]  # ModelScope's streaming datasets give a ':FILE' column as [local_path]
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value).strip():
        raise ValueError(f'{where}: image path must be a non-empty string, got {value!r}')
    path = os.fspath(value).strip()
    if '://' in path:
        return path  # a URL: leave to whoever opens it
    path = os.path.expanduser(path)
    if base is not None and not os.path.isabs(path):
        path = os.path.join(base, path)
    return os.path.normpath(path) if base is not None else path


def _build(entries: List[Entry], base: Optional[str], source: str, classes: Optional[List[str]],
           transform: Transform, on_error: str) -> ImageRowsDataset:
    if not entries:
        raise ValueError(f'{source}: no rows')
    labels, classes, tokens = _labels([(where, label) for where, _, label in entries], classes)
    rows = []
    for (where, image, _), label in zip(entries, labels):
        if _is_in_memory(image):
            rows.append({IMAGE_KEY: image, LABEL_KEY: label})
        else:
            rows.append({PATH_KEY: _resolve(image, base, where), LABEL_KEY: label})
    return ImageRowsDataset(rows, classes, transform=transform, on_error=on_error, source=source,
                            label_tokens=tokens)


def _is_in_memory(image: Any) -> bool:
    return not isinstance(image, (str, os.PathLike, list, tuple)) and image is not None


def _base(root: Optional[Union[str, os.PathLike]], path: str) -> str:
    # Absolute, so that rows still resolve if the working directory changes later.
    return os.path.abspath(os.path.expanduser(os.fspath(root))) if root is not None else \
        os.path.dirname(os.path.abspath(path))


def _pick_column(keys: Sequence[str], aliases: Sequence[str]) -> Optional[str]:
    lowered = {str(k).strip().lower(): k for k in keys}
    for alias in aliases:
        if alias in lowered:
            return lowered[alias]
    return None


def _record_entry(where: str, record: Any) -> Entry:
    if not isinstance(record, dict):
        raise ValueError(f'{where}: expected an object with an image path and a label, got {record!r}')
    path_col = _pick_column(list(record), PATH_COLUMNS)
    label_col = _pick_column(list(record), LABEL_COLUMNS)
    if path_col is None or label_col is None:
        missing = 'an image path key (one of ' + ', '.join(PATH_COLUMNS) + ')' if path_col is None else \
            'a label key (one of ' + ', '.join(LABEL_COLUMNS) + ')'
        raise ValueError(f'{where}: missing {missing}; keys: {sorted(map(str, record))}')
    return where, record[path_col], record[label_col]


# -- readers ---------------------------------------------------------------------------------------------------
def from_rows(rows: Sequence[Dict[str, Any]], root: Optional[Union[str, os.PathLike]] = None, *,
              classes: ClassesArg = None, transform: Transform = None, on_error: str = 'raise',
              source: str = '<rows>') -> ImageRowsDataset:
    """Rows given as dicts (image path or PIL image, label int or class name; column names as in manifests).

    Relative paths are resolved against ``root`` when given, else kept as they are.
    """
    entries = [_record_entry(f'{source} row {i}', r) for i, r in enumerate(rows)]
    base = _base(root, '') if root is not None else None
    return _build(entries, base, source, _classes_arg(classes), transform, on_error)


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
