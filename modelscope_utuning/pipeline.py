"""``pipeline('vision-efficient-tuning', model_dir_or_id)``: top-k classification of images, in batches.

The model comes the usual ModelScope way (``Model.from_pretrained`` in the base ``Pipeline``); the preprocessor is
ours, built from the model folder (``Preprocessor.from_pretrained`` would build ModelScope's cv2 / torchvision one).
Inputs: anything :func:`~modelscope_utuning.preprocessing.image_io.load_image` takes, or a list of them (-> a list of
results, ``batch_size`` images per forward). Output: ``{'scores': [top-k probabilities, descending],
'labels': [class names, or index strings when the model has no CLASSES]}``.
"""
from __future__ import annotations

import json
import numbers
import os
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from modelscope.outputs import OutputKeys
from modelscope.pipelines.base import Input, Pipeline
from modelscope.utils.constant import Frameworks, ModeKeys
from modelscope.utils.device import device_placement, verify_device
from modelscope.utils.logger import get_logger

from .backbone import int8
from .backbone.linear import quantize_frozen_linears
from .checkpoint.hub_layout import read_configuration
from .data.readers import walk_images
from .fileio import read_json_object
from .location import EXPECTED, HUB, locate_model_source
from .multitask import TaskGroup
from .preprocessing.image_io import ImageInputError
from .preprocessing.preprocessor import VisionEfficientTuningPreprocessor
from .registration import register_class

logger = get_logger()

DEFAULT_BATCH_SIZE = 8
DEFAULT_TOPK = 5
CALL_ARGS = ('topk',)
PRECISIONS = ('fp32', 'int8')
_BUILD_LATER = object()  # stands in for the preprocessor until the model (and its folder) is known


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f'{name}={value!r}: expected a positive integer')
    return int(value)


def _check_precision(precision: Any) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f'precision={precision!r}: expected one of {PRECISIONS}')


def calibration_inputs(calibration: Any, precision: str) -> Optional[List[Any]]:
    """``calibration=``: a folder of images (read recursively, sorted) or a list of inputs -> the list; None -> None.
    Only with ``precision='int8'``."""
    if calibration is None:
        return None
    if precision != 'int8':
        raise ValueError(f"calibration= goes with precision='int8' (precision={precision!r})")
    if isinstance(calibration, (str, os.PathLike)):
        folder = os.fspath(calibration)
        if not os.path.isdir(folder):
            raise ValueError(f'calibration={folder!r}: expected a folder of images or a list of images')
        images = walk_images(folder)
        if not images:
            raise ValueError(f'calibration={folder!r}: the folder holds no images')
        return images
    if isinstance(calibration, (list, tuple)) and calibration:
        return list(calibration)
    raise ValueError(f'calibration={calibration!r}: expected a folder of images or a non-empty list of images')


def apply_precision(precision: str, models: List[Any], device: str, calibration: Optional[List[Any]] = None,
                    run: Optional[Callable[[List[Any]], Any]] = None) -> None:
    """``precision='int8'``: the frozen backbone linears of ``models`` as int8 products (CPU only). With
    ``calibration`` (:func:`calibration_inputs`' list), ``run`` (the pipeline) runs on it once while
    :func:`.backbone.int8.calibrating` records the layers' input ranges."""
    if precision != 'int8':
        return
    if not str(device).startswith('cpu') and torch.cuda.is_available():
        raise ValueError(f"precision='int8' is the CPU path (PyTorch's int8 kernels); device={device!r}: use 'cpu'")
    if sum(quantize_frozen_linears(m) for m in models) == 0:
        raise ValueError("precision='int8': the model has no frozen backbone linear layer to run in int8")
    if calibration is not None:
        with int8.calibrating(torch.nn.ModuleList(models)):
            run(calibration)
    else:
        logger.info("precision='int8' without calibration images: activations quantized per token, without "
                    'smoothing; pass calibration=<a folder or list of a few dozen of your images> for answers '
                    'closer to fp32 (benchmarks/README.md, int8)')


def _check_device(device: Any) -> str:
    """Validate ``device`` with a ValueError (ModelScope asserts); refuse a CUDA index that does not exist."""
    if isinstance(device, torch.device):
        device = str(device)
    expected = "expected 'cpu', 'gpu', 'cuda', 'gpu:N' or 'cuda:N'"
    if not isinstance(device, str):
        raise ValueError(f'device={device!r}: {expected}')
    try:
        kind, index = verify_device(device)
    except (AssertionError, ValueError) as e:
        raise ValueError(f'device={device!r}: {expected}') from e
    if kind == 'gpu':
        if not torch.cuda.is_available():
            # ModelScope falls back to the CPU; say so louder when a particular GPU was asked for.
            log = logger.info if device.lower() == 'gpu' else logger.warning
            log(f'device={device!r}: CUDA is not available, running on the CPU')
        elif index >= torch.cuda.device_count():
            n = torch.cuda.device_count()
            raise ValueError(f'device={device!r}: only {n} CUDA device(s) visible (cuda:0 .. cuda:{n - 1})')
    return device


