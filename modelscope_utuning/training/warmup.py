"""Linear learning-rate warm-up over the first iterations of a run, on top of any schedule.

``lr_t = lr_sched(t) * (r + (1 - r) * t / N)`` for the first ``N`` optimizer steps (``r`` = 0.1), then the
schedule's own rate. Why: a parameter-efficient fine-tune starts with a fresh head and fresh tuners, and the first
AdamW steps move every parameter by about the full learning rate whatever its gradient; at the learning rates
PETL recipes use (1e-3 to 1e-2) those first steps can throw the tuners far from the pre-trained features before
the head has learnt where to go. Measured on DINOv2 ViT-S/14 (10-shot, 112 px, tri-tuner, lr 1e-2): 32 % test
accuracy without warm-up, 67 % with 10 % of the steps warmed up (``benchmarks/README.md``).

It counts iterations, not epochs, so it also works for runs of one or two epochs (ModelScope's ``LinearWarmup``
steps with the epoch-based schedule). The factor is applied to the optimizer's groups just for each step and
taken off right after, so the schedule (and ModelScope's LR log) see their own values, and a resumed run, which
knows its iteration, continues the warm-up exactly.

Configuration: ``train.warmup``: ``auto`` (default: 10 % of the run's iterations when the configuration has no
warm-up of its own in ``train.lr_scheduler.options.warmup``), a number of iterations (int >= 0; 0 = off), a
fraction of the run in (0, 1), or ``none``.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Union

START_RATIO = 0.1
AUTO_FRACTION = 0.1


def warmup_iters(setting: Any, total_iters: int, has_own_warmup: bool) -> int:
    """The number of warm-up iterations ``train.warmup`` asks for; ValueError naming the key when it is bad."""
    if setting is None or setting == 'auto':
        return 0 if has_own_warmup else max(1, math.ceil(AUTO_FRACTION * total_iters))
    if setting in ('none', False):
        return 0
    value = count_or_fraction(setting, 'train.warmup', 'iterations', 'the run')
    return max(1, math.ceil(value * total_iters)) if isinstance(value, float) else value


def count_or_fraction(setting: Any, key: str, unit: str, whole: str) -> Union[int, float]:
    """A setting that is a count (int >= 0, or a whole float) or a fraction in (0, 1): the int count or the
    float fraction; a ValueError naming ``key`` otherwise ('auto' / 'none' are the caller's to handle first)."""
    if isinstance(setting, bool) or not isinstance(setting, (int, float)) or setting < 0:
        raise ValueError(f"{key}={setting!r}: expected 'auto', 'none', a number of {unit} (int >= 0) "
                         f'or a fraction of {whole} in (0, 1)')
    if isinstance(setting, float) and not setting.is_integer():
        if setting >= 1:
            raise ValueError(f'{key}={setting!r}: a fraction of {whole} must be in (0, 1)')
        return setting
    return int(setting)


class StepWarmup:
    """Scales every group's learning rate for the optimizer's first ``iters`` steps (see the module docstring).
    ``step_index()`` gives the 0-based index of the step about to run."""

    def __init__(self, optimizer, iters: int, step_index: Callable[[], int], start_ratio: float = START_RATIO):
        self.iters, self.step_index, self.start_ratio = iters, step_index, start_ratio
        self._saved: Optional[list] = None
        self._handles = [optimizer.register_step_pre_hook(self._pre),
                         optimizer.register_step_post_hook(self._post)]

    def factor(self, t: int) -> float:
        if t >= self.iters:
            return 1.0
        return self.start_ratio + (1.0 - self.start_ratio) * t / self.iters

    def _pre(self, optimizer, args, kwargs):
        f = self.factor(self.step_index())
        if f < 1.0:
            self._saved = [g['lr'] for g in optimizer.param_groups]
            for g in optimizer.param_groups:
                g['lr'] = g['lr'] * f

    def _post(self, optimizer, args, kwargs):
        if self._saved is not None:
            for g, lr in zip(optimizer.param_groups, self._saved):
                g['lr'] = lr
            self._saved = None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
