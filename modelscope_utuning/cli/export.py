"""``export``: tuner-only files, a model folder with LoRA merged into the frozen weights, or ONNX (fp32 or int8)."""
from __future__ import annotations

import os
from typing import Dict, Optional

from .. import registration  # noqa: F401  (registers the plugin)
from ..checkpoint.hub_layout import read_configuration
from ..extras import MissingExtraError
from ..model import VisionEfficientTuningModel, has_lora, merge_lora
from ..training.export import export_output
from .common import CLIError
from .models import resolve_model

def _prepare_out_dir(path: str, force: bool) -> str:
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise CLIError(f'{path!r} exists and is not a folder')
        if os.listdir(path) and not force:
            raise CLIError(f'{path!r} is not empty (use --force to write into it)')
    os.makedirs(path, exist_ok=True)
    return path


def cmd_export(args) -> int:
    if sum(map(bool, (args.tuner_only, args.merge_lora, args.onnx))) != 1:
        raise CLIError('choose one of --tuner-only, --merge-lora or --onnx')
    if args.onnx:
        from ..deploy import onnx_export  # optional: the ONNX export code loads only for --onnx
        try:  # before the model is loaded: a missing package is a setup problem, said in one line
            onnx_export.require_exporter()
            onnx_export.require_runtime()
        except MissingExtraError as e:
            raise CLIError(str(e)) from None
    if args.opset is not None and not args.onnx:
        raise CLIError('--opset goes with --onnx')
    if args.int8 and not args.onnx:
        raise CLIError('--int8 goes with --onnx (in Python: pipeline(..., precision=\'int8\'))')
    model_spec = resolve_model(args.model, allow_config=False)
    if args.base_weights and not os.path.isfile(args.base_weights):
        raise CLIError(f'--base-weights {args.base_weights!r}: no such file')
    if os.path.isdir(model_spec) and os.path.abspath(args.out_dir) == os.path.abspath(model_spec):
        raise CLIError('the output folder must differ from the model folder')
    out = _prepare_out_dir(args.out_dir, args.force)
    from modelscope.models import Model
    model = Model.from_pretrained(model_spec)
    if not isinstance(model, VisionEfficientTuningModel):
        raise CLIError(f'{args.model!r} is not a vision-efficient-tuning model ({type(model).__name__})')
    if args.tuner_only:
        if args.base_weights:  # recorded, so that model_from_tuners(out) finds the frozen backbone
            model.backbone_config = dict(model.backbone_config or {},
                                         pretrained_weights=os.path.abspath(args.base_weights))
        cfg = read_configuration(model.model_dir)
        export_output(model, cfg, out, tuner_only=True, base_path=bool(args.base_weights))
        n = sum(p.numel() for p in model.model.tuner_state_dict().values())
        print(f'tuner-only export: {out} ({n:,} values: tuners, head; backbone fingerprint '
              f'{model.model.backbone_fingerprint()[:19]}...)')
        print(f"load: pipeline('vision-efficient-tuning', {out!r}, backbone=<the frozen backbone file or model "
              "folder>), or modelscope_utuning.model_from_tuners(folder, pretrained_weights=<file>)")
        return 0
    if args.onnx:
        return _export_onnx(model, out, args.opset, int8=args.int8)
    if not has_lora(model):
        raise CLIError(f'{args.model!r} has no LoRA tuner to merge')
    merge_lora(model)
    cfg = read_configuration(model.model_dir)
    cfg.setdefault('model', {})['backbone'] = dict(model.backbone_config or {})
    export_output(model, cfg, out)
    print(f'merged LoRA into the backbone weights: {out} (a model folder for pipeline() / Model.from_pretrained)')
    return 0


def _report_difference(diffs: Dict[int, float], what: str, limit: Optional[float] = None) -> None:
    """Print ``what: batch n: d, ...``; past ``limit`` the export is wrong: a RuntimeError."""
    print(f'{what}: ' + ', '.join(f'batch {n}: {d:.2e}' for n, d in diffs.items()))
    worst = max(diffs.values())
    if limit is not None and worst > limit:
        raise RuntimeError(f'the ONNX model differs from the torch model by {worst:.2e} (> {limit:.0e})')


def _export_onnx(model, out: str, opset: Optional[int], int8: bool = False) -> int:
    model.eval()
    if model.model.head_layers_needed() is not None:  # a segmentation model
        if int8:
            raise CLIError('--int8 is for classification models for now; export the segmentation model in fp32')
        # optional: the ONNX export code loads only for --onnx
        from ..segmentation.onnx_export import export_segmentation_onnx, max_abs_difference as seg_difference
        result = export_segmentation_onnx(model, out, opset=opset)
        print(f'ONNX export: {result["onnx"]} (dynamic batch axis, logits at the patch grid); configuration.json '
              'and preprocessing.json (loading, resizing, upsampling and argmax) beside it')
        _report_difference(seg_difference(model, out), 'onnxruntime vs torch, max |difference| of the logits',
                           limit=1e-4)
        print(f'run it: modelscope_utuning.segmentation.onnx_export.OnnxSegmenter({out!r})(image)')
        return 0
    from ..deploy.onnx_export import export_onnx, max_abs_difference  # optional: loads only for --onnx
    result = export_onnx(model, out, opset=opset)
    print(f'ONNX export: {result["onnx"]} (opset {result["opset"]}, dynamic batch axis); '
          f'configuration.json and the preprocessing beside it')
    if result['merged']:
        print(f'merged into the frozen weights first: {", ".join(result["merged"])}')
    for note in result['notes']:
        print(note)
    _report_difference(max_abs_difference(model, out),
                       'onnxruntime vs torch, max |difference| of scores and logits', limit=1e-4)
    if int8:
        from ..deploy.onnx_export import quantize_int8  # optional: loads only for --onnx
        q = quantize_int8(out)
        _report_difference(max_abs_difference(model, out),
                           f'int8: {q["quantized"]} matrix products quantized, kept in fp32: '
                           f'{", ".join(q["kept_fp32"])}; onnxruntime int8 vs torch fp32, max |difference| of '
                           'scores and logits')
    print(f'run it: modelscope_utuning.deploy.onnx_export.OnnxClassifier({out!r})(image)')
    return 0

