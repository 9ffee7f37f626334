"""The trainer's epoch checkpoints: whole or absent, each one a loadable model, and nothing written to ``output/``.

ModelScope's checkpoint hook, at the start of training, copies the base model's files and configuration into
``work_dir/output`` and, at every checkpoint, hard-links the raw epoch file there; a run that fails or is killed
leaves an ``output/`` that loads as a model (the untrained base one). Its files are written in place, so a kill
during a write leaves a half-written ``epoch_N.pth`` that fails later with torch's zip error naming no file.

:class:`CheckpointWriter` is our processor for that hook (ModelScope's own extension point,
``CheckpointHook.set_processor``), installed on our trainer's hooks only:

- ``prepare_output`` writes nothing (the trainer writes ``output/`` once, complete, at the end; see export.py);
  the hook's own small files (``eval_result.txt``) go to a private folder, ``work_dir/.hook_output``;
- ``epoch_N.pth`` and ``epoch_N_trainer_state.pth`` are written to a temporary name and renamed, the trainer state
  first: a model file never exists without its state;
- ``epoch_N.pth`` holds ``{'state_dict', 'CLASSES', 'model_cfg', 'utuning'}`` (``utuning``: the writer's version,
  which dates its tuner entries for :mod:`..checkpoint.migrate`): ModelScope's resume reads its ``state_dict``,
  and :func:`modelscope_utuning.load_model` builds the model from it alone.
"""
from __future__ import annotations

import glob
import io
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from modelscope.trainers.hooks.checkpoint.checkpoint_processor import CheckpointProcessor
from modelscope.utils.checkpoint import weights_to_cpu

from ..checkpoint.migrate import writer_marker
from ..compat import quiet_upload_queue
from ..fileio import atomic_write, fault_point

HOOK_OUTPUT = '.hook_output'
_EPOCH = re.compile(r'^(epoch|iter)_(\d+)\.pth$')


def _save(obj: Any, path: str) -> None:
    def write(tmp: str) -> None:
        with io.BytesIO() as buf:  # serialise first: the file only ever holds a whole checkpoint
            torch.save(obj, buf)
            with open(tmp, 'wb') as f:
                f.write(buf.getvalue())
                f.flush()
                os.fsync(f.fileno())
    atomic_write(path, write)


class CheckpointWriter(CheckpointProcessor):
    """ModelScope's checkpoint processor, writing whole files and nothing into the output folder (module
    docstring). ``model_cfg`` gives the ``model`` section saved with each epoch file."""

    def __init__(self, model_cfg: Optional[Dict[str, Any]] = None):
        super().__init__()
        self.model_cfg = model_cfg or {}

    def prepare_output(self, trainer, output_dir):
        os.makedirs(output_dir, exist_ok=True)  # the hook's private folder (its eval_result.txt goes there)

    def link(self, model, src_file, output_dir):
        pass  # output/ is written by the trainer at the end of the run, whole

    def save_trainer_state(self, trainer, model, train_state_file, meta, save_optimizers):
        state: Dict[str, Any] = {'meta': dict(meta or {})}
        if save_optimizers:
            state['optimizer'] = trainer.optimizer.state_dict()
            if trainer.lr_scheduler is not None and hasattr(trainer.lr_scheduler, 'state_dict'):
                state['lr_scheduler'] = trainer.lr_scheduler.state_dict()
        from modelscope import __version__
        import time
        state['meta'].update(modelscope=__version__, time=time.asctime())
        if getattr(model, 'CLASSES', None) is not None:
            state['meta']['CLASSES'] = list(model.CLASSES)
        _save(state, train_state_file)
        fault_point('between_state_and_model')  # the trainer state of epoch N is there, its model file not yet

    def save_model_state(self, model, model_file):
        _save({'state_dict': weights_to_cpu(model.state_dict()),
               'CLASSES': list(model.CLASSES) if getattr(model, 'CLASSES', None) is not None else None,
               'model_cfg': self.model_cfg, 'utuning': writer_marker()}, model_file)


