"""Few-shot accuracy of the tuning methods on a real pre-trained backbone and real data, over a learning-rate sweep.

    python benchmarks/accuracy.py                                   # every method x lr x seed below
    python benchmarks/accuracy.py --methods linear utuning_tri --lrs 1e-3 1e-2 --seeds 0
    python benchmarks/accuracy.py --render-only                     # rewrite the README table from the results

Backbone: DINOv2 ViT-S/14 (Hugging Face layout, ``--weights``; made by ``../shared/tools/real_backbone.py``),
loaded through ``model.backbone.pretrained_weights`` of configuration.json, run at ``--img-size`` 112 (8 x 8
patches; the position embedding is resampled by the package). Data: Fashion-MNIST (IDX files, ``--data``):
``--shots`` images per class for training, drawn with the seed from the official train split, and
``--test-per-class`` images per class (balanced) from the official test split, also drawn with the seed. The
images are written as grayscale PNGs in an image-folder layout; the package's loader makes them RGB.

``--dataset colour``: real colour photographs and drawings of 10 object classes (Debian's Tux Paint stamps, GPL-2,
``apt-get install -y tuxpaint-stamps-default``), made at run time by ``../shared/tools/colour_objects.py`` in the
scratch folder (or ``--colour-dir``, an existing output of it; never commit the images). Per seed, ``--shots``
(default 5) images per class are drawn for training and every other image of the class (109 of the 159) is the
test set; 20 epochs of batch 10 by default. ``--curves [EVERY]`` records the per-epoch training loss and, every
EVERY epochs, the accuracy on the training and the test images; ``--set KEY=JSON`` changes one configuration key
after everything else (e.g. ``--set train.probe_epochs=auto``) and ``--tag`` keeps such runs apart.

Every run goes through the public API only: a model directory holding configuration.json alone (no weights
beside it; ``pretrained_weights`` = the DINOv2 file; head ``num_classes`` 10), then ``build_trainer(name=
Trainers.vision_efficient_tuning, default_args=dict(model=dir, work_dir=..., train_dataset=folder, eval_dataset=
folder, cfg_modify_fn=...))``, ``.train()``, one evaluation at the end. ``cfg_modify_fn`` sets the method (legacy
``*_length`` keys as ModelScope's own tests do, or ``model.backbone.tuners``) and the learning rate; everything
else is the trainer's default (AdamW, cosine by epoch, the trainer's warm-up over the first 10 % of the steps, the
head's own learning rate max(lr, 1e-2)), except ``--precision``. Tuner methods and the linear probe sweep
``--lrs`` (for the probe that is the head's rate, ``head_lr`` set to it); full fine-tuning sweeps ``--full-lrs`` for the backbone (head at
the default). Results go to ``--out`` (JSON: every run with its command, loss and timings; runs of other
settings are kept apart) and the table between the markers in benchmarks/README.md. One run at a time per
process; several processes (e.g. ``--threads 1`` each, different methods) may share ``--out``.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gzip
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_WEIGHTS = '/tmp/dinov2_vits14.safetensors'
DEFAULT_DATA = '/usr/share/datasets/fashion-mnist'
DEFAULT_OUT = os.path.join(HERE, 'results', 'accuracy_sweep.json')
COLOUR_OUT = os.path.join(HERE, 'results', 'accuracy_colour.json')
README = os.path.join(HERE, 'README.md')
SECTION = '## Accuracy (real backbone, Fashion-MNIST few-shot)'
TABLE_START, TABLE_END = '<!-- accuracy-table:start -->', '<!-- accuracy-table:end -->'
CLASS_NAMES = ['T-shirt-top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag',
               'Ankle boot']
# --dataset colour: real colour photos and drawings, 10 classes, made by the team's offline tool from Debian's
# Tux Paint stamps (GPL-2: made at benchmark time in the scratch folder, never committed).
COLOUR_TOOL = os.path.join(os.path.dirname(HERE), '..', 'shared', 'tools', 'colour_objects.py')
COLOUR_CLASSES = ['vehicle', 'roadsign', 'money', 'chess', 'christmas', 'halloween', 'easter', 'hanukkah', 'insect',
                  'sport']
COLOUR_SECTION = '## Accuracy (real backbone, colour objects few-shot)'
# per dataset: shots, test images per class, epochs, batch (the colour setting: 5 shots, 20 epochs, 10)
DATASET_DEFAULTS = {'fashion-mnist': dict(shots=10, test_per_class=50, epochs=15, batch=25),
                    'colour': dict(shots=5, test_per_class=None, epochs=20, batch=10)}

# DINOv2 ViT-S/14 as our VisionTransformer arguments (see checkpoint/converters.py).
BACKBONE = {'patch_size': 14, 'embed_dim': 384, 'depth': 12, 'num_heads': 6, 'init_values': 1.0,
            'norm_eps': 1e-6, 'qkv_bias': True, 'global_pool': 'token'}

TUNER_SIZE = 10  # adapter dim, prefix / prompt length, LoRA rank: ModelScope's tests use 10 for all of them
P_ADAPTER_MHA = {'type': 'adapter', 'op': 'mha', 'form': 'parallel', 'dim': TUNER_SIZE}
P_ADAPTER_FFN = {'type': 'adapter', 'op': 'ffn', 'form': 'parallel', 'dim': TUNER_SIZE}
P_PREFIX_BLOCK = {'type': 'prefix', 'op': 'block', 'form': 'parallel', 'length': TUNER_SIZE}
TRI = [P_ADAPTER_MHA, P_ADAPTER_FFN, P_PREFIX_BLOCK]
VERTICAL = {'type': 'vertical', 'dim': TUNER_SIZE}

# name -> (label, edit of cfg.model), in table order. Methods whose tuner kind this package version lacks are
# skipped with a note.
METHODS: Dict[str, Any] = {
    'linear': ('Linear probing (head only)', {}),
    'full': ('Full fine-tuning', {'freeze_cfg': {'train_part': {'backbone': ['']}}}),
    'adapter': ('Adapter (original: sequential, ffn, dim 10)', {'legacy': ('adapter_length', TUNER_SIZE)}),
    'prefix': ('Prefix (original: sequential, mha, length 10)', {'legacy': ('prefix_length', TUNER_SIZE)}),
    'prompt': ('Prompt (original: VPT-deep, length 10)', {'legacy': ('prompt_length', TUNER_SIZE)}),
    'lora': ('LoRA (qkv, rank 10)', {'legacy': ('lora_length', TUNER_SIZE)}),
    'lora_plain': ('LoRA, plain (A and B at one lr: lr_ratio 1, as before LoRA+)',
                   {'tuners': [{'type': 'lora', 'op': 'mha', 'rank': TUNER_SIZE, 'lr_ratio': 1}]}),
    'utuning_single': ('U-Tuning single: P-Adapter ffn', {'tuners': [P_ADAPTER_FFN]}),
    'utuning_dual': ('U-Tuning dual: P-Adapter mha + ffn', {'tuners': [P_ADAPTER_MHA, P_ADAPTER_FFN]}),
    'utuning_tri': ('U-Tuning tri: P-Adapter mha + ffn + P-Prefix block', {'tuners': TRI}),
    'utuning_tri_bypass': ('U-Tuning tri, bypass (lateral side path only)', {'tuners': TRI, 'bypass': True}),
    'utuning_tri_bypass_vertical': ('U-Tuning tri, bypass + vertical tuner (Res-Tuning-Bypass)',
                                    {'tuners': TRI + [VERTICAL], 'bypass': True}),
    'ssf': ('SSF (scale & shift on mha + ffn)', {'tuners': [{'type': 'ssf', 'op': 'mha'}, {'type': 'ssf', 'op': 'ffn'}]}),
    'repadapter': ('RepAdapter (linear, before mha + ffn, dim 10)',
                   {'tuners': [{'type': 'repadapter', 'op': 'mha', 'dim': TUNER_SIZE},
                               {'type': 'repadapter', 'op': 'ffn', 'dim': TUNER_SIZE}]}),
}
TUNER_LRS = [5e-4, 1e-3, 2e-3, 5e-3, 1e-2]
FULL_LRS = [1e-5, 3e-5, 1e-4, 3e-4]


def kinds_of(method: str) -> List[str]:
    edit = METHODS[method][1]
    return [e['type'] for e in edit.get('tuners', [])]


# -- data --------------------------------------------------------------------------------------------------------
def read_idx(path: str) -> np.ndarray:
    """An IDX file (optionally .gz) as a NumPy array."""
    opener = gzip.open if path.endswith('.gz') else open
    with opener(path, 'rb') as f:
        data = f.read()
    if data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f'{path}: not an unsigned-byte IDX file')
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _idx_file(folder: str, stem: str) -> str:
    for name in (stem, stem + '.gz'):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise FileNotFoundError(f'{folder}: no {stem}(.gz)')


def load_fashion_mnist(folder: str):
    out = {}
    for split, prefix in (('train', 'train'), ('test', 't10k')):
        images = read_idx(_idx_file(folder, f'{prefix}-images-idx3-ubyte'))
        labels = read_idx(_idx_file(folder, f'{prefix}-labels-idx1-ubyte'))
        out[split] = (images, labels)
    return out


def sample_per_class(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    picked = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in range(len(CLASS_NAMES))]
    return np.concatenate(picked)


def colour_pool(folder: str) -> Dict[str, List[str]]:
    """class -> sorted image paths, over both splits the tool wrote (we draw our own split per seed)."""
    pool = {c: [] for c in COLOUR_CLASSES}
    for split in ('train', 'test'):
        for c in COLOUR_CLASSES:
            d = os.path.join(folder, split, c)
            if os.path.isdir(d):
                pool[c] += [os.path.join(d, n) for n in os.listdir(d) if n.endswith('.png')]
    missing = [c for c, v in pool.items() if not v]
    if missing:
        raise FileNotFoundError(f'{folder}: no images of {missing}; make it with {COLOUR_TOOL} OUT_DIR')
    return {c: sorted(v) for c, v in pool.items()}


def make_colour_pool(scratch: str) -> str:
    out = os.path.join(scratch, 'colour_objects')
    subprocess.run([sys.executable, COLOUR_TOOL, out], check=True, capture_output=True)
    return out


def write_colour_split(pool: Dict[str, List[str]], shots: int, seed: int, root: str):
    """``shots`` images per class drawn with the seed for training, every other image of the class for testing
    (image-folder layout, copies)."""
    rng = np.random.default_rng(seed)
    for c, files in pool.items():
        order = [files[i] for i in rng.permutation(len(files))]
        for split, part in (('train', order[:shots]), ('test', order[shots:])):
            os.makedirs(os.path.join(root, split, c), exist_ok=True)
            for f in part:
                shutil.copy(f, os.path.join(root, split, c, os.path.basename(f)))
    return os.path.join(root, 'train'), os.path.join(root, 'test')


def write_split(images: np.ndarray, labels: np.ndarray, indices: np.ndarray, root: str) -> str:
    """Grayscale PNGs under ``root/<class>/`` (image-folder layout; the loader converts them to RGB)."""
    from PIL import Image
    for name in CLASS_NAMES:
        os.makedirs(os.path.join(root, name), exist_ok=True)
    for i in indices:
        Image.fromarray(images[i], mode='L').save(os.path.join(root, CLASS_NAMES[labels[i]], f'{i:05d}.png'))
    return root


# -- configuration -----------------------------------------------------------------------------------------------
def base_configuration(weights: str, img_size: int) -> Dict[str, Any]:
    """configuration.json of the model directory (no weights beside it): DINOv2 ViT-S/14, fresh 10-class head."""
    from modelscope_utuning.training.defaults import model_configuration
    return model_configuration(
        backbone=dict(BACKBONE, img_size=img_size, pretrained_weights=os.path.abspath(weights)),
        head={'num_classes': len(CLASS_NAMES)},
        # 28-px images straight to img_size: eval resize to img_size then a center crop of img_size (no
        # 256-style resize-then-crop that would cut the garment's edges); mild random crops and flips to train.
        # Normalisation: ImageNet statistics (the package default), which DINOv2 was trained with.
        preprocessor={'type': 'vision-efficient-tuning-preprocessor', 'img_size': img_size,
                      'interpolation': 'bilinear',
                      'val': {'resize': img_size},
                      'train': {'scale': [0.75, 1.0], 'ratio': [0.9, 1.1], 'hflip': 0.5}})


def write_model_dir(model_dir: str, weights: str, img_size: int) -> str:
    """A new model directory holding only :func:`base_configuration`'s configuration.json; returns it."""
    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(model_dir, 'configuration.json'), 'w') as f:
        json.dump(base_configuration(weights, img_size), f, indent=2)
    return model_dir


