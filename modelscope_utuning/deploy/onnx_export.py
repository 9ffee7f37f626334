"""ONNX export of a trained U-Tuning classifier: ``OUT/model.onnx`` plus what is needed to run it.

What is written:

- ``model.onnx``: input ``imgs`` float32 ``(batch, 3, H, W)`` (already preprocessed), outputs ``scores`` (softmax,
  what ``model({'imgs': x})['scores']`` gives) and ``logits``, both ``(batch, num_classes)``; the batch axis is
  dynamic. The weights are stored inside the file (no external-data side file).
- ``configuration.json``: the preprocessing (our preprocessor's section, with the crop size written out), the
  class names and an ``onnx`` section describing the graph. Its model type is ``vision-efficient-tuning-onnx``:
  ``pipeline()`` refuses the folder, saying how to run it, instead of building a torch model with random weights
  from it. :class:`OnnxClassifier` runs it.
- ``preprocessing.json``: everything the pipeline does to an image before the graph, as data, for runtimes
  without this package: how each input kind and PIL mode becomes 8-bit RGB (16-bit scaling, alpha dropped,
  palettes, CMYK, EXIF orientation, numpy BGR arrays), the resize / crop with its filter and rounding, /255 and
  mean / std, and what it leaves out; schema in :mod:`..preprocessing.description`. Written for every export
  (our preprocessor section or a hub model's ModelScope transform lists), computed from the preprocessor the
  pipeline builds.

Before export, tuners that fold into the frozen weights (every kind whose class says ``mergeable``, e.g. LoRA)
are merged into a copy of the network with :meth:`~modelscope_utuning.network.VisionEfficientTuning.merge`, so the
graph holds plain linears; where merging would change the outputs (another tuner reads the projection a merged
one changes) that kind stays unmerged and is exported as ordinary ops, as are all parallel and sequential tuners
and bypass mode. The export goes through ``torch.onnx.export(dynamo=True)``; the frozen linears' oneDNN fast path
(:mod:`..backbone.linear`) steps aside while exporting, so the graph has only standard ONNX ops.

Needs the extra ``[onnx]`` (onnx, onnxscript for the exporter, onnxruntime to verify and run).
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from .. import __version__
from ..extras import require
from ..fileio import read_json_object, write_text_atomic
from ..checkpoint.hub_layout import CONFIGURATION_FILE, read_configuration
from ..network import VisionEfficientTuning, as_network
from ..preprocessing.description import describe, describe_steps
from ..preprocessing.preprocessor import OUR_TYPE, VisionEfficientTuningPreprocessor

ONNX_FILE = 'model.onnx'
PREPROCESSING_FILE = 'preprocessing.json'
CONFIG_FILE = CONFIGURATION_FILE
ONNX_MODEL_TYPE = 'vision-efficient-tuning-onnx'
INPUT_NAME = 'imgs'
OUTPUT_NAMES = ('scores', 'logits')
BATCH_AXIS = 'batch'
EXTRA = 'onnx'


def require_exporter() -> None:
    """MissingExtraError (with the install line) unless the exporter's packages import."""
    for module in ('onnx', 'onnxscript'):
        require(module, EXTRA, 'ONNX export')


def require_runtime():
    """The ``onnxruntime`` module, or MissingExtraError with the install line."""
    return require('onnxruntime', EXTRA, 'running an ONNX model')


