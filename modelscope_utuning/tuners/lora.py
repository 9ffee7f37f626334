"""LoRA (Hu et al. 2021): a low-rank update of frozen weights, ``W' = W + (alpha / r) B A``.

- on the mha OP: ``qkv += (alpha/r) B A h`` with ``A: C -> r``, ``B: r -> 3C`` (the built-in's layout, one pair
  for q, k and v together; applied at the ``q`` and ``kv`` hook points): ``r C + 3 C r`` parameters.
- on the ffn OP: fc1 and fc2 each get a pair (``fc1`` / ``fc2`` points): ``r C + r F`` and ``r F + r C``
  (F the MLP width).

``B`` starts at zero. :meth:`LoRA.merge` folds the update into the frozen weights for inference.

Learning rates (LoRA+, Hayou et al. 2024): ``A`` learns at ``lr / lr_ratio``, ``B`` at ``lr``. Why: ``A`` starts at
the scale ``1 / sqrt(3 d_in)`` (about 0.03 for d_in = 384), and AdamW moves every entry by about ``lr`` per step
whatever its gradient, so at lr 1e-2 one step re-draws a third of ``A`` - the directions the update reads - while
``B`` (from zero) has barely started: on DINOv2 ViT-S/14 the loss climbs to 4.8 and training ends at chance
(10 %), at 56 and 112 px alike, while 5e-4 trains. With ``A`` at ``lr / 16`` the same run (plain AdamW, 40 steps,
56 px) reaches 97.5 % on its training images at 1e-2 and 100 % at 5e-4 (``B`` carries the early updates). Only
the optimizer changes: the forward, the stored ``A`` / ``B`` and the hub layout stay the built-in's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Dims, Tuner, TunerConfig, option, register_tuner
from .spec import legacy_size


DEFAULT_LR_RATIO = 16.0  # LoRA+'s recommended ratio of B's to A's learning rate


@dataclass(frozen=True)
class LoRAConfig(TunerConfig):
    alpha: float = option(None, 'the update is scaled by alpha / rank (null, the default: alpha = rank, i.e. 1, on '
                                'every layer whatever its rank)')
    lr_ratio: float = option(DEFAULT_LR_RATIO, 'LoRA+: A learns at the tuner learning rate / lr_ratio, B at the tuner '
                                   'learning rate (default 16; 1: both alike, as plain LoRA)')


def _pair(d_in: int, d_out: int, rank: int):
    a = nn.Linear(d_in, rank, bias=False)
    b = nn.Linear(rank, d_out, bias=False)
    nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
    nn.init.zeros_(b.weight)
    return a, b


@register_tuner
class LoRA(Tuner):
    kind = 'lora'
    Config = LoRAConfig
    ops = ('mha', 'ffn')
    default_op = 'mha'
    size_keys = ('rank', 'length', 'dim')
    mergeable = True
    hub_names = (('attn.lora.', 'mha_lora.', None),)
    legacy_keys = ('lora_length', 'lora_type')

    @classmethod
    def check(cls, spec) -> None:
        if spec.form != 'parallel':
            spec.fail("LoRA has a single form; leave 'form' out (or 'parallel')")
        if spec.op == 'block':
            spec.fail("LoRA adapts weight matrices: op must be 'mha' (qkv) or 'ffn' (fc1, fc2)")
        for name in ('alpha', 'lr_ratio'):
            value = getattr(spec.options, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                spec.fail(f'{name} must be a positive number, got {value!r}')

    @classmethod
    def num_trainable(cls, spec, size: int, dims: Dims) -> int:
        C, F_ = dims.embed_dim, dims.mlp_hidden
        return size * C + 3 * C * size if spec.op == 'mha' else 2 * (size * C + size * F_)

    @classmethod
    def legacy_entry(cls, backbone_cfg: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        size = legacy_size(backbone_cfg, 'lora_length')
        return None if size is None else {'type': 'lora', 'op': 'mha', 'rank': size}

    def __init__(self, spec, size: int, dims: Dims):
        super().__init__(spec, size, dims)
        self.rank = size
        alpha = spec.alpha
        self.scaling = (alpha if alpha is not None else size) / size
        self.lr_ratio = float(spec.lr_ratio)
        C = dims.embed_dim
        if self.op == 'mha':
            self.lora_a, self.lora_b = _pair(C, 3 * C, size)
            self.points = ('q', 'kv')
        else:
            self.fc1_a, self.fc1_b = _pair(C, dims.mlp_hidden, size)
            self.fc2_a, self.fc2_b = _pair(dims.mlp_hidden, C, size)
            self.points = ('fc1', 'fc2')

    def _pair_for(self, point: str) -> Tuple[nn.Linear, nn.Linear, slice]:
        if point in ('q', 'kv'):
            C = self.lora_a.in_features
            return self.lora_a, self.lora_b, (slice(0, C) if point == 'q' else slice(C, 3 * C))
        a, b = (self.fc1_a, self.fc1_b) if point == 'fc1' else (self.fc2_a, self.fc2_b)
        return a, b, slice(None)

    def edit_linear(self, point: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y + (alpha/r) B A x`` (for q / kv: the rows of B that produce them)."""
        a, b, rows = self._pair_for(point)
        return y + F.linear(a(x), b.weight[rows]) * self.scaling

    def delta_weight(self, point: str) -> torch.Tensor:
        a, b, rows = self._pair_for(point)
        return (b.weight[rows] @ a.weight) * self.scaling

    @classmethod
    def qkv_entry(cls, ranks: Sequence[int]) -> Dict[str, Any]:
        """The entry of LoRA on the mha OP (the fused qkv) with these per-layer ranks (0: none) and scaling 1
        (alpha = rank), for :meth:`set_update` to fill."""
        return {'type': cls.kind, 'op': 'mha', 'rank': [int(r) for r in ranks]}

    @torch.no_grad()
    def set_update(self, a: torch.Tensor, b: torch.Tensor, scaling: float = 1.0) -> None:
        """Make this mha tuner compute ``W_qkv + scaling B A``, with ``A`` (rank, C) and ``B`` (3C, rank): a
        low-rank update of the fused qkv trained elsewhere (e.g. by ms-swift), carried over exactly."""
        if self.op != 'mha' or tuple(a.shape) != tuple(self.lora_a.weight.shape) \
                or tuple(b.shape) != tuple(self.lora_b.weight.shape):
            raise ValueError(f'a qkv update of A {tuple(a.shape)}, B {tuple(b.shape)} does not fit this {self.op} '
                             f'tuner (A {tuple(self.lora_a.weight.shape)}, B {tuple(self.lora_b.weight.shape)})')
        self.lora_a.weight.copy_(a)
        self.lora_b.weight.copy_(b * (scaling / self.scaling))

    def lr_scales(self) -> Dict[str, float]:
        """``A`` (``lora_a``, ``fc1_a``, ``fc2_a``) at ``1 / lr_ratio`` of the tuner learning rate (module docstring)."""
        return {n: 1.0 / self.lr_ratio for n, _ in self.named_parameters() if n.split('.')[0].endswith('_a')}

    def modifies(self) -> Tuple[str, ...]:
        return ('q', 'k', 'v') if self.op == 'mha' else ('fc1', 'fc2')

    @torch.no_grad()
    def merge(self, block) -> None:
        """Add ``(alpha/r) B A`` to the frozen weights of ``block``; the tuner then must be detached."""
        if self.op == 'mha':
            w = block.attn.qkv.weight
            w += ((self.lora_b.weight @ self.lora_a.weight) * self.scaling).to(w.dtype)
        else:
            for point, linear in (('fc1', block.mlp.fc1), ('fc2', block.mlp.fc2)):
                linear.weight += self.delta_weight(point).to(linear.weight.dtype)

    def extra_repr(self) -> str:
        return f'op={self.op}, rank={self.rank}, scaling={self.scaling:g}'
