"""What a MODEL or DATA argument names: a model folder, a hub id, a preset, a configuration file; a dataset."""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Tuple

from ..data import load_dataset_any
from ..location import HUB, ModelLocationError, locate_model_source
from .common import CLIError, read_json

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESET_DIRS = (os.path.join(PACKAGE_DIR, 'configs'), os.path.join(os.path.dirname(PACKAGE_DIR), 'configs'))


def list_presets() -> Dict[str, str]:
    """Preset name -> configuration file (``modelscope_utuning/configs/*.json``, then a checkout's ``configs/``)."""
    found: Dict[str, str] = {}
    for folder in PRESET_DIRS:
        if os.path.isdir(folder):
            for name in sorted(os.listdir(folder)):
                if name.endswith('.json') and not name.startswith('.'):
                    found.setdefault(name[:-5], os.path.join(folder, name))
    return found


def _materialize_config(path: str, work_dir: str) -> str:
    """A model folder holding the configuration file ``path`` (no weights): ``work_dir/model``."""
    cfg = read_json(path)
    backbone = (cfg.get('model') or {}).get('backbone') or {}
    weights = backbone.get('pretrained_weights')
    if isinstance(weights, str) and not os.path.isabs(weights):
        candidate = os.path.join(os.path.dirname(os.path.abspath(path)), weights)
        if os.path.exists(candidate):
            backbone['pretrained_weights'] = candidate  # relative to the configuration it came with
    model_dir = os.path.join(work_dir, 'model')
    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(model_dir, 'configuration.json'), 'w', encoding='utf-8') as f:
        json.dump(cfg, f, indent=2)
    return model_dir


def locate_model(spec: str, allow_config: bool = True) -> Tuple[str, str]:
    """What ``spec`` names, without side effects: ``('dir', folder)``, ``('config', json file)`` (a preset or a
    configuration file) or ``('hub', id)``. Raises CLIError with what was expected."""
    if os.path.isdir(spec):
        if not os.path.isfile(os.path.join(spec, 'configuration.json')):
            raise CLIError(f'model folder {spec!r} has no configuration.json')
        return 'dir', os.path.abspath(spec)
    if os.path.isfile(spec):
        if not allow_config:
            raise CLIError(f'{spec!r} is a file; expected a model folder or a hub id')
        if not spec.endswith('.json'):
            raise CLIError(f'{spec!r}: expected a model folder, a hub id, a preset name or a configuration .json')
        read_json(spec)
        return 'config', os.path.abspath(spec)
    presets = list_presets()
    name = spec[:-5] if spec.endswith('.json') else spec
    if allow_config and name in presets:
        return 'config', presets[name]
    try:
        if locate_model_source(spec)[0] == HUB:  # the package's one rule for paths and hub ids
            return 'hub', spec  # ModelScope downloads it
        reason = 'no such folder'
    except ModelLocationError as e:
        reason = e.reason
    what = 'a model folder, a hub id (owner/name)'
    if allow_config:
        what += ', a configuration .json or a preset (' + (', '.join(presets) or 'none installed') + ')'
    raise CLIError(f'unknown model {spec!r}: {reason}; expected {what}')


def resolve_model(spec: str, work_dir: Optional[str] = None, allow_config: bool = True) -> str:
    """A model folder or hub id for ModelScope: a preset or configuration file becomes ``work_dir/model``."""
    kind, where = locate_model(spec, allow_config)
    if kind == 'config':
        if work_dir is None:
            raise CLIError(f'{spec!r} is a configuration, not a trained model')
        return _materialize_config(where, work_dir)
    return where


def load_data(path: Optional[str], option: str, classes: Optional[List[str]] = None):
    """Read a dataset source with our readers; CLIError when it does not exist."""
    if not path:
        raise CLIError(f'{option} is required')
    if not os.path.exists(path):
        raise CLIError(f'{option} {path!r}: no such file or folder')
    kwargs = {'classes': classes} if classes else {}
    try:
        return load_dataset_any(path, **kwargs)
    except ValueError as e:
        raise CLIError(f'{option} {path!r}: {e}') from None

