"""ONNX export of a segmentation model: ``modelscope-utuning export MODEL OUT --onnx`` on a segmentation folder.

Writes ``OUT/model.onnx`` (input ``imgs`` float32 ``(batch, 3, S, S)``, output ``logits`` ``(batch, K, S/p, S/p)``,
dynamic batch; mergeable tuners folded in first, as for the classifier), ``OUT/configuration.json`` and
``OUT/preprocessing.json``: how the pipeline loads an image (the classifier's loading rules, shared) and prepares
it (the whole image resized to ``S x S`` with Pillow's bilinear filter, /255, mean / std), and how it turns the
logits into masks (``postprocess``: bilinear upsampling to the image's own size with ``align_corners=False``, then
argmax over the classes). :class:`OnnxSegmenter` runs such a folder like ``pipeline('semantic-segmentation')``.
"""
from __future__ import annotations

import copy
import json
import os
from typing import Any, Dict, Iterable, Optional

import numpy as np
import PIL
import torch
import torch.nn as nn
from modelscope.utils.constant import ModeKeys

from .. import __version__
from ..deploy.onnx_export import (BATCH_AXIS, CONFIG_FILE, INPUT_NAME, ONNX_FILE, PREPROCESSING_FILE, cpu_session,
                                  export_graph, merged_copy, require_exporter, require_runtime)
from ..checkpoint.hub_layout import read_configuration
from ..fileio import write_text_atomic
from ..preprocessing.description import SCHEMA, SCHEMA_VERSION, describe_loading
from ..registration import SEG_TASK
from .network import predict_masks
from .preprocessor import SegmentationPreprocessor

ONNX_SEG_TYPE = 'vision-efficient-tuning-segmentation-onnx'
OUTPUT = 'logits'