def install(trainer, model_cfg: Dict[str, Any]) -> None:
    """Give every checkpoint hook of ``trainer`` our processor and a private folder for its own files (and, where
    it uploads nothing, no upload queue: compat.py, 6.)."""
    from modelscope.trainers.hooks import CheckpointHook
    for hook in trainer.hooks:
        if isinstance(hook, CheckpointHook):
            hook.set_processor(CheckpointWriter(model_cfg))
            hook.output_dir = os.path.join(trainer.work_dir, HOOK_OUTPUT)
            quiet_upload_queue(hook)


def epoch_files(work_dir: str) -> Dict[int, Tuple[str, str]]:
    """``{N: (epoch_N.pth, epoch_N_trainer_state.pth)}`` for the checkpoints in ``work_dir`` (iter_N alike)."""
    out = {}
    for path in glob.glob(os.path.join(work_dir, '*.pth')):
        m = _EPOCH.match(os.path.basename(path))
        if m:
            out[int(m.group(2))] = (path, path[:-len('.pth')] + CheckpointProcessor.TRAINER_STATE_SUFFIX)
    return out


def trainer_state_globals():
    """The non-tensor types in a trainer state file (NumPy's RNG state). Allow-listing them keeps
    ``torch.load(weights_only=True)`` - ModelScope's resume path - working on torch >= 2.6 without unpickling
    arbitrary objects."""
    import numpy as np
    core = getattr(np, '_core', None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def _load(path: str) -> Any:
    with torch.serialization.safe_globals(trainer_state_globals()):
        return torch.load(path, map_location='cpu', weights_only=True)


def readable(path: str) -> bool:
    try:
        _load(path)
        return True
    except Exception:  # noqa: BLE001 - anything that does not load is not a checkpoint to resume from
        return False


@dataclass
class ResumePlan:
    """Where a resumed run starts. ``files``: the epoch files' names, oldest first; ``checkpoint``: the model file to
    continue from (None: epoch 1) and ``epoch`` its number; ``skipped``: why each newer file was passed over, newest
    first."""
    files: List[str] = field(default_factory=list)
    checkpoint: Optional[str] = None
    epoch: Optional[int] = None
    skipped: List[str] = field(default_factory=list)


def resume_plan(work_dir: str) -> ResumePlan:
    """Each epoch's model file and trainer state are loaded, newest first, until both load: the newest one a
    resume after a crash or a kill should start from, with the reason each newer one was skipped."""
    found = epoch_files(work_dir)
    plan = ResumePlan(files=[os.path.basename(found[n][0]) for n in sorted(found)])
    for n in sorted(found, reverse=True):
        model_file, state_file = found[n]
        if not os.path.isfile(state_file):
            plan.skipped.append(f'{os.path.basename(state_file)} is missing')
        elif not readable(model_file):
            plan.skipped.append(f'{os.path.basename(model_file)} cannot be read (half-written or damaged)')
        elif not readable(state_file):
            plan.skipped.append(f'{os.path.basename(state_file)} cannot be read (half-written or damaged)')
        else:
            plan.checkpoint, plan.epoch = model_file, n
            break
    return plan


def latest_checkpoint(work_dir: str) -> Optional[str]:
    """The newest ``epoch_N.pth`` of ``work_dir`` whose model file and trainer state both load (:func:`resume_plan`),
    or None."""
    return resume_plan(work_dir).checkpoint


def check_resume_file(path: str) -> None:
    """ValueError naming ``path`` (and its trainer state) when a checkpoint to resume from is missing or does not
    load, instead of torch's error deep inside the run."""
    state = path[:-len('.pth')] + CheckpointProcessor.TRAINER_STATE_SUFFIX if path.endswith('.pth') else None
    for p in (path, state):
        if p is None:
            continue
        if not os.path.isfile(p):
            raise ValueError(f'checkpoint {p!r} does not exist')
        try:
            _load(p)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f'checkpoint {p!r} cannot be read (a half-written or damaged file?): {e}; '
                             'resume from an earlier epoch_N.pth') from e
