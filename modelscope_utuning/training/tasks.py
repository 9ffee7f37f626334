"""Several bypass tasks trained in one run on one frozen forward per step.

Tasks tuned in bypass mode from the same pre-trained backbone share everything the backbone computes: its frozen pass
does not depend on their tuners. :func:`train_bypass_tasks` takes one ordinary trainer per task (each its model
configuration, data, labels, optimizer, schedule, hooks and ``work_dir``, built by ``build_trainer`` as usual) and
trains them together:

- the tasks' frozen weights become the first task's very tensors (held once);
- each step takes one batch from every task (one shared shuffle order when the tasks' data have the same length, so
  that tasks over the same images, e.g. one image set with N label columns, see the same images together), runs the
  frozen pass once over the distinct images of all the batches (:class:`~..backbone.feature_cache.
  FrozenFeatureCache`, pixel digests), and then each task's own ``train_step`` and hooks, whose forward reads the
  frozen pass back instead of computing it;
- each task's run is otherwise its own ModelScope run: its optimizer and scheduler hooks, warm-up, logging,
  evaluation, checkpoints, and at the end its own ``work_dir/output`` that ``pipeline()`` loads alone, and together
  with the others' in ``pipeline(model=[...])`` (:mod:`..multitask`: the backbone held once, one frozen forward).

The per-task runs are the loops of ModelScope's ``EpochBasedTrainer.train_loop`` stepped side by side: each trainer's
``train()`` prepares its run (data loader, hooks, lock) and hands its loop over; the last one to be ready runs all
loops. Numbers: over the same images in the same order each task ends at the weights of its own single run, bit for
bit (tests/test_tasks.py); over different images, the frozen pass of a batch composed of all tasks' images moves
matrix-product roundings by ~1e-6.
"""
from __future__ import annotations

import contextlib
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from modelscope.utils.constant import ModeKeys, TrainerStages
from modelscope.utils.data_utils import to_device
from modelscope.utils.logger import get_logger
from torch.utils.data import DataLoader, RandomSampler, Sampler

from ..backbone.bypass import fields_needed, live_steps
from ..backbone.feature_cache import FrozenFeatureCache
from ..multitask import _set_parameter
from .precision import autocast

logger = get_logger()


class SharedOrder(Sampler):
    """One random order per epoch, read by every task's data loader (``n`` rows each)."""

    def __init__(self, n: int):
        self.n = n
        self.order: List[int] = list(range(n))

    def new_epoch(self) -> None:
        self.order = torch.randperm(self.n).tolist()  # torch's global generator, as RandomSampler's seed

    def __iter__(self):
        return iter(self.order)

    def __len__(self) -> int:
        return self.n


def _layout(net) -> Tuple[Optional[int], Optional[List[int]]]:
    """(rows the side stream reads, the block outputs the head reads) of a network's training forward."""
    layers = net.head_layers_needed()
    if layers is not None:
        return None, list(layers)
    return (1 if net.backbone.global_pool == 'token' else None), None


