"""Prefix tuners (Li & Liang 2021; parallel form: U-Tuning's P-Prefix).

Learnable keys and values ``K_pre, V_pre`` of shape ``(L, C)``, split into H heads of width d = C/H.

- sequential (original; mha OP only, as the built-in computes it): they are concatenated to the MHA's own keys
  and values, ``Attn(Q, [K; K_pre], [V; V_pre])``. Per query this equals
  ``(1 - lambda) Attn(Q, K, V) + lambda Attn(Q, K_pre, V_pre)`` with
  ``lambda = sum_j exp(q k_pre_j / sqrt d) / (sum_i exp(q k_i / sqrt d) + sum_j exp(q k_pre_j / sqrt d))``.
- parallel (P-Prefix, any OP): the mixing weight lambda becomes a free learned scale s and the prefix attention
  runs beside the OP: ``OP'(h) = OP(h) + s * Attn(Q, K_pre, V_pre)``, ``Q = W_q h`` through the block's frozen
  MHA query projection (on the block OP: ``W_q norm1(x)``), joined as :mod:`.parallel` says. No output
  projection is applied to the prefix branch: ``V_pre`` is learned, so a fixed projection would add cost and
  nothing else. ``V_pre`` starts at zero.

Trainable parameters: ``2 L C`` plus the scale's (parallel only).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn

from ..backbone.hooks import OpContext
from .attention import attend, split_heads
from .base import Dims, Tuner, register_tuner
from .parallel import ParallelConfig, ParallelTuner
from .scale import Scale
from .spec import legacy_size


@register_tuner
class Prefix(ParallelTuner):
    kind = 'prefix'
    Config = ParallelConfig
    ops = ('mha', 'ffn', 'block')
    forms = ('parallel', 'sequential')
    default_op = 'mha'
    size_keys = ('length', 'dim')
    hub_names = (('attn.prefix.prefix_key', 'mha_prefix.key', 'sequential'),
                 ('attn.prefix.prefix_value', 'mha_prefix.value', 'sequential'))
    legacy_keys = ('prefix_length', 'prefix_type')

    @classmethod
    def check(cls, spec) -> None:
        if spec.form == 'sequential' and spec.op != 'mha':
            spec.fail("a sequential prefix extends the MHA's keys and values: op must be 'mha' "
                      "(use form 'parallel' for the ffn / block OPs)")
        super().check(spec)

    @classmethod
    def num_trainable(cls, spec, size: int, dims: Dims) -> int:
        C = dims.embed_dim
        return 2 * size * C + Scale.num_params(spec.scale, C)  # 'none' (0) in the sequential form

    @classmethod
    def legacy_entry(cls, backbone_cfg: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        size = legacy_size(backbone_cfg, 'prefix_length')
        return None if size is None else {'type': 'prefix', 'op': 'mha', 'form': 'sequential', 'length': size}

    @classmethod
    def form_class(cls, form: str):
        return SequentialPrefix if form == 'sequential' else cls

    def __init__(self, spec, size: int, dims: Dims):
        """The parallel form (P-Prefix): ``V_pre`` starts at zero, so the branch starts silent."""
        super().__init__(spec, size, dims)
        self._prefix(size, dims)
        nn.init.zeros_(self.value)
        self._init_parallel(spec, dims.embed_dim)
        self.points = (self.op,)

    def _prefix(self, size: int, dims: Dims) -> None:
        self.num_heads = dims.num_heads
        self.key = nn.Parameter(torch.empty(1, size, dims.embed_dim))
        self.value = nn.Parameter(torch.empty(1, size, dims.embed_dim))
        nn.init.xavier_uniform_(self.key)

    def no_weight_decay(self) -> set:
        return {'key', 'value'}

    def borrows(self):
        # On the mha OP the query is the attention's own: merging into W_q changes both alike.
        return ('q',) if self.op != 'mha' else ()

    def branch(self, ctx: OpContext) -> torch.Tensor:
        """``Attn(W_q h, K_pre, V_pre)``."""
        return attend(ctx.query(), split_heads(self.key, self.num_heads), split_heads(self.value, self.num_heads))


class SequentialPrefix(Prefix):
    """The original prefix (mha OP only): its keys and values join the MHA's own at the ``extra_kv`` point,
    initialised as ModelScope's built-in initialises them."""

    def __init__(self, spec, size: int, dims: Dims):
        Tuner.__init__(self, spec, size, dims)
        self._prefix(size, dims)
        nn.init.xavier_uniform_(self.value)
        self.points = ('extra_kv',)

    def borrows(self):
        return ()

    def extra_kv(self, batch: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """The prefix keys / values as (B, H, L, d), to concatenate inside the MHA."""
        k = split_heads(self.key, self.num_heads).expand(batch, -1, -1, -1)
        v = split_heads(self.value, self.num_heads).expand(batch, -1, -1, -1)
        return k, v