def _check_model_path(model: Any) -> Any:
    """A local folder is used as it is (absolute); a hub id is left to ModelScope; a missing local path (a typo)
    fails here, named, instead of going to the hub (the rule: :func:`.location.locate_model_source`)."""
    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    if not isinstance(model, str):
        return model
    if locate_model_source(model)[0] == HUB:
        return model
    if not os.path.isdir(model):
        raise ValueError(f'model {model!r}: not a model folder (a file); {EXPECTED}')
    if not os.path.isfile(os.path.join(model, 'configuration.json')):
        raise ValueError(f'model folder {model!r} has no configuration.json')
    _refuse_onnx_export(model)
    return os.path.abspath(model)


def _refuse_onnx_export(folder: str) -> None:
    """An ONNX export (``modelscope-utuning export --onnx``) holds no torch weights: say how to run it rather than
    fail in the model registry."""
    from .deploy.onnx_export import ONNX_MODEL_TYPE  # optional: the ONNX export code loads only for its folders
    try:
        model_type = (read_json_object(os.path.join(folder, 'configuration.json')).get('model') or {}).get('type')
    except ValueError:
        return  # the model builder reports an unreadable configuration
    if model_type == ONNX_MODEL_TYPE:
        raise ValueError(f'{folder!r} is an ONNX export ({ONNX_MODEL_TYPE}): run it with '
                         'modelscope_utuning.deploy.onnx_export.OnnxClassifier(folder), or give pipeline() the '
                         'model folder it was exported from')


def _local_model(model: Any) -> Any:
    """A model object as it is; a local folder checked; a hub id downloaded (ModelScope's own snapshot_download)."""
    if not isinstance(model, (str, os.PathLike)):
        return model
    checked = _check_model_path(model)
    if os.path.isdir(checked):
        return checked
    from modelscope.hub.snapshot_download import snapshot_download
    return snapshot_download(checked)


def _preprocessors(models: List[Any], cfg: Any, given: Optional[Any]) -> List[Any]:
    """One eval preprocessor per model, from its own folder (models with the same preprocessing share one)."""
    if given is not None:
        return [given] * len(models)
    out, seen = [], {}
    for m in models:
        size = tuple(m.backbone.patch_embed.img_size)
        section = read_config_section(m.model_dir, 'preprocessor')
        dense = m.model.head_layers_needed() is not None
        key = (json.dumps(section, sort_keys=True), size, dense)
        if key not in seen:
            if dense:  # a segmentation model: the whole image resized, its size kept for the output masks
                # keeps the classification pipeline off the segmentation package until a dense model comes
                from .segmentation.preprocessor import SegmentationPreprocessor
                seen[key] = SegmentationPreprocessor.from_config(
                    {'preprocessor': section or {}, 'model': {'backbone': {'img_size': size[0]}}}, ModeKeys.INFERENCE)
            else:
                seen[key] = VisionEfficientTuningPreprocessor.from_model_dir(m.model_dir, mode=ModeKeys.INFERENCE,
                                                                           img_size=size)
        out.append(seen[key])
    return out


def read_config_section(model_dir: Optional[str], key: str) -> Any:
    """One section of a model folder's configuration.json, or None (no folder, no file or no such section)."""
    return read_configuration(model_dir, required=False).get(key)


