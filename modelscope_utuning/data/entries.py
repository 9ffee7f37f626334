"""What every reader shares: column names, labels read against class names, and the assembly of
``(where, image, label)`` entries into an :class:`ImageRowsDataset` (errors name the file and line, key or row)."""
from __future__ import annotations

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


def from_rows(rows: Sequence[Dict[str, Any]], root: Optional[Union[str, os.PathLike]] = None, *,
              classes: ClassesArg = None, transform: Transform = None, on_error: str = 'raise',
              source: str = '<rows>') -> ImageRowsDataset:
    """Rows given as dicts (image path or PIL image, label int or class name; column names as in manifests).

    Relative paths are resolved against ``root`` when given, else kept as they are.
    """
    entries = [_record_entry(f'{source} row {i}', r) for i, r in enumerate(rows)]
    base = _base(root, '') if root is not None else None
    return _build(entries, base, source, _classes_arg(classes), transform, on_error)
