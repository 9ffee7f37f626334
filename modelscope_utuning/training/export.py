"""The trained output folder: everything another user needs to load, run and understand the model, nothing else.

``configuration.json`` (declaring the plugin, finetune off so nothing is dropped on reload, no paths of the
machine it was trained on), ``pytorch_model.pt`` (hub layout), ``adapter_model.safetensors`` +
``adapter_config.json`` (tuner-only), ``README.md`` (model card: how to install and use the plugin, the data the
metrics come from, the license), ``training_curve.png`` (:mod:`.curve`), and ``app.py`` + ``requirements.txt``: the web
demo of the folder itself (:mod:`..deploy.app`), so that the folder also runs as a ModelScope Studio app as it
stands.

The folder is written whole or not at all: into a temporary sibling folder, which then replaces ``output/`` by
renames. After a failure or a kill at any moment ``output/`` is absent or a complete model; leftovers of an
interrupted export are removed by the next run (:func:`clean_stale_outputs`).

Configurations that ModelScope's built-in model cannot compute (any tuner entry of ours, bypass) name the model
and pipeline type ``vision-efficient-tuning@modelscope-utuning``, which the plugin registers beside the built-in's
names: loading such a folder without the plugin then fails with ModelScope's registry error naming the package,
instead of reaching the built-in (which needs torchvision, and would not compute these tuners).
"""
from __future__ import annotations

import copy
import glob
import json
import os
import shutil
import tempfile
from typing import Any, Dict, Optional

from .. import __version__
from ..fileio import fault_point, write_text_atomic
from ..registration import SEG_TASK, SEG_TYPE, model_type_for
from ..tuners.base import legacy_keys
from .curve import read_log, write_training_curve

PLUGIN_PACKAGE = 'modelscope-utuning'
LICENSE = 'apache-2.0'
# Keys whose values are paths of the training machine (work dirs, checkpoint folders, the backbone file read at
# the start): a trained folder reloads without them and must not carry them to the hub.
MACHINE_PATH_KEYS = ('work_dir', 'save_dir', 'out_dir', 'output_dir', 'checkpoint_path', 'pretrained_weights',
                     'model_dir', 'cache_dir', 'log_dir', 'dataset_dir', 'data_dir')
_TMP_PREFIX, _OLD_SUFFIX = '.output.tmp-', '.old-'
CURVE_FILE = 'training_curve.png'
APP_FILE = 'app.py'
REQUIREMENTS_FILE = 'requirements.txt'


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
    cfg['utuning'] = {'package': PLUGIN_PACKAGE, 'import': 'modelscope_utuning', 'version': __version__,
                      'requires': f'pip install {PLUGIN_PACKAGE}; import modelscope_utuning before loading'}
    if cfg.get('task') == SEG_TASK or model.get('type') == SEG_TYPE:  # a segmentation model stays one
        cfg['task'], model['type'], cfg['pipeline'] = SEG_TASK, SEG_TYPE, {'type': SEG_TYPE}
        return scrub_machine_paths(cfg)
    cfg['task'] = 'vision-efficient-tuning'
    kind = model_type_for(model.get('backbone') or {})
    model['type'] = kind
    cfg['pipeline'] = {'type': kind}
    return scrub_machine_paths(cfg)


def scrub_machine_paths(cfg: Any) -> Any:
    """``cfg`` without the keys that hold paths of the training machine (:data:`MACHINE_PATH_KEYS`) and without any
    other absolute path value, at any depth."""
    if isinstance(cfg, dict):
        return {k: scrub_machine_paths(v) for k, v in cfg.items()
                if k not in MACHINE_PATH_KEYS and not _is_machine_path(v)}
    if isinstance(cfg, list):
        return [scrub_machine_paths(v) for v in cfg if not _is_machine_path(v)]
    return cfg


def _is_machine_path(v: Any) -> bool:
    return isinstance(v, str) and os.path.isabs(v) and len(v) > 1


