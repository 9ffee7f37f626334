"""What every parallel U-Tuner shares: ``OP'(h) = OP(h) + s * U(h)``, its scale ``s`` and where it joins.

A parallel tuner computes a branch ``u = U(h)`` (B, n, C) from the OP input h; :class:`ParallelTuner` turns it
into the OP's additive term ``delta = s(h) * u`` (see :mod:`.scale`) and says where that term joins the frozen
computation (``join``, one option of every parallel entry):

- ``residual`` (default): after the layer scale, measured in units of the residual stream it joins:
  ``x' = x + OP(h) + rms(x) * s * U(h)`` with ``rms(x)`` the per-token root-mean-square of that stream (no
  gradient flows through it). Why: the OP reads ``norm(x)``, so it is blind to the scale of ``x``, and a
  pre-trained backbone's residual stream may have any scale (DINOv2 ViT-S/14's is 0.05-0.5 per channel in its
  early layers; supervised ViTs grow to tens). A term in absolute units is then a negligible nudge on one
  backbone and a rewrite of the features on another: one AdamW step at a common PETL learning rate
  (2e-3) moved DINOv2's features by 35-40 % through a single P-Adapter. Measured in the residual's own units,
  the same step is the same relative change on every backbone, with or without layer scale (the function
  ``x -> k x`` applied to the embeddings and every OP output leaves a normalised ViT unchanged, and with it now
  the tuned model and its gradients up to that factor).
- ``layer_scale``: before the layer scale, like the frozen OP's own output, ``x' = x + gamma * (Attn(h) + s
  U(h))`` (CaiT / DINOv2 blocks; the same as ``absolute`` where the OP has no layer scale, or on the block OP).
- ``absolute``: ``x' = x + OP(h) + s * U(h)`` in absolute units, the literal formula: version 0.1's
  parametrization (with its initialisations), kept so that models saved by it load unchanged.

Measured (DINOv2 ViT-S/14, Fashion-MNIST 10-shot, 112 px, tri-tuner, AdamW, 60 steps; ``benchmarks/README.md``
has the sweep): with ``absolute`` the tri-tuner collapses to chance at lr 1e-2 and trains poorly from 2e-3 without
warm-up; with ``residual`` it trains at every lr from 5e-4 to 1e-2.

Whatever the join, a parallel tuner starts silent: its branch or its scale starts at zero, so the tuned model
equals the frozen one at step 0.

The scale starts at 1 (``DEFAULT_SCALE_INIT``; a P-Prompt's at 0) unless the entry's ``scale_init`` says
otherwise. The trainer writes one into entries that name none when the learning rate is below 4e-3
(``training/policy.py``, rule 9: ``4e-3 / lr``, so 8 at 5e-4 and 4 at the default 1e-3): the output weights start
at zero and AdamW moves each by about the lr per step, so the branch grows at about ``s * lr`` per step, and at low
rates a short run ended with the tuners barely started (the tri-tuner 1.1 points under its linear probe at lr 5e-4
on 10-shot Fashion-MNIST; 5.9 over it with the rule). A larger start at every rate (He et al. 2022's scaled parallel
adapter, s = 4) was measured and not adopted (``benchmarks/README.md``, "The parallel scale's start"): it moves the
whole learning-rate curve down, 4.0 points under the probe at lr 1e-2 on 5-shot colour photos (7.3 over it with
s = 1) and a collapse at 2e-2.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..backbone.hooks import OpContext
from .base import Tuner, TunerConfig, option
from .scale import SCALES, Scale

JOINS = ('residual', 'layer_scale', 'absolute')
DEFAULT_JOIN = 'residual'
DEFAULT_SCALE = 'channel'
DEFAULT_SCALE_INIT = 1.0  # s at step 0 from lr 4e-3 up (see the module docstring)


@dataclass(frozen=True)
class ParallelConfig(TunerConfig):
    scale: str = option(None, "the learned scale s: 'none', 'scalar', 'channel' (default for the parallel form) "
                              "or 'input' (s(h) = h w + b)", choices=SCALES)
    scale_init: float = option(None, "the scale's initial value (default: the kind's, 1; a P-Prompt's 0; the "
                                     "trainer's below lr 4e-3 with Adam: 4e-3 / lr)",
                               init_only=True)
    join: str = option(None, "where s U(h) joins: 'residual' (default: after the layer scale, in units of the "
                             "residual stream), 'layer_scale' (before it) or 'absolute'", choices=JOINS)


class ParallelTuner(Tuner):
    """Base of the kinds with a parallel form: subclasses compute :meth:`branch`; ``combine`` adds ``delta``.
    Their entries have the options of :class:`ParallelConfig`, which only the parallel form has."""

    bypass_forms = ('parallel',)
    default_scale_init = DEFAULT_SCALE_INIT  # unless the entry gives one (a kind may start at 0)

    @classmethod
    def check(cls, spec) -> None:
        """Scale, its initial value and the join belong to the parallel form only."""
        if spec.form == 'sequential':
            o = spec.options
            if o.scale not in (None, 'none'):
                spec.fail('the sequential (original) form has no learned scale; use form "parallel"')
            for name in ('scale_init', 'join'):
                if getattr(o, name) is not None:
                    spec.fail(f'the sequential (original) form computes what the built-in computes; "{name}" is '
                              'an option of the parallel form')

    @classmethod
    def resolve(cls, spec, dims):
        """Parallel: scale ``channel``, join ``residual``, the kind's initial scale; sequential: no scale."""
        o = spec.options
        if spec.form == 'sequential':
            o = dataclasses.replace(o, scale='none')
        else:
            o = dataclasses.replace(o, scale=o.scale or DEFAULT_SCALE, join=o.join or DEFAULT_JOIN,
                                    scale_init=cls.default_scale_init if o.scale_init is None else o.scale_init)
        return dataclasses.replace(spec, options=o)

    @classmethod
    def starts_at_default_scale(cls, entry) -> bool:
        """Whether ``entry`` (a raw ``model.backbone.tuners`` entry of this kind) builds a parallel tuner whose scale
        :meth:`resolve` would start at ``DEFAULT_SCALE_INIT``: the parallel form, no ``scale_init`` named, and a kind
        whose own start is that default (not a P-Prompt's 0). The trainer's rule 9 writes a start into these."""
        return (entry.get('form', cls.default_form) == 'parallel' and 'scale_init' not in entry
                and cls.default_scale_init == DEFAULT_SCALE_INIT)

    def _init_parallel(self, spec, dim: int) -> None:
        self.scale = Scale(spec.scale, dim, spec.scale_init)
        self.join = spec.join

    def branch(self, ctx: OpContext) -> torch.Tensor:
        """``U(h)`` (B, n, C)."""
        raise NotImplementedError

    def scaled_branch(self, ctx: OpContext) -> torch.Tensor:
        """``s(h) * U(h)`` (B, n, C); a kind whose branch ends in a projection may compute it more cheaply."""
        return self.scale(ctx.h, self.branch(ctx))

    def delta(self, ctx: OpContext) -> torch.Tensor:
        d = self.scaled_branch(ctx)
        if self.join == 'residual':
            return d * ctx.residual_rms()
        if self.join == 'layer_scale':
            gamma = ctx.layer_scale()
            return d if gamma is None else d * gamma
        return d

    def combine(self, ctx: OpContext, y: torch.Tensor) -> torch.Tensor:
        return y + self.delta(ctx)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f', join={self.join}' if self.form == 'parallel' else '')
