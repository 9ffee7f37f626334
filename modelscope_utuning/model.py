"""``VisionEfficientTuningModel``: ModelScope's ``vision-efficient-tuning`` model, a thin shell around the plain-torch
network (:class:`~.network.VisionEfficientTuning`).

What the shell adds is ModelScope's side of things: the constructor arguments of the ``model`` section of
configuration.json, reading ``pytorch_model.pt`` from the model folder (``finetune`` / ``unload_part``
semantics), ``freeze_cfg``, and the forward contract of the built-in:
``model({'imgs': (B, 3, H, W), 'labels': (B,)})`` returns ``{'loss'}`` in train mode and
``{'scores': softmax (B, C), 'labels': argmax (B,)}`` in eval mode.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from modelscope.models.base import TorchModel

from .backbone.vit import VisionTransformer
from .checkpoint.hub_layout import (CHECKPOINT_FILE, network_state_from_hub, read_checkpoint, read_configuration,
                                    split_model_state)
from .checkpoint.merge import has_tuners, merge_block_tuners
from .checkpoint.migrate import migrate_backbone, writer_of_checkpoint, writer_of_folder
from .head import ClassifierHead
from .location import locate_model_source
from .network import VisionEfficientTuning, as_network
from .registration import SEG_TYPE, register_class
from .tuners.spec import TunerSpec

__all__ = ['VisionEfficientTuningModel', 'has_lora', 'load_model', 'load_tuners', 'merge_lora', 'model_from_tuners',
           'save_tuners']


def _substring_match(name: str, parts: Iterable[str]) -> bool:
    return any(p in name for p in parts)


class VisionEfficientTuningModel(TorchModel):
    """U-Tuning classifier registered as ModelScope's ``vision-efficient-tuning`` model.

    Args (the ``model`` section of configuration.json):
        model_dir: folder with configuration.json and, optionally, ``pytorch_model.pt`` (hub layout).
        backbone: ViT arguments, ``tuners`` (see :mod:`modelscope_utuning.tuners.spec`), legacy ``*_length``
            keys, ``bypass``, ``pretrained_weights`` (a pre-trained backbone file; see :mod:`.checkpoint.converters`).
        head: ``{dim, num_classes, dropout_rate}``.
        loss: ``{label_smoothing}``.
        pretrained: load ``pytorch_model.pt`` when present.
        finetune: when True, ``pretrained_cfg.unload_part`` names weights (substrings) not to load, and a head or
            tuner whose shape differs from the checkpoint's starts fresh.
        freeze_cfg: ``{freeze_part: {backbone: [...], head: [...]}, train_part: {...}}`` substring lists applied
            after the default policy (backbone frozen; tuners, BitFit biases and head trainable).
        CLASSES: class names (the checkpoint's win when present, unless a fine-tune replaced the head).
    """

    network_class = VisionEfficientTuning  # the plain-torch network this ModelScope shell holds

    def __init__(self, model_dir: Optional[str] = None, backbone: Optional[Dict] = None,
                 head: Optional[Dict] = None, loss: Optional[Dict] = None, pretrained: bool = True,
                 finetune: bool = False, pretrained_cfg: Optional[Dict] = None, freeze_cfg: Optional[Dict] = None,
                 CLASSES: Optional[List[str]] = None, **kwargs):
        super().__init__(model_dir)
        kwargs.pop('type', None)
        kwargs.pop('device', None)
        ckpt_path = os.path.join(model_dir, CHECKPOINT_FILE) if model_dir else None
        ckpt = read_checkpoint(ckpt_path) if pretrained and ckpt_path and os.path.isfile(ckpt_path) else None

        backbone_cfg = _version_defaults(dict(backbone or (ckpt or {}).get('backbone_cfg') or {}), model_dir)
        head_cfg = dict(head or (ckpt or {}).get('head_cfg') or {})
        if ckpt is not None:
            _fill_from_checkpoint(backbone_cfg, head_cfg, ckpt)
        elif 'num_classes' not in backbone_cfg:
            backbone_cfg['num_classes'] = 0
        self.model = self.network_class(backbone_cfg, head_cfg, classes=CLASSES,
                                           label_smoothing=float((loss or {}).get('label_smoothing', 0.0)),
                                           base_dir=model_dir)
        self.finetune = finetune
        self.head_loaded = False
        if ckpt is not None:
            unload = (pretrained_cfg or {}).get('unload_part', {}) if finetune else {}

            def drop(key: str) -> bool:
                part, _, rest = key.partition('.')
                return _substring_match(rest if part in ('backbone', 'head') else key,
                                        unload.get('head' if part == 'head' else 'backbone', []))

            result = self.model.load_hub_state(ckpt, f'checkpoint {ckpt_path!r}', drop=drop,
                                               fresh_on_mismatch=finetune)
            self.head_loaded = result['head_loaded']
            if result['ignored']:
                from modelscope.utils.logger import get_logger
                get_logger().warning(f'checkpoint weights not used (they start fresh): {result["ignored"]}')
            if ckpt.get('CLASSES') is not None and self.head_loaded:
                self.model.CLASSES = list(ckpt['CLASSES'])
        self.freeze_cfg = freeze_cfg
        self.apply_freeze_policy(freeze_cfg)

    # -- views of the network -------------------------------------------------------------------------------------
    @property
    def backbone(self) -> VisionTransformer:
        return self.model.backbone

    @property
    def head(self) -> ClassifierHead:
        return self.model.head

    @property
    def specs(self) -> List[TunerSpec]:
        return self.model.specs

    @property
    def backbone_config(self) -> Dict[str, Any]:
        return self.model.backbone_config

    @backbone_config.setter
    def backbone_config(self, value: Dict[str, Any]) -> None:
        self.model.backbone_config = dict(value)

    @property
    def CLASSES(self) -> Optional[List[str]]:  # noqa: N802 - ModelScope's name
        return self.model.CLASSES

    @CLASSES.setter
    def CLASSES(self, value: Optional[List[str]]) -> None:  # noqa: N802
        self.model.CLASSES = list(value) if value is not None else None

    # -- trainable parameters -------------------------------------------------------------------------------------
    def apply_freeze_policy(self, freeze_cfg: Optional[Dict] = None) -> None:
        """Which parameters train.

        Default: backbone frozen; the tuners' parameters and the head trainable. A ``freeze_cfg`` with a
        ``freeze_part`` is read as ModelScope's built-in reads it (hub BitFit models rely on this): everything
        trains except the parameters whose names contain a listed substring. ``train_part`` then re-enables
        matching parameters in either case. Both parts apply to ``backbone`` and ``head`` alike (names relative to
        them; network-level tuners count as backbone).
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
            self.model.set_default_trainable()
        for key, flag in (('freeze_part', False), ('train_part', True)):
            for part, substrings in (freeze_cfg.get(key) or {}).items():
                if isinstance(substrings, str):
                    substrings = [substrings]
                if not isinstance(substrings, (list, tuple)) or not all(isinstance(s, str) for s in substrings):
                    raise ValueError(f'model.freeze_cfg.{key}.{part}={substrings!r}: expected a list of name '
                                     'substrings')
                params = self._part_parameters(part)
                for substring in substrings:
                    # A pattern that matches nothing changes nothing: almost always a typo or another model's
                    # naming, which would otherwise train (or freeze) something else than meant, silently.
                    if not any(substring in name for name, _ in params):
                        raise ValueError(
                            f'model.freeze_cfg.{key}.{part}: {substring!r} matches no parameter of the {part} '
                            f'(names look like {", ".join(n for n, _ in params[:4])}, ...)')
                for name, p in params:
                    if _substring_match(name, substrings):
                        p.requires_grad = flag

    def _part_parameters(self, part: str):
        if part == 'head':
            return list(self.head.named_parameters())
        params = list(self.backbone.named_parameters())
        params += [(n, p) for n, p in self.model.named_parameters() if not n.startswith(('backbone.', 'head.'))]
        return params

    def trainable_parameters(self) -> Tuple[int, int]:
        """(trainable, total) parameter counts."""
        return self.model.trainable_parameters()

    # -- forward ---------------------------------------------------------------------------------------------------
    def forward(self, input: Dict[str, Any]) -> Dict[str, torch.Tensor]:  # noqa: A002 - ModelScope's name
        if not isinstance(input, dict) or 'imgs' not in input:
            raise ValueError("model input must be a dict with 'imgs' (B, 3, H, W) and, to train, 'labels' (B,)")
        logits = self.model(input['imgs'])
        if self.training:
            labels = input.get('labels')
            if labels is None:
                raise ValueError("training needs 'labels' (B,) beside 'imgs'")
            loss = F.cross_entropy(logits.float(), labels.long().to(logits.device),
                                   label_smoothing=self.model.label_smoothing)
            return {'loss': loss}
        scores = F.softmax(logits.float(), dim=1)
        return {'scores': scores, 'labels': scores.argmax(dim=1)}

    # -- saving, merging ---------------------------------------------------------------------------------------------
    def save_hub_checkpoint(self, folder: str) -> str:
        """Write ``folder/pytorch_model.pt`` in the hub layout; returns its path."""
        return self.model.save_hub(folder)

    def merge(self, kinds: Optional[Iterable[str]] = None) -> List[str]:
        """Fold mergeable tuners into the frozen weights (see :meth:`VisionEfficientTuning.merge`)."""
        merged = self.model.merge(kinds)
        if merged:
            self.apply_freeze_policy(self.freeze_cfg)
        return merged

    @classmethod
    def from_pretrained(cls, model_name_or_path, *args, **kwargs):
        """ModelScope's ``Model.from_pretrained``, with a missing local path (a typo) named at once instead of being
        sent to the hub (the rule: :func:`.location.locate_model_source`); hub ids download as usual."""
        if isinstance(model_name_or_path, (str, os.PathLike)):
            locate_model_source(model_name_or_path)
        return super().from_pretrained(model_name_or_path, *args, **kwargs)

    @classmethod
    def from_network(cls, net: VisionEfficientTuning, model_dir: Optional[str] = None,
                     freeze_cfg: Optional[Dict] = None) -> 'VisionEfficientTuningModel':
        """Wrap an existing network (nothing is rebuilt or reloaded)."""
        self = cls.__new__(cls)
        TorchModel.__init__(self, model_dir)
        self.model, self.finetune, self.head_loaded, self.freeze_cfg = net, False, True, freeze_cfg
        self.apply_freeze_policy(freeze_cfg)
        return self

    @classmethod
    def from_tuners(cls, folder: str, pretrained_weights: Optional[str] = None,
                    freeze_cfg: Optional[Dict] = None) -> 'VisionEfficientTuningModel':
        """A model from a tuner-only export and the base backbone weights (see
        :meth:`VisionEfficientTuning.from_tuners`)."""
        return cls.from_network(cls.network_class.from_tuners(folder, pretrained_weights), freeze_cfg=freeze_cfg)


def _version_defaults(backbone_cfg: Dict[str, Any], model_dir: Optional[str]) -> Dict[str, Any]:
    """``model.backbone`` with its tuner entries migrated for the version that wrote ``model_dir``'s
    configuration.json (``utuning.version``; none: not written by this package, today's defaults): a folder saved
    by 0.1 keeps ``join: absolute`` (:mod:`.checkpoint.migrate`)."""
    return migrate_backbone(backbone_cfg, writer_of_folder(model_dir), source=f'{model_dir}/configuration.json')


def _fill_from_checkpoint(backbone_cfg: Dict[str, Any], head_cfg: Dict[str, Any], ckpt: Dict[str, Any]) -> None:
    """What the configuration leaves out, read from the checkpoint: whether the backbone has a legacy classifier
    head (the built-in keeps one when its config leaves num_classes at 1000), and the head's class count."""
    state, _ = network_state_from_hub(ckpt)
    if 'num_classes' not in backbone_cfg:
        w = state.get('backbone.head.weight')
        backbone_cfg['num_classes'] = int(w.shape[0]) if w is not None else 0
    if 'num_classes' not in head_cfg:
        w = state.get('head.fc.weight')
        if w is not None:
            head_cfg['num_classes'] = int(w.shape[0])


# -- the public helpers, on any of our model objects --------------------------------------------------------------
def save_tuners(model, folder: str, base_path: bool = True) -> Dict[str, str]:
    """Write the tuner-only files of ``model`` into ``folder`` (see :mod:`.checkpoint.tuner_only`); ``base_path``:
    record the path of its base weights file, so that :func:`model_from_tuners` finds it on this machine."""
    return as_network(model).save_tuners(folder, base_path)


def load_tuners(model, folder: str, strict: bool = True) -> Dict[str, Any]:
    """Load a tuner-only export into ``model`` (built on the same base with the same tuners)."""
    return as_network(model).load_tuners(folder, strict)


def model_from_tuners(folder: str, pretrained_weights: Optional[str] = None,
                      freeze_cfg: Optional[Dict] = None) -> VisionEfficientTuningModel:
    """A :class:`VisionEfficientTuningModel` from a tuner-only export and its base backbone weights."""
    return VisionEfficientTuningModel.from_tuners(folder, pretrained_weights, freeze_cfg)


def load_model(path: str) -> VisionEfficientTuningModel:
    """A model from a folder (``configuration.json`` [+ ``pytorch_model.pt``], as ModelScope loads it) or from a
    checkpoint file the trainer wrote (``work_dir/epoch_N.pth``: its weights, class names and model configuration
    travel together). ValueError naming the file when it is not one of those or cannot be read (a half-written
    file, for example)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        cfg = dict(read_configuration(path).get('model') or {})
        return _model_class(cfg.pop('type', None))(model_dir=path, **cfg)
    if not os.path.isfile(path):
        raise ValueError(f'{path!r}: no such model folder or checkpoint file')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised naming the file
        raise ValueError(f'checkpoint {path!r} cannot be read (a half-written or damaged file?): {e}') from e
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get('state_dict'), dict) and ckpt.get('model_cfg')):
        raise ValueError(f'{path!r} is not a checkpoint file of a modelscope-utuning trainer (expected state_dict, '
                         'CLASSES and model_cfg); load the folder with its configuration.json instead')
    cfg = dict(ckpt['model_cfg'])
    if cfg.get('backbone'):  # its tuner entries mean what they meant to the version that wrote the file
        cfg['backbone'] = migrate_backbone(cfg['backbone'], writer_of_checkpoint(ckpt), source=f'checkpoint {path!r}')
    cls = _model_class(cfg.pop('type', None))
    cfg['finetune'] = False
    model = cls(model_dir=None, pretrained=False, **cfg)
    hub = split_model_state(ckpt['state_dict'], ckpt.get('CLASSES'))
    result = model.model.load_hub_state(hub, f'checkpoint {path!r}')
    model.head_loaded = result['head_loaded']
    if ckpt.get('CLASSES') is not None:
        model.CLASSES = list(ckpt['CLASSES'])
    return model


def _model_class(model_type: Optional[str]) -> type:
    """Our model class for a configuration's ``model.type`` (the classifier unless it names segmentation)."""
    if model_type == SEG_TYPE:
        from .segmentation.model import VisionEfficientTuningSegmentationModel  # cycle: it imports this module
        return VisionEfficientTuningSegmentationModel
    return VisionEfficientTuningModel


def merge_lora(model):
    """Fold LoRA into the frozen weights, in place; returns ``model`` (our model, its network or a bare ViT)."""
    if isinstance(model, VisionTransformer):
        merge_block_tuners(model, ('lora',))
    else:
        target = model if isinstance(model, VisionEfficientTuningModel) else as_network(model)
        target.merge(('lora',))
    return model


def has_lora(model) -> bool:
    vit = model if isinstance(model, VisionTransformer) else as_network(model).backbone
    return has_tuners(vit, ('lora',))


register_class(VisionEfficientTuningModel)
