"""Where a model argument points: a local path or a hub id, decided by one rule (:func:`locate_model_source`).

A hub id is ``owner/name``. A string that exists locally is a local path. A string that does not exist is a hub id
only when nothing about it says "path"; otherwise it is a local path that is missing, and it is named at once
(a ``ValueError``) instead of being sent to the hub, which fails much later (15 s of retries offline) with a
connection error that does not name the typo. Path-shaped means any of:

- absolute (``/x/y``, ``C:\\x``), or starting with ``~`` (which is not expanded);
- relative with ``./`` or ``../`` (or ``.`` / ``..`` anywhere in it);
- ending with a separator (``models/``);
- holding a backslash, an empty part (``a//b``) or more than one ``/`` (a hub id has exactly one);
- ``first/second`` where ``first`` is a folder here: ``work_dir/outptu`` next to an existing ``work_dir`` is a
  typo in a path, not the hub model ``outptu`` of a user ``work_dir``.

Everything else of the form ``owner/name`` goes to the hub (ModelScope downloads it): ``damo/vit-base`` with no
local ``damo`` folder is a hub id. A string that is neither (``mymodel``) is named as well.

Used by the pipeline (single and several models), ``Model.from_pretrained`` through our model class, our trainer
(``build_trainer(model=...)``), :class:`~.multitask.TaskGroup`, the command line and the guard in
:mod:`.compat` (8.) that ModelScope's own ``pipeline()`` / ``build_trainer()`` reach before our code runs.
"""
from __future__ import annotations

import difflib
import os
import re
from typing import Any, Optional, Tuple

HUB_ID = re.compile(r'^[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*$')  # owner/name
LOCAL, HUB = 'local', 'hub'
EXPECTED = "expected a model folder (with configuration.json) or a hub id like 'owner/name'"


class ModelLocationError(ValueError):
    """A model argument that is a missing local path, or neither a path nor a hub id. ``spec`` is the argument,
    ``reason`` why it is not usable (without the argument), for callers that phrase their own message."""

    def __init__(self, spec: str, reason: str):
        self.spec, self.reason = spec, reason
        super().__init__(f'model {spec!r}: not a model folder: {reason}; {EXPECTED}')


def _separators() -> Tuple[str, ...]:
    return tuple(s for s in {'/', os.sep, os.altsep} if s)


def path_shape(spec: str) -> Optional[str]:
    """Why ``spec`` (a string that does not exist) reads as a local path, or None when it may be a hub id."""
    seps = _separators()
    if spec.startswith('~'):
        return 'it starts with ~, which is not expanded'
    if os.path.isabs(spec) or spec.startswith(seps):
        return 'an absolute path'
    if spec.endswith(seps):
        return 'it ends with a path separator'
    if '\\' in spec:
        return 'it holds a backslash'
    parts = re.split('|'.join(re.escape(s) for s in seps), spec)
    if parts[0] in ('.', '..'):
        return f'a relative path (it starts with {parts[0]}/)'
    if any(p in ('.', '..') for p in parts):
        return "a path (it holds '.' or '..')"
    if len(parts) > 1 and '' in parts:
        return 'a path (it holds an empty part)'
    if len(parts) > 2:
        return f"a path ({len(parts)} parts; a hub id is owner/name)"
    if len(parts) == 2 and os.path.isdir(parts[0]):
        return (f'{parts[0]!r} is a folder here, so {spec!r} is a path in it, not a hub id (for the hub model, '
                f'run from a folder without {parts[0]!r})')
    return None


def _missing_detail(spec: str) -> str:
    """``'<first missing part>' is not in '<deepest existing folder>'`` plus a close match there, if any."""
    path = os.path.abspath(spec)
    missing = ''
    while path and not os.path.exists(path):
        parent, missing = os.path.dirname(path), os.path.basename(path)
        if parent == path:
            break
        path = parent
    if not missing or not os.path.isdir(path):
        return f'no such folder {os.path.abspath(spec)!r}'
    text = f'no such folder {os.path.abspath(spec)!r} ({missing!r} is not in {path!r}'
    try:
        names = [n for n in os.listdir(path) if not n.startswith('.')]
    except OSError:
        names = []
    close = difflib.get_close_matches(missing, names, n=1, cutoff=0.6)
    return text + (f'; did you mean {close[0]!r}?)' if close else ')')


def locate_model_source(model: Any) -> Tuple[str, str]:
    """``('local', path)`` for a string (or ``os.PathLike``) that exists, ``('hub', id)`` for a hub id to
    download; :class:`ModelLocationError` (a ValueError naming the argument) for a missing path or a string that
    is neither. Nothing is read or downloaded: only the local file system is looked at."""
    is_pathlike = isinstance(model, os.PathLike)
    if is_pathlike:
        model = os.fspath(model)
    if not isinstance(model, str):
        raise TypeError(f'model={model!r}: expected a folder path or a hub id (a string)')
    if not model.strip():
        raise ModelLocationError(model, 'an empty name')
    if os.path.exists(model):
        return LOCAL, model
    why = 'a path object' if is_pathlike else path_shape(model)
    if why is not None:
        raise ModelLocationError(model, f'{_missing_detail(model)}; read as a local path: {why}')
    if HUB_ID.match(model):
        return HUB, model
    raise ModelLocationError(model, f'{_missing_detail(model)}, and not a hub id (owner/name)')


def is_missing_local_path(model: Any) -> bool:
    """Whether ``model`` is a string the rule refuses (a missing local path, or neither path nor hub id)."""
    if not isinstance(model, (str, os.PathLike)):
        return False
    try:
        locate_model_source(model)
    except ModelLocationError:
        return True
    return False
