"""U-Tuners: small trainable modules attached to the frozen OPs of a ViT.

U-Tuning (Jiang et al., arXiv 2303.00690) writes every tuner as ``x' = OP(x) + s * U(x)`` with a frozen OP
(mha, ffn or the whole block) and a parallel tuner U (adapter, prefix, prompt). The original, sequential
forms of these methods, LoRA, BitFit and side-tuning are here too. See :mod:`.spec` for the configuration.
"""
from __future__ import annotations

from typing import Iterable, List

import torch.nn as nn

from ..backbone.vit import VisionTransformer
from .adapter import Adapter
from .lora import LoRA
from .prefix import Prefix
from .prompt import Prompt
from .scale import Scale
from .side import SideTuner
from .spec import TunerSpec, legacy_entries, parse_tuner, parse_tuners

__all__ = ['Adapter', 'LoRA', 'Prefix', 'Prompt', 'Scale', 'SideTuner', 'TunerSpec', 'apply_tuners',
           'bitfit_parameter_names', 'expected_trainable_count', 'legacy_entries', 'parse_tuner', 'parse_tuners']

# Tuner modules live under these names; everything else in the backbone is frozen pre-trained weight.
TUNER_MODULE_TYPES = (Adapter, LoRA, Prefix, Prompt, SideTuner)


def _build(spec: TunerSpec, size: int, vit: VisionTransformer, act: str) -> nn.Module:
    C = vit.embed_dim
    kw = {} if spec.scale_init is None else {'scale_init': spec.scale_init}
    if spec.type == 'adapter':
        return Adapter(C, size, spec.op, spec.form, act=spec.act or act, scale=spec.scale, **kw)
    if spec.type == 'prefix':
        return Prefix(C, vit.num_heads, size, spec.op, spec.form, scale=spec.scale, **kw)
    if spec.type == 'prompt':
        return Prompt(C, size, spec.op, spec.form, scale=spec.scale, **kw)
    if spec.type == 'lora':
        return LoRA(C, size, spec.op, mlp_hidden=vit.blocks[0].mlp.fc1.out_features, alpha=spec.alpha)
    raise AssertionError(spec.type)


def apply_tuners(vit: VisionTransformer, specs: Iterable[TunerSpec], act: str = 'gelu') -> None:
    """Attach every tuner of ``specs`` to ``vit`` in place (BitFit only marks biases; see freezing)."""
    for spec in specs:
        if spec.type == 'side':
            vit.side = SideTuner(vit.embed_dim, spec.net)
        elif spec.type != 'bitfit':
            for blk, size in zip(vit.blocks, spec.sizes):
                if size:
                    blk.attach(spec.op, spec.type, _build(spec, size, vit, act))


def bitfit_parameter_names(vit: VisionTransformer, specs: Iterable[TunerSpec]) -> List[str]:
    """Bias parameters (backbone-relative names) that BitFit entries make trainable."""
    names = []
    for spec in specs:
        if spec.type != 'bitfit':
            continue
        layers = {i for i, s in enumerate(spec.sizes) if s}
        all_layers = len(layers) == len(vit.blocks)
        for name, p in vit.named_parameters():
            if not name.endswith('bias') or is_tuner_parameter(name):
                continue
            if name.startswith('blocks.'):
                if int(name.split('.')[1]) in layers:
                    names.append(name)
            elif all_layers:
                names.append(name)
    return sorted(set(names))


def is_tuner_parameter(name: str) -> bool:
    """True for parameters of tuner modules (backbone-relative or model-relative names)."""
    parts = name.split('.')
    return any(p.split('_', 1)[-1] in ('adapter', 'prefix', 'prompt', 'lora') and p.split('_', 1)[0] in
               ('mha', 'ffn', 'block') for p in parts) or 'side' in parts


def expected_trainable_count(spec: TunerSpec, vit: VisionTransformer) -> int:
    """The closed-form number of trainable parameters a tuner entry adds (see each tuner's docstring)."""
    C, F = vit.embed_dim, vit.blocks[0].mlp.fc1.out_features
    scale = Scale.num_params(spec.scale, C) if spec.form == 'parallel' and spec.type != 'lora' else 0
    total = 0
    for r in spec.sizes:
        if not r:
            continue
        if spec.type == 'adapter':
            total += 2 * C * r + r + C + scale
        elif spec.type == 'prefix':
            total += 2 * r * C + scale
        elif spec.type == 'prompt':
            total += r * C + scale
        elif spec.type == 'lora':
            total += (r * C + 3 * C * r) if spec.op == 'mha' else (r * C + r * F + r * F + r * C)
    if spec.type == 'side':
        fcn4 = 3 * 16 * 9 + 16 * 16 * 9 + 16 * 32 * 9 + 32 * 64 * 9 + 2 * (16 + 16 + 32 + 64) + 64 * C + C
        total = fcn4 + 1
    if spec.type == 'bitfit':
        total = sum(vit.get_parameter(n).numel() for n in bitfit_parameter_names(vit, [spec]))
    return total
