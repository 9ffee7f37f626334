"""The tuner-only file format: the few trained weights of a tuned model, apart from the frozen backbone.

A folder holds

- ``adapter_model.safetensors``: the weights that train (tuners, BitFit biases, the side network) and the
  classification head, under their names in the network (``backbone.blocks.0.mha_adapter.down.weight``,
  ``backbone.blocks.3.attn.qkv.bias``, ``side.net.fc.weight``, ``head.fc.weight`` ...);
- ``adapter_config.json``::

    {"format_version": 2,
     "written_by": {"package": "modelscope-utuning", "version": "..."},
     "tuners": [...],      # the model's tuner entries, every option written out (legacy keys as entries)
     "base": {...},        # the backbone's ViT arguments (and pretrained_weights, when the model had it)
     "backbone_fingerprint": "sha256:...",  # of the frozen backbone weights the tuners were trained on
     "head": {"num_classes": C, "dim": D},
     "CLASSES": [...] | null}

Every reader gets the entries through :func:`.migrate.migrate` (:func:`read_tuner_config`): an option an older
version left out means that version's default (a file without ``written_by`` is dated by the rule in
:mod:`.migrate`: 0.1 wrote format 1). Both files are written atomically (a temporary file in the same folder,
then ``os.replace``). This module only reads and writes the files; building a model from them is the network's job
(:meth:`modelscope_utuning.network.VisionEfficientTuning.from_tuners`).
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Mapping, Tuple

import torch

from ..fileio import atomic_write, write_text_atomic
from ..tuners.base import tuner_kinds
from .migrate import migrate, writer_marker, writer_of_tuner_config

WEIGHTS_FILE = 'adapter_model.safetensors'
CONFIG_FILE = 'adapter_config.json'
FORMAT_VERSION = 2


def write_tuner_files(folder: str, state: Mapping[str, torch.Tensor], config: Dict[str, Any]) -> Dict[str, str]:
    """Write both files into ``folder``; returns their paths."""
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    config = dict(config, format_version=FORMAT_VERSION, written_by=writer_marker())
    text = json.dumps(config, indent=2, ensure_ascii=False, default=_json_default) + '\n'
    weights, cfg_path = os.path.join(folder, WEIGHTS_FILE), os.path.join(folder, CONFIG_FILE)
    atomic_write(weights, lambda tmp: save_file(tensors, tmp, metadata={
        'format': 'pt', 'format_version': str(FORMAT_VERSION)}))
    write_text_atomic(cfg_path, text)
    return {'weights': weights, 'config': cfg_path}


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (tuple, set)):
        return list(obj)
    if hasattr(obj, 'item'):
        return obj.item()
    raise TypeError(f'{type(obj).__name__} is not JSON serialisable')


def has_tuner_files(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, CONFIG_FILE)) and os.path.isfile(os.path.join(folder, WEIGHTS_FILE))


def read_tuner_config(folder: str) -> Dict[str, Any]:
    """``adapter_config.json`` of ``folder``, its ``tuners`` migrated to what they mean to this version
    (:mod:`.migrate`); ValueError naming the file when it is missing, not JSON or not a tuner-only config."""
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(path):
        raise ValueError(f'no tuner-only export in {folder!r}: {CONFIG_FILE} is missing')
    with open(path, encoding='utf-8') as f:
        try:
            cfg = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f'{path!r} is not valid JSON: {e}') from e
    if not isinstance(cfg, dict) or 'tuners' not in cfg or 'head' not in cfg:
        raise ValueError(f'{path!r}: expected a tuner-only config with "tuners", "base" and "head"')
    if cfg.get('format_version', 1) > FORMAT_VERSION:
        raise ValueError(f'{path!r}: format_version {cfg["format_version"]} is newer than this code '
                         f'({FORMAT_VERSION}); upgrade modelscope-utuning')
    cfg['tuners'] = migrate(cfg['tuners'], writer_of_tuner_config(cfg, folder), cfg.get('format_version', 1),
                            source=repr(path))
    return cfg


def read_tuner_files(folder: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """-> (weights under this version's names, config)."""
    from safetensors.torch import load_file
    cfg = read_tuner_config(folder)
    path = os.path.join(folder, WEIGHTS_FILE)
    if not os.path.isfile(path):
        raise ValueError(f'no tuner-only export in {folder!r}: {WEIGHTS_FILE} is missing')
    try:
        state = load_file(path, device='cpu')
    except Exception as e:  # noqa: BLE001
        raise ValueError(f'{path!r} could not be read as safetensors: {e}') from e
    if cfg.get('format_version', 1) < 2:  # version 1 kept network-level tuners (the side network) on the backbone
        for kind in (k for k, c in tuner_kinds().items() if c.level == 'network'):
            old = f'backbone.{kind}.'
            state = {(kind + '.' + k[len(old):]) if k.startswith(old) else k: v for k, v in state.items()}
    return state, cfg