def make_cfg_modify_fn(method: str, lr: float, s: argparse.Namespace) -> Callable:
    edit = METHODS[method][1]

    def cfg_modify_fn(cfg):
        # The seed's edits ...
        cfg.model.head.num_classes = len(CLASS_NAMES)
        cfg.train.max_epochs = s.epochs
        cfg.train.lr_scheduler.T_max = s.epochs
        # ... the method ...
        if 'legacy' in edit:
            key, value = edit['legacy']
            cfg.model.backbone[key] = value  # as ModelScope's own per-method tests do
        if 'tuners' in edit:
            cfg.model.backbone.tuners = copy.deepcopy(edit['tuners'])
        if edit.get('bypass'):
            cfg.model.backbone.bypass = True
        if 'freeze_cfg' in edit:
            cfg.model.freeze_cfg = copy.deepcopy(edit['freeze_cfg'])
        # ... and the learning rate; everything else stays the trainer's default.
        cfg.train.optimizer.lr = lr
        if method == 'linear':  # the probe sweeps the head's own rate
            cfg.train.optimizer.head_lr = lr
        cfg.train.amp = s.precision
        cfg.train.dataloader.batch_size_per_gpu = s.batch
        cfg.train.dataloader.workers_per_gpu = 0
        cfg.evaluation.dataloader.batch_size_per_gpu = 100
        cfg.evaluation.dataloader.workers_per_gpu = 0
        cfg.evaluation.period = {'interval': s.epochs}  # one evaluation, at the end
        cfg.train.checkpoint = {'period': {'interval': s.epochs}}  # one epoch_N.pth, at the end
        cfg.train.logging = {'interval': 1}
        for dotted, value in s.set:  # --set KEY=VALUE: e.g. the previous defaults, for comparison
            node = cfg
            *parents, last = dotted.split('.')
            for k in parents:
                if k not in node or node[k] is None:
                    node[k] = {}
                node = node[k]
            node[last] = value
        return cfg
    return cfg_modify_fn


