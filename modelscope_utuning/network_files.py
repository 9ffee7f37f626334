"""The network's saved forms: the hub layout (``pytorch_model.pt``), the tuner-only files (``adapter_config.json`` +
weights, with the frozen backbone's fingerprint), each read strictly with one report of everything that does not fit.

:class:`SavedWeights` is a base class of :class:`~.network.VisionEfficientTuning`; the file formats themselves live in
:mod:`.checkpoint` (names in :mod:`.checkpoint.hub_layout`, files in :mod:`.checkpoint.tuner_only`, older writers'
entries in :mod:`.checkpoint.migrate`).
"""
from __future__ import annotations

import hashlib
import inspect
import os
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch
import torch.nn as nn

from .backbone.vit import VisionTransformer
from .backbone_config import VIT_ARGS, base_config
from .checkpoint import hub_layout, tuner_only
from .checkpoint.load_report import LoadReport, shape_mismatches
from .tuners import dims_of, parse_tuners
from .tuners.base import slot_names


class SavedWeights:
    """Saving and loading for :class:`~.network.VisionEfficientTuning` (a base class: it reads the network's
    ``backbone``, ``head``, ``specs`` and configuration)."""

    # -- weights --------------------------------------------------------------------------------------------------
    def _forms(self) -> Dict[str, str]:
        """Tuner module path (relative to the backbone for block tuners, the network otherwise) -> form."""
        out = {}
        for name, tuner, _ in self.tuners():
            key = name[len('backbone.'):] if name.startswith('backbone.') else name
            out[key] = tuner.form
        return out

    def tuner_state_dict(self) -> Dict[str, torch.Tensor]:
        """What the tuner-only file holds: every parameter a tuner trains, and the head."""
        out = {n: p.detach() for n, p in self.tuner_parameters().items()}
        out.update({f'head.{k}': v for k, v in self.head.state_dict().items()})
        return out

    def save_hub(self, folder: str) -> str:
        """Write ``folder/pytorch_model.pt`` in the hub layout (the built-in's names where it has the same
        tuner); returns its path."""
        path = os.path.join(folder, hub_layout.CHECKPOINT_FILE)
        hub_layout.write_checkpoint(path, self.state_dict(), self._forms(), self.CLASSES)
        return path

    def load_hub_state(self, ckpt: Dict[str, Any], source: str, drop: Callable[[str], bool] = lambda k: False,
                       fresh_on_mismatch: bool = False) -> Dict[str, Any]:
        """Load a hub-layout checkpoint dict strictly.

        Tuners the checkpoint lacks start fresh, as do weights stored under a built-in name whose tuner here has the
        other form (a sequential tuner's weights mean something else in a parallel tuner). ``drop(name)`` names
        weights not to load (ModelScope's ``unload_part``); with ``fresh_on_mismatch`` a head or tuner whose shape
        changed starts fresh (a new fine-tune). Everything else missing, unexpected or wrongly shaped is reported
        in one ValueError. Returns ``{'head_loaded': bool, 'ignored': [names]}``.
        """
        state, builtin_forms = hub_layout.network_state_from_hub(ckpt)
        own = self.state_dict()
        tuner_keys = {f'{name}.{k}' for name, t, _ in self.tuners() for k in t.state_dict()}
        dropped = {k for k in state if drop(k)}
        state = {k: v for k, v in state.items() if k not in dropped}
        forms = self._forms()
        other_form = [k for k, form in builtin_forms.items() if k in state and k in tuner_keys
                      and forms.get(_module_path(k)) not in (None, form)]
        ignored = list(other_form)
        for k in other_form:
            state.pop(k)
        if 'backbone.pos_embed' in state:
            state['backbone.pos_embed'] = self.backbone.load_pos_embed(state['backbone.pos_embed'])
        head_state = {k: v for k, v in state.items() if k.startswith('head.')}
        if fresh_on_mismatch:
            resized = [k for k, v in state.items() if (k in tuner_keys or k.startswith('head.')) and k in own
                       and v.shape != own[k].shape]
            if any(k.startswith('head.') for k in resized):
                resized += [k for k in head_state if k not in resized]  # a new head: all of it starts fresh
            for k in resized:
                state.pop(k)
            ignored += resized
        head_loaded = any(k.startswith('head.') for k in state)
        slots = set(slot_names())
        report = LoadReport(source)
        report.add(
            missing=[k for k in own if k not in state and k not in tuner_keys and k not in dropped
                     and not (k.startswith('head.') and not head_loaded)],
            unexpected=[k for k in state if k not in own and not _in_slot(k, slots)],
            mismatched=shape_mismatches(state, own))
        report.raise_if_any('tuners absent from the checkpoint start fresh; set model.finetune and '
                            'model.pretrained_cfg.unload_part to drop weights on purpose')
        ignored += [k for k in state if k not in own]
        self.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
        return {'head_loaded': head_loaded, 'ignored': ignored}

    # -- the tuner-only files ---------------------------------------------------------------------------------------
    def base_config(self) -> Dict[str, Any]:
        """The frozen base: ViT arguments (and ``pretrained_weights`` when given), without the tuners."""
        base = base_config(self.backbone_config)
        vit = self.backbone
        # The backbone-level head may have been inferred from a hub checkpoint: record it, the base must say it.
        base.setdefault('num_classes', vit.head.out_features if isinstance(vit.head, nn.Linear) else 0)
        for key, value in (('embed_dim', vit.embed_dim), ('depth', vit.depth), ('num_heads', vit.num_heads)):
            base.setdefault(key, value)
        return base

    def trained_backbone_names(self) -> List[str]:
        """Backbone weights (names relative to the backbone) that a tuner trains, e.g. BitFit's biases."""
        return sorted(n[len('backbone.'):] for n in self.tuner_parameters() if n.startswith('backbone.')
                      and not _in_slot(n, set(slot_names())))

    def backbone_digests(self) -> Dict[str, str]:
        """sha256 of each frozen backbone tensor (dtype, shape, bytes), tuners' own weights left out."""
        tuner_keys = {f'{name}.{k}'[len('backbone.'):] for name, t, _ in self.tuners() if name.startswith('backbone.')
                      for k in t.state_dict()}
        out = {}
        for k, v in self.backbone.state_dict().items():
            if k in tuner_keys:
                continue
            t = v.detach().cpu().contiguous()
            h = hashlib.sha256(f'{t.dtype}|{tuple(t.shape)}|'.encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b'')
            out[k] = h.hexdigest()
        return out

    def backbone_fingerprint(self, exclude: Optional[Iterable[str]] = None,
                             digests: Optional[Dict[str, str]] = None) -> str:
        """One hash of the frozen backbone weights, leaving out ``exclude`` (default: the weights a tuner of this
        model trains, whose pre-trained values are gone): equal for models tuned from the same pre-trained
        backbone, whatever their tuners (compare with the same ``exclude``)."""
        exclude = set(self.trained_backbone_names() if exclude is None else exclude)
        digests = self.backbone_digests() if digests is None else digests
        h = hashlib.sha256()
        for k in sorted(digests):
            if k not in exclude:
                h.update(f'{k}:{digests[k]};'.encode())
        return 'sha256:' + h.hexdigest()

    def tuner_config(self, base_path: bool = False) -> Dict[str, Any]:
        """The tuner-only config; the base's ``pretrained_weights`` (a path of this machine) only with
        ``base_path``, else just its file name, for the record."""
        base = self.base_config()
        weights = base.pop('pretrained_weights', None)
        if weights:
            base['pretrained_weights' if base_path else 'pretrained_weights_name'] = \
                weights if base_path else os.path.basename(str(weights))
        return {'tuners': [spec.to_entry() for spec in self.specs], 'base': base,
                'backbone_fingerprint': self.backbone_fingerprint(),
                'fingerprint_excludes': self.trained_backbone_names(),
                'head': self.head_config(),
                'CLASSES': list(self.CLASSES) if self.CLASSES is not None else None}

    def save_tuners(self, folder: str, base_path: bool = False) -> Dict[str, str]:
        """Write ``adapter_model.safetensors`` + ``adapter_config.json`` into ``folder``; returns their paths.
        ``base_path``: record the path of the base weights file (for :meth:`from_tuners` on this machine)."""
        return tuner_only.write_tuner_files(folder, self.tuner_state_dict(), self.tuner_config(base_path))

    def load_tuners(self, folder: str, strict: bool = True) -> Dict[str, Any]:
        """Load a tuner-only export into this network (built on the same base, with the same tuners): one
        ValueError lists every missing / unexpected / mismatched weight and any difference of the base ViT
        arguments or of the tuner entries. Sets ``CLASSES`` from the file; returns its config."""
        state, cfg = tuner_only.read_tuner_files(folder)
        own = self.tuner_state_dict()
        report = LoadReport(f'tuner-only export {folder!r}')
        report.add(missing=[k for k in own if k not in state], unexpected=[k for k in state if k not in own],
                   mismatched=shape_mismatches(state, own))
        diffs = _base_differences(cfg.get('base') or {}, self.base_config())
        if diffs:
            report.problems.append(f'base differs: {diffs}')
        ours = [spec.to_entry() for spec in self.specs]
        if _signature(cfg['tuners'], self.backbone) != _signature(ours, self.backbone):
            report.problems.append(f'tuners: file {cfg["tuners"]} vs model {ours}')
        if strict:
            report.raise_if_any('build the model from the same base and tuner entries, e.g. with '
                                'VisionEfficientTuning.from_tuners')
        params = dict(self.named_parameters())
        params.update({f'head.{k}': v for k, v in self.head.state_dict().items()})
        with torch.no_grad():
            for k, v in state.items():
                if k in own and tuple(v.shape) == tuple(own[k].shape):
                    params[k].copy_(v.to(params[k].dtype))
        if cfg.get('CLASSES') is not None:
            self.CLASSES = list(cfg['CLASSES'])
        return cfg

    @classmethod
    def from_tuners(cls, folder: str, base_weights: Optional[str] = None, **kwargs) -> 'SavedWeights':
        """Build a network from a tuner-only export: the frozen base from ``base_weights`` (a backbone file in any
        layout :mod:`.checkpoint.converters` reads), else from the base's own ``pretrained_weights`` entry. Without
        either there are no base weights: a ValueError says so (a random backbone would predict nonsense)."""
        cfg = tuner_only.read_tuner_config(folder)
        backbone = dict(cfg.get('base') or {})
        if base_weights is not None:
            backbone['pretrained_weights'] = base_weights
        elif not backbone.get('pretrained_weights'):
            raise ValueError(f'{folder!r} holds only tuners; the frozen backbone they were trained on is not in it: '
                             'pass pretrained_weights= (the base backbone file)')
        elif not os.path.isfile(backbone['pretrained_weights']):
            raise ValueError(f'the base weights {backbone["pretrained_weights"]!r} recorded in {folder!r} do not '
                             'exist here; pass pretrained_weights=')
        backbone['tuners'] = list(cfg['tuners'])
        net = cls(backbone, dict(cfg['head']), classes=cfg.get('CLASSES'), **kwargs)
        net.load_tuners(folder)
        return net


