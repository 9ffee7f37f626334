"""Parameter groups: tuners and head may have their own learning rates; no weight decay on the parameters where
decay only pulls learned tokens / offsets towards zero (prompts, prefixes, position embeddings, norms, biases,
scales)."""
from __future__ import annotations

from typing import Dict, List

import torch.nn as nn

NO_DECAY_SUBSTRINGS = ('bias', 'norm', 'pos_embed', 'cls_token', 'prompt', 'prefix', 'scale', 'gamma', 'alpha')


def no_decay(name: str, param) -> bool:
    return param.ndim <= 1 or any(s in name for s in NO_DECAY_SUBSTRINGS)


def param_groups(model: nn.Module, lr: float, weight_decay: float, head_lr: float = None) -> List[Dict]:
    """Trainable parameters only, split into (tuner | head) x (decay | no decay) groups."""
    groups: Dict[tuple, Dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_head = '.head.' in f'.{name}' and '.backbone.' not in f'.{name}'
        nd = no_decay(name, p)
        key = (is_head, nd)
        if key not in groups:
            groups[key] = {'params': [], 'names': [], 'lr': head_lr if is_head and head_lr else lr,
                           'weight_decay': 0.0 if nd else weight_decay}
        groups[key]['params'].append(p)
        groups[key]['names'].append(name)
    if not groups:
        raise ValueError('the model has no trainable parameters: check model.backbone.tuners / freeze_cfg')
    return [groups[k] for k in sorted(groups)]