def available(method: str) -> bool:
    from modelscope_utuning.tuners import tuner_kinds
    return all(k in tuner_kinds() for k in kinds_of(method))


# -- running -----------------------------------------------------------------------------------------------------
def run_one(method: str, lr: float, seed: int, s: argparse.Namespace, train_dir: str, test_dir: str,
            scratch: str) -> Dict[str, Any]:
    import torch
    from modelscope.metainfo import Trainers
    from modelscope.trainers import build_trainer
    import modelscope_utuning  # noqa: F401  (registers the plugin)

    tag = f'{method}_lr{lr:g}_s{seed}'
    model_dir, work_dir = os.path.join(scratch, tag + '_model'), os.path.join(scratch, tag + '_work')
    write_model_dir(model_dir, s.weights, s.img_size)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    curve = CurveHook(train_dir, test_dir, s.curves) if s.curves else None
    trainer = build_trainer(name=Trainers.vision_efficient_tuning, default_args=dict(
        model=model_dir, work_dir=work_dir, train_dataset=train_dir, eval_dataset=test_dir,
        cfg_modify_fn=make_cfg_modify_fn(method, lr, s), seed=seed, callbacks=[curve] if curve else None))
    t1 = time.perf_counter()
    trainer.train()
    t2 = time.perf_counter()
    result = dict(trainer.metric_values or {})
    if 'accuracy' not in result:
        result = trainer.evaluate()
    t3 = time.perf_counter()
    model = trainer.model_unwrapped
    trainable, total = model.trainable_parameters()
    head = sum(p.numel() for p in model.head.parameters())
    losses = []
    log_json = os.path.join(work_dir, f'{trainer.timestamp}.log.json')
    if os.path.isfile(log_json):
        with open(log_json) as f:
            losses = [r['loss'] for r in map(json.loads, filter(str.strip, f)) if r.get('mode') == 'train'
                      and 'loss' in r]
    groups = {g.get('initial_lr', g.get('lr')) for g in trainer.optimizer.param_groups}
    entry = {
        'method': method, 'label': METHODS[method][0], 'lr': lr, 'seed': seed,
        'top1': float(result['accuracy']),
        'top5': float(result['top5-accuracy']) if 'top5-accuracy' in result else None,
        'trainable_params': int(trainable), 'trainable_params_excl_head': int(trainable - head),
        'total_params': int(total), 'optimizer_lrs': sorted(float(x) for x in groups),
        'build_s': round(t1 - t0, 1), 'train_s': round(t2 - t1, 1), 'eval_s': round(t3 - t2, 1),
        'first_loss': losses[0] if losses else None, 'last_loss': losses[-1] if losses else None,
        'min_loss': min(losses) if losses else None, 'nan': any(not np.isfinite(v) for v in losses),
        'command': f'python benchmarks/accuracy.py --methods {method} --lrs {lr:g} --seeds {seed}'
                   + (f' --dataset {s.dataset}' if s.dataset != 'fashion-mnist' else '')
                   + ''.join(f' --set {k}={json.dumps(v)}' for k, v in s.set)
                   + (f' --tag {s.tag}' if s.tag else '')
                   + (f' --curves {s.curves}' if s.curves else '')
                   + (f' --precision {s.precision}' if s.precision != 'fp32' else '')
                   + (f' --threads {s.threads}' if s.threads != 2 else '')
                   + (f' --img-size {s.img_size}' if s.img_size != 112 else '')
                   + (f' --epochs {s.epochs}' if s.epochs != DATASET_DEFAULTS[s.dataset]['epochs'] else ''),
    }
    if curve is not None:
        entry['curve'] = curve.rows
    if not s.keep:
        shutil.rmtree(model_dir, ignore_errors=True)
        shutil.rmtree(work_dir, ignore_errors=True)
    return entry


