"""``modelscope-utuning``: train, evaluate, predict, export and publish U-Tuning models from the command line.

::

    modelscope-utuning demo [--quick]
    modelscope-utuning train MODEL --train-data DATA [--eval-data DATA] [--work-dir DIR] [key=value ...]
    modelscope-utuning eval MODEL --data DATA [--json]
    modelscope-utuning predict MODEL IMAGE_OR_FOLDER ... [--topk K] [--json]
    modelscope-utuning export MODEL OUT_DIR (--tuner-only | --merge-lora | --onnx)
    modelscope-utuning push MODEL_DIR OWNER/NAME          # token from $MODELSCOPE_API_TOKEN
    modelscope-utuning serve MODEL [--host H] [--port P]  # web demo (extra [gradio])

MODEL is a model folder (configuration.json, and pytorch_model.pt once trained), a hub id (``owner/name``), a
preset name (``modelscope-utuning presets`` lists them) or the path of a configuration.json. DATA is an image
folder (one sub-directory per class), a CSV / TSV / JSONL manifest, a VTAB-1K ``"path label"`` list or an FGVC
json split. ``key=value`` overrides edit the configuration before training, as ModelScope's
``Config.merge_from_dict`` does (``train.max_epochs=20``, ``model.backbone.tuners.0.dim=16``); values are read as
JSON when they parse (numbers, true / false / null, lists, objects), else as strings; a list value replaces the
list it names.

Exit status: 0 on success, 2 for bad arguments (one line on stderr), 1 when the work itself fails.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import sys
import tempfile
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .fileio import read_json_object
from .location import HUB, HUB_ID, ModelLocationError, locate_model_source

PROG = 'modelscope-utuning'
TOKEN_ENV = 'MODELSCOPE_API_TOKEN'
OVERRIDE_KEY = re.compile(r'^[A-Za-z_][A-Za-z0-9_\-]*(\.[A-Za-z0-9_\-]+)*$')
# Top-level sections of a configuration.json; an override may add a key under them, but a new top-level key is
# most likely a typo (``trian.max_epochs=3``) and is refused.
KNOWN_SECTIONS = ('framework', 'task', 'pipeline', 'model', 'preprocessor', 'train', 'evaluation', 'dataset',
                  'plugins', 'allow_remote', 'log_level', 'parallel', 'utuning', 'description')
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
PRESET_DIRS = (os.path.join(PACKAGE_DIR, 'configs'), os.path.join(os.path.dirname(PACKAGE_DIR), 'configs'))
PREDICT_CHUNK = 64  # images per pipeline call (the pipeline batches inside it)


class CLIError(Exception):
    """A bad argument: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + message
        self.exit(2, f'{self.prog}: error: {message} (see {self.prog} --help)\n')


