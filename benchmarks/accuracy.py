"""Few-shot accuracy of the tuning methods on a real pretrained backbone and real data.

    python benchmarks/accuracy.py                         # every method, the settings below
    python benchmarks/accuracy.py --methods linear utuning_tri --seeds 0 1 --epochs 20

Backbone: DINOv2 ViT-S/14 (Hugging Face layout, ``--weights``; made by ``../shared/tools/real_backbone.py``),
loaded through ``model.backbone.pretrained_weights`` of configuration.json and run at ``--img-size`` 56 (4x4
patches, position embedding resampled by the package). Data: Fashion-MNIST (IDX files, ``--data``): ``--shots``
images per class for training, drawn with the seed from the official train split, and ``--test-per-class``
images per class (balanced) from the official test split, also drawn with the seed. The images are written as
grayscale PNGs in an image-folder layout (one sub-directory per class); the package's loader makes them RGB.

Every method goes through the public API only: a model directory holding configuration.json alone (no
pytorch_model.pt; ``pretrained_weights`` = the DINOv2 file; head ``num_classes`` 10), then
``build_trainer(name=Trainers.vision_efficient_tuning, default_args=dict(model=dir, work_dir=..., train_dataset=
folder, eval_dataset=folder, cfg_modify_fn=...))``, ``.train()``, ``.evaluate()``. ``cfg_modify_fn`` sets the
method (legacy ``*_length`` keys as ModelScope's own tests do, or ``model.backbone.tuners``) and the schedule,
which is the same for every method except full fine-tuning's backbone learning rate.

Results go to ``--out`` (JSON; entries of earlier runs with the same settings are kept unless re-run) and the
table between the markers in benchmarks/README.md (``--readme``). One training process at a time.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gzip
import json
import os
import platform
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
DEFAULT_OUT = os.path.join(HERE, 'results', 'accuracy.json')
README = os.path.join(HERE, 'README.md')
SECTION = '## Accuracy (real backbone, Fashion-MNIST few-shot)'
TABLE_START, TABLE_END = '<!-- accuracy-table:start -->', '<!-- accuracy-table:end -->'
CLASS_NAMES = ['T-shirt-top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag',
               'Ankle boot']

# DINOv2 ViT-S/14 as our VisionTransformer arguments (see checkpoint/converters.py).
BACKBONE = {'patch_size': 14, 'embed_dim': 384, 'depth': 12, 'num_heads': 6, 'init_values': 1.0,
            'norm_eps': 1e-6, 'qkv_bias': True, 'global_pool': 'token'}

TUNER_SIZE = 10  # adapter dim, prefix / prompt length, LoRA rank: ModelScope's tests use 10 for all of them
P_ADAPTER_MHA = {'type': 'adapter', 'op': 'mha', 'form': 'parallel', 'dim': TUNER_SIZE, 'scale': 'channel'}
P_ADAPTER_FFN = {'type': 'adapter', 'op': 'ffn', 'form': 'parallel', 'dim': TUNER_SIZE, 'scale': 'channel'}
P_PREFIX_BLOCK = {'type': 'prefix', 'op': 'block', 'form': 'parallel', 'length': TUNER_SIZE, 'scale': 'channel',
                  'layers': 'all'}

# name -> (label, edit of cfg.model), in table order.
METHODS: Dict[str, Any] = {
    'linear': ('Linear probing (head only)', {}),
    # Linear probing is convex and under-fits in 60 steps at the shared head lr: also give it its own.
    'linear_hlr': ('Linear probing, own head lr 1e-2', {'head_lr': 1e-2}),
    'full': ('Full fine-tuning', {'freeze_cfg': {'train_part': {'backbone': ['']}}}),
    'adapter': ('Adapter (original: sequential, ffn, dim 10)', {'legacy': ('adapter_length', TUNER_SIZE)}),
    'prefix': ('Prefix (original: sequential, mha, length 10)', {'legacy': ('prefix_length', TUNER_SIZE)}),
    'prompt': ('Prompt (original: VPT-deep, length 10)', {'legacy': ('prompt_length', TUNER_SIZE)}),
    'lora': ('LoRA (qkv, rank 10)', {'legacy': ('lora_length', TUNER_SIZE)}),
    'utuning_single': ('U-Tuning single: P-Adapter ffn', {'tuners': [P_ADAPTER_FFN]}),
    'utuning_dual': ('U-Tuning dual: P-Adapter mha + ffn', {'tuners': [P_ADAPTER_MHA, P_ADAPTER_FFN]}),
    'utuning_tri': ('U-Tuning tri: P-Adapter mha + ffn + P-Prefix block',
                    {'tuners': [P_ADAPTER_MHA, P_ADAPTER_FFN, P_PREFIX_BLOCK]}),
    'utuning_tri_bypass': ('U-Tuning tri, bypass (side path on detached features)',
                           {'tuners': [P_ADAPTER_MHA, P_ADAPTER_FFN, P_PREFIX_BLOCK], 'bypass': True}),
}


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


def make_cfg_modify_fn(method: str, s: argparse.Namespace) -> Callable:
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
        # ... and one schedule for all (full fine-tuning: a smaller backbone lr, same head lr).
        cfg.train.optimizer = {'type': 'AdamW', 'lr': s.full_lr if method == 'full' else s.lr,
                               'head_lr': edit.get('head_lr', s.head_lr), 'weight_decay': s.weight_decay}
        cfg.train.amp = 'fp32'
        cfg.train.dataloader.batch_size_per_gpu = s.batch
        cfg.train.dataloader.workers_per_gpu = 0
        cfg.evaluation.dataloader.batch_size_per_gpu = 100
        cfg.evaluation.dataloader.workers_per_gpu = 0
        cfg.train.checkpoint = {'period': {'interval': s.epochs}}  # one epoch_N.pth, at the end
        cfg.train.logging = {'interval': 1}
        return cfg
    return cfg_modify_fn


def bypass_available() -> bool:
    from modelscope_utuning import backbone_config
    return 'bypass' in getattr(backbone_config, 'OUR_KEYS', ())


# -- running -----------------------------------------------------------------------------------------------------
def run_method(method: str, seed: int, s: argparse.Namespace, train_dir: str, test_dir: str, scratch: str
               ) -> Dict[str, Any]:
    import torch
    from modelscope.metainfo import Trainers
    from modelscope.trainers import build_trainer
    import modelscope_utuning  # noqa: F401  (registers the plugin)

    model_dir = os.path.join(scratch, f'{method}_s{seed}_model')
    work_dir = os.path.join(scratch, f'{method}_s{seed}_work')
    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(model_dir, 'configuration.json'), 'w') as f:
        json.dump(base_configuration(s.weights, s.img_size), f, indent=2)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    trainer = build_trainer(name=Trainers.vision_efficient_tuning, default_args=dict(
        model=model_dir, work_dir=work_dir, train_dataset=train_dir, eval_dataset=test_dir,
        cfg_modify_fn=make_cfg_modify_fn(method, s), seed=seed))
    t1 = time.perf_counter()
    trainer.train()
    t2 = time.perf_counter()
    result = trainer.evaluate()
    t3 = time.perf_counter()
    trainable, total = trainer.model_unwrapped.trainable_parameters()
    head = sum(p.numel() for p in trainer.model_unwrapped.head.parameters())
    losses = []
    log_json = os.path.join(work_dir, f'{trainer.timestamp}.log.json')
    if os.path.isfile(log_json):
        with open(log_json) as f:
            losses = [r['loss'] for r in map(json.loads, filter(str.strip, f)) if r.get('mode') == 'train'
                      and 'loss' in r]
    entry = {
        'method': method, 'label': METHODS[method][0], 'seed': seed,
        'top1': float(result['accuracy']),
        'top5': float(result['top5-accuracy']) if 'top5-accuracy' in result else None,
        'eval': {k: float(v) for k, v in result.items()},
        'trainable_params': int(trainable), 'trainable_params_excl_head': int(trainable - head),
        'total_params': int(total),
        'build_s': round(t1 - t0, 1), 'train_s': round(t2 - t1, 1), 'eval_s': round(t3 - t2, 1),
        'wall_s': round(t3 - t0, 1),
        'first_loss': losses[0] if losses else None, 'last_loss': losses[-1] if losses else None,
        'lr': s.full_lr if method == 'full' else s.lr,
        'head_lr': METHODS[method][1].get('head_lr', s.head_lr),
        'command': 'python benchmarks/accuracy.py ' + ' '.join(sys.argv[1:]),
    }
    if not s.keep:
        shutil.rmtree(model_dir, ignore_errors=True)
        shutil.rmtree(work_dir, ignore_errors=True)
    return entry


def machine_info(threads: int) -> Dict[str, Any]:
    import torch
    import modelscope
    model_name = None
    try:
        out = subprocess.run(['lscpu'], capture_output=True, text=True, check=False).stdout
        model_name = next((line.split(':', 1)[1].strip() for line in out.splitlines()
                           if line.startswith('Model name')), None)
    except OSError:
        pass
    return {'cpu': model_name or platform.processor(), 'logical_cpus': os.cpu_count(), 'torch': torch.__version__,
            'torch_threads': threads, 'modelscope': modelscope.__version__, 'python': platform.python_version(),
            'note': 'CPUs shared with other jobs: wall times are indicative only'}


def settings_of(s: argparse.Namespace) -> Dict[str, Any]:
    return {'backbone': 'DINOv2 ViT-S/14 (' + os.path.basename(s.weights) + ')', 'img_size': s.img_size,
            'shots': s.shots, 'test_per_class': s.test_per_class, 'epochs': s.epochs, 'batch': s.batch,
            'optimizer': 'AdamW', 'lr': s.lr, 'head_lr': s.head_lr, 'full_lr': s.full_lr,
            'weight_decay': s.weight_decay, 'schedule': f'cosine by epoch, T_max={s.epochs}, no warm-up',
            'precision': 'fp32', 'tuner_size': TUNER_SIZE,
            'train_aug': f'RandomResizedCrop({s.img_size}, scale 0.75-1, ratio 0.9-1.1) + hflip 0.5',
            'eval_transform': f'resize {s.img_size} + center crop {s.img_size}'}


def load_results(path: str, settings: Dict[str, Any]) -> List[Dict[str, Any]]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        old = json.load(f)
    if old.get('settings') != settings:
        print(f'{path}: earlier results used other settings; starting a fresh file', flush=True)
        return []
    return list(old.get('runs', []))


def summarize(runs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per method (table order): mean top-1 over seeds, its range, params, mean wall time."""
    rows = []
    for method in METHODS:
        mine = sorted((r for r in runs if r['method'] == method), key=lambda r: r['seed'])
        if not mine:
            continue
        accs = [r['top1'] for r in mine]
        rows.append({'method': method, 'label': mine[0]['label'], 'seeds': [r['seed'] for r in mine],
                     'top1_mean': statistics.mean(accs), 'top1_min': min(accs), 'top1_max': max(accs),
                     'per_seed': {str(r['seed']): r['top1'] for r in mine},
                     'trainable_params': mine[0]['trainable_params'],
                     'trainable_params_excl_head': mine[0]['trainable_params_excl_head'],
                     'wall_s_mean': statistics.mean(r['wall_s'] for r in mine),
                     'train_s_mean': statistics.mean(r['train_s'] for r in mine),
                     # The CPUs are shared: the fastest run is the closest to the method's own cost.
                     'train_s_min': min(r['train_s'] for r in mine),
                     'eval_s_min': min(r['eval_s'] for r in mine)})
    return rows