def _module_path(key: str) -> str:
    """``backbone.blocks.0.ffn_adapter.down.weight`` -> ``blocks.0.ffn_adapter``; ``side.net.x`` -> ``side``."""
    parts = key.split('.')
    if parts[0] == 'backbone':
        return '.'.join(parts[1:4])
    return parts[0]


def _in_slot(key: str, slots: set) -> bool:
    return any(part in slots for part in key.split('.')[:-1])


def _base_differences(saved: Dict[str, Any], ours: Dict[str, Any]) -> List[str]:
    keys = (set(saved) | set(ours)) - {'pretrained_weights', 'pretrained_weights_name', 'drop_rate',
                                       'attn_drop_rate', 'drop_path_rate', 'bypass'}
    defaults = {k: p.default for k, p in inspect.signature(VisionTransformer.__init__).parameters.items()
                if k in VIT_ARGS}
    diffs = []
    for k in sorted(keys):
        a, b = saved.get(k, defaults.get(k)), ours.get(k, defaults.get(k))
        if a != b:
            diffs.append(f'{k}: file {a!r} vs model {b!r}')
    return diffs


def _signature(entries, vit) -> List[tuple]:
    """What the entries compute, order-free; initial values and spelling do not matter."""
    try:
        specs = parse_tuners(entries, dims_of(vit))
    except ValueError as e:
        return [('invalid', str(e))]
    return sorted(s.signature() for s in specs)
