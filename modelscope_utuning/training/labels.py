"""One label space for the model and every dataset it sees: labels always mean the model's classes.

Each reader numbers its own classes (an image folder by its sorted sub-folders, a manifest by its class list), so
the same index means different classes in two sources: an evaluation folder without the first class would shift
every label by one, and a correct model would score 0 %. Before the trainer runs, the *reference* class list is
decided once and every dataset is mapped onto it by name:

- the model's own class names when its head was loaded from a checkpoint (that head is what they mean);
- else the training data's class names (the new head learns them; the model takes them as its ``CLASSES``);
- else the model's configured ``CLASSES``; else none: labels are class indices as they are.

A dataset class the reference does not know is an error that names it and its source; a dataset without class
names must use indices below the head's size; a reference longer than the head is an error (it would have to
predict classes it has no output for). All of it happens when the trainer is built, not at the first step.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

from ..data.datasets import ImageRowsDataset
from ..data.readers import labels_by_classes


def reference_classes(model, train: Optional[ImageRowsDataset]) -> Optional[List[str]]:
    """The class list the head stands for (see the module docstring)."""
    n = model.head.num_classes
    if getattr(model, 'head_loaded', False) and model.CLASSES is not None:
        return list(model.CLASSES)
    if train is not None and train.classes is not None:
        classes = list(train.classes)
        if len(classes) > n:
            raise ValueError(f'{train.source}: the training data has {len(classes)} classes ({_preview(classes)}) '
                             f'but model.head.num_classes is {n}; set cfg.model.head.num_classes = {len(classes)} '
                             '(and cfg.model.finetune = True to start a new head from a checkpoint)')
        return classes
    if model.CLASSES is not None:
        return list(model.CLASSES)
    return None


def map_onto(ds: ImageRowsDataset, classes: Optional[Sequence[str]], num_classes: int,
             role: str) -> ImageRowsDataset:
    """``ds`` with its labels in the model's numbering (a new dataset sharing the rows), or ValueError naming what
    does not fit. ``role``: 'training' or 'evaluation', for messages."""
    if classes is not None and ds.classes is not None:
        index = {str(name): i for i, name in enumerate(classes)}
        unknown = [name for name in ds.classes if str(name) not in index]
        if unknown:
            raise ValueError(f'{ds.source}: {role} class(es) {unknown[:8]} are not classes of the model '
                             f'({_preview(classes)}); the model would never predict them. Train a new head on them '
                             '(cfg.model.finetune = True and cfg.model.head.num_classes) or drop those images')
        mapping = [index[str(name)] for name in ds.classes]
        if mapping == list(range(len(ds.classes))) and list(ds.classes) == list(classes):
            return ds
        return ds.with_label_map(mapping, classes)
    if classes is not None and ds.classes is None and ds.label_tokens is not None:
        # Text labels read as indices by the source's reader ("3") may be class *names*: decided here, against
        # the model's classes, by the same rule every reader uses when it is given the classes.
        where = [(f'{ds.source}: row {i} ({ds.describe(i)})', token) for i, token in enumerate(ds.label_tokens)]
        labels = labels_by_classes(where, classes, ds.source)
        if labels != list(ds.labels):
            mapping: dict = {}
            for raw, label, (place, token) in zip(ds.labels, labels, where):
                if mapping.setdefault(raw, label) != label:
                    raise ValueError(f'{place}: label {token!r} reads as index {raw} like another row\'s label '
                                     f'that names a different class; write every label of {ds.source} one way')
            label_map = [mapping.get(i, 0) for i in range(max(mapping) + 1)]
            return ds.with_label_map(label_map, classes)
        return ds.with_label_map(list(range(max(labels, default=-1) + 1)), classes)
    bound = num_classes if classes is None else min(num_classes, len(classes))
    for i, label in enumerate(ds.labels):
        if not 0 <= label < bound:
            raise ValueError(f'{ds.source}: {role} row {i} ({ds.describe(i)}) has label {label}, but the model has '
                             f'{bound} classes (labels 0 .. {bound - 1})')
    if classes is not None and ds.classes is None:
        return ds.with_label_map(list(range(max(ds.labels, default=-1) + 1)), classes)
    return ds


def check_conflicting_labels(ds: ImageRowsDataset, role: str) -> None:
    """ValueError naming every image file listed twice in ``ds`` with two different labels; a warning for files
    listed twice with the same label (counted twice by any metric).

    An error, not a warning: the model predicts one class per image, so such an image is wrong under one of its
    labels whatever the model does - an evaluation reports less than the model's accuracy, and training pulls
    the model two ways on it. It is almost always a manifest mistake, cheap to fix once named."""
    import logging
    import os
    seen: dict = {}
    conflicts, repeats = [], []
    labels = ds.labels
    for i, path in enumerate(ds.image_paths()):
        if path is None or '://' in path:
            continue
        key = os.path.realpath(path)
        first = seen.setdefault(key, i)
        if first != i:
            (conflicts if labels[first] != labels[i] else repeats).append((first, i, path))
    if conflicts:
        def name(label: int) -> str:
            return repr(ds.classes[label]) if ds.classes is not None and label < len(ds.classes) else str(label)
        shown = '; '.join(f'{path!r} is row {a} with label {name(labels[a])} and row {b} with label '
                          f'{name(labels[b])}' for a, b, path in conflicts[:5])
        more = f' (and {len(conflicts) - 5} more)' if len(conflicts) > 5 else ''
        raise ValueError(f'{ds.source}: {role} data lists {len(conflicts)} image(s) twice with different labels: '
                         f'{shown}{more}; keep one label per image')
    if repeats:
        logging.getLogger('modelscope.utuning.data').warning(
            f'{ds.source}: {len(repeats)} {role} image(s) listed more than once with the same label, counted once '
            f'per listing, e.g. {repeats[0][2]!r} (rows {repeats[0][0]} and {repeats[0][1]})')


def _preview(names: Sequence[str], n: int = 8) -> str:
    names = [str(x) for x in names]
    return ', '.join(names[:n]) + (f', ... ({len(names)} in all)' if len(names) > n else '')
