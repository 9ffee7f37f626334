"""Image-classification rows as a torch ``Dataset``, with unreadable images named instead of failing in collate.

A row is ``{'img_path:FILE': <local path>, 'label': int}`` (the columns of ModelScope's FME benchmark) or
``{'image': PIL.Image, 'label': int}`` for in-memory sources. The readers in :mod:`.readers` build these.
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from torch.utils.data import Dataset

from .views import fixed_view

PATH_KEY = 'img_path:FILE'
IMAGE_KEY = 'image'
LABEL_KEY = 'label'
ON_ERROR_CHOICES = ('raise', 'skip')

# A child of ModelScope's logger, so these messages reach the trainer's log file as well.
logger = logging.getLogger('modelscope.utuning.data')


class UnreadableImageError(ValueError):
    """An image that cannot be opened or decoded; ``path`` and ``index`` name it."""

    def __init__(self, message: str, path: str, index: int):
        super().__init__(message)
        self.path = path
        self.index = index


def _probe(row: Dict[str, Any], verify: bool = False) -> Optional[BaseException]:
    """None when the row's image decodes fully, else the error. ``verify`` adds PIL's structural check."""
    from PIL import Image
    try:
        img = row[PATH_KEY] if PATH_KEY in row else row[IMAGE_KEY]
        if isinstance(img, (str, os.PathLike)):
            if verify:
                with Image.open(img) as opened:
                    opened.verify()
            # verify() does not decode pixel data, so a truncated JPEG passes it; load() catches that.
            with Image.open(img) as opened:
                opened.load()
        elif isinstance(img, Image.Image):
            img.load()
        elif img is None:
            raise ValueError('no image in row')
    except Exception as err:  # noqa: BLE001  (any failure to decode means the image is unusable)
        return err
    return None


def _row_labels(rows: Sequence) -> List[Any]:
    # Lazy row sources (e.g. a Hugging Face dataset) expose labels so that nothing is decoded here.
    labels = getattr(rows, 'labels', None)
    if labels is not None:
        return list(labels)
    return [row.get(LABEL_KEY) if isinstance(row, dict) else None for row in rows]


class ImageRowsDataset(Dataset):
    """Rows of an image-classification dataset; ``__getitem__`` returns a copy of row ``i``, transformed if given.

    Args:
        rows: a sequence of row dicts (or a lazy sequence with a ``labels`` attribute, as the readers build).
        classes: class names in label order, or None when the source carries none.
        transform: callable applied to the row copy (e.g. the preprocessor mapping a row to {'imgs', 'labels'}).
        on_error: 'raise' (an unreadable image raises :class:`UnreadableImageError`, a ValueError naming its
            path and index) or 'skip' (it is replaced by the next readable row, wrapping around; a warning is
            logged once). Unreadable images are found lazily, when the transform raises; without a transform,
            'skip' decodes each image once to check it. The trainer does not rely on the lazy replacement: it
            finds the unreadable rows first (:meth:`readable`) and drops them, so that no image is counted twice.
        source: what the rows came from, for messages.
        label_tokens: the labels as the source wrote them, when it wrote text (a CSV's ``"3"``): whether such a
            token is a class index or a class *named* "3" can only be told against the model's class list, which
            :func:`modelscope_utuning.training.labels.map_onto` does.

    The dataset objects a caller passes in are never changed by the trainer: it works on copies
    (:meth:`with_options`), which share the rows.
    """

    def __init__(self,
                 rows: Sequence[Dict[str, Any]],
                 classes: Optional[Sequence[str]] = None,
                 transform: Optional[Callable[[Dict[str, Any]], Any]] = None,
                 on_error: str = 'raise',
                 source: Optional[str] = None,
                 label_tokens: Optional[Sequence[str]] = None):
        self.rows = rows
        self.classes = list(classes) if classes is not None else None
        self.on_error = on_error
        self.transform = transform
        self.source = source or '<rows>'
        self._labels = self._check_rows()
        self._bad: Dict[int, str] = {}  # index -> reason, per process (each DataLoader worker finds its own)
        self._warned = False
        self.label_map: Optional[List[int]] = None  # this source's label -> the model's (see with_label_map)
        self.label_tokens = list(label_tokens) if label_tokens is not None else None
        self.views: Optional[Tuple[int, int]] = None  # (K, seed): K fixed augmented views per row (see .views)

    @property
    def on_error(self) -> str:
        return self._on_error

    @on_error.setter
    def on_error(self, value: str) -> None:
        # Checked on every assignment: any other value used to mean 'skip' silently.
        if value not in ON_ERROR_CHOICES:
            raise ValueError(f'on_error (train.on_bad_image) must be one of {ON_ERROR_CHOICES}, got {value!r}')
        self._on_error = value

    def _check_rows(self) -> List[int]:
        labels = _row_labels(self.rows)
        lazy = hasattr(self.rows, 'labels')
        num_classes = len(self.classes) if self.classes is not None else None
        for index, label in enumerate(labels):
            if not lazy:
                row = self.rows[index]
                if not isinstance(row, dict) or (PATH_KEY not in row and IMAGE_KEY not in row):
                    raise ValueError(f'{self.source}: row {index} needs a {PATH_KEY!r} or {IMAGE_KEY!r} key '
                                     f'and a {LABEL_KEY!r} key, got {row!r}')
            if isinstance(label, bool) or not isinstance(label, int):
                raise ValueError(f'{self.source}: row {index}: label must be an int, got {label!r}')
            if label < 0 or (num_classes is not None and label >= num_classes):
                bound = f'[0, {num_classes})' if num_classes is not None else '>= 0'
                raise ValueError(f'{self.source}: row {index}: label {label} is not in {bound}')
        return labels

    # -- sizes and labels ------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.rows)

    @property
    def labels(self) -> List[int]:
        """The label of every row, in order (read without decoding images), in the model's numbering when a label
        map is set."""
        if self.label_map is not None:
            return [self.label_map[label] for label in self._labels]
        return list(self._labels)

    def with_label_map(self, label_map: List[int], classes: Optional[Sequence[str]]) -> 'ImageRowsDataset':
        """The same rows whose label ``i`` reads ``label_map[i]``, with ``classes`` as class names: this source's
        numbering turned into the model's (the rows are shared, not copied)."""
        other = self.with_transform(self.transform)
        other.label_map = list(label_map)
        other.classes = list(classes) if classes is not None else None
        return other

    @property
    def num_classes(self) -> int:
        """``len(classes)`` when class names are known, else ``max(label) + 1``."""
        if self.classes is not None:
            return len(self.classes)
        labels = self.labels
        return max(labels) + 1 if labels else 0

    @property
    def skipped(self) -> List[str]:
        """Images found unreadable so far in this process (paths, or ``source[index]`` when in memory)."""
        return [self._bad[i] for i in sorted(self._bad)]

    def __repr__(self) -> str:
        classes = f'{len(self.classes)} classes' if self.classes is not None else 'no class names'
        return f'ImageRowsDataset({len(self)} rows, {classes}, source={self.source!r})'

    # -- access ----------------------------------------------------------------------------------------------
    def describe(self, index: int) -> str:
        """Where row ``index``'s image comes from: its path, else ``source[index]``."""
        describe = getattr(self.rows, 'describe', None)
        if describe is not None:
            return describe(index)
        row = self.rows[index]
        if PATH_KEY in row:
            return str(row[PATH_KEY])
        img = row.get(IMAGE_KEY)
        if isinstance(img, (str, os.PathLike)):
            return str(img)
        return getattr(img, 'filename', '') or f'{self.source}[{index}]'

    def _unreadable(self, index: int, err: BaseException) -> UnreadableImageError:
        path = self.describe(index)
        return UnreadableImageError(
            f'unreadable image {path!r} (row {index} of {self.source}): {type(err).__name__}: {err}', path, index)

    def _load(self, index: int) -> Any:
        try:
            row = dict(self.rows[index])
        except Exception as err:  # noqa: BLE001  (lazy sources decode the image while fetching the row)
            raise self._unreadable(index, err) from err
        if self.label_map is not None and row.get(LABEL_KEY) is not None:
            row[LABEL_KEY] = self.label_map[row[LABEL_KEY]]
        if self.transform is None:
            if self.on_error == 'skip':
                problem = _probe(row)
                if problem is not None:
                    raise self._unreadable(index, problem) from problem
            return row
        try:
            with fixed_view(self.views, index):
                return self.transform(row)
        except Exception as err:
            # Blame the image only when it really fails to decode; a bug in the transform must surface as is.
            problem = _probe(row)
            if problem is None:
                raise
            raise self._unreadable(index, problem) from err

    def _note_bad(self, index: int, err: UnreadableImageError) -> None:
        self._bad[index] = err.path
        if not self._warned:
            self._warned = True
            logger.warning(f'skipping {err}; {len(self._bad)} unreadable image(s) so far in this '
                           f'process (on_error="skip"); later ones are logged at DEBUG level, see `.skipped`')
        else:
            logger.debug(f'skipping {err}')

    def __getitem__(self, index: int) -> Any:
        n = len(self)
        index = int(index)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f'index {index} out of range for {n} rows of {self.source}')
        if self.on_error == 'raise':
            return self._load(index)
        # The replacement is the next readable row in cyclic order: the same whichever rows were seen before.
        for step in range(n):
            candidate = (index + step) % n
            if candidate in self._bad:
                continue
            try:
                return self._load(candidate)
            except UnreadableImageError as err:
                self._note_bad(candidate, err)
        raise ValueError(f'{self.source}: none of the {n} images is readable (on_error="skip"), e.g. '
                         f'{self.skipped[:3]}')

    # -- whole-dataset operations ----------------------------------------------------------------------------
    def validate(self, num_workers: int = 8) -> List[str]:
        """Decode every image now (PIL verify, then a full load) and return the unreadable ones' paths, in order.

        With on_error='skip' the bad rows are remembered, so ``__getitem__`` skips them without retrying, and
        one warning gives their count.
        """
        def check(index: int) -> Optional[str]:
            try:
                row = self.rows[index]
            except Exception as err:  # noqa: BLE001  (lazy sources decode while fetching)
                problem: Optional[BaseException] = err
            else:
                problem = _probe(row, verify=True)
            if problem is None:
                return None
            logger.debug(f'{self.source}: {self._unreadable(index, problem)}')
            return self.describe(index)

        indices = range(len(self))
        if num_workers > 1 and len(self) > 1:
            # Decoding is I/O and C code that releases the GIL, so threads help on large datasets.
            with ThreadPoolExecutor(max_workers=num_workers) as pool:
                results = list(pool.map(check, indices))
        else:
            results = [check(i) for i in indices]
        bad = [(i, path) for i, path in zip(indices, results) if path is not None]
        if self.on_error == 'skip' and bad:
            self._bad.update(bad)
            if not self._warned:
                self._warned = True
                logger.warning(f'{self.source}: {len(bad)} of {len(self)} images are unreadable and will be '
                               f'skipped (on_error="skip"), e.g. {[p for _, p in bad[:3]]}')
        return [path for _, path in bad]

    def select(self, indices: Iterable[int]) -> 'ImageRowsDataset':
        """A dataset of the rows at ``indices`` (same classes, transform, on_error and label map), e.g. a few-shot
        subset."""
        indices = [int(i) for i in indices]
        selector = getattr(self.rows, 'select', None)
        rows = selector(indices) if selector is not None else [self.rows[i] for i in indices]
        tokens = [self.label_tokens[i] for i in indices] if self.label_tokens is not None else None
        if self.label_map is None:
            return ImageRowsDataset(rows, self.classes, self.transform, self.on_error, self.source, tokens)
        out = ImageRowsDataset(rows, None, self.transform, self.on_error, self.source, tokens)
        out.label_map, out.classes = list(self.label_map), self.classes
        return out

    def with_transform(self, transform: Optional[Callable[[Dict[str, Any]], Any]]) -> 'ImageRowsDataset':
        """The same rows with another transform (e.g. the eval preprocessor); the rows are shared, not copied."""
        return self.with_options(transform=transform)

    _KEEP = object()

    def with_options(self, transform: Any = _KEEP, on_error: Any = _KEEP, views: Any = _KEEP) -> 'ImageRowsDataset':
        """A copy with another ``transform``, ``on_error`` and / or ``views`` (``(K, seed)``: the transform gives
        each row one of K fixed views, :mod:`.views`; None: as it is); this dataset is left as it is and the rows
        are shared, not copied."""
        other = ImageRowsDataset.__new__(ImageRowsDataset)
        other.__dict__.update(self.__dict__)
        if transform is not ImageRowsDataset._KEEP:
            other.transform = transform
        if on_error is not ImageRowsDataset._KEEP:
            other.on_error = on_error
        if views is not ImageRowsDataset._KEEP:
            other.views = views
        other._bad = dict(self._bad)
        other.label_tokens = list(self.label_tokens) if self.label_tokens is not None else None
        return other

    # -- what the trainer checks before it counts anything ---------------------------------------------------
    def readable(self, num_workers: int = 8) -> Tuple['ImageRowsDataset', List[str]]:
        """(this dataset without its unreadable rows, the unreadable rows' paths in row order).

        "Unreadable" means what the pipeline cannot read: every row is loaded with the pipeline's own image
        reader (:func:`modelscope_utuning.preprocessing.image_io.load_image`), so the rows kept are exactly
        the rows ``pipeline()`` can answer for, and a metric over them is the metric of ``pipeline()`` over them.
        """
        # keeps data light: the preprocessing package loads and registers the pipeline's preprocessor
        from ..preprocessing.image_io import load_image as pipeline_reader

        def check(index: int) -> Optional[str]:
            try:
                row = self.rows[index]
                pipeline_reader(row[PATH_KEY] if PATH_KEY in row else row[IMAGE_KEY])
            except Exception as err:  # noqa: BLE001  (any failure to read means the pipeline cannot use it)
                logger.debug(f'{self.source}: {self._unreadable(index, err)}')
                return self.describe(index)
            return None

        indices = range(len(self))
        if num_workers > 1 and len(self) > 1:
            with ThreadPoolExecutor(max_workers=num_workers) as pool:
                results = list(pool.map(check, indices))
        else:
            results = [check(i) for i in indices]
        bad = [path for path in results if path is not None]
        if not bad:
            return self, []
        if len(bad) == len(self):
            raise ValueError(f'{self.source}: none of the {len(self)} images is readable, e.g. {bad[:3]}')
        kept = self.select([i for i, path in zip(indices, results) if path is None])
        return kept, bad

    def image_paths(self) -> List[Optional[str]]:
        """The file path of every row's image (None for images held in memory), read without decoding."""
        paths = getattr(self.rows, 'paths', None)
        if paths is not None:
            return list(paths())
        out: List[Optional[str]] = []
        for row in self.rows:
            image = row.get(PATH_KEY, row.get(IMAGE_KEY)) if isinstance(row, dict) else None
            out.append(os.fspath(image) if isinstance(image, (str, os.PathLike)) else None)
        return out