def _hook_base():
    from modelscope.trainers.hooks import Hook
    return Hook


class CurveHook(_hook_base()):
    """``--curves``: after every epoch, the epoch's mean training loss and the model's accuracy on the training
    images (eval transform) and on the test images, into ``rows`` (one dict per epoch). Reads no random numbers."""

    def __init__(self, train_dir: str, test_dir: str, every: int = 1):
        self.every = every
        self.dirs = {'train': train_dir, 'test': test_dir}
        self.rows: List[Dict[str, Any]] = []
        self.losses: List[float] = []

    def before_run(self, trainer):
        import torch
        from modelscope.utils.constant import ModeKeys
        self.data = {}
        for role, d in self.dirs.items():
            ds = trainer.build_dataset(d, trainer.cfg, ModeKeys.EVAL, preprocessor=trainer.eval_preprocessor)
            items = [ds[i] for i in range(len(ds))]
            self.data[role] = (torch.stack([it['imgs'] for it in items]),
                               torch.as_tensor([int(it['labels']) for it in items]))
        self.rows.append(dict(epoch=0, loss=None, **self._accuracies(trainer)))

    def after_train_iter(self, trainer):
        self.losses.append(float(trainer.train_outputs['loss']))

    def _accuracies(self, trainer):
        import torch
        model = trainer.model_unwrapped
        was = model.training
        model.eval()
        out = {}
        with torch.no_grad():
            for role, (x, y) in self.data.items():
                pred = torch.cat([model({'imgs': x[i:i + 64]})['labels'] for i in range(0, len(y), 64)])
                out[f'{role}_acc'] = float((pred == y).float().mean())
        model.train(was)
        return out

    def after_train_epoch(self, trainer):
        loss = statistics.mean(self.losses) if self.losses else None
        self.losses = []
        epoch = trainer.epoch + 1
        if epoch % self.every and epoch != trainer.max_epochs:
            self.rows.append(dict(epoch=epoch, loss=loss))
            return
        self.rows.append(dict(epoch=epoch, loss=loss, **self._accuracies(trainer)))
        print('curve ' + json.dumps(self.rows[-1]), flush=True)