# -- overrides ----------------------------------------------------------------------------------------------------
def parse_value(text: str) -> Any:
    """JSON when it parses (``3``, ``1e-3``, ``true``, ``null``, ``[..]``, ``{..}``, ``"s"``), else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_override(text: str) -> Tuple[str, Any]:
    """``'train.max_epochs=5'`` -> ``('train.max_epochs', 5)``; raises CLIError on bad syntax."""
    if '=' not in text:
        raise CLIError(f'bad override {text!r}: expected key=value, e.g. train.max_epochs=10')
    key, value = text.split('=', 1)
    key = key.strip()
    if not OVERRIDE_KEY.match(key):
        raise CLIError(f'bad override {text!r}: the key must be dotted names, e.g. model.head.num_classes=10')
    return key, parse_value(value.strip())


def parse_overrides(items: Sequence[str]) -> List[Tuple[str, Any]]:
    return [parse_override(t) for t in items or []]


def apply_overrides(cfg, overrides: Sequence[Tuple[str, Any]]):
    """Apply ``(dotted key, value)`` pairs to a ModelScope ``Config`` (in place; returns it).

    Dicts merge into what is there and integer parts index lists (``Config.merge_from_dict(...,
    allow_list_keys=True)``); other values, lists included, replace it. (ModelScope itself would merge a list of
    typed dicts entry by entry, by ``type``, which for tuner entries mixes OPs: ``model.backbone.tuners=[...]``
    is meant to be the new list.) Raises CLIError naming the override when it does not fit.
    """
    for key, value in overrides:
        parts = key.split('.')
        if parts[0] not in cfg and parts[0] not in KNOWN_SECTIONS:
            raise CLIError(f'override {key}=...: unknown top-level section {parts[0]!r}; expected one of '
                           f'{", ".join(KNOWN_SECTIONS)}')
        try:
            if isinstance(value, dict):
                cfg.merge_from_dict({key: value}, allow_list_keys=True)
            else:
                _set_path(cfg, parts, value)
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise CLIError(f'override {key}=...: {e}') from None
    return cfg


def _set_path(cfg, parts: List[str], value: Any) -> None:
    from modelscope.utils.config import ConfigDict
    node = cfg
    for i, part in enumerate(parts[:-1]):
        where = '.'.join(parts[:i + 1])
        if isinstance(node, list):
            node = node[_index(part, node, where)]
            continue
        if part not in node or node[part] is None:
            node[part] = ConfigDict()
        elif not isinstance(node[part], (dict, list)):
            raise TypeError(f'{where} is {node[part]!r}, not a section')
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        node[_index(last, node, '.'.join(parts))] = value
    else:
        node[last] = value


def _index(part: str, node: list, where: str) -> int:
    if not part.isdigit():
        raise KeyError(f'{where}: a list, index it with a number (0 .. {len(node) - 1})')
    i = int(part)
    if i >= len(node):
        raise IndexError(f'{where}: index {i} is out of range for a list of {len(node)}')
    return i


# -- models, presets, data ----------------------------------------------------------------------------------------
def list_presets() -> Dict[str, str]:
    """Preset name -> configuration file (``modelscope_utuning/configs/*.json``, then a checkout's ``configs/``)."""
    found: Dict[str, str] = {}
    for folder in PRESET_DIRS:
        if os.path.isdir(folder):
            for name in sorted(os.listdir(folder)):
                if name.endswith('.json') and not name.startswith('.'):
                    found.setdefault(name[:-5], os.path.join(folder, name))
    return found


def _read_json(path: str) -> Dict:
    try:
        return read_json_object(path)
    except ValueError as e:
        raise CLIError(str(e)) from None


def _materialize_config(path: str, work_dir: str) -> str:
    """A model folder holding the configuration file ``path`` (no weights): ``work_dir/model``."""
    cfg = _read_json(path)
    backbone = (cfg.get('model') or {}).get('backbone') or {}
    weights = backbone.get('pretrained_weights')
    if isinstance(weights, str) and not os.path.isabs(weights):
        candidate = os.path.join(os.path.dirname(os.path.abspath(path)), weights)
        if os.path.exists(candidate):
            backbone['pretrained_weights'] = candidate  # relative to the configuration it came with
    model_dir = os.path.join(work_dir, 'model')
    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(model_dir, 'configuration.json'), 'w', encoding='utf-8') as f:
        json.dump(cfg, f, indent=2)
    return model_dir


def locate_model(spec: str, allow_config: bool = True) -> Tuple[str, str]:
    """What ``spec`` names, without side effects: ``('dir', folder)``, ``('config', json file)`` (a preset or a
    configuration file) or ``('hub', id)``. Raises CLIError with what was expected."""
    if os.path.isdir(spec):
        if not os.path.isfile(os.path.join(spec, 'configuration.json')):
            raise CLIError(f'model folder {spec!r} has no configuration.json')
        return 'dir', os.path.abspath(spec)
    if os.path.isfile(spec):
        if not allow_config:
            raise CLIError(f'{spec!r} is a file; expected a model folder or a hub id')
        if not spec.endswith('.json'):
            raise CLIError(f'{spec!r}: expected a model folder, a hub id, a preset name or a configuration .json')
        _read_json(spec)
        return 'config', os.path.abspath(spec)
    presets = list_presets()
    name = spec[:-5] if spec.endswith('.json') else spec
    if allow_config and name in presets:
        return 'config', presets[name]
    try:
        if locate_model_source(spec)[0] == HUB:  # the package's one rule for paths and hub ids
            return 'hub', spec  # ModelScope downloads it
        reason = 'no such folder'
    except ModelLocationError as e:
        reason = e.reason
    what = 'a model folder, a hub id (owner/name)'
    if allow_config:
        what += ', a configuration .json or a preset (' + (', '.join(presets) or 'none installed') + ')'
    raise CLIError(f'unknown model {spec!r}: {reason}; expected {what}')


def resolve_model(spec: str, work_dir: Optional[str] = None, allow_config: bool = True) -> str:
    """A model folder or hub id for ModelScope: a preset or configuration file becomes ``work_dir/model``."""
    kind, where = locate_model(spec, allow_config)
    if kind == 'config':
        if work_dir is None:
            raise CLIError(f'{spec!r} is a configuration, not a trained model')
        return _materialize_config(where, work_dir)
    return where


def load_data(path: Optional[str], option: str, classes: Optional[List[str]] = None):
    """Read a dataset source with our readers; CLIError when it does not exist."""
    from .data import load_dataset_any
    if not path:
        raise CLIError(f'{option} is required')
    if not os.path.exists(path):
        raise CLIError(f'{option} {path!r}: no such file or folder')
    kwargs = {'classes': classes} if classes else {}
    try:
        return load_dataset_any(path, **kwargs)
    except ValueError as e:
        raise CLIError(f'{option} {path!r}: {e}') from None


def model_classes(model_dir: str) -> Optional[List[str]]:
    """The class names a local model folder was trained with (tuner-only config, else the checkpoint)."""
    from .checkpoint.tuner_only import CONFIG_FILE
    adapter_cfg = os.path.join(model_dir, CONFIG_FILE)
    if os.path.isfile(adapter_cfg):
        try:
            with open(adapter_cfg, encoding='utf-8') as f:
                classes = json.load(f).get('CLASSES')
            if classes:
                return [str(c) for c in classes]
        except (OSError, ValueError):
            pass
    ckpt = os.path.join(model_dir, 'pytorch_model.pt')
    if os.path.isfile(ckpt):
        from .checkpoint.hub_layout import read_checkpoint
        classes = read_checkpoint(ckpt).get('CLASSES')
        if classes:
            return [str(c) for c in classes]
    cfg = os.path.join(model_dir, 'configuration.json')
    classes = ((_read_json(cfg).get('model') or {}).get('CLASSES')) if os.path.isfile(cfg) else None
    return [str(c) for c in classes] if classes else None


def _build_trainer(**default_args):
    from modelscope.metainfo import Trainers
    from modelscope.trainers import build_trainer
    from . import registration  # noqa: F401  (registers the plugin)
    return build_trainer(name=Trainers.vision_efficient_tuning, default_args=default_args)


def _print_metrics(metrics: Dict[str, Any], as_json: bool, out=None) -> None:
    out = out or sys.stdout
    if as_json:
        print(json.dumps(metrics, indent=2, default=float), file=out)
        return
    width = max((len(k) for k in metrics), default=6)
    for k, v in metrics.items():
        print(f'{k:<{width}}  {v:.4f}' if isinstance(v, float) else f'{k:<{width}}  {v}', file=out)


def _default_work_dir(spec: str) -> str:
    name = re.sub(r'[^A-Za-z0-9_.\-]+', '-', os.path.basename(os.path.normpath(spec)) or 'model')
    name = name[:-5] if name.endswith('.json') else name
    stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
    return os.path.join('work_dirs', f'{name}-{stamp}')


# -- commands -----------------------------------------------------------------------------------------------------
def cmd_train(args) -> int:
    overrides = parse_overrides(args.overrides)
    explicit = {k for k, _ in overrides}
    if args.epochs is not None:
        if args.epochs < 1:
            raise CLIError(f'--epochs {args.epochs}: expected a positive number')
        overrides.append(('train.max_epochs', args.epochs))
    if args.batch_size is not None:
        if args.batch_size < 1:
            raise CLIError(f'--batch-size {args.batch_size}: expected a positive number')
        overrides.append(('train.dataloader.batch_size_per_gpu', args.batch_size))
    if args.lr is not None:
        overrides.append(('train.optimizer.lr', args.lr))
    if args.backbone_weights:
        if not os.path.isfile(args.backbone_weights):
            raise CLIError(f'--backbone-weights {args.backbone_weights!r}: no such file')
        overrides.append(('model.backbone.pretrained_weights', os.path.abspath(args.backbone_weights)))
    if args.resume and not args.work_dir:
        raise CLIError('--resume needs --work-dir: the folder of the run to continue')
    locate_model(args.model)  # a bad model name fails before any data is read
    train_ds = load_data(args.train_data, '--train-data')
    eval_ds = load_data(args.eval_data, '--eval-data', classes=train_ds.classes) if args.eval_data else None
    work_dir = os.path.abspath(args.work_dir or _default_work_dir(args.model))
    if os.path.exists(work_dir) and not os.path.isdir(work_dir):
        raise CLIError(f'--work-dir {args.work_dir!r} is a file; expected a folder (it is created if missing)')
    from .training.workdir import WorkDirBusyError, WorkDirLock
    lock = WorkDirLock(work_dir)  # held for the whole command: a refused run writes nothing into the work_dir
    try:
        lock.acquire()
    except WorkDirBusyError as e:
        raise CLIError(str(e)) from None
    try:
        return _train(args, work_dir, overrides, explicit, train_ds, eval_ds)
    finally:
        lock.release()


def resume_point(work_dir: str, resume: bool) -> Optional[str]:
    """The epoch file ``train`` continues from: with ``resume``, the newest whose model file and trainer state both
    load (an unreadable newest one, e.g. half-written by a kill, falls back to the one before, said on stderr), or
    None to start at epoch 1 when there is none (said too). Without ``resume``, CLIError when the work_dir holds
    epoch files: re-running a command does not silently start the run again over its checkpoints."""
    from .training.checkpointing import epoch_files, readable
    files = epoch_files(work_dir)
    names = [os.path.basename(files[n][0]) for n in sorted(files)]
    if not resume:
        if files:
            raise CLIError(f'--work-dir {work_dir!r} holds the checkpoints of an earlier run ({", ".join(names)}): '
                           'pass --resume to continue it from its newest readable epoch, or use another --work-dir '
                           '(or delete them to start over)')
        return None
    if not files:
        print(f'--resume: nothing to resume in {work_dir} (no epoch_N.pth yet): starting at epoch 1', file=sys.stderr)
        return None
    for n in sorted(files, reverse=True):
        model_file, state_file = files[n]
        if not os.path.isfile(state_file):
            problem = f'{os.path.basename(state_file)} is missing'
        elif not readable(model_file):
            problem = f'{os.path.basename(model_file)} cannot be read (half-written or damaged)'
        elif not readable(state_file):
            problem = f'{os.path.basename(state_file)} cannot be read (half-written or damaged)'
        else:
            print(f'--resume: continuing from {model_file} (epoch {n} done)', file=sys.stderr)
            return model_file
        print(f'--resume: {problem}: falling back to the epoch before', file=sys.stderr)
    print(f'--resume: no readable epoch file in {work_dir} ({", ".join(names)}): starting at epoch 1',
          file=sys.stderr)
    return None


def _train(args, work_dir: str, overrides: List[Tuple[str, Any]], explicit: set, train_ds, eval_ds) -> int:
    """``train`` once the work_dir is locked: where to start, the model folder, the trainer, the run."""
    checkpoint = resume_point(work_dir, args.resume)
    model = resolve_model(args.model, work_dir)
    has_weights = os.path.isdir(model) and os.path.isfile(os.path.join(model, 'pytorch_model.pt'))
    notes: List[str] = []

    def cfg_modify_fn(cfg):
        apply_overrides(cfg, overrides)
        if args.epochs is not None and cfg.safe_get('train.lr_scheduler.T_max') is not None \
                and 'train.lr_scheduler.T_max' not in explicit:
            cfg.train.lr_scheduler.T_max = args.epochs
        if not has_weights and not cfg.safe_get('model.backbone.pretrained_weights'):
            notes.append('no pre-trained weights: the backbone starts from a random initialisation (pass '
                         '--backbone-weights FILE, or start from a trained model folder)')
        n = train_ds.num_classes
        head = cfg.model.get('head') or {}
        if 'model.head.num_classes' not in explicit and head.get('num_classes') != n:
            if not cfg.model.get('head'):
                cfg.model.head = {}
            old = head.get('num_classes')
            cfg.model.head.num_classes = n
            if has_weights and old is not None and 'model.finetune' not in explicit:
                cfg.model.finetune = True
                notes.append(f'the dataset has {n} classes, the model {old}: a new head is trained '
                             '(model.head.num_classes and model.finetune set)')
        return cfg

    if os.path.isdir(model):  # check the overrides now, with a clear message, before anything is built
        from modelscope.utils.config import Config
        from .training.defaults import apply_defaults
        from .training.validate import validate_config
        try:
            validate_config(cfg_modify_fn(apply_defaults(Config.from_file(os.path.join(model, 'configuration.json')))))
        except ValueError as e:
            raise CLIError(str(e)) from None
        notes.clear()
    print(f'training {args.model} on {args.train_data} ({len(train_ds)} images, {train_ds.num_classes} classes); '
          f'work dir {work_dir}', file=sys.stderr)
    trainer = _build_trainer(model=model, work_dir=work_dir, train_dataset=train_ds, eval_dataset=eval_ds,
                             cfg_modify_fn=cfg_modify_fn)
    for note in notes:
        print(f'note: {note}', file=sys.stderr)
    trainer.train(checkpoint_path=checkpoint)
    metrics = trainer.evaluate() if eval_ds is not None else {}
    trainable, total = trainer.model_unwrapped.trainable_parameters()
    if args.json:
        print(json.dumps({'output_dir': trainer.output_dir, 'work_dir': work_dir, 'metrics': metrics,
                          'trainable_params': trainable, 'total_params': total}, indent=2, default=float))
    else:
        print(f'trained {trainable:,} of {total:,} parameters ({100.0 * trainable / max(total, 1):.3f}%)')
        if metrics:
            _print_metrics(metrics, False)
        print(f'model saved to {trainer.output_dir}')
    return 0


def cmd_eval(args) -> int:
    model = resolve_model(args.model, allow_config=False)
    classes = model_classes(model) if os.path.isdir(model) else None
    ds = load_data(args.data, '--data', classes=classes)
    tmp = None
    work_dir = args.work_dir
    if work_dir is None:
        tmp = tempfile.mkdtemp(prefix='utuning-eval-')
        work_dir = tmp

    def cfg_modify_fn(cfg):
        if args.batch_size:
            cfg.evaluation.dataloader.batch_size_per_gpu = args.batch_size
        return cfg
    try:
        trainer = _build_trainer(model=model, work_dir=work_dir, eval_dataset=ds, cfg_modify_fn=cfg_modify_fn)
        metrics = trainer.evaluate()
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    metrics = {k: (float(v) if hasattr(v, '__float__') and not isinstance(v, (int, bool)) else v)
               for k, v in (metrics or {}).items()}
    if not args.json:
        print(f'{len(ds)} images from {args.data}', file=sys.stderr)
    _print_metrics(metrics, args.json)
    return 0


def expand_inputs(items: Sequence[str]) -> List[str]:
    """Files as given, folders walked (sorted, image extensions only, hidden entries skipped), URLs kept."""
    from .data import IMAGE_EXTENSIONS
    from .data.readers import walk_images
    out: List[str] = []
    for item in items:
        if item.startswith(('http://', 'https://')):
            out.append(item)
        elif os.path.isdir(item):
            found = walk_images(item)
            if not found:
                raise CLIError(f'folder {item!r} holds no images ({", ".join(IMAGE_EXTENSIONS)})')
            out += found
        elif os.path.isfile(item):
            out.append(item)
        else:
            raise CLIError(f'{item!r}: no such file or folder')
    return out


def format_table(rows: List[Dict[str, Any]], topk: int) -> str:
    """``image  label  score`` (and the other top-k labels) as aligned text."""
    width = max([len('image')] + [len(r['input']) for r in rows])
    lw = max([len('label')] + [len(r['labels'][0]) for r in rows if r['labels']])
    head = f'{"image":<{width}}  {"label":<{lw}}  score'
    if topk > 1:
        head += '   next'
    lines = [head]
    for r in rows:
        line = f'{r["input"]:<{width}}  {r["labels"][0]:<{lw}}  {r["scores"][0]:.4f}'
        if topk > 1 and len(r['labels']) > 1:
            line += '   ' + ', '.join(f'{lab} {s:.3f}' for lab, s in zip(r['labels'][1:], r['scores'][1:]))
        lines.append(line)
    return '\n'.join(lines)


def format_columns(rows: List[Dict[str, Any]], names: List[str]) -> str:
    """``image  <model 1>  <model 2> ...``: each model's top label and score in a column of its own."""
    cells = [[f'{m["labels"][0]} {m["scores"][0]:.4f}' for m in r['models']] for r in rows]
    width = max([len('image')] + [len(r['input']) for r in rows])
    widths = [max([len(n)] + [len(c[i]) for c in cells]) for i, n in enumerate(names)]
    lines = ['  '.join([f'{"image":<{width}}'] + [f'{n:<{w}}' for n, w in zip(names, widths)])]
    for r, c in zip(rows, cells):
        lines.append('  '.join([f'{r["input"]:<{width}}'] + [f'{x:<{w}}' for x, w in zip(c, widths)]))
    return '\n'.join(lines)


def cmd_predict(args) -> int:
    if args.topk < 1:
        raise CLIError(f'--topk {args.topk}: expected a positive number')
    if args.batch_size < 1:
        raise CLIError(f'--batch-size {args.batch_size}: expected a positive number')
    specs = [m for m in args.model.split(',') if m] + list(args.also or [])
    models = [resolve_model(m, allow_config=False) for m in specs]
    if args.backbone and not os.path.exists(args.backbone):
        raise CLIError(f'--backbone {args.backbone!r}: no such file or folder')
    inputs = expand_inputs(args.inputs)
    from modelscope.pipelines import pipeline
    from tqdm import tqdm
    from . import registration  # noqa: F401
    kwargs = {'device': args.device} if args.device else {}
    if args.backbone:
        kwargs['backbone'] = os.path.abspath(args.backbone)
    many = len(models) > 1
    classifier = pipeline('vision-efficient-tuning', models if many else models[0], batch_size=args.batch_size,
                          **kwargs)
    rows: List[Dict[str, Any]] = []
    chunk = max(PREDICT_CHUNK, args.batch_size)

    def row(path, r):
        return {'input': path, 'labels': list(r['labels']), 'scores': [float(s) for s in r['scores']]}
    with tqdm(total=len(inputs), unit='img', desc='predict', file=sys.stderr,
              disable=True if len(inputs) <= chunk else None) as bar:
        for start in range(0, len(inputs), chunk):
            part = inputs[start:start + chunk]
            results = classifier(part, topk=args.topk)
            if many:  # one result per model and image
                rows += [{'input': path, 'models': [dict(row(path, m), model=s) for m, s in zip(r, specs)]}
                         for path, r in zip(part, results)]
            else:
                rows += [row(path, r) for path, r in zip(part, results)]
            bar.update(len(part))
    if args.json:
        text = json.dumps(rows, indent=2)
    else:
        text = format_columns(rows, specs) if many else format_table(rows, args.topk)
    if args.output:
        with open(args.output, 'w', encoding='utf-8') as f:
            f.write(text + '\n')
        print(f'{len(rows)} predictions written to {args.output}', file=sys.stderr)
    else:
        print(text)
    return 0


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
        from .deploy import onnx_export
        from .extras import MissingExtraError
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
    from . import registration  # noqa: F401
    model = Model.from_pretrained(model_spec)
    from .model import VisionEfficientTuningModel
    if not isinstance(model, VisionEfficientTuningModel):
        raise CLIError(f'{args.model!r} is not a vision-efficient-tuning model ({type(model).__name__})')
    if args.tuner_only:
        if args.base_weights:  # recorded, so that model_from_tuners(out) finds the frozen backbone
            model.backbone_config = dict(model.backbone_config or {},
                                         pretrained_weights=os.path.abspath(args.base_weights))
        from .training.export import export_output
        cfg = _read_json(os.path.join(model.model_dir, 'configuration.json'))
        export_output(model, cfg, out, tuner_only=True, base_path=bool(args.base_weights))
        n = sum(p.numel() for p in model.model.tuner_state_dict().values())
        print(f'tuner-only export: {out} ({n:,} values: tuners, head; backbone fingerprint '
              f'{model.model.backbone_fingerprint()[:19]}...)')
        print(f"load: pipeline('vision-efficient-tuning', {out!r}, backbone=<the frozen backbone file or model "
              "folder>), or modelscope_utuning.model_from_tuners(folder, pretrained_weights=<file>)")
        return 0
    if args.onnx:
        return _export_onnx(model, out, args.opset, int8=args.int8)
    from .model import has_lora, merge_lora
    from .training.export import export_output
    if not has_lora(model):
        raise CLIError(f'{args.model!r} has no LoRA tuner to merge')
    merge_lora(model)
    cfg = _read_json(os.path.join(model.model_dir, 'configuration.json'))
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
        from .segmentation.onnx_export import export_segmentation_onnx, max_abs_difference as seg_difference
        result = export_segmentation_onnx(model, out, opset=opset)
        print(f'ONNX export: {result["onnx"]} (dynamic batch axis, logits at the patch grid); configuration.json '
              'and preprocessing.json (loading, resizing, upsampling and argmax) beside it')
        _report_difference(seg_difference(model, out), 'onnxruntime vs torch, max |difference| of the logits',
                           limit=1e-4)
        print(f'run it: modelscope_utuning.segmentation.onnx_export.OnnxSegmenter({out!r})(image)')
        return 0
    from .deploy.onnx_export import export_onnx, max_abs_difference
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
        from .deploy.onnx_export import quantize_int8
        q = quantize_int8(out)
        _report_difference(max_abs_difference(model, out),
                           f'int8: {q["quantized"]} matrix products quantized, kept in fp32: '
                           f'{", ".join(q["kept_fp32"])}; onnxruntime int8 vs torch fp32, max |difference| of '
                           'scores and logits')
    print(f'run it: modelscope_utuning.deploy.onnx_export.OnnxClassifier({out!r})(image)')
    return 0


def cmd_push(args) -> int:
    folder = args.model_dir
    if not os.path.isdir(folder):
        raise CLIError(f'{folder!r}: no such folder')
    if not os.path.isfile(os.path.join(folder, 'configuration.json')):
        raise CLIError(f'{folder!r} has no configuration.json (push a trained output folder)')
    if not HUB_ID.match(args.repo_id):
        raise CLIError(f'repository id {args.repo_id!r}: expected owner/name')
    token = os.environ.get(TOKEN_ENV, '').strip()
    if not token:
        raise CLIError(f'no hub token: set {TOKEN_ENV} to an access token of your ModelScope account')
    from modelscope.hub.api import HubApi
    from modelscope.hub.constants import ModelVisibility
    api = HubApi(token=token)
    visibility = ModelVisibility.PUBLIC if args.public else ModelVisibility.PRIVATE
    api.create_repo(args.repo_id, token=token, visibility=visibility, exist_ok=True)
    api.upload_folder(repo_id=args.repo_id, folder_path=os.path.abspath(folder),
                      commit_message=args.message or f'Upload {os.path.basename(os.path.abspath(folder))}',
                      revision=args.revision, token=token, ignore_patterns=['.tmp-*', '*.pyc', '__pycache__'])
    print(f'uploaded {folder} to {api.get_model_url(args.repo_id)}')
    return 0


def cmd_serve(args) -> int:
    from .deploy import app as web
    from .extras import MissingExtraError
    if not 0 < args.port < 65536:
        raise CLIError(f'--port {args.port}: expected 1 to 65535')
    if args.topk < 1:
        raise CLIError(f'--topk {args.topk}: expected a positive number')
    try:
        web.require_gradio()  # before the model is loaded: a missing package is a setup problem, said in one line
    except MissingExtraError as e:
        raise CLIError(str(e)) from None
    model = resolve_model(args.model, allow_config=False)
    page = web.build_app(model, topk=args.topk, device=args.device)
    print(f'serving {args.model} on http://{args.host}:{args.port} (Ctrl+C stops)', flush=True)
    web.launch(page, host=args.host, port=args.port, quiet=True)
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo
    if args.threads is not None and args.threads < 0:
        raise CLIError(f'--threads {args.threads}: expected 0 (torch default) or more')
    if args.segmentation:
        from .demo_segmentation import run_segmentation_demo
        result = run_segmentation_demo(args.work_dir, quick=args.quick, show_logs=args.show_logs,
                                       threads=1 if args.threads is None else args.threads)
        if args.json:
            print(json.dumps(result, indent=2, default=float))
        return 0
    result = run_demo(args.work_dir, quick=args.quick, verbose=True, show_logs=args.show_logs,
                      threads=args.threads)
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != 'settings'}, indent=2, default=float))
    return 0


def cmd_presets(args) -> int:
    presets = list_presets()
    if not presets:
        print('no presets installed', file=sys.stderr)
        return 0
    width = max(len(n) for n in presets)
    for name, path in presets.items():
        print(f'{name:<{width}}  {path}')
    return 0


# -- parser -------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    parser = _Parser(prog=PROG, description='U-Tuning (arXiv 2303.00690) for ModelScope: parameter-efficient '
                     'tuning of vision transformers.', epilog='See `modelscope-utuning COMMAND --help`.')
    parser.add_argument('--version', action='version', version=f'%(prog)s {__version__}')
    parser.add_argument('--traceback', action='store_true', help='show the full traceback when a command fails')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')

    p = sub.add_parser('train', help='fine-tune a model (U-Tuners + head) on a dataset',
                       description='Fine-tune MODEL on --train-data through ModelScope\'s trainer; the result is '
                       'WORK_DIR/output, a model folder for pipeline() / predict / push. Overrides: key=value '
                       '(JSON values), e.g. train.max_epochs=20 model.backbone.tuners=\'[{"type": "adapter", '
                       '"op": "ffn", "form": "parallel", "dim": 10}]\'.')
    p.add_argument('model', help='model folder, hub id, preset name or configuration .json')
    p.add_argument('overrides', nargs='*', metavar='key=value', help='configuration overrides')
    p.add_argument('--train-data', required=True, metavar='DATA', help='image folder, manifest or list file')
    p.add_argument('--eval-data', metavar='DATA', help='evaluated after training (class names as --train-data)')
    p.add_argument('--work-dir', help='default: work_dirs/<model>-<time>')
    p.add_argument('--epochs', type=int, help='train.max_epochs (and the cosine schedule\'s T_max)')
    p.add_argument('--batch-size', type=int, help='train.dataloader.batch_size_per_gpu')
    p.add_argument('--lr', type=float, help='train.optimizer.lr')
    p.add_argument('--backbone-weights', metavar='FILE',
                   help='pre-trained backbone (timm / HF / hub layout) for a model folder or preset without weights')
    p.add_argument('--resume', action='store_true',
                   help='continue the run in --work-dir from its newest readable epoch_N.pth (an unreadable newest '
                   'one falls back to the one before; none: start at epoch 1); without it, a work dir holding epoch '
                   'files is refused')
    p.add_argument('--json', action='store_true', help='print the result as JSON')
    p.set_defaults(func=cmd_train)

    p = sub.add_parser('eval', help='evaluate a trained model on a dataset',
                       description='Accuracy (and top-5 with more than 5 classes) of MODEL on --data; image-folder '
                       'classes are matched to the model\'s class names.')
    p.add_argument('model', help='trained model folder or hub id')
    p.add_argument('--data', required=True, metavar='DATA', help='image folder, manifest or list file')
    p.add_argument('--batch-size', type=int)
    p.add_argument('--work-dir', help='keep the evaluation logs here (default: a temporary folder)')
    p.add_argument('--json', action='store_true', help='print the metrics as JSON')
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser('predict', help='classify images (files, folders or URLs)',
                       description='Top-k classes of each image through pipeline(\'vision-efficient-tuning\').')
    p.add_argument('model', help='trained model folder or hub id; several, comma-separated, give one column each '
                              '(models on one backbone share it)')
    p.add_argument('inputs', nargs='+', metavar='IMAGE', help='image files, folders (searched recursively) or URLs')
    p.add_argument('--also', action='append', metavar='MODEL', help='a further model (repeatable)')
    p.add_argument('--backbone', metavar='FILE_OR_FOLDER',
                   help='the frozen backbone for model folders that hold only tuners (export --tuner-only)')
    p.add_argument('--topk', type=int, default=1, help='classes per image (default 1)')
    p.add_argument('--batch-size', type=int, default=16, help='images per forward pass (default 16)')
    p.add_argument('--device', default=None, help="'cpu', 'gpu' or 'cuda:N' (default: a GPU when there is one)")
    p.add_argument('--json', action='store_true', help='print a JSON list instead of a table')
    p.add_argument('--output', '-o', metavar='FILE', help='write the table / JSON to FILE')
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser('export', help='write tuner-only weights, a model folder with LoRA merged, or ONNX',
                       description='--tuner-only: adapter_model.safetensors + adapter_config.json (tuners, BitFit '
                       'biases, head; no backbone). --merge-lora: fold LoRA into the frozen weights and write a '
                       'new model folder that runs without the low-rank branch. --onnx: model.onnx (dynamic batch, '
                       'mergeable tuners folded in) + configuration.json + preprocessing.json, checked against '
                       'torch with onnxruntime (extra [onnx]).')
    p.add_argument('model', help='trained model folder or hub id')
    p.add_argument('out_dir', help='folder to write (must be new or empty unless --force)')
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument('--tuner-only', action='store_true')
    mode.add_argument('--merge-lora', action='store_true')
    mode.add_argument('--onnx', action='store_true')
    p.add_argument('--opset', type=int, help='with --onnx: ONNX opset (default: the exporter\'s)')
    p.add_argument('--int8', action='store_true',
                   help='with --onnx: int8 weights for the matrix products (onnxruntime\'s dynamic quantizer; '
                        'the head stays fp32)')
    p.add_argument('--base-weights', metavar='FILE',
                   help='with --tuner-only: record this frozen backbone file for model_from_tuners()')
    p.add_argument('--force', action='store_true', help='write into a non-empty folder')
    p.set_defaults(func=cmd_export)

    p = sub.add_parser('push', help='upload a model folder to the ModelScope hub',
                       description=f'Create OWNER/NAME if needed and upload MODEL_DIR with HubApi; the token comes '
                       f'from ${TOKEN_ENV}.')
    p.add_argument('model_dir', help='model folder (e.g. WORK_DIR/output)')
    p.add_argument('repo_id', metavar='OWNER/NAME')
    p.add_argument('--public', action='store_true', help='create the repository public (default private)')
    p.add_argument('--message', '-m', help='commit message')
    p.add_argument('--revision', default=None, help='branch to commit to (default master)')
    p.set_defaults(func=cmd_push)

    p = sub.add_parser('serve', help='web demo: upload an image, see its top-5 labels (Gradio)',
                       description='A Gradio page for MODEL through pipeline(\'vision-efficient-tuning\'); offline '
                       '(no analytics, no share link, system fonts). Needs the extra [gradio].')
    p.add_argument('model', help='trained model folder or hub id')
    p.add_argument('--host', default='127.0.0.1', help='address to listen on (default 127.0.0.1; 0.0.0.0 for all)')
    p.add_argument('--port', type=int, default=7860, help='default 7860')
    p.add_argument('--topk', type=int, default=5, help='labels shown (default 5)')
    p.add_argument('--device', default=None, help="'cpu', 'gpu' or 'cuda:N' (default: a GPU when there is one)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser('demo', help='the embedded demo: pre-train a tiny ViT, U-Tune it, predict (CPU, offline)',
                       description='Runs offline in a few minutes on 2 CPU cores on Fashion-MNIST images shipped '
                       'with the package; --quick takes well under a minute.')
    p.add_argument('--quick', action='store_true', help='a smaller, faster run')
    p.add_argument('--work-dir', help='default: a new temporary folder (kept)')
    p.add_argument('--show-logs', action='store_true', help="show ModelScope's training logs on the console")
    p.add_argument('--threads', type=int, help='torch threads (default 1: steady on a busy 2-core machine; '
                   '0: torch default)')
    p.add_argument('--json', action='store_true', help='also print the measured numbers as JSON')
    p.add_argument('--segmentation', action='store_true',
                   help='the semantic-segmentation demo instead: scenes composed from the same images')
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser('presets', help='list the configuration presets')
    p.set_defaults(func=cmd_presets)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:
            if getattr(args, 'command', None) == 'train' and not any(e.startswith('-') for e in extra):
                args.overrides = list(args.overrides) + extra  # key=value after the options
            else:
                parser.error(f'unrecognized arguments: {" ".join(extra)}')
    except SystemExit as e:  # --help, --version, or a parse error (already printed)
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    if not getattr(args, 'command', None):
        parser.print_help(sys.stderr)
        return 2
    prog = f'{PROG} {args.command}'
    try:
        return int(args.func(args) or 0)
    except CLIError as e:
        print(f'{prog}: error: {e}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f'{prog}: interrupted', file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `modelscope-utuning predict ... | head`: the reader left, nothing to report
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that Python's final flush does not fail again
        return 1
    except (ValueError, OSError, RuntimeError, TypeError, KeyError) as e:
        if args.traceback:
            raise
        print(f'{prog}: error: {type(e).__name__}: {e}' if isinstance(e, (KeyError, TypeError)) else
              f'{prog}: error: {e}', file=sys.stderr)
        print(f'(run `{PROG} --traceback {args.command} ...` for the full traceback)', file=sys.stderr)
        return 1


if __name__ == '__main__':
    sys.exit(main())
