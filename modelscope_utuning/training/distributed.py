"""Data-parallel training on CPU (gloo) or GPU (nccl) under ``torchrun``.

ModelScope's DDPHook assumes CUDA (``torch.cuda.set_device``, nccl, ``cuda:<rank>``); this hook picks the backend
and device from what the machine has, so ``torchrun --nproc_per_node 2 train.py`` also works on a CPU box.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from modelscope.trainers.hooks import Hook
from modelscope.trainers.hooks.priority import Priority
from modelscope.utils.constant import DistributedParallelType


class DataParallelHook(Hook):
    PRIORITY = Priority.LOW

    def __init__(self, launcher: str = 'pytorch'):
        if launcher != 'pytorch':
            raise ValueError(f"launcher={launcher!r}: only 'pytorch' (torchrun) is supported")
        self.wrapped = False

    def after_init(self, trainer):
        if not dist.is_initialized():
            if 'LOCAL_RANK' not in os.environ:
                raise ValueError("launcher='pytorch' needs the torchrun environment (LOCAL_RANK, RANK, WORLD_SIZE)")
            backend = 'nccl' if torch.cuda.is_available() else 'gloo'
            if backend == 'nccl':
                torch.cuda.set_device(int(os.environ['LOCAL_RANK']))
            dist.init_process_group(backend=backend)
        trainer.device = torch.device(f'cuda:{os.environ["LOCAL_RANK"]}' if torch.cuda.is_available() else 'cpu')
        trainer.model.to(trainer.device)
        trainer.parallel_groups[DistributedParallelType.DP] = None

    def before_run(self, trainer):
        self.wrap(trainer)

    def before_val(self, trainer):
        self.wrap(trainer)

    def wrap(self, trainer):
        if not self.wrapped:
            device_ids = [trainer.device.index] if trainer.device.type == 'cuda' else None
            trainer.model = torch.nn.parallel.DistributedDataParallel(trainer.model, device_ids=device_ids)
            self.wrapped = True


class EvalShardSampler(torch.utils.data.Sampler):
    """Rows ``[rank * n / world, (rank + 1) * n / world)`` of ``n`` evaluation rows, in order, unpadded.

    The shards of all ranks partition the rows (some may be one shorter, or empty), so gathered per-rank metric
    counts are over each row exactly once. Evaluation runs without gradient synchronisation, so ranks may run a
    different number of batches."""

    def __init__(self, n: int, rank: int, world_size: int):
        self.start = n * rank // world_size
        self.stop = n * (rank + 1) // world_size

    def __iter__(self):
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start
