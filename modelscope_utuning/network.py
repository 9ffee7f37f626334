"""The U-Tuning classifier in plain torch: a frozen ViT with tuners on its OPs, network-level tuners (BitFit, the
side network) and a classification head. ModelScope's model class is a thin shell around it (:mod:`.model`).

``VisionEfficientTuning(backbone_cfg, head_cfg)`` builds it from the ``model.backbone`` / ``model.head`` sections of
configuration.json. It owns its configuration, class names, which parameters train (from the tuners' types:
:meth:`~.tuners.base.Tuner.adapter_params`), the weight-decay exemptions, and its weights in both formats: the
hub layout (``pytorch_model.pt``) and the tuner-only files, each loaded strictly with one report of everything
that does not fit.

Shapes: images ``(B, 3, H, W)``; ``forward_features`` -> tokens ``(B, N, C)``; ``pre_logits`` -> ``(B, D)``;
``forward`` -> logits ``(B, num_classes)``.
"""
from __future__ import annotations

import copy
import hashlib
import os
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn

from .backbone.vit import VisionTransformer
from .backbone_config import base_config, split_backbone_config, without_kinds
from .checkpoint import hub_layout, tuner_only
from .checkpoint.load_report import LoadReport, shape_mismatches
from .checkpoint.merge import merge_block_tuners
from .head import ClassifierHead
from .tuners import attach_block_tuners, build_tuner, bypass_problems, parse_tuners
from .tuners.base import Tuner, dims_of, slot_name, slot_names
from .tuners.spec import TunerSpec

HEAD_ARGS = ('dim', 'num_classes', 'dropout_rate')
NETWORK_POINTS = ('features',)  # network-level hook point: the pooled feature, with the images at hand


# ModelScope's name for the built-in's head (hub configurations), and the plain one
CLASSIFIER_HEAD_TYPES = (None, 'ClassifierHead', 'linear')


