"""One training run per work_dir at a time: a lock file held while a trainer trains or evaluates.

Two trainers on one ``work_dir`` would interleave one log and race on ``epoch_N.pth`` and ``output/``. The lock is
an ``flock`` on ``work_dir/.lock`` (released by the kernel when the process dies, so a killed run never leaves a
stale lock); the file names the holder's pid for the message.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional

LOCK_FILE = '.lock'
# Locks this process holds: lock file (real path) -> [descriptor, holders]. The command line holds the lock of its
# work_dir for the whole command and the trainer it builds takes the same lock again: that is one run, not two.
_HELD: Dict[str, List[int]] = {}


class WorkDirBusyError(RuntimeError):
    """Another live process holds the work_dir."""


class WorkDirLock:
    """The lock of ``work_dir`` for the process of global rank 0; other ranks of a data-parallel run share the
    work_dir with it by design and take no lock."""

    def __init__(self, work_dir: str):
        self.work_dir = work_dir
        self.path = os.path.join(work_dir, LOCK_FILE)
        self._fd: Optional[int] = None
        self._key: Optional[str] = None

    @staticmethod
    def _is_rank0() -> bool:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank() == 0
        return int(os.environ.get('RANK', '0') or 0) == 0

    def acquire(self) -> 'WorkDirLock':
        if self._fd is not None or not self._is_rank0():
            return self
        import fcntl
        os.makedirs(self.work_dir, exist_ok=True)
        key = os.path.realpath(self.path)
        if key in _HELD:  # this process holds it already
            _HELD[key][1] += 1
            self._fd, self._key = _HELD[key][0], key
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors='replace').strip() or '?'
            os.close(fd)
            raise WorkDirBusyError(f'work_dir {self.work_dir!r} is in use by another training run (pid {holder}); '
                                   'wait for it or use another work_dir') from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd, self._key = fd, key
        _HELD[key] = [fd, 1]
        return self

    def release(self) -> None:
        if self._fd is not None:
            held = _HELD.get(self._key)
            if held is not None and held[1] > 1:
                held[1] -= 1
            else:
                import fcntl
                _HELD.pop(self._key, None)
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
            self._fd = None

    def check(self) -> None:
        """Raise now if another process holds the lock (taken and given back at once)."""
        if self._fd is None:
            self.acquire()
            self.release()

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