def lscpu() -> Dict[str, str]:
    try:
        out = subprocess.run(['lscpu'], capture_output=True, text=True, check=False).stdout
    except OSError:
        return {}
    info = dict(line.split(':', 1) for line in out.splitlines() if ':' in line)
    flags = info.get('Flags', '').split()
    keep = [f for f in flags if f.startswith(('avx', 'amx')) or f in ('fma', 'f16c')]
    return {'model_name': info.get('Model name', '').strip(), 'flags': ' '.join(keep)}


def cpu_record() -> Dict[str, str]:
    """The CPU as the jsonl benchmarks record it beside every row: ``{'model', 'flags'}`` (lscpu)."""
    cpu = lscpu()
    return {'model': cpu.get('model_name') or platform.processor(), 'flags': cpu.get('flags', '')}


def read_rows(path: str) -> List[Dict[str, Any]]:
    """The rows of a jsonl results file (none when it does not exist yet)."""
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def append_rows(path: str, rows: List[Dict[str, Any]]) -> None:
    """Append ``rows`` to a jsonl results file, creating its folder; each row is one line."""
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    with open(path, 'a') as f:
        for r in rows:
            f.write(json.dumps(r) + '\n')


def machine_info(threads: int) -> Dict[str, Any]:
    import torch
    import modelscope
    cpu = lscpu()
    return {'cpu': cpu.get('model_name') or platform.processor(), 'cpu_flags': cpu.get('flags', ''),
            'logical_cpus': os.cpu_count(), 'torch': torch.__version__, 'torch_threads': threads,
            'modelscope': modelscope.__version__, 'python': platform.python_version(),
            'note': 'CPUs shared with other jobs at times: wall times are indicative only'}