class VisionEfficientTuning(nn.Module):
    """Backbone + tuners + head (see the module docstring).

    Args:
        backbone_cfg: ``model.backbone``: ViT arguments, ``tuners``, legacy ``*_length`` keys, ``bypass``,
            ``pretrained_weights`` (a pre-trained backbone file, loaded here; see :mod:`.checkpoint.converters`).
        head_cfg: ``{dim, num_classes, dropout_rate}`` (``dim`` defaults to the backbone's output width).
        classes: class names, in label order.
        label_smoothing: of the training cross-entropy.
        base_dir: folder that a relative ``pretrained_weights`` is relative to.
    """

    def __init__(self, backbone_cfg: Dict[str, Any], head_cfg: Dict[str, Any], classes: Optional[List[str]] = None,
                 label_smoothing: float = 0.0, base_dir: Optional[str] = None):
        super().__init__()
        self.backbone_config = dict(backbone_cfg or {})
        vit_kwargs, entries, extras = split_backbone_config(self.backbone_config)
        self._n_explicit = len(self.backbone_config.get('tuners') or [])
        self.backbone = VisionTransformer(**vit_kwargs)
        self.specs: List[TunerSpec] = parse_tuners(entries, self.backbone.depth, self.backbone.embed_dim)
        attach_block_tuners(self.backbone, self.specs)
        dims = dims_of(self.backbone)
        for spec in self.specs:
            if spec.kind.level == 'network':
                self.add_module(slot_name(spec.kind, None), build_tuner(spec, 1, dims))
        self._set_bypass(bool(extras.get('bypass')))
        self.head = self.build_head(head_cfg)
        self.CLASSES = list(classes) if classes is not None else None
        self.label_smoothing = float(label_smoothing)
        weights = extras.get('pretrained_weights')
        if weights:
            from .checkpoint.converters import load_pretrained_backbone
            if base_dir and not os.path.isabs(weights) and os.path.isfile(os.path.join(base_dir, weights)):
                weights = os.path.join(base_dir, weights)  # relative to the model folder, as shipped
            load_pretrained_backbone(self.backbone, weights)
        self.set_default_trainable()

    def build_head(self, head_cfg: Dict[str, Any]) -> nn.Module:
        """The task head from ``model.head`` (a dense-prediction network overrides this; see
        :mod:`.segmentation.network`)."""
        return ClassifierHead(**self._head_args(head_cfg))

    def head_config(self) -> Dict[str, Any]:
        """``model.head`` as the saved files record it (enough to build the same head again)."""
        return {'num_classes': self.head.num_classes, 'dim': self.head.dim}

    def _head_args(self, head_cfg: Dict[str, Any]) -> Dict[str, Any]:
        head = dict(head_cfg or {})
        kind = head.pop('type', None)
        if kind not in CLASSIFIER_HEAD_TYPES:
            raise ValueError(f'model.head.type={kind!r}: the classification head is a linear classifier, expected '
                             f'one of {CLASSIFIER_HEAD_TYPES[1:]} (or no type); segmentation heads belong to model '
                             'type vision-efficient-tuning-segmentation')
        unknown = set(head) - set(HEAD_ARGS)
        if unknown:
            raise ValueError(f'model.head: unknown key(s) {sorted(unknown)}; expected {HEAD_ARGS}')
        if 'num_classes' not in head:
            raise ValueError('model.head.num_classes is required (no checkpoint head to read it from)')
        head.setdefault('dim', self.backbone.out_dim)
        if head['dim'] != self.backbone.out_dim:
            raise ValueError(f'model.head.dim={head["dim"]} does not match the backbone output width '
                             f'{self.backbone.out_dim}')
        return head

    def _set_bypass(self, on: bool) -> None:
        required = [s.source for s in self.specs if s.kind.requires_bypass]
        if not on:
            if required:
                raise ValueError(f'tuner entries {required} work on the bypass path only: set '
                                 'model.backbone.bypass to true')
            return
        bad = bypass_problems(self.specs)
        if bad or not self.specs:
            from .tuners.base import tuner_kinds
            able = [f'{" / ".join(c.bypass_forms)} {k}' for k, c in tuner_kinds().items() if c.bypass_forms]
            raise ValueError('model.backbone.bypass needs tuners that run beside the frozen backbone '
                             f'({", ".join(able)}); not supported: {bad or "no tuners"}')
        self.backbone.bypass = True

    # -- the tuners ---------------------------------------------------------------------------------------------
    def tuners(self) -> List[Tuple[str, Tuner, nn.Module]]:
        """``(name relative to the network, tuner, host)`` for every tuner (host: its block, or the network)."""
        out = []
        for blk in self.backbone.blocks:
            for name, t in blk.tuners():
                out.append((f'backbone.blocks.{blk.index}.{name}', t, blk))
        for name, module in self.named_children():
            if isinstance(module, Tuner):
                out.append((name, module, self))
        return out

    def tuner_parameters(self) -> Dict[str, nn.Parameter]:
        """Every parameter a tuner trains (its ``adapter_params``), by name relative to the network."""
        names = {id(p): n for n, p in self.named_parameters()}
        out = {}
        for name, tuner, host in self.tuners():
            for p in tuner.adapter_params(host).values():
                out[names[id(p)]] = p
        return out

    def set_default_trainable(self) -> None:
        """Backbone frozen; the tuners' parameters and the head train."""
        for p in self.parameters():
            p.requires_grad = False
        for p in list(self.tuner_parameters().values()) + list(self.head.parameters()):
            p.requires_grad = True

    def trainable_parameters(self) -> Tuple[int, int]:
        """(trainable, total) parameter counts."""
        total = sum(p.numel() for p in self.parameters())
        return sum(p.numel() for p in self.parameters() if p.requires_grad), total

    def no_weight_decay(self) -> set:
        """Names (relative to the network) that weight decay would only pull towards zero: the backbone's position
        embedding and class token, the tuners' learned tokens / offsets / scales, and every 1-d parameter."""
        names = {f'backbone.{n}' for n in self.backbone.no_weight_decay()}
        for name, tuner, _ in self.tuners():
            names |= {f'{name}.{n}' for n in tuner.no_weight_decay()}
        names |= {n for n, p in self.named_parameters() if p.ndim <= 1}
        return names

    def lr_scales(self) -> Dict[str, float]:
        """Names (relative to the network) whose learning rate is the tuner rate times a factor of the tuner's own
        (:meth:`Tuner.lr_scales`, e.g. LoRA's ``A``); every other parameter has factor 1."""
        out = {}
        for name, tuner, _ in self.tuners():
            out.update({f'{name}.{n}': float(f) for n, f in tuner.lr_scales().items()})
        return out

    def parameter_roles(self) -> Dict[str, str]:
        """Trainable parameter name -> 'head' | 'tuner' | 'backbone' (for per-role learning rates)."""
        head = {id(p) for p in self.head.parameters()}
        tuner = {id(p) for p in self.tuner_parameters().values()}
        return {n: 'head' if id(p) in head else 'tuner' if id(p) in tuner else 'backbone'
                for n, p in self.named_parameters() if p.requires_grad}

    # -- forward ------------------------------------------------------------------------------------------------
    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Tokens ``(B, N, C)`` after the backbone's final norm (the ViT's contract)."""
        return self.backbone.forward_features(images)

    def pre_logits(self, images: torch.Tensor) -> torch.Tensor:
        """The pooled feature the head reads, ``(B, D)``: pooling (only the rows it reads are finished), the
        network-level ``features`` point (side network), fc_norm and the legacy backbone head."""
        vit = self.backbone
        tokens = vit.forward_features(images, pooled_rows_only=True)
        return self.forward_head_features(tokens, images)

    def forward_head_features(self, tokens: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        vit = self.backbone
        if vit.global_pool == 'avg':
            x = tokens[:, vit.num_prefix_tokens:].mean(dim=1)
        elif vit.global_pool == 'token':
            x = tokens[:, 0]
        else:
            x = tokens
        for name, module in self.named_children():
            if isinstance(module, Tuner) and 'features' in module.points:
                x = module.edit_features(images, x)
        return vit.head(vit.fc_norm(x))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)``."""
        return self.head(self.pre_logits(images))

    # The tokens-to-logits step on its own, for callers that ran the backbone themselves (several tasks sharing one
    # frozen forward, :mod:`.multitask`): which block outputs the head reads besides the final tokens, and the head's
    # logits from them. A dense network (:mod:`.segmentation.network`) reads intermediate layers.
    def head_layers_needed(self) -> Optional[List[int]]:
        """Block indices whose outputs the head reads besides the final tokens (None: the final tokens only)."""
        return None

    def logits_from_tokens(self, final: torch.Tensor, levels: Dict[int, torch.Tensor],
                           images: torch.Tensor) -> torch.Tensor:
        """Logits from the final tokens ``(B, N, C)`` (and ``levels``: block index -> tokens, for dense heads)."""
        return self.head(self.forward_head_features(final, images))

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
        return {'tuners': [spec.resolved_config() for spec in self.specs], 'base': base,
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
        ours = [spec.to_config() for spec in self.specs]
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
    def from_tuners(cls, folder: str, base_weights: Optional[str] = None, **kwargs) -> 'VisionEfficientTuning':
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

    def add_tuners(self, entries: Iterable[Dict[str, Any]]) -> List[TunerSpec]:
        """Attach further explicit tuner entries to this built network (in place; e.g. tuners another library
        trained, converted to ours): they start fresh and train, and the configuration lists them from now on.
        Validated with the entries already there (ValueError, nothing changed, on a bad or conflicting entry).
        Returns the new specs."""
        entries = [dict(e) for e in entries]
        explicit = list(self.backbone_config.get('tuners') or []) + entries
        _, all_entries, _ = split_backbone_config(dict(self.backbone_config, tuners=explicit))
        specs = parse_tuners(all_entries, self.backbone.depth, self.backbone.embed_dim)
        new = specs[self._n_explicit:self._n_explicit + len(entries)]
        if self.backbone.bypass and bypass_problems(new):
            raise ValueError(f'tuner entries {bypass_problems(new)} cannot run on the bypass path')
        before = {id(t) for _, t, _ in self.tuners()}
        attach_block_tuners(self.backbone, new)
        dims = dims_of(self.backbone)
        for spec in new:
            if spec.kind.level == 'network':
                self.add_module(slot_name(spec.kind, None), build_tuner(spec, 1, dims))
        self.specs[:] = specs
        self.backbone_config = dict(self.backbone_config, tuners=explicit)
        self._n_explicit = len(explicit)
        for _, tuner, host in self.tuners():
            if id(tuner) not in before:
                for p in tuner.adapter_params(host).values():
                    p.requires_grad = True
        return new

    # -- merging ---------------------------------------------------------------------------------------------------
    def merge(self, kinds: Optional[Iterable[str]] = None) -> List[str]:
        """Fold mergeable tuners of ``kinds`` (all mergeable kinds when None) into the frozen weights and drop
        them; the specs and the configuration then describe the merged network. Returns the merged kinds."""
        merged = merge_block_tuners(self.backbone, kinds)
        if merged:
            self.specs[:] = [s for s in self.specs if s.type not in merged]
            self.backbone_config = without_kinds(self.backbone_config, merged)
        return merged

    def resolved_backbone_config(self) -> Dict[str, Any]:
        """``backbone_config`` with each explicit tuner entry completed by everything it was built with (op, form
        and every option: :meth:`TunerSpec.resolved_config`), so that a saved model means the same to a later
        version whose defaults differ."""
        cfg = copy.deepcopy(self.backbone_config)
        if not cfg.get('tuners'):
            return cfg
        cfg['tuners'] = [spec.resolved_config() for spec in self.specs[:self._n_explicit]]
        return cfg


def _module_path(key: str) -> str:
    """``backbone.blocks.0.ffn_adapter.down.weight`` -> ``blocks.0.ffn_adapter``; ``side.net.x`` -> ``side``."""
    parts = key.split('.')
    if parts[0] == 'backbone':
        return '.'.join(parts[1:4])
    return parts[0]


def _in_slot(key: str, slots: set) -> bool:
    return any(part in slots for part in key.split('.')[:-1])


def _base_differences(saved: Dict[str, Any], ours: Dict[str, Any]) -> List[str]:
    import inspect
    from .backbone_config import VIT_ARGS
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
        specs = parse_tuners(entries, vit.depth, vit.embed_dim)
    except ValueError as e:
        return [('invalid', str(e))]
    return sorted(s.signature() for s in specs)