def model_card(model, cfg: Dict, eval_results: Dict, trainable: int, total: int,
               curve_backend: Optional[str] = None, data: Optional[Dict[str, str]] = None) -> str:
    """The README.md of the output folder; ``curve_backend``: how training_curve.png was drawn (None: not at all);
    ``data``: descriptions of the training and evaluation data."""
    tuners = cfg.get('model', {}).get('backbone', {}).get('tuners') or []
    legacy = {k: v for k, v in cfg.get('model', {}).get('backbone', {}).items() if k in legacy_keys()}
    data = data or {}
    lines = [
        '---', 'tasks:', '- vision-efficient-tuning', 'frameworks:', '- pytorch', f'license: {LICENSE}',
        'tags:', '- modelscope-utuning', '- parameter-efficient-tuning', '---', '',
        '# U-Tuning vision-efficient-tuning model', '',
        'Trained with [modelscope-utuning](https://pypi.org/project/modelscope-utuning/) (U-Tuning, '
        '[arXiv 2303.00690](https://arxiv.org/abs/2303.00690)): a frozen ViT whose operations carry small trainable',
        'tuners, `x\' = OP(x) + s * U(x)`.', '',
        '## Use', '',
        f'This model needs the plugin: `pip install {PLUGIN_PACKAGE}>={__version__}`, then import it before loading',
        '(without it ModelScope does not know this model type).', '',
        '```python', 'import modelscope_utuning  # registers the plugin with ModelScope',
        'from modelscope.pipelines import pipeline', "p = pipeline('vision-efficient-tuning', '<this folder or hub id>')",
        "print(p('image.jpg'))  # {'scores': [...], 'labels': [...]}", '```', '',
        '## Tuners', '', '```json', json.dumps({'tuners': tuners, **legacy}, indent=2), '```', '',
        f'Trainable parameters: {trainable:,} of {total:,} ({100.0 * trainable / max(total, 1):.3f}%).', '',
        f'Classes ({len(model.CLASSES or [])}): ' + ', '.join(map(str, (model.CLASSES or [])[:20]))
        + (' ...' if len(model.CLASSES or []) > 20 else ''), '',
        '## Evaluation', '',
    ]
    if eval_results:
        lines += [f'On {data.get("eval", "the evaluation data given to the trainer")} (training data: '
                  f'{data.get("train", "not recorded")}):', '']
        lines += ['| metric | value |', '| --- | --- |']
        lines += [f'| {k} | {v:.4f} |' if isinstance(v, float) else f'| {k} | {v} |' for k, v in eval_results.items()]
    else:
        lines.append(f'No evaluation was run (training data: {data.get("train", "not recorded")}).')
    if curve_backend:
        lines += ['', '![training curve](training_curve.png)']
        if curve_backend != 'matplotlib':
            lines += ['', "The curve is a basic drawing (matplotlib was not installed): `pip install "
                      "'modelscope-utuning[plot]'` draws it with axes, ticks and legends."]
    lines += ['', '## Files', '', '`pytorch_model.pt` (ModelScope hub layout), `adapter_model.safetensors` +',
              '`adapter_config.json` (tuner and head weights only), `configuration.json`; `app.py` is a web demo',
              "of this folder (`pip install 'modelscope-utuning[gradio]'`, then `python app.py`; it also runs as a",
              'ModelScope Studio app).', '',
              '## License', '',
              f'The weights of this model are released under {LICENSE} as far as its training code is concerned; the '
              'frozen backbone they contain comes from its pre-trained source, whose license also applies.', '']
    return '\n'.join(lines)


def clean_stale_outputs(output_dir: str) -> None:
    """Remove what an interrupted run left beside ``output_dir`` (temporary and replaced output folders, temporary
    files of an interrupted checkpoint write). Call it holding the work_dir's lock."""
    parent, name = os.path.split(os.path.abspath(output_dir))
    for path in glob.glob(os.path.join(parent, _TMP_PREFIX + '*')) + \
            glob.glob(os.path.join(parent, name + _OLD_SUFFIX + '*')):
        shutil.rmtree(path, ignore_errors=True)
    for path in glob.glob(os.path.join(parent, '.tmp-*')):
        if os.path.isfile(path):
            os.remove(path)


def export_output(model, cfg: Dict, output_dir: str, eval_results: Optional[Dict] = None,
                  log_json: Optional[str] = None, data: Optional[Dict[str, str]] = None,
                  iters_per_epoch: Optional[int] = None, tuner_only: bool = False, base_path: bool = False) -> str:
    """Write the whole output folder for ``model`` (a VisionEfficientTuningModel), replacing ``output_dir`` only
    once every file is written; returns the folder. ``tuner_only``: no ``pytorch_model.pt`` (a few MB: tuners, head
    and the backbone's fingerprint; it loads against the backbone given once, ``pipeline(..., backbone=...)``);
    ``base_path``: record the base weights file's path in adapter_config.json (a path of this machine)."""
    output_dir = os.path.abspath(output_dir)
    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=parent)
    try:
        if not tuner_only:
            model.save_hub_checkpoint(tmp)
        model.model.save_tuners(tmp, base_path)
        out_cfg = output_configuration(cfg, model.head.num_classes, model.model.resolved_backbone_config())
        write_text_atomic(os.path.join(tmp, 'configuration.json'), json.dumps(out_cfg, indent=4) + '\n')
        write_card(model, out_cfg, tmp, eval_results, log_json, data, iters_per_epoch)
        write_app(tmp)
        _fsync_dir(tmp)
        _replace_dir(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output_dir


def _fsync_dir(folder: str) -> None:
    for name in os.listdir(folder):
        with open(os.path.join(folder, name), 'rb') as f:
            os.fsync(f.fileno())


def _replace_dir(new: str, target: str) -> None:
    """``new`` becomes ``target``: the old one is renamed aside first, then removed; in between, no ``target``."""
    old = None
    fault_point('export_ready')  # every file written, output/ not replaced yet
    if os.path.lexists(target):
        old = f'{target}{_OLD_SUFFIX}{os.getpid()}'
        shutil.rmtree(old, ignore_errors=True)
        os.rename(target, old)
        fault_point('export_between_renames')  # the old output aside, the new one not in place: no output/
    os.rename(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_app(output_dir: str) -> None:
    """``app.py`` (launches the Gradio demo on this folder) and its ``requirements.txt``."""
    from ..deploy.app import app_requirements, app_source  # keeps the CLI light: deploy.app loads preprocessing
    write_text_atomic(os.path.join(output_dir, APP_FILE), app_source())
    write_text_atomic(os.path.join(output_dir, REQUIREMENTS_FILE), app_requirements())


def write_card(model, out_cfg: Dict, output_dir: str, eval_results: Optional[Dict] = None,
               log_json: Optional[str] = None, data: Optional[Dict[str, str]] = None,
               iters_per_epoch: Optional[int] = None) -> None:
    """``README.md`` and ``training_curve.png`` of the output folder (cheap: no weights are written)."""
    curve = write_training_curve(read_log(log_json), os.path.join(output_dir, CURVE_FILE), iters_per_epoch)
    trainable, total = model.trainable_parameters()
    write_text_atomic(os.path.join(output_dir, 'README.md'),
                      model_card(model, out_cfg, eval_results or {}, trainable, total,
                                 curve.backend if curve else None, data))