def settings_of(s: argparse.Namespace) -> Dict[str, Any]:
    from modelscope_utuning.training.defaults import DEFAULT_DROP_PATH, DEFAULT_HEAD_LR, DEFAULTS, PARALLEL_SPEED_LR
    from modelscope_utuning.tuners.parallel import DEFAULT_SCALE_INIT
    opt = DEFAULTS['train']['optimizer']
    return {'dataset': s.dataset, 'tag': s.tag, 'overrides': {k: v for k, v in s.set},
            'backbone': 'DINOv2 ViT-S/14 (' + os.path.basename(s.weights) + ')', 'img_size': s.img_size,
            'shots': s.shots, 'test_per_class': s.test_per_class, 'epochs': s.epochs, 'batch': s.batch,
            'optimizer': f'trainer default: {json.dumps(opt)}', 'head_lr': f'trainer default: max(lr, {DEFAULT_HEAD_LR:g})',
            'schedule': f'cosine by epoch, T_max={s.epochs}; trainer warm-up over the first 10% of the steps',
            'drop_path': f'trainer default: {DEFAULT_DROP_PATH:g} while tuners or the backbone train in standard mode, '
                         '0 for the probe and in bypass mode (train.drop_path auto)',
            'parallel_scale_init': f'trainer default: max({DEFAULT_SCALE_INIT:g}, {PARALLEL_SPEED_LR:g} / lr) for '
                                   'parallel adapters and prefixes (policy rule 9)',
            'precision': s.precision, 'tuner_size': TUNER_SIZE,
            'train_aug': f'RandomResizedCrop({s.img_size}, scale 0.75-1, ratio 0.9-1.1) + hflip 0.5',
            'eval_transform': f'resize {s.img_size} + center crop {s.img_size}'}


