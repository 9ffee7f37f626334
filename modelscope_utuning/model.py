"""``VisionEfficientTuningModel``: frozen ViT + U-Tuners + classification head, as a ModelScope TorchModel.

Forward contract (ModelScope's built-in): ``model({'imgs': (B, 3, H, W), 'labels': (B,)})`` returns
``{'loss'}`` in train mode and ``{'scores': softmax (B, C), 'labels': argmax (B,)}`` in eval mode.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from modelscope.models.base import TorchModel

from .backbone_config import build_backbone, enable_bypass, split_backbone_config
from .checkpoint.hub_layout import CHECKPOINT_FILE, from_builtin_names, read_checkpoint, write_checkpoint
from .head import ClassifierHead
from .registration import register_class
from .tuners import Adapter, Prefix, Prompt, bitfit_parameter_names, is_tuner_parameter
from .tuners.spec import TunerSpec

HEAD_ARGS = ('dim', 'num_classes', 'dropout_rate')


def _substring_match(name: str, parts: Iterable[str]) -> bool:
    return any(p in name for p in parts)


def _two_form_tuner_form(vit: nn.Module, key: str) -> Optional[str]:
    """The ``form`` of the adapter / prefix / prompt module owning parameter ``key`` (None for anything else:
    LoRA and side-tuning have one form only, so the built-in's weights always mean the same for them)."""
    parts = key.split('.')
    for i in range(len(parts) - 1, 0, -1):
        try:
            module = vit.get_submodule('.'.join(parts[:i]))
        except AttributeError:
            continue
        if isinstance(module, (Adapter, Prefix, Prompt)):
            return module.form
    return None


class VisionEfficientTuning(nn.Module):
    """The network itself (backbone + head + loss), independent of ModelScope's model plumbing."""

    def __init__(self, backbone: nn.Module, head: ClassifierHead, specs: List[TunerSpec],
                 label_smoothing: float = 0.0):
        super().__init__()
        self.backbone, self.head, self.specs = backbone, head, specs
        self.label_smoothing = label_smoothing

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """Pooled feature (B, D) fed to the head."""
        return self.backbone(imgs)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes)."""
        return self.head(self.forward_features(imgs))


class VisionEfficientTuningModel(TorchModel):
    """U-Tuning classifier registered as ModelScope's ``vision-efficient-tuning`` model.

    Args (the ``model`` section of configuration.json):
        model_dir: folder with configuration.json and, optionally, ``pytorch_model.pt`` (hub layout).
        backbone: ViT arguments, ``tuners`` (see :mod:`modelscope_utuning.tuners.spec`), legacy ``*_length``
            keys, ``pretrained_weights`` (a pre-trained backbone file; see :mod:`.checkpoint.converters`).
        head: ``{dim, num_classes, dropout_rate}``.
        pretrained: load ``pytorch_model.pt`` when present.
        finetune: when True, ``pretrained_cfg.unload_part`` names weights (substrings) not to load, and a head
            whose class count differs from the checkpoint's starts fresh.
        freeze_cfg: ``{freeze_part: {backbone: [...], head: [...]}, train_part: {...}}`` substring lists applied
            after the default policy (backbone frozen; tuners, BitFit biases and head trainable).
        CLASSES: class names (the checkpoint's win when present).
    """

    def __init__(self, model_dir: Optional[str] = None, backbone: Optional[Dict] = None,
                 head: Optional[Dict] = None, loss: Optional[Dict] = None, pretrained: bool = True,
                 finetune: bool = False, pretrained_cfg: Optional[Dict] = None, freeze_cfg: Optional[Dict] = None,
                 CLASSES: Optional[List[str]] = None, **kwargs):
        super().__init__(model_dir)
        kwargs.pop('type', None)
        kwargs.pop('device', None)
        ckpt_path = os.path.join(model_dir, CHECKPOINT_FILE) if model_dir else None
        ckpt = read_checkpoint(ckpt_path) if pretrained and ckpt_path and os.path.isfile(ckpt_path) else None

        backbone_cfg = dict(backbone or (ckpt or {}).get('backbone_cfg') or {})
        vit_kwargs, entries, extras = split_backbone_config(backbone_cfg)
        raw_backbone = ckpt.get('backbone_weight', {}) if ckpt else {}
        backbone_state = from_builtin_names(raw_backbone)
        # Tuner weights stored under the built-in's names are sequential-form weights.
        self._builtin_form_keys = set(backbone_state) - set(raw_backbone)
        if 'num_classes' not in vit_kwargs:
            # The built-in backbone keeps a Linear head when its config leaves num_classes out; follow the
            # checkpoint, which tells whether that head exists.
            w = backbone_state.get('head.weight')
            vit_kwargs['num_classes'] = int(w.shape[0]) if w is not None else 0
        self.backbone_config = backbone_cfg
        vit, specs = build_backbone(vit_kwargs, entries)
        if extras.get('bypass'):
            enable_bypass(vit, specs)

        head_cfg = dict(head or (ckpt or {}).get('head_cfg') or {})
        head_cfg.pop('type', None)
        unknown = set(head_cfg) - set(HEAD_ARGS)
        if unknown:
            raise ValueError(f'model.head: unknown key(s) {sorted(unknown)}; expected {HEAD_ARGS}')
        if 'num_classes' not in head_cfg:
            w = (ckpt or {}).get('head_weight', {}).get('fc.weight')
            if w is None:
                raise ValueError('model.head.num_classes is required (no checkpoint head to read it from)')
            head_cfg['num_classes'] = int(w.shape[0])
        head_cfg.setdefault('dim', vit.out_dim)
        if head_cfg['dim'] != vit.out_dim:
            raise ValueError(f'model.head.dim={head_cfg["dim"]} does not match the backbone output width '
                             f'{vit.out_dim}')
        label_smoothing = float((loss or {}).get('label_smoothing', 0.0))
        self.model = VisionEfficientTuning(vit, ClassifierHead(**head_cfg), specs, label_smoothing)
        self.CLASSES = list(CLASSES) if CLASSES is not None else None
        self.finetune = finetune

        if extras.get('pretrained_weights'):
            from .checkpoint.converters import load_pretrained_backbone
            weights = extras['pretrained_weights']
            if model_dir and not os.path.isabs(weights) and os.path.isfile(os.path.join(model_dir, weights)):
                weights = os.path.join(model_dir, weights)  # relative to the model folder, as shipped
            load_pretrained_backbone(vit, weights)
        if ckpt is not None:
            unload = (pretrained_cfg or {}).get('unload_part', {}) if finetune else {}
            self._load_hub_state(backbone_state, dict(ckpt.get('head_weight', {})), unload, finetune)
            if ckpt.get('CLASSES') is not None and not (finetune and self._head_reset):
                self.CLASSES = list(ckpt['CLASSES'])
        self.freeze_cfg = freeze_cfg
        self.apply_freeze_policy(freeze_cfg)

    # -- convenient views ------------------------------------------------------------------------------------
    @property
    def backbone(self) -> nn.Module:
        return self.model.backbone

    @property
    def head(self) -> ClassifierHead:
        return self.model.head

    @property
    def specs(self) -> List[TunerSpec]:
        return self.model.specs

    # -- loading ---------------------------------------------------------------------------------------------
    def _load_hub_state(self, backbone_state: Dict[str, torch.Tensor], head_state: Dict[str, torch.Tensor],
                        unload: Dict[str, List[str]], finetune: bool) -> None:
        vit = self.backbone
        unloaded = {k for k in backbone_state if _substring_match(k, unload.get('backbone', []))}
        backbone_state = {k: v for k, v in backbone_state.items() if k not in unloaded}
        # A sequential tuner's weights mean something else in a parallel tuner of the same name: start fresh.
        other_form = [k for k in backbone_state
                      if k in self._builtin_form_keys and _two_form_tuner_form(vit, k) not in (None, 'sequential')]
        for k in other_form:
            backbone_state.pop(k)
        head_state = {k: v for k, v in head_state.items() if not _substring_match(k, unload.get('head', []))}
        self._head_reset = not head_state
        own_head = self.head.state_dict()
        if finetune and any(k in own_head and v.shape != own_head[k].shape for k, v in head_state.items()):
            head_state, self._head_reset = {}, True  # class count changed: a fresh head
        if 'pos_embed' in backbone_state:
            backbone_state['pos_embed'] = vit.load_pos_embed(backbone_state['pos_embed'])
        own = vit.state_dict()
        resized = [k for k, v in backbone_state.items()
                   if finetune and is_tuner_parameter(k) and k in own and v.shape != own[k].shape]
        for k in resized:  # a new fine-tune with another tuner size: those tuners start fresh
            backbone_state.pop(k)
        missing = [k for k in own if k not in backbone_state and not is_tuner_parameter(k) and k not in unloaded]
        unexpected = [k for k in backbone_state if k not in own and not is_tuner_parameter(k)]
        mismatched = [f'{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}'
                      for k, v in backbone_state.items() if k in own and v.shape != own[k].shape]
        head_missing = [f'head.{k}' for k in own_head if k not in head_state] if head_state else []
        mismatched += [f'head.{k}: checkpoint {tuple(v.shape)} vs model {tuple(own_head[k].shape)}'
                       for k, v in head_state.items() if k in own_head and v.shape != own_head[k].shape]
        if missing or unexpected or mismatched or head_missing:
            raise ValueError(
                'checkpoint does not fit the configured model:'
                + (f'\n  missing backbone weights: {missing}' if missing else '')
                + (f'\n  unexpected backbone weights: {unexpected}' if unexpected else '')
                + (f'\n  shape mismatches: {mismatched}' if mismatched else '')
                + (f'\n  missing head weights: {head_missing}' if head_missing else '')
                + '\n(tuners absent from the checkpoint start fresh; set model.finetune and '
                  'model.pretrained_cfg.unload_part to drop weights on purpose)')
        ignored = [k for k in backbone_state if k not in own] + other_form + resized
        if ignored:
            from modelscope.utils.logger import get_logger
            get_logger().warning(f'checkpoint tuner weights not used by the configured tuners: {ignored}')
        vit.load_state_dict({k: v for k, v in backbone_state.items() if k in own}, strict=False)
        if head_state:
            self.head.load_state_dict(head_state)

    # -- trainable parameters ----------------------------------------------------------------------------------
    def apply_freeze_policy(self, freeze_cfg: Optional[Dict] = None) -> None:
        """Which parameters train.

        Default: backbone frozen; tuners, BitFit biases and the head trainable. A ``freeze_cfg`` with a
        ``freeze_part`` is read as ModelScope's built-in reads it (hub BitFit models rely on this): everything
        trains except the parameters whose names contain a listed substring. ``train_part`` then re-enables
        matching parameters in either case. Both parts apply to ``backbone`` and ``head`` alike.
        """
        freeze_cfg = freeze_cfg or {}
        for key in ('freeze_part', 'train_part'):
            for part in (freeze_cfg.get(key) or {}):
                if part not in ('backbone', 'head'):
                    raise ValueError(f'model.freeze_cfg.{key}: unknown part {part!r}; expected backbone / head')
        if freeze_cfg.get('freeze_part'):
            for p in self.parameters():
                p.requires_grad = True
        else:
            bitfit = set(bitfit_parameter_names(self.backbone, self.specs))
            for name, p in self.backbone.named_parameters():
                p.requires_grad = is_tuner_parameter(name) or name in bitfit
            for p in self.head.parameters():
                p.requires_grad = True
        for key, flag in (('freeze_part', False), ('train_part', True)):
            for part, substrings in (freeze_cfg.get(key) or {}).items():
                for name, p in getattr(self, part).named_parameters():
                    if _substring_match(name, substrings):
                        p.requires_grad = flag

    def trainable_parameters(self) -> Tuple[int, int]:
        """(trainable, total) parameter counts."""
        total = sum(p.numel() for p in self.parameters())
        return sum(p.numel() for p in self.parameters() if p.requires_grad), total

    # -- forward -----------------------------------------------------------------------------------------------
    def forward(self, input: Dict[str, Any]) -> Dict[str, torch.Tensor]:  # noqa: A002 - ModelScope's name
        if not isinstance(input, dict) or 'imgs' not in input:
            raise ValueError("model input must be a dict with 'imgs' (B, 3, H, W) and, to train, 'labels' (B,)")
        imgs = input['imgs']
        logits = self.model(imgs)
        if self.training:
            labels = input.get('labels')
            if labels is None:
                raise ValueError("training needs 'labels' (B,) beside 'imgs'")
            loss = F.cross_entropy(logits.float(), labels.long().to(logits.device),
                                   label_smoothing=self.model.label_smoothing)
            return {'loss': loss}
        scores = F.softmax(logits.float(), dim=1)
        return {'scores': scores, 'labels': scores.argmax(dim=1)}

    # -- saving ------------------------------------------------------------------------------------------------
    def save_hub_checkpoint(self, folder: str) -> str:
        """Write ``folder/pytorch_model.pt`` in the hub layout; returns its path."""
        sequential = {f'blocks.{b.index}.{name}' for b in self.backbone.blocks for name, m in b.named_children()
                      if getattr(m, 'form', None) == 'sequential'}
        path = os.path.join(folder, CHECKPOINT_FILE)
        write_checkpoint(path, self.backbone.state_dict(), self.head.state_dict(), self.CLASSES, sequential)
        return path


register_class(VisionEfficientTuningModel)
