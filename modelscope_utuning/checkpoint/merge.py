"""Fold LoRA into the frozen weights for inference: ``W <- W + (alpha / r) B A``, then drop the LoRA modules.

After :func:`merge_lora` the blocks run the plain backbone path (no low-rank branch) and give the same outputs.
LoRA is looked up by name (``block.tuner(op, 'lora')``) and is not in ``Block.op_tuners`` (it does not combine
outputs), so removing the child module is all the block needs. The model's tuner specs and
``backbone_config`` lose their LoRA entries, so a saved configuration describes the merged network.

Refused (ValueError, nothing changed) where merging would change outputs: a block with mha LoRA whose parallel
prefix (on the ffn / block OP) or parallel prompt (any OP) borrows the frozen q / k / v projections, which
before merging do not include the LoRA update.
"""
from __future__ import annotations

from typing import List

LORA_OPS = ('mha', 'ffn')


def _parts(model):
    """(VisionTransformer, network or None, wrapper or None)."""
    net = getattr(model, 'model', None)
    if net is not None and hasattr(net, 'backbone'):
        return net.backbone, net, model
    if hasattr(model, 'backbone') and hasattr(model, 'head'):
        return model.backbone, model, None
    if hasattr(model, 'blocks'):
        return model, None, None
    raise TypeError(f'expected a VisionEfficientTuningModel, its .model or a VisionTransformer, '
                    f'got {type(model).__name__}')


def _conflicts(vit) -> List[str]:
    found = []
    for blk in vit.blocks:
        if blk.tuner('mha', 'lora') is None:
            continue
        for op in ('mha', 'ffn', 'block'):
            for kind in ('prefix', 'prompt'):
                t = blk.tuner(op, kind)
                if t is None or getattr(t, 'form', None) != 'parallel':
                    continue
                if kind == 'prompt' or op != 'mha':
                    found.append(f'layer {blk.index}: the parallel {kind} on op {op!r} uses the frozen '
                                 f'{"key / value" if kind == "prompt" else "query"} projection, which merging '
                                 'the mha LoRA would change')
    return found


def _drop_lora_entries(cfg: dict) -> dict:
    cfg = dict(cfg)
    cfg.pop('lora_length', None)
    cfg.pop('lora_type', None)
    if cfg.get('tuners'):
        cfg['tuners'] = [e for e in cfg['tuners'] if not (isinstance(e, dict) and e.get('type') == 'lora')]
    return cfg


def merge_lora(model):
    """Merge every LoRA tuner into qkv / fc1 / fc2 in place and remove it; returns ``model``.

    Accepts a VisionEfficientTuningModel, its network (``.model``) or a bare VisionTransformer.
    """
    vit, net, wrapper = _parts(model)
    conflicts = _conflicts(vit)
    if conflicts:
        raise ValueError('cannot merge LoRA without changing the outputs:\n  ' + '\n  '.join(conflicts))
    merged = 0
    for blk in vit.blocks:
        for op in LORA_OPS:
            lora = blk.tuner(op, 'lora')
            if lora is None:
                continue
            lora.merge_into(blk)
            name = f'{op}_lora'
            delattr(blk, name)  # removes the child module
            for names in blk.op_tuners.values():  # LoRA is never listed there; keep it so if that changes
                while name in names:
                    names.remove(name)
            merged += 1
    if net is not None and merged and hasattr(net, 'specs'):
        net.specs[:] = [s for s in net.specs if s.type != 'lora']
    if wrapper is not None and merged and isinstance(getattr(wrapper, 'backbone_config', None), dict):
        wrapper.backbone_config = _drop_lora_entries(wrapper.backbone_config)
    return model


def has_lora(model) -> bool:
    vit, _, _ = _parts(model)
    from ..tuners.lora import LoRA
    return any(isinstance(m, LoRA) for m in vit.modules())


__all__ = ['merge_lora', 'has_lora']
