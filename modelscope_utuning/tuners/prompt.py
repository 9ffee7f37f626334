"""Prompt tuners (VPT, Jia et al. 2022; parallel form: U-Tuning's P-Prompt).

Learnable prompt tokens ``P`` of shape ``(L, C)``.

- sequential (original VPT-deep, block OP only, as the built-in computes it): the tokens join the sequence in
  front of the block (the ``tokens`` hook point); the first prompted layer appends them at the end of the
  sequence, each later prompted layer replaces the previous layer's prompt tokens with its own. They are then
  processed like image tokens.
- parallel (P-Prompt, any OP): the prompts go through the block's frozen key / value projections and are
  attended by the frozen queries of the OP input:
  ``OP'(h) = OP(h) + s * Attn(W_q h, W_k P + b_k, W_v P + b_v)`` (on the block OP ``W_q norm1(x)``), joined as
  :mod:`.parallel` says. The sequence length never changes, so it composes with any other tuner. ``s`` starts
  at zero. The tokens start as draws of N(0, 1), the statistics of the normalised tokens the frozen projections
  were trained on, so that their keys and values differ from one another from the first step (small initial tokens
  would all project to about ``b_k`` / ``b_v``: the branch would add one and the same vector to every token).

Trainable parameters: ``L C`` plus the scale's (parallel only).
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
import torch.nn as nn

from ..backbone.hooks import OpContext, TokenState
from .attention import attend
from .base import Dims, Tuner, register_tuner
from .parallel import ParallelConfig, ParallelTuner
from .scale import Scale
from .spec import legacy_size


@register_tuner
class Prompt(ParallelTuner):
    kind = 'prompt'
    Config = ParallelConfig
    ops = ('mha', 'ffn', 'block')
    forms = ('parallel', 'sequential')
    default_op = 'block'
    size_keys = ('length', 'dim')
    hub_names = (('prompt.prompt_token', 'block_prompt.tokens', 'sequential'),)
    legacy_keys = ('prompt_length', 'prompt_type')
    default_scale_init = 0.0

    @classmethod
    def check(cls, spec) -> None:
        if spec.form == 'sequential' and spec.op != 'block':
            spec.fail("a sequential prompt adds tokens to the block input: op must be 'block' "
                      "(use form 'parallel' for the mha / ffn OPs)")
        super().check(spec)

    @classmethod
    def num_trainable(cls, spec, size: int, dims: Dims) -> int:
        C = dims.embed_dim
        return size * C + Scale.num_params(spec.scale, C)  # 'none' (0) in the sequential form

    @classmethod
    def legacy_entry(cls, backbone_cfg: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        size = legacy_size(backbone_cfg, 'prompt_length')
        return None if size is None else {'type': 'prompt', 'op': 'block', 'form': 'sequential', 'length': size}

    @classmethod
    def form_class(cls, form: str):
        return SequentialPrompt if form == 'sequential' else cls

    def __init__(self, spec, size: int, dims: Dims):
        """The parallel form (P-Prompt): the scale starts at zero, so the branch starts silent."""
        super().__init__(spec, size, dims)
        self.length = size
        self.tokens = nn.Parameter(torch.empty(1, size, dims.embed_dim))
        self._init_parallel(spec, dims.embed_dim)
        if self.join == 'absolute':
            nn.init.xavier_uniform_(self.tokens)
        else:
            nn.init.normal_(self.tokens)
        self.points = (self.op,)

    def no_weight_decay(self) -> set:
        return {'tokens'}

    def borrows(self):
        return ('k', 'v') if self.op == 'mha' else ('q', 'k', 'v')

    def branch(self, ctx: OpContext) -> torch.Tensor:
        """``Attn(W_q h, W_k P + b_k, W_v P + b_v)``."""
        tokens = self.tokens.to(ctx.h.dtype)
        return attend(ctx.query(), ctx.project(tokens, 'k'), ctx.project(tokens, 'v'))


class SequentialPrompt(Prompt):
    """The original VPT-deep prompts (block OP only): tokens that join the sequence at the ``tokens`` point,
    initialised as ModelScope's built-in initialises them."""

    def __init__(self, spec, size: int, dims: Dims):
        Tuner.__init__(self, spec, size, dims)
        self.length = size
        self.tokens = nn.Parameter(torch.empty(1, size, dims.embed_dim))
        nn.init.xavier_uniform_(self.tokens)
        self.points = ('tokens',)

    def borrows(self):
        return ()

    def drops_rows(self, state: TokenState) -> int:
        return state.appended

    def edit_tokens(self, x: torch.Tensor, state: TokenState) -> torch.Tensor:
        """``(B, N, C) -> (B, N - appended + L, C)``, replacing the previous layer's prompts."""
        if state.appended:
            x = x[:, :-state.appended]
        state.appended = self.length
        return torch.cat((x, self.tokens.expand(x.shape[0], -1, -1).to(x.dtype)), dim=1)