class ExportedClassifier(nn.Module):
    """``imgs (B, 3, H, W) -> (scores, logits)``: the network's logits and their softmax in float32, as the
    ModelScope model's eval forward computes them, as plain tensors (an ONNX graph has no dict outputs)."""

    def __init__(self, net: VisionEfficientTuning):
        super().__init__()
        self.net = net

    def forward(self, imgs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        logits = self.net(imgs).float()
        return torch.softmax(logits, dim=1), logits


def merged_copy(model) -> Tuple[VisionEfficientTuning, List[str], List[str]]:
    """A float32 eval-mode copy of ``model``'s network with every mergeable tuner kind folded in where that keeps
    the outputs -> (network, merged kinds, notes on kinds left unmerged). The caller's model is not touched."""
    net = copy.deepcopy(as_network(model)).float().eval()
    kinds = sorted({t.kind for _, t, _ in net.tuners() if t.mergeable})
    if not kinds:
        return net, [], []
    try:
        return net, net.merge(kinds), []
    except ValueError:
        pass  # some kind conflicts with a tuner left in place: merge the kinds that do not, one by one
    merged, notes = [], []
    for kind in kinds:
        try:
            merged += net.merge([kind])
        except ValueError as e:
            notes.append(f'{kind} not merged (exported as ordinary ops): {e}')
    return net, merged, notes


def _configuration(model, cfg: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    if cfg is not None:
        return copy.deepcopy(cfg.to_dict() if hasattr(cfg, 'to_dict') else dict(cfg))
    return read_configuration(getattr(model, 'model_dir', None), required=False)


def _inference_preprocessor(cfg: Dict[str, Any], img_size: Tuple[int, int]):
    from modelscope.utils.constant import ModeKeys
    return VisionEfficientTuningPreprocessor.from_model_dir(cfg=cfg, mode=ModeKeys.INFERENCE, img_size=list(img_size))


def describe_preprocessing(preprocessor) -> List[Dict[str, Any]]:
    """The eval transform as plain steps (the ``steps`` of preprocessing.json; see
    :mod:`..preprocessing.description`), for our preprocessor and ModelScope's transform lists alike."""
    return describe_steps(preprocessor.eval_transform)


def export_onnx(model, out_dir: str, cfg: Optional[Dict[str, Any]] = None, opset: Optional[int] = None,
                merge: bool = True, example_batch: int = 2) -> Dict[str, Any]:
    """Write ``out_dir/model.onnx``, ``configuration.json`` and ``preprocessing.json`` for ``model`` (our ModelScope
    model or its network); ``cfg``: its configuration (read from ``model.model_dir`` when None). Returns
    ``{'onnx': path, 'merged': [kinds], 'notes': [...], 'opset': int}``."""
    require_exporter()
    net0 = as_network(model)
    img_size = tuple(net0.backbone.patch_embed.img_size)
    full = _configuration(model, cfg)
    pre = _inference_preprocessor(full, img_size)  # the pipeline's own preprocessor for this configuration
    classes = list(net0.CLASSES) if net0.CLASSES is not None else None
    preprocessing = describe(pre, img_size, classes, INPUT_NAME)  # before exporting: a refusal costs nothing
    if merge:
        net, merged, notes = merged_copy(model)
    else:
        net, merged, notes = copy.deepcopy(as_network(model)).float().eval(), [], []
    wrapper = ExportedClassifier(net).eval()
    example = torch.randn(example_batch, 3, *img_size, generator=torch.Generator().manual_seed(0))
    path = os.path.join(out_dir, ONNX_FILE)
    opset_used = export_graph(wrapper, example, path, list(OUTPUT_NAMES), opset)

    section = copy.deepcopy(full.get('preprocessor') or {'type': OUR_TYPE})
    if section.get('type') == OUR_TYPE:
        section['img_size'] = list(img_size)  # written out: the backbone section is not copied
    onnx_info = {'file': ONNX_FILE, 'input': {'name': INPUT_NAME, 'shape': [BATCH_AXIS, 3, *img_size],
                                              'dtype': 'float32'},
                 'outputs': [{'name': n, 'shape': [BATCH_AXIS, net.head.num_classes]} for n in OUTPUT_NAMES],
                 'opset': opset_used, 'merged_tuners': merged, 'notes': notes,
                 'preprocessing': PREPROCESSING_FILE}
    out_cfg = {'framework': 'onnx', 'task': 'vision-efficient-tuning', 'pipeline': {'type': 'vision-efficient-tuning'},
               'model': {'type': ONNX_MODEL_TYPE, 'CLASSES': classes,
                         'num_classes': net.head.num_classes, 'img_size': list(img_size)},
               'preprocessor': section, 'onnx': onnx_info,
               'utuning': {'package': 'modelscope-utuning', 'import': 'modelscope_utuning', 'version': __version__}}
    write_text_atomic(os.path.join(out_dir, CONFIG_FILE), json.dumps(out_cfg, indent=4) + '\n')
    write_text_atomic(os.path.join(out_dir, PREPROCESSING_FILE), json.dumps(preprocessing, indent=4) + '\n')
    return {'onnx': path, 'merged': merged, 'notes': notes, 'opset': opset_used}


def export_graph(module: nn.Module, example: torch.Tensor, path: str, output_names: List[str],
                 opset: Optional[int] = None) -> Optional[int]:
    """``module(imgs)`` -> one ONNX file at ``path`` (input ``imgs`` with a dynamic batch axis, dynamo exporter,
    weights inside the file); returns the opset written."""
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    kwargs = {} if opset is None else {'opset_version': int(opset)}
    batch = torch.export.Dim(BATCH_AXIS, min=1, max=65536)
    with torch.no_grad(), _quiet_registry_warnings():
        program = torch.onnx.export(module, (example,), input_names=[INPUT_NAME], output_names=output_names,
                                    dynamic_shapes={INPUT_NAME: {0: batch}}, external_data=False, dynamo=True,
                                    verbose=False, **kwargs)
    program.save(path, external_data=False)
    return _opset_of(program)


def cpu_session(path: str, threads: Optional[int] = None):
    """An onnxruntime CPU session on ``path`` (``threads``: intra-op threads, default onnxruntime's)."""
    ort = require_runtime()
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
    return ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])


