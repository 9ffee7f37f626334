"""Probe first, then tune (LP-FT, Kumar et al. 2022), as an option: for the first epochs of a run only the head
learns; the tuners (and any other trainable backbone parameter) join afterwards.

Off by default, because measured it does not help here. It was the leading candidate for issue #23 (a tuned model
ending below its own linear probe on few-shot colour photographs): every parallel tuner starts silent, so a tuned
model starts as its probe, and training the head first should let the tuners start from the probe's boundaries.
Measured on the colour set (``benchmarks/README.md``; DINOv2 ViT-S/14, 5 shots per class, 20 epochs of batch 10,
tri-tuner), it ends *below* both the probe and joint training: at 56 px and the default lr (3 seeds, paired)
probe 55.0 %, joint 56.3 %, probe-first (half the epochs) 53.8 %; at 112 px, lr 5e-4, seed 0: probe 61.5 %, joint
63.3 %, probe-first 59.6 % (its test accuracy was 62.4 % when the tuners joined at epoch 10 and fell after).

Configuration: ``train.probe_epochs``: ``none`` / 0 (default: everything learns from the first step), a number of
epochs (int >= 0), a fraction of the epochs in (0, 1), or ``auto`` (half of ``max_epochs``, rounded down, when the
model has trainable parameters besides its head and its head is freshly made).

How: while the head learns alone, the other parameters' gradients are dropped before each optimizer step (AdamW
then leaves them, their moments and their weight decay untouched, as if they were frozen), and - without data
parallelism - they do not require gradients at all, so the backward pass stops at the head (those epochs cost what
a linear probe costs). The phase follows the trainer's epoch, so a resumed run is in the same phase as an
uninterrupted one. The learning-rate schedule is the run's own (the tuners join at the schedule's current rate).
"""
from __future__ import annotations

import math
from typing import Any, List

import torch

from ..network import as_network
from .warmup import count_or_fraction

AUTO_FRACTION = 0.5


def probe_epochs(setting: Any, max_epochs: int, has_body: bool, head_loaded: bool) -> int:
    """The number of head-only epochs ``train.probe_epochs`` asks for; ValueError naming the key when it is bad."""
    if setting in (None, 'none', False):
        return 0
    if setting == 'auto':
        if not has_body or head_loaded:
            return 0
        return int(math.floor(AUTO_FRACTION * max_epochs))
    value = count_or_fraction(setting, 'train.probe_epochs', 'epochs', 'the epochs')
    return int(math.floor(value * max_epochs)) if isinstance(value, float) else min(value, max_epochs)


def _hook_base():
    from modelscope.trainers.hooks import Hook
    return Hook


class ProbeFirst(_hook_base()):
    """Head-only for the first ``epochs`` epochs (see the module docstring). ``body``: the trainable parameters
    that wait; ``toggle``: whether to switch their ``requires_grad`` too (not under data parallelism, whose
    wrapper fixed the set of parameters that receive gradients when it was built)."""

    def __init__(self, optimizer, body: List[torch.nn.Parameter], epochs: int, toggle: bool = True):
        self.body, self.epochs, self.toggle = list(body), int(epochs), toggle
        self.active = False
        self._handle = optimizer.register_step_pre_hook(self._drop_body_grads)

    def _set(self, active: bool) -> None:
        self.active = active
        if self.toggle:
            for p in self.body:
                p.requires_grad_(not active)

    def _drop_body_grads(self, optimizer, args, kwargs):
        if self.active:
            for p in self.body:
                p.grad = None

    def before_train_epoch(self, trainer):
        self._set(trainer.epoch < self.epochs)

    def after_run(self, trainer):
        self._set(False)  # the model leaves training with every trainable parameter trainable again

    def remove(self) -> None:
        self._set(False)
        self._handle.remove()


def install_probe_first(trainer, optimizer):
    """The trainer's :class:`ProbeFirst` hook for ``train.probe_epochs`` (registered with the trainer), or None when
    there is nothing to wait for."""
    model = trainer.model_unwrapped
    net = as_network(model)
    roles = net.parameter_roles()
    body = [p for n, p in net.named_parameters() if p.requires_grad and roles.get(n) != 'head']
    n = probe_epochs(trainer.cfg.safe_get('train.probe_epochs'), trainer.max_epochs, bool(body),
                     bool(getattr(model, 'head_loaded', False)))
    if not n:
        return None
    hook = ProbeFirst(optimizer, body, n, toggle=not getattr(trainer, '_dist', False))
    trainer.register_hook(hook)
    return hook
