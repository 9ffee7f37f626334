"""``key=value`` overrides: parsed as JSON where they parse, applied to a ModelScope ``Config`` in place."""
from __future__ import annotations

import json
import re
from typing import Any, List, Sequence, Tuple

from .common import CLIError

OVERRIDE_KEY = re.compile(r'^[A-Za-z_][A-Za-z0-9_\-]*(\.[A-Za-z0-9_\-]+)*$')

# Top-level sections of a configuration.json; an override may add a key under them, but a new top-level key is
# most likely a typo (``trian.max_epochs=3``) and is refused.
KNOWN_SECTIONS = ('framework', 'task', 'pipeline', 'model', 'preprocessor', 'train', 'evaluation', 'dataset',
                  'plugins', 'allow_remote', 'log_level', 'parallel', 'utuning', 'description')


def parse_value(text: str) -> Any:
    """JSON when it parses (``3``, ``1e-3``, ``true``, ``null``, ``[..]``, ``{..}``, ``"s"``), else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_override(text: str) -> Tuple[str, Any]:
    """``'train.max_epochs=5'`` -> ``('train.max_epochs', 5)``; raises CLIError on bad syntax."""
    if '=' not in text:
        raise CLIError(f'bad override {text!r}: expected key=value, e.g. train.max_epochs=10')
    key, value = text.split('=', 1)
    key = key.strip()
    if not OVERRIDE_KEY.match(key):
        raise CLIError(f'bad override {text!r}: the key must be dotted names, e.g. model.head.num_classes=10')
    return key, parse_value(value.strip())


def parse_overrides(items: Sequence[str]) -> List[Tuple[str, Any]]:
    return [parse_override(t) for t in items or []]


def apply_overrides(cfg, overrides: Sequence[Tuple[str, Any]]):
    """Apply ``(dotted key, value)`` pairs to a ModelScope ``Config`` (in place; returns it).

    Dicts merge into what is there and integer parts index lists (``Config.merge_from_dict(...,
    allow_list_keys=True)``); other values, lists included, replace it. (ModelScope itself would merge a list of
    typed dicts entry by entry, by ``type``, which for tuner entries mixes OPs: ``model.backbone.tuners=[...]``
    is meant to be the new list.) Raises CLIError naming the override when it does not fit.
    """
    for key, value in overrides:
        parts = key.split('.')
        if parts[0] not in cfg and parts[0] not in KNOWN_SECTIONS:
            raise CLIError(f'override {key}=...: unknown top-level section {parts[0]!r}; expected one of '
                           f'{", ".join(KNOWN_SECTIONS)}')
        try:
            if isinstance(value, dict):
                cfg.merge_from_dict({key: value}, allow_list_keys=True)
            else:
                _set_path(cfg, parts, value)
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise CLIError(f'override {key}=...: {e}') from None
    return cfg


def _set_path(cfg, parts: List[str], value: Any) -> None:
    from modelscope.utils.config import ConfigDict
    node = cfg
    for i, part in enumerate(parts[:-1]):
        where = '.'.join(parts[:i + 1])
        if isinstance(node, list):
            node = node[_index(part, node, where)]
            continue
        if part not in node or node[part] is None:
            node[part] = ConfigDict()
        elif not isinstance(node[part], (dict, list)):
            raise TypeError(f'{where} is {node[part]!r}, not a section')
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        node[_index(last, node, '.'.join(parts))] = value
    else:
        node[last] = value


def _index(part: str, node: list, where: str) -> int:
    if not part.isdigit():
        raise KeyError(f'{where}: a list, index it with a number (0 .. {len(node) - 1})')
    i = int(part)
    if i >= len(node):
        raise IndexError(f'{where}: index {i} is out of range for a list of {len(node)}')
    return i