def quantize_int8(out_dir: str) -> Dict[str, Any]:
    """Rewrite ``out_dir/model.onnx`` with int8 weights for its matrix products (ONNX Runtime's dynamic quantizer:
    weights int8 per output channel, activations uint8 per call), the last product (the classification head)
    left in fp32; ``configuration.json`` records ``onnx.precision: int8``. Returns ``{'quantized': n nodes,
    'kept_fp32': [names]}``."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    path = os.path.join(out_dir, ONNX_FILE)
    graph = onnx.load(path, load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    # products with a weight (the linears); activation x activation products (attention) stay fp32
    products = [n.name for n in graph.node if n.op_type in ('MatMul', 'Gemm') and weights & set(n.input)]
    keep = products[-1:]  # the head: few FLOPs, and the scores users read come straight out of it
    tmp = path + '.int8.tmp'
    # reduce_range (7-bit weights): x86 kernels without VNNI multiply u8 x s8 pairs into int16 sums that saturate
    # at 8 bits (measured on the AMD EPYC: score errors up to 0.13 and top-1 flips on the fixtures, 0.02 without)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer's advice to run its shape pre-processing: not needed here
    try:
        quantize_dynamic(path, tmp, weight_type=QuantType.QInt8, per_channel=True, reduce_range=True,
                         op_types_to_quantize=['MatMul', 'Gemm'], nodes_to_quantize=products[:-1])
    finally:
        root.setLevel(level)
    os.replace(tmp, path)
    cfg_path = os.path.join(out_dir, CONFIG_FILE)
    cfg = read_json_object(cfg_path)
    cfg['onnx']['precision'] = 'int8'
    cfg['onnx']['notes'] = list(cfg['onnx'].get('notes') or []) + [
        'int8: matrix products quantized by onnxruntime.quantization.quantize_dynamic (weights int8 per channel, '
        'activations uint8 per call); the head kept in fp32']
    write_text_atomic(cfg_path, json.dumps(cfg, indent=4) + '\n')
    quantized = [n for n in onnx.load(path, load_external_data=False).graph.node
                 if n.op_type in ('MatMulInteger', 'DynamicQuantizeMatMul', 'ConvInteger')]
    return {'quantized': len(quantized), 'kept_fp32': keep}


@contextlib.contextmanager
def _quiet_registry_warnings():
    """The exporter logs one warning per torchvision op it cannot register when torchvision is absent (as it is
    here by design); none of them concerns this model."""
    log = logging.getLogger('torch.onnx._internal.exporter._registration')
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _opset_of(program) -> Optional[int]:
    try:
        return int(program.model.opset_imports.get('', 0)) or None
    except AttributeError:
        return None


class OnnxClassifier:
    """Runs an exported folder with onnxruntime: images -> ``{'scores': [top-k], 'labels': [names]}`` like
    ``pipeline('vision-efficient-tuning')``, or :meth:`run` on preprocessed batches.

    The images go through our preprocessor built from the folder's configuration.json (the same floats as the
    pipeline's)."""

    def __init__(self, folder: str, threads: Optional[int] = None):
        require_runtime()
        self.folder = folder
        self.config = read_configuration(folder)
        if self.config.get('model', {}).get('type') != ONNX_MODEL_TYPE:
            raise ValueError(f'{folder!r} is not an ONNX export of modelscope-utuning (model.type is not '
                             f'{ONNX_MODEL_TYPE!r})')
        self.session = cpu_session(os.path.join(folder, self.config['onnx']['file']), threads)
        self.classes = self.config['model'].get('CLASSES')
        self.preprocessor = _inference_preprocessor(self.config, tuple(self.config['model']['img_size']))

    def run(self, imgs) -> Dict[str, np.ndarray]:
        """Preprocessed float32 ``(B, 3, H, W)`` (tensor or array) -> ``{'scores': (B, C), 'logits': (B, C)}``."""
        x = imgs.detach().cpu().numpy() if isinstance(imgs, torch.Tensor) else np.asarray(imgs)
        outs = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: x.astype(np.float32, copy=False)})
        return dict(zip(OUTPUT_NAMES, outs))

    def __call__(self, image, topk: int = 5) -> Dict[str, list]:
        scores = self.run(self.preprocessor(image)['imgs'][None])['scores'][0]
        order = np.argsort(-scores, kind='stable')[:min(topk, scores.size)]
        labels = [str(self.classes[i]) if self.classes and i < len(self.classes) else str(i) for i in order]
        return {'scores': [float(scores[i]) for i in order], 'labels': labels}


def max_abs_difference(model, folder: str, batch_sizes: Iterable[int] = (1, 3), seed: int = 0) -> Dict[int, float]:
    """Largest |onnxruntime - torch| over scores and logits, per batch size, on random inputs: the check the command
    line prints after exporting. ``model``: the model that was exported (unmerged is fine: merging keeps outputs)."""
    net = as_network(model)
    was_training = net.training
    net.eval()
    clf = OnnxClassifier(folder)
    size = tuple(clf.config['model']['img_size'])
    g = torch.Generator().manual_seed(seed)
    out = {}
    try:
        for n in batch_sizes:
            x = torch.randn(n, 3, *size, generator=g)
            with torch.no_grad():
                logits = net(x).float()
            ref = {'scores': torch.softmax(logits, 1).numpy(), 'logits': logits.numpy()}
            got = clf.run(x)
            out[int(n)] = max(float(np.abs(got[k] - ref[k]).max()) for k in OUTPUT_NAMES)
    finally:
        net.train(was_training)
    return out


__all__ = ['ExportedClassifier', 'OnnxClassifier', 'cpu_session', 'describe_preprocessing', 'export_graph',
           'export_onnx', 'max_abs_difference', 'merged_copy', 'quantize_int8', 'require_exporter', 'require_runtime']
