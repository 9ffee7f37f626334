"""ms-swift's tuners through ModelScope's ``build_trainer(..., efficient_tuners=...)``, with our model and trainer.

ModelScope's own flow (its ``test_finetune_vision_efficient_tuning_swift.py``) turns the model's tuners off
(``lora_length = 0``) and passes e.g. ``LoRAConfig(r=10, target_modules=['qkv'], use_merged_linear=True,
enable_lora=[True])`` from ``swift.tuners``; ``EpochBasedTrainer`` then wraps the model with
``Swift.prepare_model``. What we do with it (extra ``[swift]``):

- :func:`apply_swift_tuners`: ``Swift.prepare_model`` replaces each ``attn.qkv`` of our ViT in place by its LoRA
  layer. Our attention reads a replaced ``qkv`` as a plain linear (``Attention.project_qkv``). The trainer keeps
  training our model itself, not swift's ``SwiftModel`` wrapper, so that our optimizer groups, checkpoints, resume
  and data parallelism work unchanged, and our trainable policy holds: swift marks only its own parameters
  trainable, we train them *and* the head and our tuners (as ModelScope's test meant with swift 1.x's
  ``only_lora_trainable=False``).
- :func:`fold_swift_lora`: for saving, each swift / peft LoRA layer on ``qkv`` becomes our LoRA tuner on the mha
  OP carrying exactly the same update ``W_qkv + s B A`` (``enable_lora`` masks included: the disabled rows of
  ``B`` are zero), and the original frozen ``qkv`` goes back in place. The output folder then loads in
  ``pipeline()`` / ``Model.from_pretrained`` with this package alone, and gives the trained model's predictions.
  (ms-swift's own ``save_pretrained`` drops ``MergedLinear`` weights: its state-dict filter wants the adapter name
  in the parameter names, which ``MergedLinear`` does not have.)

Only LoRA on ``qkv`` is supported (ModelScope's flow); any other swift tuner or target is refused before
training with a ValueError saying so.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ..backbone.linear import QKVLinear
from ..extras import require
from ..network import as_network
from ..tuners.lora import LoRA

EXTRA = 'swift'
QKV_SUFFIX = '.attn.qkv'


def require_swift():
    """The ``swift`` package (ms-swift), or MissingExtraError with the install line."""
    return require('swift', EXTRA, 'efficient_tuners (ms-swift tuners)')


def _as_list(tuners: Any) -> List[Any]:
    if isinstance(tuners, dict):
        return list(tuners.values())
    return list(tuners) if isinstance(tuners, (list, tuple)) else [tuners]


def lora_layers(model) -> Dict[str, nn.Module]:
    """Module path (relative to our network) -> every swift / peft LoRA layer in it."""
    from peft.tuners.lora import LoraLayer
    from swift.tuners.lora_layers import LoRALayer
    return {name: m for name, m in as_network(model).named_modules() if isinstance(m, (LoraLayer, LoRALayer))}


def apply_swift_tuners(model, efficient_tuners) -> Tuple[nn.Module, Any]:
    """Apply ``efficient_tuners`` (a swift config, a list or a dict of them) to our ModelScope ``model`` in place,
    as ModelScope's trainer would, then restore our trainable policy beside swift's parameters -> (our model,
    swift's ``SwiftModel`` wrapper around it). ValueError for tuners that :func:`fold_swift_lora` cannot save."""
    require_swift()
    from peft import LoraConfig
    from swift import Swift
    configs = _as_list(efficient_tuners)
    bad = [type(c).__name__ for c in configs if not isinstance(c, LoraConfig)]  # swift's LoRAConfig is one
    if bad:
        raise ValueError(f'efficient_tuners: {bad} are not supported here; ms-swift LoRA on qkv '
                         '(swift.tuners.LoRAConfig(target_modules=[\'qkv\'], ...)) is, or use our own tuners '
                         '(model.backbone.tuners)')
    if isinstance(efficient_tuners, (list, tuple)):  # ModelScope passes what it is given; swift takes one or a dict
        efficient_tuners = configs[0] if len(configs) == 1 else {f'adapter_{i}': c for i, c in enumerate(configs)}
    swift_model = Swift.prepare_model(model, efficient_tuners)
    layers = lora_layers(model)
    elsewhere = sorted(n for n in layers if not (n.startswith('backbone.blocks.') and n.endswith(QKV_SUFFIX)))
    if elsewhere:
        raise ValueError(f'efficient_tuners put LoRA layers on {elsewhere}; only target_modules=[\'qkv\'] (the '
                         'attention\'s fused projection) can be saved as this package\'s LoRA')
    swift_params = [p for p in model.parameters() if p.requires_grad]
    model.apply_freeze_policy(getattr(model, 'freeze_cfg', None))  # head and our tuners train again
    for p in swift_params:
        p.requires_grad = True
    return model, swift_model


def _update_of(layer: nn.Module, out_features: int) -> Optional[Tuple[torch.Tensor, torch.Tensor, float]]:
    """``(A (R, C), B (out, R), scaling)`` with ``delta W = scaling B A`` for one swift ``MergedLinear`` or peft
    LoRA ``Linear`` layer; None when it carries no update (rank 0 / nothing enabled / merged already)."""
    if getattr(layer, 'merged', False):
        return None  # its update is in the frozen weight already (merge_weights): nothing left to carry
    if hasattr(layer, 'enable_lora'):  # swift's MergedLinear: grouped conv1d of lora_A / lora_B, zero-padded rows
        if not getattr(layer, 'r', 0) or not any(layer.enable_lora):
            return None
        a = layer.lora_A.detach()
        groups = len(layer.enable_lora)
        enabled = [i for i, on in enumerate(layer.enable_lora) if on]
        r, rows = layer.r, out_features // groups
        b = a.new_zeros(out_features, r * len(enabled))
        for j, g in enumerate(enabled):  # group j of A/B drives the rows of enabled group g
            b[g * rows:(g + 1) * rows, j * r:(j + 1) * r] = layer.lora_B.detach()[j * rows:(j + 1) * rows]
        if getattr(layer, 'fan_in_fan_out', False):
            raise ValueError('an ms-swift LoRA layer with fan_in_fan_out=True cannot be carried over')
        return a, b, float(layer.scaling)
    active = [n for n in layer.lora_A.keys() if n in getattr(layer, 'active_adapters', layer.lora_A.keys())]
    if any(getattr(layer, 'use_dora', {}).get(n, False) for n in active):
        raise ValueError('a DoRA layer (use_dora=True) is not a low-rank update of W and cannot be carried over')
    if not active:
        return None
    a = torch.cat([layer.lora_A[n].weight.detach() for n in active])
    b = torch.cat([layer.lora_B[n].weight.detach() * layer.scaling[n] for n in active], dim=1)
    return a, b, 1.0


def fold_swift_lora(model) -> List[int]:
    """Replace every swift / peft LoRA layer on ``backbone.blocks.N.attn.qkv`` of our ``model`` (in place) by our
    LoRA tuner on the mha OP with the same update, and put the original frozen qkv back. Returns the layers that got
    one. The outputs do not change (up to float rounding of ``scaling * B``)."""
    net = as_network(model)
    updates: Dict[int, Tuple[torch.Tensor, torch.Tensor, float]] = {}
    for blk in net.backbone.blocks:
        layer = blk.attn.qkv
        if isinstance(layer, QKVLinear):
            continue
        base = getattr(layer, 'base_layer', None)
        if not isinstance(base, QKVLinear):
            raise ValueError(f'layer {blk.index}: attn.qkv is a {type(layer).__name__} that does not wrap our '
                             'QKVLinear; cannot carry it over')
        update = _update_of(layer, base.out_features)
        blk.attn.qkv = base
        if update is not None:
            updates[blk.index] = update
    if not updates:
        return []
    ranks = [updates[i][0].shape[0] if i in updates else 0 for i in range(len(net.backbone.blocks))]
    net.add_tuners([LoRA.qkv_entry(ranks)])
    for i, (a, b, scaling) in updates.items():
        tuner = next(t for _, t in net.backbone.blocks[i].tuners() if isinstance(t, LoRA) and t.op == 'mha')
        tuner.set_update(a.to(tuner.lora_a.weight.dtype), b.to(tuner.lora_b.weight.dtype), scaling)
    if hasattr(model, 'apply_freeze_policy'):
        model.apply_freeze_policy(getattr(model, 'freeze_cfg', None))
    return sorted(updates)


def exportable(model) -> nn.Module:
    """``model`` itself when it holds no swift / peft layer, else a copy with them folded into our LoRA (the trained
    model keeps training as it is)."""
    if all(isinstance(blk.attn.qkv, QKVLinear) for blk in as_network(model).backbone.blocks):
        return model
    folded = copy.deepcopy(model)
    fold_swift_lora(folded)
    return folded


__all__ = ['apply_swift_tuners', 'exportable', 'fold_swift_lora', 'lora_layers', 'require_swift']
