"""The U-Tuning classifier in plain torch: a frozen ViT with tuners on its OPs, network-level tuners (BitFit, the
side network) and a classification head. ModelScope's model class is a thin shell around it (:mod:`.model`).

``VisionEfficientTuning(backbone_cfg, head_cfg)`` builds it from the ``model.backbone`` / ``model.head`` sections of
configuration.json. It owns its configuration, class names, which parameters train (from the tuners' types:
:meth:`~.tuners.base.Tuner.adapter_params`), the weight-decay exemptions and the forward; its weights in both
formats (the hub layout and the tuner-only files) come from its base class :class:`~.network_files.SavedWeights`.

Shapes: images ``(B, 3, H, W)``; ``forward_features`` -> tokens ``(B, N, C)``; ``pre_logits`` -> ``(B, D)``;
``forward`` -> logits ``(B, num_classes)``.
"""
from __future__ import annotations

import copy
import os
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn

from .backbone.vit import VisionTransformer
from .backbone_config import split_backbone_config, without_kinds
from .checkpoint.converters import load_pretrained_backbone
from .checkpoint.merge import merge_block_tuners
from .head import ClassifierHead
from .network_files import SavedWeights
from .tuners import attach_block_tuners, build_tuner, bypass_problems, parse_tuners
from .tuners.base import Tuner, dims_of, slot_name, tuner_kinds
from .tuners.spec import TunerSpec

HEAD_ARGS = ('dim', 'num_classes', 'dropout_rate')


# ModelScope's name for the built-in's head (hub configurations), and the plain one
CLASSIFIER_HEAD_TYPES = (None, 'ClassifierHead', 'linear')


class VisionEfficientTuning(SavedWeights, nn.Module):
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
        self.specs: List[TunerSpec] = parse_tuners(entries, dims_of(self.backbone))
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
        """Final tokens ``(B, N, C)`` -> the head's input ``(B, D)``: the backbone's own ``pool`` (the one
        ``forward_head`` uses), the ``features`` point between pooling and fc_norm (the side network mixes in
        there, which is why this is not ``vit.forward_head``), fc_norm and the legacy backbone head."""
        vit = self.backbone
        x = vit.pool(tokens)
        for module in self.children():
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

    def add_tuners(self, entries: Iterable[Dict[str, Any]]) -> List[TunerSpec]:
        """Attach further explicit tuner entries to this built network (in place; e.g. tuners another library
        trained, converted to ours): they start fresh and train, and the configuration lists them from now on.
        Validated with the entries already there (ValueError, nothing changed, on a bad or conflicting entry).
        Returns the new specs."""
        entries = [dict(e) for e in entries]
        explicit = list(self.backbone_config.get('tuners') or []) + entries
        _, all_entries, _ = split_backbone_config(dict(self.backbone_config, tuners=explicit))
        specs = parse_tuners(all_entries, dims_of(self.backbone))
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
        and every option: :meth:`TunerSpec.to_entry`), so that a saved model means the same to a later
        version whose defaults differ."""
        cfg = copy.deepcopy(self.backbone_config)
        if not cfg.get('tuners'):
            return cfg
        cfg['tuners'] = [spec.to_entry() for spec in self.specs[:self._n_explicit]]
        return cfg


def as_network(obj: Any) -> VisionEfficientTuning:
    """Our plain-torch network inside ``obj``: the network itself (or a subclass, e.g. the segmentation network),
    the ModelScope model around it (its ``.model``), or either wrapped by DistributedDataParallel (``.module``).
    The one place a caller unwraps; a TypeError names anything else."""
    seen = obj
    for _ in range(3):  # DDP(model) -> model -> network
        if isinstance(obj, VisionEfficientTuning):
            return obj
        inner = obj._modules.get('module') or obj._modules.get('model') if isinstance(obj, nn.Module) else None
        if inner is None:
            break
        obj = inner
    raise TypeError(f'expected one of our models (VisionEfficientTuningModel or VisionEfficientTuning, possibly '
                    f'wrapped by DistributedDataParallel), got {type(seen).__name__}')

