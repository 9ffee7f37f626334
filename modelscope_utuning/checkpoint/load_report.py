"""One report of what does not fit when weights are loaded strictly: missing, unexpected, wrongly shaped.

Every loader (hub checkpoint, tuner-only file, pre-trained backbone) collects its findings in a
:class:`LoadReport` and raises once, with every problem listed, so a user fixes them all in one go.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, List, Mapping

import torch


def shape_mismatches(state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor],
                     prefix: str = '') -> List[str]:
    """``'name: checkpoint (a, b) vs model (c, d)'`` for every key of both whose shapes differ."""
    return [f'{prefix}{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}'
            for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]


@dataclass
class LoadReport:
    """Findings of one load; :meth:`raise_if_any` raises a ValueError listing them all."""
    source: str                      # e.g. "checkpoint '/x/pytorch_model.pt'"
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    mismatched: List[str] = field(default_factory=list)
    problems: List[str] = field(default_factory=list)
    hints: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched or self.problems)

    def add(self, missing: Iterable[str] = (), unexpected: Iterable[str] = (), mismatched: Iterable[str] = (),
            problems: Iterable[str] = ()) -> 'LoadReport':
        self.missing += list(missing)
        self.unexpected += list(unexpected)
        self.mismatched += list(mismatched)
        self.problems += list(problems)
        return self

    def message(self, footer: str = '') -> str:
        return (f'{self.source} does not fit the model:'
                + ''.join(f'\n  {p}' for p in self.problems)
                + (f'\n  missing weights: {self.missing}' if self.missing else '')
                + (f'\n  unexpected weights: {self.unexpected}' if self.unexpected else '')
                + (f'\n  shape mismatches: {self.mismatched}' if self.mismatched else '')
                + ''.join(f'\n  hint: {h}' for h in self.hints)
                + (f'\n({footer})' if footer else ''))

    def raise_if_any(self, footer: str = '') -> None:
        if not self.ok:
            raise ValueError(self.message(footer))
