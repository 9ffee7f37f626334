"""``pipeline('semantic-segmentation', model_dir)`` (or the name ``vision-efficient-tuning-segmentation``).

Output per image: ``{'masks': np.ndarray (H, W) int64 of class ids at the input image's own size, 'labels':
[class names, index = class id]}`` (ModelScope's ``OutputKeys.MASKS`` / ``OutputKeys.LABELS``). One class-id map
rather than one 0/1 mask per class: ``masks == labels.index(name)`` gives a class's mask. Inputs: whatever the
classifier's pipeline reads (a path, URL, PIL image, BGR numpy array, bytes, a dict with ``img_path:FILE``), or a
list of them (-> a list of results, ``batch_size`` images per forward). ``precision='int8'`` and
``calibration=`` as for the classifier's pipeline (:mod:`..backbone.int8`).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Union

import torch
from modelscope.outputs import OutputKeys
from modelscope.pipelines.base import Input, Pipeline
from modelscope.utils.constant import Frameworks, ModeKeys
from modelscope.utils.device import device_placement

from ..pipeline import (_BUILD_LATER, DEFAULT_BATCH_SIZE, _check_device, _check_model_path, _check_precision,
                        _positive_int, apply_precision, calibration_inputs, read_config_section)
from ..preprocessing.image_io import ImageInputError
from ..registration import register_class
from .network import predict_masks
from .preprocessor import SegmentationPreprocessor


def dense_result(model, logits: torch.Tensor, size) -> Dict[str, Any]:
    """One image's result from its logits ``(1, K, h, w)``: the class-id map at ``size`` (H, W) and the class names
    (also what ``pipeline('vision-efficient-tuning', [classifier, segmenter])`` gives for the segmenter)."""
    classes = getattr(model, 'CLASSES', None)
    labels = [str(c) for c in classes] if classes is not None else [str(i) for i in range(logits.shape[1])]
    return {OutputKeys.MASKS: predict_masks(logits, [size])[0].cpu().numpy(), OutputKeys.LABELS: labels}


class SegmentationPipeline(Pipeline):
    """U-Tuning semantic segmentation (see the module docstring)."""

    def __init__(self, model: Any, preprocessor: Optional[Any] = None, device: str = 'gpu',
                 batch_size: int = DEFAULT_BATCH_SIZE, precision: str = 'fp32', calibration: Any = None, **kwargs):
        _check_precision(precision)
        calibration = calibration_inputs(calibration, precision)
        device = _check_device(device)
        self.batch_size = _positive_int(batch_size, 'batch_size')
        super().__init__(model=_check_model_path(model), device=device,
                         preprocessor=_BUILD_LATER if preprocessor is None else preprocessor, **kwargs)
        if self.preprocessor is _BUILD_LATER:  # ours, from the model folder (not ModelScope's default builder)
            cfg = {'preprocessor': read_config_section(self.model.model_dir, 'preprocessor') or {},
                   'model': {'backbone': {'img_size': self.model.backbone.patch_embed.img_size[0]}}}
            self.preprocessor = SegmentationPreprocessor.from_config(cfg, ModeKeys.INFERENCE)
        self.preprocessor.mode = ModeKeys.INFERENCE
        apply_precision(precision, [self.model], self.device_name, calibration, self)

    def _get_framework(self) -> str:
        return Frameworks.torch

    def _check_input(self, input: Any) -> None:  # noqa: A002 - checked when loaded, with clear errors
        pass

    def _sanitize_parameters(self, **kwargs):
        if kwargs:
            raise ValueError(f'unknown pipeline argument(s) {sorted(kwargs)}; expected batch_size')
        return {}, {}, {}

    def __call__(self, input: Union[Input, List[Input]], batch_size: Optional[int] = None,  # noqa: A002
                 **kwargs) -> Union[Dict[str, Any], List[Dict[str, Any]]]:
        self._sanitize_parameters(**kwargs)
        if not self._model_prepare:
            self.prepare_model()  # ModelScope's: the model on the pipeline's device, in eval mode
        single = not isinstance(input, list)
        items = [input] if single else input
        size = _positive_int(batch_size, 'batch_size') if batch_size is not None else self.batch_size
        results = []
        for start in range(0, len(items), size):
            chunk = items[start:start + size]
            prepared = []
            for offset, item in enumerate(chunk):
                try:
                    prepared.append(self.preprocessor(item))
                except ImageInputError as e:
                    raise ImageInputError(f'input [{start + offset}] of the list: {e}') if not single else e
            results += self._predict(prepared)
        return results[0] if single else results

    def _predict(self, prepared: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        model = self.model
        model.eval()
        p = next(model.parameters())
        imgs = torch.stack([d['imgs'] for d in prepared]).to(device=p.device, dtype=p.dtype)
        with device_placement(self.framework, self.device_name), torch.no_grad():
            logits = model({'imgs': imgs})['logits']
        return [dense_result(model, logits[i:i + 1], d['size']) for i, d in enumerate(prepared)]

    # ModelScope's single-input path is not used (``__call__`` above batches); kept for its abstract methods.
    def preprocess(self, input: Input, **kwargs) -> Dict[str, Any]:  # noqa: A002
        return self.preprocessor(input)

    def forward(self, inputs: Dict[str, Any], **kwargs) -> Dict[str, Any]:
        return inputs

    def postprocess(self, inputs: Dict[str, Any], **kwargs) -> Dict[str, Any]:
        return inputs


register_class(SegmentationPipeline)