class BypassTasks:
    """The joint run of :func:`train_bypass_tasks` (see the module docstring)."""

    def __init__(self, trainers: Mapping[str, object]):
        from .trainer import VisionEfficientTuningTrainer  # keeps this module light: the trainer stack
        if not trainers:
            raise ValueError('train_bypass_tasks: no task given; expected {name: trainer, ...}')
        self.names = list(trainers)
        self.trainers = [trainers[n] for n in self.names]
        for name, tr in zip(self.names, self.trainers):
            if not isinstance(tr, VisionEfficientTuningTrainer):
                raise TypeError(f'task {name!r}: expected a vision-efficient-tuning trainer, got {type(tr).__name__}')
            if not tr.model_unwrapped.model.backbone.bypass:
                raise ValueError(f'task {name!r}: its model is not in bypass mode (model.backbone.bypass=false); only '
                                 'bypass tasks share a frozen forward')
            if getattr(tr, 'train_dataset', None) is None:
                raise ValueError(f'task {name!r}: no training data')
        self.nets = [tr.model_unwrapped.model for tr in self.trainers]
        lead = self.trainers[0]
        dirs = [tr.work_dir for tr in self.trainers]
        if len(set(dirs)) != len(dirs):
            raise ValueError(f'tasks {self.names} share a work_dir ({dirs}): each task writes its own output/')
        for name, tr, net in zip(self.names[1:], self.trainers[1:], self.nets[1:]):
            for what, mine, theirs in (('train.max_epochs', tr.max_epochs, lead.max_epochs),
                                       ('precision', tr.precision, lead.precision),
                                       ('rows read (pooling, dense head)', _layout(net)[0], _layout(self.nets[0])[0])):
                if mine != theirs:
                    raise ValueError(f'task {name!r}: {what} {mine!r} differs from task {self.names[0]!r}\'s '
                                     f'{theirs!r}; the tasks step together on one frozen forward')
        self._share_frozen_weights()

    def _share_frozen_weights(self) -> None:
        """Every task's frozen weights become the first task's tensors; a task whose frozen weights differ is refused
        (its frozen pass is another one)."""
        lead = self.nets[0].backbone
        ours = dict(lead.frozen_named_parameters())
        for name, net in zip(self.names[1:], self.nets[1:]):
            theirs = dict(net.backbone.frozen_named_parameters())
            if theirs.keys() != ours.keys() or any(
                    p.shape != ours[k].shape or not torch.equal(p, ours[k]) for k, p in theirs.items()):
                raise ValueError(f'task {name!r}: its frozen backbone differs from task {self.names[0]!r}\'s (other '
                                 'pre-trained weights or architecture); tasks trained together share one')
            for k in theirs:
                _set_parameter(net.backbone, k, ours[k])

    # -- running ---------------------------------------------------------------------------------------------------
    def train(self) -> Dict[str, str]:
        """Train every task; returns ``{name: output folder}``."""
        self._ready: List[Tuple[object, DataLoader]] = []
        self._enter(0)
        return {n: tr.output_dir for n, tr in zip(self.names, self.trainers)}

    def _enter(self, k: int) -> None:
        """Task ``k``'s own ``train()``: it prepares its run, and its loop (``_loop_driver``) enters task ``k + 1``'s;
        the last one runs every loop. Each ``train()`` then finishes (its output/) as the stack unwinds."""
        tr = self.trainers[k]
        tr._loop_driver = lambda loader: self._ready_then_next(k, loader)
        try:
            tr.train()
        finally:
            tr._loop_driver = None

    def _ready_then_next(self, k: int, loader: DataLoader) -> None:
        self._ready.append((self.trainers[k], loader))
        if k + 1 < len(self.trainers):
            self._enter(k + 1)
        else:
            self._loop()

    def _loaders(self) -> Tuple[List[DataLoader], Optional[SharedOrder]]:
        """The tasks' loaders; when the tasks' data have one length and shuffle, one order for all of them."""
        loaders = [loader for _, loader in self._ready]
        lengths = {len(loader.dataset) for loader in loaders}
        if len(lengths) != 1 or not all(isinstance(loader.sampler, RandomSampler) for loader in loaders):
            return loaders, None
        order = SharedOrder(lengths.pop())
        return [DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=order, num_workers=loader.num_workers,
                           collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last,
                           worker_init_fn=loader.worker_init_fn) for loader in loaders], order

    def _loop(self) -> None:
        """ModelScope's ``train_loop``, for all tasks side by side, one frozen forward per step."""
        trainers = [tr for tr, _ in self._ready]
        loaders, order = self._loaders()
        iters = {len(loader) for loader in loaders}
        if len(iters) != 1:
            sizes = {n: len(loader) for n, loader in zip(self.names, loaders)}
            raise ValueError(f'the tasks give different numbers of batches per epoch ({sizes}); tasks trained '
                             'together step together: expected equal training set sizes (or batch sizes to match)')
        lead = trainers[0]
        rows = _layout(self.nets[0])[0]
        needs = tuple(tuple(sorted(set().union(*f))) for f in zip(
            *[fields_needed(n.backbone, [n.backbone], _layout(n)[1]) for n in self.nets]))
        # The tasks' frozen passes go through one cache: a step's images at a time, or, when every task's plan caches
        # (train.feature_cache), kept across steps as a single run keeps them.
        plans = [getattr(tr, 'feature_cache_plan', None) for tr in trainers]
        self.keep = all(p is not None and p.on for p in plans)
        cache = FrozenFeatureCache(int(max(p.max_mb for p in plans) * 2 ** 20) if self.keep else 2 ** 62)
        self.cache = cache
        for tr in trainers:
            tr.invoke_hook(TrainerStages.before_run)
            tr.model.train()
        for _ in range(lead._epoch, lead._max_epochs):
            for tr in trainers:
                tr.invoke_hook(TrainerStages.before_train_epoch)
            if order is not None:
                order.new_epoch()
            for i, batches in enumerate(zip(*loaders)):
                batches = [to_device(b, tr.device) for b, tr in zip(batches, trainers)]
                for tr, b in zip(trainers, batches):
                    tr.data_batch = b
                    tr._inner_iter = i
                    tr.invoke_hook(TrainerStages.before_train_iter)
                with self._one_frozen_pass(cache, lead, batches, (rows, needs)):
                    for tr, b in zip(trainers, batches):
                        tr.train_step(tr.model, b)
                for tr in trainers:
                    tr.invoke_hook(TrainerStages.after_train_iter)
                    del tr.data_batch
                    tr._iter += 1
                    tr._mode = ModeKeys.TRAIN
                if i + 1 >= lead.iters_per_epoch:
                    break
            for tr in trainers:
                tr.invoke_hook(TrainerStages.after_train_epoch)
                tr._inner_iter = 0
                tr._epoch += 1
            if any(getattr(tr, '_stop_training', False) for tr in trainers):
                break
        for tr in trainers:
            tr.invoke_hook(TrainerStages.after_run)
        if self.keep:
            logger.info(f'frozen feature cache of the {len(trainers)} tasks: {cache.summary()}')

    @contextlib.contextmanager
    def _one_frozen_pass(self, cache: FrozenFeatureCache, lead, batches: Sequence[dict], layout):
        """The frozen pass over the distinct images of ``batches``, held while the tasks' forwards read it."""
        vits = [net.backbone for net in self.nets]
        saved = [v.feature_cache for v in vits]
        images = torch.cat([b['imgs'] for b in batches])
        vit = vits[0]
        lead.model.train()  # the mode the tasks' train_step puts their models in, right after
        with autocast(lead.precision, lead._device_type):
            for _ in cache.steps(vit, images, layout, lambda some: live_steps(vit, some, layout[0])):
                pass
        for v in vits:
            v.feature_cache = cache
        try:
            yield
        finally:
            for v, s in zip(vits, saved):
                v.feature_cache = s
            if not self.keep:
                cache.clear()


def train_bypass_tasks(trainers: Mapping[str, object]) -> Dict[str, str]:
    """Train several bypass tasks in one run on one frozen forward per step (see the module docstring).

    ``trainers``: ``{task name: trainer}``, each built by ``build_trainer(name=Trainers.vision_efficient_tuning,
    default_args=dict(model=..., work_dir=..., train_dataset=..., eval_dataset=..., cfg_modify_fn=...))`` with its
    model in bypass mode, the same pre-trained backbone, the same number of epochs and batches per epoch. Returns
    ``{task name: its output folder}``; each trainer's ``evaluate()`` works as after its own ``train()``."""
    return BypassTasks(trainers).train()