class ExportedSegmenter(nn.Module):
    """``imgs (B, 3, S, S) -> logits (B, K, S/p, S/p)`` in float32."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.net(imgs).float()


def preprocessing_description(pre: SegmentationPreprocessor, classes) -> Dict[str, Any]:
    """preprocessing.json of a segmentation export (the classifier's schema; its own steps and a postprocess)."""
    s = pre.img_size
    return {'schema': SCHEMA, 'schema_version': SCHEMA_VERSION,
            'written_by': {'package': 'modelscope-utuning', 'version': __version__, 'pillow': PIL.__version__},
            'input': {'name': INPUT_NAME, 'shape': ['batch', 3, s, s], 'dtype': 'float32', 'layout': 'NCHW'},
            'classes': list(classes) if classes is not None else None,
            'load': describe_loading(),
            'steps': [{'op': 'resize', 'resize': {'height': s, 'width': s}, 'interpolation': 'bilinear',
                       'pillow_filter': int(PIL.Image.BILINEAR), 'note': 'the whole image, aspect ratio not kept'},
                      {'op': 'to_float', 'divide_by': 255, 'dtype': 'float32', 'layout': 'CHW'},
                      {'op': 'normalize', 'mean': list(pre.mean), 'std': list(pre.std), 'dtype': 'float32'}],
            'postprocess': {'output': OUTPUT, 'upsample': {'to': 'the loaded image size (H, W)', 'mode': 'bilinear',
                                                           'align_corners': False, 'dtype': 'float32'},
                            'masks': 'argmax over the class axis: class ids (H, W); labels[id] names them'},
            'left_out': ['decoder differences between image libraries (decode with Pillow for equal pixels)']}


def export_segmentation_onnx(model, out_dir: str, opset: Optional[int] = None, example_batch: int = 2
                             ) -> Dict[str, Any]:
    """Write the export (see the module docstring) for ``model`` (our segmentation model); returns ``{'onnx': path,
    'merged': [kinds], 'notes': [...]}``."""
    require_exporter()
    net0 = model.model
    s = net0.backbone.patch_embed.img_size[0]
    full = read_configuration(getattr(model, 'model_dir', None), required=False)
    pre = SegmentationPreprocessor.from_config({'preprocessor': full.get('preprocessor') or {},
                                                'model': {'backbone': {'img_size': s}}}, ModeKeys.INFERENCE)
    classes = list(net0.CLASSES) if net0.CLASSES is not None else None
    net, merged, notes = merged_copy(model)
    example = torch.randn(example_batch, 3, s, s, generator=torch.Generator().manual_seed(0))
    path = os.path.join(out_dir, ONNX_FILE)
    export_graph(ExportedSegmenter(net).eval(), example, path, [OUTPUT], opset)
    grid = net.backbone.patch_embed.grid_size
    section = dict(full.get('preprocessor') or {}, img_size=s, type='vision-efficient-tuning-segmentation-preprocessor')
    out_cfg = {'framework': 'onnx', 'task': SEG_TASK,
               'model': {'type': ONNX_SEG_TYPE, 'CLASSES': classes, 'num_classes': net.head.num_classes,
                         'img_size': [s, s]},
               'preprocessor': section,
               'onnx': {'file': ONNX_FILE, 'input': {'name': INPUT_NAME, 'shape': [BATCH_AXIS, 3, s, s],
                                                     'dtype': 'float32'},
                        'outputs': [{'name': OUTPUT, 'shape': [BATCH_AXIS, net.head.num_classes, *grid]}],
                        'merged_tuners': merged, 'notes': notes, 'preprocessing': PREPROCESSING_FILE},
               'utuning': {'package': 'modelscope-utuning', 'import': 'modelscope_utuning', 'version': __version__}}
    write_text_atomic(os.path.join(out_dir, CONFIG_FILE), json.dumps(out_cfg, indent=4) + '\n')
    write_text_atomic(os.path.join(out_dir, PREPROCESSING_FILE),
                      json.dumps(preprocessing_description(pre, classes), indent=4) + '\n')
    return {'onnx': path, 'merged': merged, 'notes': notes}


class OnnxSegmenter:
    """Runs a segmentation export with onnxruntime: an image -> ``{'masks': (H, W) class ids, 'labels': [...]}``,
    as ``pipeline('semantic-segmentation')`` answers; :meth:`run` on preprocessed batches."""

    def __init__(self, folder: str, threads: Optional[int] = None):
        require_runtime()
        self.config = read_configuration(folder)
        if (self.config.get('model') or {}).get('type') != ONNX_SEG_TYPE:
            raise ValueError(f'{folder!r} is not a segmentation ONNX export (model.type is not {ONNX_SEG_TYPE!r})')
        self.session = cpu_session(os.path.join(folder, ONNX_FILE), threads)
        self.classes = self.config['model'].get('CLASSES')
        self.preprocessor = SegmentationPreprocessor.from_config(copy.deepcopy(self.config), ModeKeys.INFERENCE)

    def run(self, imgs) -> np.ndarray:
        x = imgs.detach().cpu().numpy() if isinstance(imgs, torch.Tensor) else np.asarray(imgs)
        return self.session.run([OUTPUT], {INPUT_NAME: x.astype(np.float32, copy=False)})[0]

    def __call__(self, image) -> Dict[str, Any]:
        data = self.preprocessor(image)
        logits = torch.from_numpy(self.run(data['imgs'][None]))
        k = logits.shape[1]
        labels = [str(c) for c in self.classes] if self.classes else [str(i) for i in range(k)]
        return {'masks': predict_masks(logits, [data['size']])[0].numpy(), 'labels': labels}


def max_abs_difference(model, folder: str, batch_sizes: Iterable[int] = (1, 3), seed: int = 0) -> Dict[int, float]:
    """Largest |onnxruntime - torch| of the logits per batch size, on random inputs."""
    net = model.model.eval()
    runner = OnnxSegmenter(folder)
    s = net.backbone.patch_embed.img_size[0]
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n in batch_sizes:
        x = torch.randn(n, 3, s, s, generator=g)
        with torch.no_grad():
            ref = net(x).float().numpy()
        out[int(n)] = float(np.abs(runner.run(x) - ref).max())
    return out