def load_results(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def key_of(settings: Dict[str, Any]) -> str:
    key = f'{settings["img_size"]}px-{settings["precision"]}-{settings["epochs"]}ep'
    if settings.get('dataset', 'fashion-mnist') != 'fashion-mnist':
        key = f'{settings["dataset"]}-{key}'
    return key + (f'-{settings["tag"]}' if settings.get('tag') else '')


def summarize(runs: List[Dict[str, Any]], seeds: List[int]) -> List[Dict[str, Any]]:
    """One row per method (table order): per lr the mean top-1 over seeds (and whether every seed ran), the best lr
    and its mean, min and max, parameters, the fastest train time."""
    rows = []
    for method in METHODS:
        mine = [r for r in runs if r['method'] == method]
        if not mine:
            continue
        per_lr = {}
        for lr in sorted({r['lr'] for r in mine}):
            accs = [r['top1'] for r in mine if r['lr'] == lr]
            per_lr[lr] = {'mean': statistics.mean(accs), 'min': min(accs), 'max': max(accs), 'n': len(accs),
                          'nan': any(r['nan'] for r in mine if r['lr'] == lr)}
        complete = {lr: v for lr, v in per_lr.items() if v['n'] == len(seeds)} or per_lr
        best = max(complete, key=lambda lr: complete[lr]['mean'])
        rows.append({'method': method, 'label': mine[0]['label'], 'per_lr': per_lr, 'best_lr': best,
                     'best': complete[best], 'trainable_params': mine[0]['trainable_params'],
                     'trainable_params_excl_head': mine[0]['trainable_params_excl_head'],
                     'total_params': mine[0]['total_params'],
                     'train_s_min': min(r['train_s'] for r in mine)})
    return rows


def markdown_table(summary: List[Dict[str, Any]], seeds: List[int]) -> str:
    lrs = TUNER_LRS
    head = ('| method | trainable (% of all) | ' + ' | '.join(f'lr {lr:g}' for lr in lrs)
            + f' | best (mean [min, max] of {len(seeds)} seeds) | train time |')
    lines = [head, '|---|---:|' + '---:|' * len(lrs) + '---:|---:|']
    for r in summary:
        def cell(lr):
            v = r['per_lr'].get(lr)
            if v is None:
                return '–'
            mark = '' if v['n'] == len(seeds) else f' ({v["n"]})'
            return ('NaN ' if v['nan'] else '') + f'{100 * v["mean"]:.1f}{mark}'
        cells = [cell(lr) for lr in lrs]
        if r['method'] == 'full':  # its own range: list it in the lr cells' place
            cells = [', '.join(f'{lr:g}: {100 * v["mean"]:.1f}' for lr, v in sorted(r['per_lr'].items()))] + \
                    [''] * (len(lrs) - 1)
        b = r['best']
        pct = 100.0 * r['trainable_params'] / max(r['total_params'], 1)
        lines.append(f'| {r["label"]} | {r["trainable_params"]:,} ({pct:.2f}%) | ' + ' | '.join(cells)
                     + f' | **{100 * b["mean"]:.1f}** [{100 * b["min"]:.1f}, {100 * b["max"]:.1f}] at {r["best_lr"]:g}'
                     + f' | {r["train_s_min"]:.0f} s |')
    return '\n'.join(lines)


def few_shot_arguments(ap: argparse.ArgumentParser, epochs: int = 15) -> argparse.ArgumentParser:
    """The options the real-backbone Fashion-MNIST benchmarks share (int8.py, feature_cache.py, tasks.py)."""
    ap.add_argument('--weights', default=DEFAULT_WEIGHTS)
    ap.add_argument('--data', default=DEFAULT_DATA)
    ap.add_argument('--shots', type=int, default=10)
    ap.add_argument('--test-per-class', type=int, default=50)
    ap.add_argument('--img-size', type=int, default=112)
    ap.add_argument('--epochs', type=int, default=epochs)
    ap.add_argument('--lr', type=float, default=2e-3)
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--threads', type=int, default=2)
    return ap


def commands_line(rows: List[Dict[str, Any]]) -> List[str]:
    """The README lines naming the commands that made ``rows`` (where they wrote left out)."""
    commands = sorted({re.sub(r' --out \S+', '', r['command']) for r in rows})
    return ['', 'Commands: ' + ', '.join(f'`{c}`' for c in commands) + '.', '']


def update_readme(table: str, path: str = README, start: str = TABLE_START, end: str = TABLE_END,
                  section: str = SECTION) -> None:
    """Put ``table`` between the markers, creating the section (or the file) when missing; other sections are
    left as they are."""
    block = f'{start}\n{table}\n{end}'
    text = open(path).read() if os.path.isfile(path) else '# Benchmarks\n'
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        if section not in text:
            text = text.rstrip('\n') + f'\n\n{section}\n\n'
        head, tail = text.split(section, 1)
        text = head + section + '\n\n' + block + '\n' + tail.lstrip('\n')
    with open(path, 'w') as f:
        f.write(text)


def render(doc: Dict[str, Any], readme: bool = True) -> None:
    for key, part in doc.get('settings_runs', {}).items():
        seeds = sorted({r['seed'] for r in part['runs']})
        part['summary'] = summarize(part['runs'], seeds)
        if readme:
            colour = part['settings'].get('dataset') == 'colour'
            update_readme(markdown_table(part['summary'], seeds), start=f'<!-- accuracy-table:{key}:start -->',
                          end=f'<!-- accuracy-table:{key}:end -->', section=COLOUR_SECTION if colour else SECTION)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--methods', nargs='+', default=list(METHODS), choices=list(METHODS))
    ap.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2],
                    help='each seed draws its own few-shot split and test set and seeds the trainer')
    ap.add_argument('--lrs', nargs='+', type=float, default=TUNER_LRS, help='tuner methods and the linear probe')
    ap.add_argument('--full-lrs', nargs='+', type=float, default=FULL_LRS, help='full fine-tuning (backbone)')
    ap.add_argument('--dataset', default='fashion-mnist', choices=list(DATASET_DEFAULTS),
                    help='colour: 10 classes of real colour photos / drawings (Tux Paint stamps, made at run time by '
                         '../shared/tools/colour_objects.py; needs tuxpaint-stamps-default): --shots per class drawn '
                         'with the seed, every other image of the class is the test set')
    ap.add_argument('--colour-dir', help='an existing output of colour_objects.py (default: made in the scratch '
                                         'folder)')
    ap.add_argument('--epochs', type=int, help='default: 15 (fashion-mnist), 20 (colour)')
    ap.add_argument('--shots', type=int, help='training images per class; default 10 (fashion-mnist), 5 (colour)')
    ap.add_argument('--test-per-class', type=int, help='fashion-mnist: default 50')
    ap.add_argument('--img-size', type=int, default=112)
    ap.add_argument('--batch', type=int, help='default 25 (fashion-mnist: four equal steps per epoch at 10 shots), '
                                              '10 (colour)')
    ap.add_argument('--set', action='append', default=[], type=_key_value, metavar='KEY=JSON',
                    help='set a configuration key in cfg_modify_fn after everything else (e.g. the previous '
                         'defaults: --set train.drop_path=0); results go under a settings key of their own '
                         'only with --tag')
    ap.add_argument('--tag', default='', help='suffix of the settings key (keeps these runs apart in --out and the '
                                              'README)')
    ap.add_argument('--curves', type=int, nargs='?', const=1, default=0, metavar='EVERY',
                    help='per-epoch train loss, and every EVERY epochs (default 1) train and test accuracy (costs '
                         'one extra forward pass of both sets each time)')
    ap.add_argument('--precision', default='fp32', choices=['fp32', 'bf16', 'auto'])
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--weights', default=DEFAULT_WEIGHTS)
    ap.add_argument('--data', default=DEFAULT_DATA)
    ap.add_argument('--out', help='default: results/accuracy_sweep.json (fashion-mnist), results/accuracy_colour.json '
                                  '(colour)')
    ap.add_argument('--readme', action=argparse.BooleanOptionalAction, default=True,
                    help='update the tables in benchmarks/README.md')
    ap.add_argument('--keep', action='store_true', help='keep model / work dirs (under the temp folder)')
    ap.add_argument('--render-only', action='store_true', help='only rewrite the README tables from --out')
    s = ap.parse_args(argv)
    for k, v in DATASET_DEFAULTS[s.dataset].items():
        if getattr(s, k) is None:
            setattr(s, k, v)
    s.out = s.out or (COLOUR_OUT if s.dataset == 'colour' else DEFAULT_OUT)
    doc = load_results(s.out)
    if s.render_only:
        render(doc, s.readme)
        return 0

    import torch
    torch.set_num_threads(s.threads)
    if not os.path.isfile(s.weights):
        sys.exit(f'{s.weights} is missing: python ../shared/tools/real_backbone.py {s.weights}')
    methods = [m for m in s.methods if available(m) or print(f'{m}: a tuner kind it needs is not in this package '
                                                              'version; skipped', flush=True)]
    settings = settings_of(s)
    key = key_of(settings)
    scratch = tempfile.mkdtemp(prefix='utuning_acc_')
    print(f'scratch folder {scratch}; settings {json.dumps(settings)}', flush=True)
    try:
        if s.dataset == 'colour':
            pool = colour_pool(s.colour_dir or make_colour_pool(scratch))
        else:
            data = load_fashion_mnist(s.data)
        for seed in s.seeds:
            if s.dataset == 'colour':
                train_dir, test_dir = write_colour_split(pool, s.shots, seed, os.path.join(scratch, f'data_s{seed}'))
            else:
                train_idx = sample_per_class(data['train'][1], s.shots, seed)
                test_idx = sample_per_class(data['test'][1], s.test_per_class, 10_000 + seed)
                train_dir = write_split(*data['train'], train_idx, os.path.join(scratch, f'data_s{seed}', 'train'))
                test_dir = write_split(*data['test'], test_idx, os.path.join(scratch, f'data_s{seed}', 'test'))
            for method in methods:
                for lr in (s.full_lrs if method == 'full' else s.lrs):
                    print(f'=== {method} lr {lr:g} seed {seed} ({datetime.datetime.now():%H:%M:%S})', flush=True)
                    entry = run_one(method, lr, seed, s, train_dir, test_dir, scratch)
                    print(f'=== {method} lr {lr:g} seed {seed}: top-1 {100 * entry["top1"]:.1f}%  train '
                          f'{entry["train_s"]:.0f}s eval {entry["eval_s"]:.0f}s  loss {entry["first_loss"]} -> '
                          f'{entry["last_loss"]}', flush=True)
                    record(s, key, settings, entry)
    finally:
        if not s.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    return 0


