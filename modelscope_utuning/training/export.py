"""The trained output folder: everything another user needs to load, run and understand the model.

``configuration.json`` (declaring the plugin, finetune off so nothing is dropped on reload), ``pytorch_model.pt``
(hub layout), ``adapter_model.safetensors`` + ``adapter_config.json`` (tuner-only), ``README.md`` (model card
with the evaluation results) and ``training_curve.png``. Every file is written to a temporary name first.
"""
from __future__ import annotations

import copy
import json
import os
from typing import Dict, List, Optional

from ..fileio import atomic_write, write_text_atomic

PLUGIN_PACKAGE = 'modelscope-utuning'


def output_configuration(cfg: Dict, num_classes: int, backbone: Optional[Dict] = None) -> Dict:
    """The training configuration, made fit for reloading the trained weights as they are; ``backbone``: the
    model's resolved backbone configuration (every tuner option written out)."""
    cfg = copy.deepcopy(cfg)
    model = cfg.setdefault('model', {})
    if backbone is not None:
        model['backbone'] = copy.deepcopy(backbone)
    model['finetune'] = False  # reloading must keep the trained head
    model.get('backbone', {}).pop('pretrained_weights', None)  # the checkpoint holds the backbone
    model.setdefault('head', {})['num_classes'] = num_classes
    # ModelScope's own `plugins` field makes every loader pip-wheel the package from PyPI (it fails offline and
    # for unpublished versions), so the requirement is declared in a field of ours instead.
    from .. import __version__
    cfg['utuning'] = {'package': PLUGIN_PACKAGE, 'import': 'modelscope_utuning', 'version': __version__}
    cfg['task'] = 'vision-efficient-tuning'
    cfg['pipeline'] = {'type': 'vision-efficient-tuning'}
    return cfg


def read_log(log_json: Optional[str]) -> List[Dict]:
    if not log_json or not os.path.isfile(log_json):
        return []
    rows = []
    with open(log_json, encoding='utf-8') as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return rows


def _polyline(draw, box, values, color):
    x0, y0, x1, y1 = box
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    n = max(len(values) - 1, 1)
    pts = [(x0 + (x1 - x0) * i / n, y1 - (y1 - y0) * (v - lo) / span) for i, v in enumerate(values)]
    if len(pts) == 1:
        pts = pts * 2
    draw.line(pts, fill=color, width=2)
    return lo, hi


def write_training_curve(rows: List[Dict], path: str) -> bool:
    """Loss per logged iteration (left) and evaluation accuracy per epoch (right), drawn with Pillow."""
    from PIL import Image, ImageDraw
    losses = [r['loss'] for r in rows if r.get('mode') == 'train' and isinstance(r.get('loss'), (int, float))]
    accs = [r['accuracy'] for r in rows if r.get('mode') == 'val' and isinstance(r.get('accuracy'), (int, float))]
    if not losses and not accs:
        return False
    img = Image.new('RGB', (800, 320), 'white')
    draw = ImageDraw.Draw(img)
    for (title, values, box, color) in (('train loss', losses, (40, 40, 380, 280), (200, 40, 40)),
                                        ('eval accuracy', accs, (440, 40, 780, 280), (40, 90, 200))):
        draw.rectangle(box, outline=(160, 160, 160))
        draw.text((box[0], 15), title, fill='black')
        if values:
            lo, hi = _polyline(draw, box, values, color)
            draw.text((box[0] + 4, box[1] + 2), f'max {hi:.4g}', fill='black')
            draw.text((box[0] + 4, box[3] - 14), f'min {lo:.4g}', fill='black')
    atomic_write(path, lambda tmp: img.save(tmp, format='PNG'))
    return True


def model_card(model, cfg: Dict, eval_results: Dict, trainable: int, total: int, has_curve: bool) -> str:
    tuners = cfg.get('model', {}).get('backbone', {}).get('tuners') or []
    from ..tuners.base import legacy_keys
    legacy = {k: v for k, v in cfg.get('model', {}).get('backbone', {}).items() if k in legacy_keys()}
    lines = [
        '---', 'tasks:', '- vision-efficient-tuning', 'frameworks:', '- pytorch', '---', '',
        '# U-Tuning vision-efficient-tuning model', '',
        'Trained with [modelscope-utuning](https://arxiv.org/abs/2303.00690): a frozen ViT whose operations carry',
        'small trainable U-Tuners, `x\' = OP(x) + s * U(x)`.', '',
        '## Use', '', '```python', 'import modelscope_utuning  # registers the plugin',
        'from modelscope.pipelines import pipeline', "p = pipeline('vision-efficient-tuning', '<this folder or hub id>')",
        "print(p('image.jpg'))  # {'scores': [...], 'labels': [...]}", '```', '',
        '## Tuners', '', '```json', json.dumps({'tuners': tuners, **legacy}, indent=2), '```', '',
        f'Trainable parameters: {trainable:,} of {total:,} ({100.0 * trainable / max(total, 1):.3f}%).', '',
        f'Classes ({len(model.CLASSES or [])}): ' + ', '.join(map(str, (model.CLASSES or [])[:20]))
        + (' ...' if len(model.CLASSES or []) > 20 else ''), '',
        '## Evaluation', '',
    ]
    if eval_results:
        lines += ['| metric | value |', '| --- | --- |']
        lines += [f'| {k} | {v:.4f} |' if isinstance(v, float) else f'| {k} | {v} |' for k, v in eval_results.items()]
    else:
        lines.append('No evaluation was run.')
    if has_curve:
        lines += ['', '![training curve](training_curve.png)']
    lines += ['', 'Files: `pytorch_model.pt` (ModelScope hub layout), `adapter_model.safetensors` +',
              '`adapter_config.json` (tuner and head weights only), `configuration.json`.', '']
    return '\n'.join(lines)


def export_output(model, cfg: Dict, output_dir: str, eval_results: Optional[Dict] = None,
                  log_json: Optional[str] = None) -> str:
    """Write the whole output folder for ``model`` (a VisionEfficientTuningModel); returns the folder."""
    os.makedirs(output_dir, exist_ok=True)
    model.save_hub_checkpoint(output_dir)
    stale = os.path.join(output_dir, 'pytorch_model.bin')  # ModelScope's link of the raw epoch file
    if os.path.lexists(stale):
        os.remove(stale)
    model.model.save_tuners(output_dir)
    out_cfg = output_configuration(cfg, model.head.num_classes, model.model.resolved_backbone_config())
    write_text_atomic(os.path.join(output_dir, 'configuration.json'), json.dumps(out_cfg, indent=4) + '\n')
    write_card(model, out_cfg, output_dir, eval_results, log_json)
    return output_dir


def write_card(model, out_cfg: Dict, output_dir: str, eval_results: Optional[Dict] = None,
               log_json: Optional[str] = None) -> None:
    """``README.md`` and ``training_curve.png`` of the output folder (cheap: no weights are written)."""
    has_curve = write_training_curve(read_log(log_json), os.path.join(output_dir, 'training_curve.png'))
    trainable, total = model.trainable_parameters()
    write_text_atomic(os.path.join(output_dir, 'README.md'),
                      model_card(model, out_cfg, eval_results or {}, trainable, total, has_curve))