class VisionEfficientTuningPipeline(Pipeline):
    """U-Tuning image classification.

    Args:
        model: a model folder, a hub id or a ``VisionEfficientTuningModel``.
        preprocessor: default: ours, from the model folder's configuration.json (eval mode).
        device: 'cpu', 'gpu', 'cuda', 'gpu:N', 'cuda:N' (the CPU when CUDA is unavailable).
        batch_size: images per forward for list inputs (also a call argument).
        topk: classes returned (also a call argument); capped at the class count.
        precision: 'fp32' (default) or 'int8': the frozen backbone's linear layers as int8 products on the CPU
            (:mod:`~.backbone.int8`; tuners, attention and head stay fp32).
        calibration: with ``precision='int8'``: a folder of images or a list of inputs (a few dozen of the images
            the model will see; the training images do) run once in fp32 when the pipeline is built; their
            ranges smooth the int8 products (:mod:`~.backbone.int8`). Without it the products are unsmoothed.
    """

    def __init__(self, model: Any, preprocessor: Optional[Any] = None, device: str = 'gpu',
                 batch_size: int = DEFAULT_BATCH_SIZE, topk: int = DEFAULT_TOPK, backbone: Optional[str] = None,
                 precision: str = 'fp32', calibration: Any = None, **kwargs):
        _check_precision(precision)
        calibration = calibration_inputs(calibration, precision)
        device = _check_device(device)
        self.batch_size = _positive_int(batch_size, 'batch_size')
        self.topk = _positive_int(topk, 'topk')
        self.group = None
        self._many = isinstance(model, (list, tuple))
        if self._many or backbone is not None:
            # several models (one result per model), and folders holding only tuners: backbones loaded once
            sources = [_local_model(m) for m in (model if isinstance(model, (list, tuple)) else [model])]
            if not sources:
                raise ValueError('model=[]: expected at least one model')
            self.group = TaskGroup(sources, backbone=backbone)
            model = self.group.models[0]
        super().__init__(model=_check_model_path(model), device=device,
                         preprocessor=_BUILD_LATER if preprocessor is None else preprocessor, **kwargs)
        if self.group is not None:
            self.models = self.group.models
            self.preprocessors = _preprocessors(self.models, self.cfg, preprocessor)
            if self.preprocessor is _BUILD_LATER:
                self.preprocessor = self.preprocessors[0]
        img_size = self._model_img_size()
        if self.preprocessor is _BUILD_LATER:
            self.preprocessor = VisionEfficientTuningPreprocessor.from_model_dir(
                self.model.model_dir, cfg=self.cfg, mode=ModeKeys.INFERENCE, img_size=img_size)
        out = getattr(self.preprocessor, 'output_size', None)
        if img_size is not None and out is not None and tuple(out) != tuple(img_size):
            raise ValueError(f'the preprocessor crops {tuple(out)} images but the model takes {tuple(img_size)}; '
                             'fix preprocessor.img_size / resize in configuration.json')
        if getattr(self.preprocessor, 'mode', None) == ModeKeys.TRAIN:
            logger.warning('the pipeline preprocessor is in train mode: predictions use random augmentation')
        apply_precision(precision, self.models if self.group is not None else [self.model], self.device_name,
                        calibration, self)

    def _model_img_size(self) -> Optional[Tuple[int, int]]:
        patch_embed = getattr(getattr(self.model, 'backbone', None), 'patch_embed', None)
        size = getattr(patch_embed, 'img_size', None)
        return tuple(size) if size is not None else None

    def _get_framework(self) -> str:
        # Ours is always torch; ModelScope's version fails on a configuration.json without "framework".
        return Frameworks.torch

    # -- ModelScope's hooks ----------------------------------------------------------------------------------------
    def __call__(self, input: Union[Input, List[Input]], *args, **kwargs):  # noqa: A002 - ModelScope's name
        """One input -> one result dict; a list -> a list of them (``batch_size`` per forward). With several models
        (``model=[...]``): one input -> a list of result dicts, one per model in order; a list -> a list of those."""
        if 'batch_size' in kwargs and kwargs['batch_size'] is not None:
            kwargs['batch_size'] = _positive_int(kwargs['batch_size'], 'batch_size')
        if self.group is not None:
            return self._call_models(input, **kwargs)
        if isinstance(input, list) and kwargs.get('batch_size') is None:
            kwargs['batch_size'] = self.batch_size  # ModelScope would otherwise run one forward per image
        return super().__call__(input, *args, **kwargs)

    def _call_models(self, input: Union[Input, List[Input]], batch_size: Optional[int] = None,  # noqa: A002
                     **kwargs) -> list:
        """Every model on every input: each batch is preprocessed once per distinct preprocessing, the models that
        share a backbone share it (:class:`~.multitask.TaskGroup`)."""
        _, _, post = self._sanitize_parameters(**kwargs)
        single = not isinstance(input, list)
        items = [input] if single else input
        size = batch_size or self.batch_size
        results: List[List[Dict[str, list]]] = []
        for start in range(0, len(items), size):
            chunk = items[start:start + size]
            batches: Dict[int, torch.Tensor] = {}
            sizes: List[Tuple[int, int]] = []  # each input's own (H, W): segmentation answers at that size
            for pre in self.preprocessors:
                if id(pre) not in batches:
                    tensors = []
                    for offset, item in enumerate(chunk):
                        try:
                            data = pre(item)
                        except ImageInputError as e:
                            raise ImageInputError(f'input [{start + offset}] of the list: {e}') from e
                        tensors.append(data['imgs'].unsqueeze(0))
                        if 'size' in data and len(sizes) < len(chunk):
                            sizes.append(tuple(data['size']))
                    batches[id(pre)] = torch.cat(tensors)
            device = next(self.models[0].parameters()).device
            inputs = [batches[id(pre)].to(device) for pre in self.preprocessors]
            with device_placement(self.framework, self.device_name), torch.no_grad():
                scores = self.group.scores(inputs)
            for row in range(len(chunk)):
                per_model = [self._dense_result(m, s[row:row + 1], sizes[row]) if self.group.is_dense(i)
                             else self._postprocess_for(m, s[row], **post)
                             for i, (m, s) in enumerate(zip(self.models, scores))]
                results.append(per_model if self._many else per_model[0])
        return results[0] if single else results

    @staticmethod
    def _dense_result(model, logits: torch.Tensor, size: Tuple[int, int]) -> Dict[str, Any]:
        """A segmentation model's answer among several models: as its own pipeline gives it
        (:class:`~.segmentation.pipeline.SegmentationPipeline`)."""
        from .segmentation.pipeline import dense_result  # cycle: segmentation.pipeline imports this module
        return dense_result(model, logits, size)

    def _postprocess_for(self, model, scores: torch.Tensor, topk: Optional[int] = None) -> Dict[str, list]:
        scores = scores.detach().float().cpu().reshape(-1)
        k = min(topk or self.topk, scores.numel())
        values, indices = torch.sort(scores, descending=True, stable=True)
        classes = getattr(model, 'CLASSES', None)
        labels = [str(classes[i]) if classes is not None and i < len(classes) else str(i)
                  for i in indices[:k].tolist()]
        return {OutputKeys.SCORES: values[:k].tolist(), OutputKeys.LABELS: labels}

    def _sanitize_parameters(self, **kwargs) -> Tuple[Dict, Dict, Dict]:
        unknown = sorted(set(kwargs) - set(CALL_ARGS))
        if unknown:
            raise ValueError(f'unknown pipeline argument(s) {unknown}; expected {list(CALL_ARGS)} or batch_size')
        post = {}
        if kwargs.get('topk') is not None:
            post['topk'] = _positive_int(kwargs['topk'], 'topk')
        return {}, {}, post

    def _check_input(self, input: Any) -> None:  # noqa: A002
        """Inputs are checked (with clear errors) when they are loaded; ModelScope's check would assert on dicts,
        bytes and paths."""

    def preprocess(self, input: Input, **preprocess_params) -> Dict[str, torch.Tensor]:  # noqa: A002
        """-> ``{'imgs': float32 (1, 3, H, W)}`` on the CPU."""
        pre = self.preprocessor
        if isinstance(pre, VisionEfficientTuningPreprocessor):
            data = pre(input)
        else:  # a foreign preprocessor: call it as ModelScope's built-in pipeline does
            data = pre(input if isinstance(input, dict) else {'img_path:FILE': input})
        return {'imgs': data['imgs'].unsqueeze(0)}

    def forward(self, inputs: Dict[str, Any], **forward_params) -> Dict[str, torch.Tensor]:
        if self.model.training:
            self.model.eval()
        # the images in the model's own precision and place (e.g. after model.to(torch.bfloat16))
        p = next(self.model.parameters(), None)
        imgs = inputs['imgs'] if p is None else inputs['imgs'].to(device=p.device, dtype=p.dtype)
        return self.model({'imgs': imgs})

    def postprocess(self, inputs: Dict[str, Any], topk: Optional[int] = None, **post_params) -> Dict[str, list]:
        """``inputs['scores']``: (1, C) or (C,) probabilities -> top-k scores (descending) and their labels."""
        return self._postprocess_for(self.model, inputs[OutputKeys.SCORES], topk)

    def _process_batch(self, input: List[Input], batch_size: int, **kwargs) -> List[Dict[str, list]]:  # noqa: A002
        """Preprocess ``batch_size`` inputs, run one forward on them, postprocess each row."""
        post = kwargs.get('postprocess_params') or {}
        results = []
        for start in range(0, len(input), batch_size):
            chunk = input[start:start + batch_size]
            tensors = []
            for offset, item in enumerate(chunk):
                try:
                    tensors.append(self.preprocess(item)['imgs'])
                except ImageInputError as e:
                    raise ImageInputError(f'input [{start + offset}] of the list: {e}') from e
            with device_placement(self.framework, self.device_name), torch.no_grad():
                out = self.forward(self._collate_fn({'imgs': torch.cat(tensors)}))
            for row in range(len(chunk)):
                result = self.postprocess({OutputKeys.SCORES: out[OutputKeys.SCORES][row]}, **post)
                self._check_output(result)
                results.append(result)
        return results


register_class(VisionEfficientTuningPipeline)