def _key_value(text: str):
    key, sep, value = text.partition('=')
    if not sep or not key:
        raise argparse.ArgumentTypeError(f'{text!r}: expected KEY=JSON')
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def record(s: argparse.Namespace, key: str, settings: Dict[str, Any], entry: Dict[str, Any]) -> None:
    """Add one run to ``--out``: read the file afresh under a lock, replace the run of the same method, lr and seed,
    write it back atomically. Several sweeps (e.g. one thread each, split by method) can share one results file."""
    import fcntl
    os.makedirs(os.path.dirname(os.path.abspath(s.out)), exist_ok=True)
    with open(s.out + '.lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        doc = load_results(s.out)
        part = doc.setdefault('settings_runs', {}).setdefault(key, {'settings': settings, 'runs': []})
        cpu = lscpu()
        entry.setdefault('cpu', f"{cpu.get('model_name', '')} ({cpu.get('flags', '')})")
        same = (entry['method'], entry['lr'], entry['seed'])
        part['runs'] = [r for r in part['runs'] if (r['method'], r['lr'], r['seed']) != same] + [entry]
        doc['machine'] = machine_info(s.threads)
        doc['updated'] = datetime.datetime.now().isoformat(timespec='seconds')
        write_results(s, doc)


def write_results(s: argparse.Namespace, doc: Dict[str, Any]) -> None:
    render(doc, s.readme)
    for part in doc['settings_runs'].values():
        # a method this copy of the script does not know (a newer one wrote it) sorts last and is kept
        order = {m: i for i, m in enumerate(METHODS)}
        part['runs'].sort(key=lambda r: (order.get(r['method'], len(order)), r['method'], r['lr'], r['seed']))
    tmp = s.out + '.tmp'
    os.makedirs(os.path.dirname(os.path.abspath(s.out)), exist_ok=True)
    with open(tmp, 'w') as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, s.out)


if __name__ == '__main__':
    sys.exit(main())
