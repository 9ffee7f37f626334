"""The classification head: ``logits = W f + b`` on the pooled backbone feature f (B, D) -> (B, num_classes)."""
from __future__ import annotations

import torch
import torch.nn as nn


class ClassifierHead(nn.Module):
    """Linear classifier with optional dropout; parameter names ``fc.weight`` / ``fc.bias`` as on the hub."""

    def __init__(self, dim: int, num_classes: int, dropout_rate: float = 0.0):
        super().__init__()
        if num_classes <= 0:
            raise ValueError(f'model.head.num_classes must be > 0, got {num_classes}')
        self.dim, self.num_classes = dim, num_classes
        self.dropout = nn.Dropout(dropout_rate) if dropout_rate > 0 else nn.Identity()
        self.fc = nn.Linear(dim, num_classes)
        # A fresh head starts at zero (uniform predictions; timm / MAE fine-tuning practice): a random head on a
        # backbone's large-norm features sends the loss to several times log(C) in the first steps, and its
        # gradient then pushes every tuner in a random direction. Loaded heads are not affected.
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(x))
