"""Configuration values checked when the trainer is built, each error naming the key and what was expected.

A value that would only fail at the first step (``train.max_epochs = "abc"``: a bare TypeError deep in the loop)
or, worse, run and write a misleading result (``train.max_epochs = 0``: an untrained ``output/`` with a model
card) is refused here. Only keys whose meaning is ours or ModelScope's common training keys are checked; unknown
sections are left to ModelScope.
"""
from __future__ import annotations

import numbers
from typing import Any, Callable, List, Optional, Tuple

from .precision import PRECISIONS


def _int(low: int) -> Callable[[Any], Optional[str]]:
    def check(v: Any) -> Optional[str]:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low:
            return f'expected an integer >= {low}'
        return None
    return check


def _number(low: float, strict: bool = True, high: Optional[float] = None) -> Callable[[Any], Optional[str]]:
    def check(v: Any) -> Optional[str]:
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or v != v or \
                (v <= low if strict else v < low) or (high is not None and v >= high):
            rng = f'{">" if strict else ">="} {low:g}' + (f' and < {high:g}' if high is not None else '')
            return f'expected a number {rng}'
        return None
    return check


def _choice(*values) -> Callable[[Any], Optional[str]]:
    def check(v: Any) -> Optional[str]:
        return None if v in values else f'expected one of {values}'
    return check


def _bool(v: Any) -> Optional[str]:
    return None if isinstance(v, bool) else 'expected true or false'


def _warmup(v: Any) -> Optional[str]:
    from .warmup import warmup_iters
    try:
        warmup_iters(v, 100, False)
    except ValueError as e:
        return str(e).split(': ', 1)[-1]
    return None


# (dotted key, check); a key that is absent or null is not checked (the defaults fill it).
CHECKS: List[Tuple[str, Callable[[Any], Optional[str]]]] = [
    ('train.max_epochs', _int(1)),
    ('train.dataloader.batch_size_per_gpu', _int(1)),
    ('train.dataloader.workers_per_gpu', _int(0)),
    ('evaluation.dataloader.batch_size_per_gpu', _int(1)),
    ('evaluation.dataloader.workers_per_gpu', _int(0)),
    ('train.optimizer.lr', _number(0.0)),
    ('train.optimizer.head_lr', _number(0.0)),
    ('train.optimizer.weight_decay', _number(0.0, strict=False)),
    ('train.lr_scheduler.T_max', _int(1)),
    ('train.amp', _choice(*PRECISIONS)),
    ('train.warmup', _warmup),
    ('train.on_bad_image', _choice('raise', 'skip')),
    ('train.cpu_allocator', _choice('default', 'lean')),
    ('model.head.num_classes', _int(1)),
    ('model.loss.label_smoothing', _number(0.0, strict=False, high=1.0)),
    ('model.finetune', _bool),
]


def _get(cfg: Any, key: str) -> Any:
    if hasattr(cfg, 'safe_get'):  # a ModelScope Config (not a dict itself)
        return cfg.safe_get(key)
    node = cfg
    for part in key.split('.'):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def validate_config(cfg: Any) -> None:
    """ValueError listing every checked key whose value does not fit (``cfg``: a ModelScope Config or a dict)."""
    problems = []
    for key, check in CHECKS:
        value = _get(cfg, key)
        if value is None:
            continue
        problem = check(value)
        if problem:
            problems.append(f'{key}={value!r}: {problem}')
    if problems:
        raise ValueError('configuration: ' + '; '.join(problems))
