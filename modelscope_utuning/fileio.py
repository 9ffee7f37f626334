"""File helpers. Writes go to a temporary name in the same folder, then a rename: nothing half-written is left."""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Callable, Dict


def fault_point(name: str) -> None:
    """A place where the fault-injection tests may kill the process (``UTUNING_FAULT=name:N`` kills it with SIGKILL
    the N-th time this point is reached). Costs one environment lookup otherwise."""
    spec = os.environ.get('UTUNING_FAULT')
    if not spec:
        return
    want, _, count = spec.partition(':')
    if want != name:
        return
    _FAULT_COUNTS[name] = _FAULT_COUNTS.get(name, 0) + 1
    if _FAULT_COUNTS[name] == int(count or 1):
        import signal
        os.kill(os.getpid(), signal.SIGKILL)


_FAULT_COUNTS: Dict[str, int] = {}


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)``, then move the result to ``path``; on any failure remove the temporary file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix='.tmp-', suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
        write(tmp)
        fault_point('atomic_write')  # written, not yet in place
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text_atomic(path: str, text: str) -> None:
    def write(tmp):
        with open(tmp, 'w', encoding='utf-8') as f:
            f.write(text)
    atomic_write(path, write)


def read_json_object(path: str) -> Dict[str, Any]:
    """A JSON file whose top level is an object (e.g. configuration.json); ValueError naming ``path`` if not."""
    try:
        with open(path, encoding='utf-8') as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f'{path}: cannot read it as JSON ({e})') from e
    if not isinstance(data, dict):
        raise ValueError(f'{path}: expected a JSON object at the top level')
    return data