def markdown_table(summary: List[Dict[str, Any]], all_seeds: List[int]) -> str:
    lines = ['| method | trainable params (without the head) | top-1 % (' +
             ', '.join(f'seed {s}' for s in all_seeds) + ') | top-1 % mean [min, max] | train time | eval time |',
             '|---|---:|---|---:|---:|---:|']
    for r in summary:
        per = ', '.join(f'{100 * r["per_seed"][str(s)]:.1f}' if str(s) in r['per_seed'] else '–'
                        for s in all_seeds)
        spread = f' [{100 * r["top1_min"]:.1f}, {100 * r["top1_max"]:.1f}]' if len(r['seeds']) > 1 else ''
        lines.append(f'| {r["label"]} | {r["trainable_params"]:,} ({r["trainable_params_excl_head"]:,}) | {per} | '
                     f'**{100 * r["top1_mean"]:.1f}**{spread} | {r["train_s_min"]:.0f} s | {r["eval_s_min"]:.0f} s |')
    return '\n'.join(lines)


def update_readme(table: str, path: str = README) -> None:
    """Put ``table`` between the markers of our section, creating the section (or the file) when missing; other
    sections are left as they are."""
    block = f'{TABLE_START}\n{table}\n{TABLE_END}'
    text = open(path).read() if os.path.isfile(path) else '# Benchmarks\n'
    if TABLE_START in text and TABLE_END in text:
        head, rest = text.split(TABLE_START, 1)
        text = head + block + rest.split(TABLE_END, 1)[1]
    else:
        if SECTION not in text:
            text = text.rstrip('\n') + f'\n\n{SECTION}\n\n'
        head, tail = text.split(SECTION, 1)
        text = head + SECTION + '\n\n' + block + '\n' + tail.lstrip('\n')
    with open(path, 'w') as f:
        f.write(text)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--methods', nargs='+', default=list(METHODS), choices=list(METHODS))
    ap.add_argument('--seeds', nargs='+', type=int, default=[0],
                    help='each seed draws its own few-shot split and test set and seeds the trainer')
    ap.add_argument('--epochs', type=int, default=15)
    ap.add_argument('--shots', type=int, default=10, help='training images per class')
    ap.add_argument('--test-per-class', type=int, default=50)
    ap.add_argument('--img-size', type=int, default=56)
    ap.add_argument('--batch', type=int, default=25, help='25: four equal steps per epoch at 10 shots')
    ap.add_argument('--lr', type=float, default=1e-3, help='tuners (and anything trainable but the head)')
    ap.add_argument('--head-lr', type=float, default=1e-3)
    ap.add_argument('--full-lr', type=float, default=3e-5, help='backbone lr of full fine-tuning')
    ap.add_argument('--weight-decay', type=float, default=1e-4)
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--weights', default=DEFAULT_WEIGHTS)
    ap.add_argument('--data', default=DEFAULT_DATA)
    ap.add_argument('--out', default=DEFAULT_OUT)
    ap.add_argument('--readme', action=argparse.BooleanOptionalAction, default=True,
                    help='update the table in benchmarks/README.md')
    ap.add_argument('--keep', action='store_true', help='keep model / work dirs (under the temp folder)')
    ap.add_argument('--render-only', action='store_true', help='only rewrite the README table from --out')
    s = ap.parse_args(argv)
    if s.render_only:
        with open(s.out) as f:
            runs = json.load(f)['runs']
        update_readme(markdown_table(summarize(runs), sorted({r['seed'] for r in runs})))
        return 0

    import torch
    torch.set_num_threads(s.threads)
    if not os.path.isfile(s.weights):
        sys.exit(f'{s.weights} is missing: python ../shared/tools/real_backbone.py {s.weights}')
    methods = list(s.methods)
    if 'utuning_tri_bypass' in methods and not bypass_available():
        print('model.backbone.bypass is not in this package version: skipping utuning_tri_bypass', flush=True)
        methods.remove('utuning_tri_bypass')

    settings = settings_of(s)
    runs = load_results(s.out, settings)
    data = load_fashion_mnist(s.data)
    scratch = tempfile.mkdtemp(prefix='utuning_acc_')
    print(f'scratch folder {scratch}; settings {json.dumps(settings)}', flush=True)
    try:
        for seed in s.seeds:
            train_idx = sample_per_class(data['train'][1], s.shots, seed)
            test_idx = sample_per_class(data['test'][1], s.test_per_class, 10_000 + seed)
            train_dir = write_split(*data['train'], train_idx, os.path.join(scratch, f'data_s{seed}', 'train'))
            test_dir = write_split(*data['test'], test_idx, os.path.join(scratch, f'data_s{seed}', 'test'))
            for method in methods:
                print(f'=== {method} seed {seed} ({datetime.datetime.now():%H:%M:%S})', flush=True)
                entry = run_method(method, seed, s, train_dir, test_dir, scratch)
                print(f'=== {method} seed {seed}: top-1 {100 * entry["top1"]:.1f}%  trainable '
                      f'{entry["trainable_params"]:,}  train {entry["train_s"]:.0f}s  eval {entry["eval_s"]:.0f}s '
                      f'loss {entry["first_loss"]} -> {entry["last_loss"]}', flush=True)
                runs = [r for r in runs if not (r['method'] == method and r['seed'] == seed)] + [entry]
                write_results(s, settings, runs)
    finally:
        if not s.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    return 0


def write_results(s: argparse.Namespace, settings: Dict[str, Any], runs: List[Dict[str, Any]]) -> None:
    summary = summarize(runs)
    all_seeds = sorted({r['seed'] for r in runs})
    doc = {'command': 'python benchmarks/accuracy.py ' + ' '.join(sys.argv[1:]),
           'updated': datetime.datetime.now().isoformat(timespec='seconds'),
           'machine': machine_info(s.threads), 'settings': settings, 'summary': summary,
           'runs': sorted(runs, key=lambda r: (list(METHODS).index(r['method']), r['seed']))}
    os.makedirs(os.path.dirname(os.path.abspath(s.out)), exist_ok=True)
    with open(s.out, 'w') as f:
        json.dump(doc, f, indent=2)
    if s.readme:
        update_readme(markdown_table(summary, all_seeds))


if __name__ == '__main__':
    sys.exit(main())
