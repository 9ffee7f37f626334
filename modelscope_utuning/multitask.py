"""Many tasks, one frozen backbone: N tuned models that share a backbone hold it once, and in bypass mode run it once.

Tasks tuned from the same pre-trained backbone differ only by their tuners and heads. Each trained ``output/``
records the fingerprint of the frozen weights it was trained on (``adapter_config.json``,
:meth:`~.network.VisionEfficientTuning.backbone_fingerprint`). :class:`TaskGroup` loads a list of model folders so
that

- the first folder of each fingerprint is loaded as usual and becomes the *shared backbone*;
- every later folder of that fingerprint is built on PyTorch's meta device (no memory), its frozen backbone
  parameters are the shared ones (the very tensors), and only its tuners, BitFit biases and head are read, from its
  small tuner-only file; a folder may even hold nothing else (see ``export --tuner-only``), given the backbone once
  (``backbone=`` a weights file or a model folder);
- folders whose backbone differs load on their own (no sharing, still correct).

Forward: tasks in bypass mode that share a backbone (and a preprocessing) get one frozen forward per batch, and each
task's tuners add their side stream to it (:func:`~.backbone.bypass.forward_bypass`); other tasks run their own
tuned forward over the shared weights. Each task's scores are those of its own single-model pipeline.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbone.bypass import forward_bypass
from .checkpoint import tuner_only
from .checkpoint.hub_layout import CHECKPOINT_FILE
from .checkpoint.migrate import migrate_backbone, writer_of_configuration
from .fileio import read_json_object
from .location import HUB, locate_model_source
from .model import VisionEfficientTuningModel, _model_class, load_model
from .network import VisionEfficientTuning
from .network_files import _base_differences

CONFIG = 'configuration.json'


def recorded_fingerprint(folder: str) -> Optional[Tuple[str, List[str]]]:
    """(the backbone fingerprint a trained folder records, the weights it leaves out), or None."""
    path = os.path.join(folder, tuner_only.CONFIG_FILE)
    if not os.path.isfile(path):
        return None
    try:
        cfg = tuner_only.read_tuner_config(folder)
    except ValueError:
        return None
    fp = cfg.get('backbone_fingerprint')
    return (fp, list(cfg.get('fingerprint_excludes') or [])) if fp else None


def _set_parameter(root: nn.Module, name: str, param: nn.Parameter) -> None:
    module_name, _, leaf = name.rpartition('.')
    module = root.get_submodule(module_name) if module_name else root
    module._parameters[leaf] = param


def model_class_of(folder: str) -> type:
    """Our model class for a folder (the classifier, or the segmentation model its configuration names)."""
    path = os.path.join(folder, CONFIG)
    kind = (read_json_object(path).get('model') or {}).get('type') if os.path.isfile(path) else None
    return _model_class(kind)


def _model_section(folder: str) -> Dict[str, Any]:
    """The ``model`` section of ``folder``'s configuration.json, its tuner entries migrated for the version that
    wrote it (:mod:`.checkpoint.migrate`)."""
    path = os.path.join(folder, CONFIG)
    full = read_json_object(path)
    cfg = dict(full.get('model') or {})
    cfg.pop('type', None)
    if cfg.get('backbone'):
        cfg['backbone'] = migrate_backbone(cfg['backbone'], writer_of_configuration(full), source=repr(path))
    return cfg


class SharedBackbone:
    """The frozen backbone of one fingerprint, held by the network that brought it."""

    def __init__(self, net: VisionEfficientTuning):
        self.net = net
        self.digests = net.backbone_digests()  # per tensor: any other model's fingerprint compares cheaply
        self.params = dict(net.backbone.named_parameters())
        self.base = net.base_config()

    def matches(self, fingerprint: str, excludes: Sequence[str]) -> bool:
        """Whether a folder's recorded fingerprint is of these weights, over the weights that folder does not train
        (weights this model trains differ from the pre-trained ones: a folder that does not leave them out too
        does not match)."""
        return self.net.backbone_fingerprint(exclude=excludes, digests=self.digests) == fingerprint

    def build_task(self, folder: str) -> Optional[VisionEfficientTuning]:
        """The network of ``folder`` over these frozen weights, or None when its base differs."""
        cfg = _model_section(folder)
        tcfg = tuner_only.read_tuner_config(folder)
        backbone_cfg = dict(cfg.get('backbone') or tcfg.get('base') or {})
        backbone_cfg.pop('pretrained_weights', None)
        if 'tuners' not in backbone_cfg and tcfg.get('tuners') is not None:
            backbone_cfg['tuners'] = list(tcfg['tuners'])
        with torch.device('meta'):
            net = model_class_of(folder).network_class(backbone_cfg, dict(cfg.get('head') or tcfg['head']),
                                                       classes=tcfg.get('CLASSES'))
        if _base_differences(self.base, net.base_config()):
            return None
        trained = set(net.tuner_parameters())
        for name, p in list(net.backbone.named_parameters()):
            full = f'backbone.{name}'
            shared = self.params.get(name)
            if full not in trained and shared is not None and shared.shape == p.shape:
                _set_parameter(net.backbone, name, shared)  # the very tensor: memory shared
        for name, p in list(net.named_parameters()):
            if p.is_meta:  # tuners, trained biases, head: read from the task's file below
                _set_parameter(net, name, nn.Parameter(torch.empty(p.shape, dtype=p.dtype),
                                                       requires_grad=p.requires_grad))
        for name, b in list(net.named_buffers()):
            if b.is_meta:  # a head's running statistics (BatchNorm): read from the task's file below as well
                module_name, _, leaf = name.rpartition('.')
                (net.get_submodule(module_name) if module_name else net)._buffers[leaf] = \
                    torch.empty(b.shape, dtype=b.dtype)
        net.load_tuners(folder)
        return net


class TaskGroup:
    """Models loaded so that those on one frozen backbone share it (see the module docstring).

    Args:
        sources: model folders (local; hub ids are downloaded by ModelScope before) or model objects.
        backbone: the frozen backbone for folders that hold only tuners: a weights file (any layout
            :mod:`.checkpoint.converters` reads) or a model folder.
    """

    def __init__(self, sources: Sequence[Any], backbone: Optional[str] = None):
        self.models: List[VisionEfficientTuningModel] = []
        self.shared: List[SharedBackbone] = []
        self.backbone_source = backbone
        for src in sources:
            self.models.append(self._load(src))

    # -- loading -----------------------------------------------------------------------------------------------
    def _register(self, model: VisionEfficientTuningModel) -> SharedBackbone:
        shared = SharedBackbone(model.model)
        self.shared.append(shared)
        model.shared_backbone = shared
        return shared

    def _load(self, src: Any) -> VisionEfficientTuningModel:
        if isinstance(src, VisionEfficientTuningModel):
            self._register(src)
            return src
        folder = os.fspath(src)
        if not os.path.exists(folder) and locate_model_source(folder)[0] == HUB:  # a missing path: named there
            raise ValueError(f'{folder!r} is a hub id: TaskGroup takes local folders (pipeline() downloads it first)')
        recorded = recorded_fingerprint(folder)
        if recorded is not None:
            for shared in self.shared:
                if shared.matches(*recorded):
                    net = shared.build_task(folder)
                    if net is not None:
                        model = model_class_of(folder).from_network(net, model_dir=folder)
                        model.shared_backbone = shared
                        return model
        if os.path.isfile(os.path.join(folder, CHECKPOINT_FILE)):
            model = load_model(folder)
        elif tuner_only.has_tuner_files(folder):
            model = self._from_tuners_and_backbone(folder)
        else:
            raise ValueError(f'{folder!r}: neither a model ({CHECKPOINT_FILE}) nor tuner-only files '
                             f'({tuner_only.WEIGHTS_FILE}, {tuner_only.CONFIG_FILE})')
        shared = self._register(model)
        if recorded is not None and not shared.matches(*recorded):
            from modelscope.utils.logger import get_logger
            get_logger().warning(f'{folder}: the backbone fingerprint it records differs from its weights')
        return model

    def _from_tuners_and_backbone(self, folder: str) -> VisionEfficientTuningModel:
        if not self.backbone_source:
            raise ValueError(f'{folder!r} holds only tuners: pass the frozen backbone they were trained on once, '
                             "pipeline(..., backbone='<weights file or model folder>')")
        src = self.backbone_source
        weights = os.path.join(src, CHECKPOINT_FILE) if os.path.isdir(src) else src
        cls = model_class_of(folder)
        return cls.from_network(cls.network_class.from_tuners(folder, weights), model_dir=folder)

    # -- forward -------------------------------------------------------------------------------------------------
    def sharing(self) -> List[List[int]]:
        """Indices of the models that share a backbone, one list per shared backbone."""
        groups: Dict[int, List[int]] = {}
        for i, m in enumerate(self.models):
            groups.setdefault(id(m.shared_backbone), []).append(i)
        return list(groups.values())

    @torch.no_grad()
    def scores(self, images: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """``images[i]``: the batch preprocessed for model i (B, 3, H, W) -> softmax scores (B, C_i) per model
        (logits (B, K, h, w) for a segmentation model, :meth:`is_dense`). Bypass models sharing a backbone and their
        input get one frozen forward."""
        out: List[Optional[torch.Tensor]] = [None] * len(self.models)
        for m in self.models:
            m.eval()  # inference: dropout off, a dense head's BatchNorm on its running statistics
        for indices in self.sharing():
            bypass = [i for i in indices if self.models[i].backbone.bypass]
            # one frozen pass per distinct input among the bypass models of this backbone
            by_input: Dict[int, List[int]] = {}
            for i in bypass:
                key = next((j for j in by_input if images[j] is images[i] or torch.equal(images[j], images[i])), i)
                by_input.setdefault(key, []).append(i)
            for key, members in by_input.items():
                shared = self.models[members[0]].model
                x = images[key].to(next(shared.parameters()).dtype)
                nets = [self.models[i].model for i in members]
                for i, logits in zip(members, _bypass_logits(nets, x)):
                    out[i] = logits if self.is_dense(i) else F.softmax(logits.float(), dim=1)
            for i in indices:
                if out[i] is None:
                    m = self.models[i].eval()
                    result = m({'imgs': images[i].to(next(m.parameters()).dtype)})
                    out[i] = result['logits'] if self.is_dense(i) else result['scores']
        return out

    def is_dense(self, i: int) -> bool:
        """Whether model ``i`` predicts per pixel (its :meth:`scores` are logits ``(B, K, h, w)``)."""
        return self.models[i].model.head_layers_needed() is not None


def _bypass_logits(nets: List[VisionEfficientTuning], images: torch.Tensor) -> List[torch.Tensor]:
    """Logits of bypass-mode networks over one frozen backbone, from one frozen forward: each network's
    tokens-to-logits step (:meth:`~.network.VisionEfficientTuning.logits_from_tokens`) reads the final tokens, and
    a dense head the intermediate layers it needs, all collected in that one pass."""
    vit = nets[0].backbone
    layers = sorted({i for n in nets for i in (n.head_layers_needed() or [])})
    if not layers:  # classifiers only: the last block finishes just the class token when that is all they read
        token_pool = vit.global_pool == 'token'
        tokens = forward_bypass(vit, images, [n.backbone for n in nets], class_token_only=token_pool)
        return [n.logits_from_tokens(t, {}, images) for n, t in zip(nets, tokens)]
    results = forward_bypass(vit, images, [n.backbone for n in nets], layers=layers)
    return [n.logits_from_tokens(final, dict(zip(layers, levels)), images) for n, (final, levels) in zip(nets, results)]
