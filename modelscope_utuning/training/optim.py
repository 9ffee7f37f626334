"""Parameter groups: the head and the tuners may have learning rates of their own; no weight decay on the
parameters where decay only pulls learned tokens / offsets towards zero (the network says which:
:meth:`~modelscope_utuning.network.VisionEfficientTuning.no_weight_decay`)."""
from __future__ import annotations

from typing import Dict, List, Optional

from ..network import as_network


def param_groups(model, lr: float, weight_decay: float, head_lr: Optional[float] = None) -> List[Dict]:
    """Trainable parameters only, split into (head | the rest) x (decay | no decay) x (the tuner's own lr factor,
    e.g. LoRA's A at lr / 16) groups. ``model``: our ModelScope model or its network; names in the groups are
    relative to the network."""
    net = as_network(model)
    roles = net.parameter_roles()
    exempt = net.no_weight_decay()
    scales = net.lr_scales()
    groups: Dict[tuple, Dict] = {}
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        is_head = roles.get(name) == 'head'
        nd = name in exempt
        scale = 1.0 if is_head else scales.get(name, 1.0)
        key = (is_head, nd, -scale)  # factor-1 groups first, as before there were factors
        if key not in groups:
            groups[key] = {'params': [], 'names': [], 'lr': (head_lr if is_head and head_lr else lr) * scale,
                           'weight_decay': 0.0 if nd else weight_decay}
        groups[key]['params'].append(p)
        groups[key]['names'].append(name)
    if not groups:
        raise ValueError('the model has no trainable parameters: check model.backbone.tuners / freeze_cfg')
    return [groups[k] for k in sorted(groups)]
