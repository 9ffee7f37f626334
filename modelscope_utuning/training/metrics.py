"""Top-k accuracy for the evaluation loop (ModelScope's ``accuracy`` covers top-1)."""
from __future__ import annotations

from typing import Dict

from modelscope.metrics.base import Metric

from ..registration import TOPK_METRIC, register_class

__all__ = ['TOPK_METRIC', 'TopKAccuracy']


class TopKAccuracy(Metric):
    """``top5-accuracy``: fraction of samples whose label is among the k highest scores."""

    def __init__(self, k: int = 5, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.k, self.hits, self.count = k, 0, 0

    def add(self, outputs: Dict, inputs: Dict) -> None:
        scores, labels = outputs['scores'], inputs['labels']
        k = min(self.k, scores.shape[1])
        topk = scores.topk(k, dim=1).indices.cpu()
        self.hits += int((topk == labels.view(-1, 1).cpu()).any(dim=1).sum())
        self.count += int(labels.numel())

    def evaluate(self) -> Dict[str, float]:
        return {f'top{self.k}-accuracy': self.hits / max(self.count, 1)}

    def merge(self, other: 'TopKAccuracy') -> None:
        self.hits += other.hits
        self.count += other.count

    def __getstate__(self):
        return self.k, self.hits, self.count

    def __setstate__(self, state):
        self.k, self.hits, self.count = state


register_class(TopKAccuracy)
