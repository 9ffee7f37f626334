"""Semantic segmentation on a frozen real backbone: mIoU, trainable share, training time and memory per method.

    python benchmarks/segmentation.py                       # every method below, one process each
    python benchmarks/segmentation.py --methods linear utuning_tri --size 112 --train 200 --epochs 10

Backbone: DINOv2 ViT-S/14 (``--weights``, made by ``../shared/tools/real_backbone.py``) through
``model.backbone.pretrained_weights``. Data: scenes composed by :mod:`modelscope_utuning.segmentation.scenes`
(seeded) from Debian's ``dataset-fashion-mnist`` (``--data``; training scenes from the official train split,
evaluation scenes from the test split): 2-5 items per scene on a textured background, exact masks, 11 classes
(background + the 10 Fashion-MNIST classes). Every run goes through the public API:
``build_trainer(name='vision-efficient-tuning-segmentation', default_args=dict(model=dir, train_dataset=folder,
eval_dataset=folder, cfg_modify_fn=...))``, ``train()``, ``evaluate()``, in a process of its own (so its peak
resident memory is its own). Results: ``--out`` (JSON lines, lscpu model and flags, command) and the table between
the markers in benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
README = os.path.join(HERE, 'README.md')
sys.path.insert(0, HERE)  # accuracy.py: the Fashion-MNIST reader, results files, lscpu, README tables
from accuracy import CLASS_NAMES, append_rows, cpu_record, load_fashion_mnist, read_rows, update_readme  # noqa: E402
TABLE_START, TABLE_END = '<!-- segmentation-table:start -->', '<!-- segmentation-table:end -->'
DEFAULT_OUT = os.path.join(HERE, 'results', 'segmentation.jsonl')
BACKBONE = {'patch_size': 14, 'embed_dim': 384, 'depth': 12, 'num_heads': 6, 'init_values': 1.0,
            'norm_eps': 1e-6, 'qkv_bias': True}
TRI = [{'type': 'adapter', 'op': 'mha', 'form': 'parallel', 'dim': 10},
       {'type': 'adapter', 'op': 'ffn', 'form': 'parallel', 'dim': 10},
       {'type': 'prefix', 'op': 'block', 'form': 'parallel', 'length': 10}]
# name -> (label, tuners, head type, bypass, full fine-tuning)
METHODS = {
    'linear': ('Linear head, frozen backbone (baseline)', [], 'linear', False, False),
    'utuning_tri': ('U-Tuning tri + linear head', TRI, 'linear', False, False),
    'utuning_tri_multilevel': ('U-Tuning tri + multi-level head (last 4 layers)', TRI, 'multilevel', False, False),
    'bypass': ('U-Tuning tri, bypass + vertical, linear head', TRI + [{'type': 'vertical', 'dim': 10}], 'linear',
               True, False),
    'lora': ('LoRA (qkv, rank 10) + linear head', [{'type': 'lora', 'op': 'mha', 'rank': 10}], 'linear', False,
             False),
    'full': ('Full fine-tuning + linear head (backbone lr 3e-5)', [], 'linear', False, True),
}


def make_scenes(data: str, root: str, n_train: int, n_eval: int, size: int, seed: int):
    from modelscope_utuning.segmentation.scenes import write_scenes
    fm = load_fashion_mnist(data)
    train = write_scenes(os.path.join(root, 'train'), *fm['train'], CLASS_NAMES, n_train, seed=seed, size=size)
    evaluation = write_scenes(os.path.join(root, 'eval'), *fm['test'], CLASS_NAMES, n_eval, seed=seed + 1,
                              size=size)
    return train, evaluation


def saved_for_backward_mb(trainer) -> float:
    """MB of tensors one training step saves for its backward pass (distinct storages, counted with
    ``torch.autograd.graph.saved_tensors_hooks``, the model's parameters and buffers left out): the activation
    memory of training, which bypass mode avoids for the frozen backbone. One batch of the training data, the trainer's own model and loss."""
    import torch
    model = trainer.model_unwrapped
    # weights saved for the input's gradient are the model's own memory, not activations: left out
    weights = {p.untyped_storage().data_ptr() for p in list(model.parameters()) + list(model.buffers())}
    seen, total, alive = set(), [0], []

    def pack(t):
        alive.append(t)  # held until the end: a freed storage's address reused by another would be miscounted
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in seen and t.device.type == 'cpu' and storage.data_ptr() not in weights:
            seen.add(key)
            total[0] += storage.nbytes()
        return t

    model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    model(batch)['loss'].backward()  # the first step times the attention kernels (backbone/kernels.py): not counted
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(batch)['loss']
    loss.backward()
    model.zero_grad(set_to_none=True)
    return total[0] / 2 ** 20


def run_one(args) -> dict:
    """One method, in this process: train, evaluate, measure."""
    import torch
    torch.set_num_threads(args.threads)
    import modelscope_utuning  # noqa: F401
    from modelscope.trainers import build_trainer
    from modelscope_utuning.registration import SEG_TASK, SEG_TYPE
    from modelscope_utuning.training.defaults import model_configuration
    label, tuners, head, bypass, full = METHODS[args.run]
    work = tempfile.mkdtemp(prefix=f'seg-{args.run}-')
    model_dir = os.path.join(work, 'model')
    os.makedirs(model_dir)
    backbone = {**BACKBONE, 'img_size': args.size, 'pretrained_weights': os.path.abspath(args.weights),
                'tuners': tuners, **({'bypass': True} if bypass else {})}
    cfg = model_configuration(backbone, {'type': head, 'num_classes': 11},
                              preprocessor={'type': 'vision-efficient-tuning-segmentation-preprocessor',
                                            'img_size': args.size})
    cfg.update(task=SEG_TASK, pipeline={'type': SEG_TYPE})
    cfg['model']['type'] = SEG_TYPE
    with open(os.path.join(model_dir, 'configuration.json'), 'w') as f:
        json.dump(cfg, f)

    def cfg_modify_fn(c):
        c.train.max_epochs = args.epochs
        c.train.lr_scheduler.T_max = args.epochs
        c.train.optimizer.lr = 3e-5 if full else args.lr
        c.train.dataloader.batch_size_per_gpu = args.batch
        c.train.amp = 'fp32'
        c.evaluation.period = {'interval': args.epochs}  # one evaluation, at the end
        if args.cpu_allocator:
            c.train.cpu_allocator = args.cpu_allocator
        if full:
            c.model.freeze_cfg = {'train_part': {'backbone': ['']}}
        return c

    trainer = build_trainer(name=SEG_TYPE, default_args=dict(
        model=model_dir, work_dir=os.path.join(work, 'work'), train_dataset=args.train_dir,
        eval_dataset=args.eval_dir, cfg_modify_fn=cfg_modify_fn, seed=args.seed))
    saved_mb = saved_for_backward_mb(trainer)
    if args.activations_only:
        return {'method': args.run, 'saved_for_backward_mb': saved_mb, 'size': args.size, 'batch': args.batch}
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.time()
    trainer.train()
    train_s = time.time() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    metrics = trainer.evaluate()
    trainable, total = trainer.model_unwrapped.trainable_parameters()
    return {'method': args.run, 'label': label, 'mIoU': metrics['mIoU'], 'pixel_accuracy': metrics['pixel_accuracy'],
            'trainable': trainable, 'total': total, 'trainable_pct': 100.0 * trainable / total,
            'train_s': train_s, 'peak_rss_mb': peak, 'saved_for_backward_mb': saved_mb, 'rss_before_train_mb': rss_before,
            'train_peak_increase_mb': peak - rss_before, 'size': args.size, 'epochs': args.epochs,
            'n_train': args.n_train, 'n_eval': args.n_eval, 'lr': 3e-5 if full else args.lr, 'seed': args.seed,
            'threads': args.threads, 'cpu': cpu_record(), 'torch': torch.__version__,
            'command': ' '.join(sys.argv)}


def activations_path(out_path: str) -> str:
    return out_path.replace('.jsonl', '_activations.jsonl')


def render(out_path: str, readme: str = README) -> None:
    rows = read_rows(out_path)
    if not rows:
        return
    # method -> MB saved for backward in one step (--activations-only runs, or the training run's own)
    saved = {r['method']: r['saved_for_backward_mb'] for r in read_rows(activations_path(out_path))}
    lines = ['',
             f'DINOv2 ViT-S/14, composed scenes at {rows[-1]["size"]} px ({rows[-1]["n_train"]} training / '
             f'{rows[-1]["n_eval"]} evaluation scenes, 11 classes), {rows[-1]["epochs"]} epochs, batch 8, fp32, '
             f'{rows[-1]["threads"]} thread(s); CPU: {rows[-1]["cpu"].get("model")} ({rows[-1]["cpu"].get("flags")}).',
             '', '| method | mIoU | pixel acc. | trainable | train time | peak RSS | RSS increase in training '
             '| saved for backward, one step |',
             '| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |']
    latest = {}
    for r in rows:
        latest[r['method']] = r
    for name in METHODS:
        r = latest.get(name)
        if r:
            lines.append(f'| {r["label"]} | {100 * r["mIoU"]:.1f} | {100 * r["pixel_accuracy"]:.1f} | '
                         f'{r["trainable_pct"]:.2f} % | {r["train_s"] / 60:.1f} min | {r["peak_rss_mb"]:.0f} MB | '
                         f'{r["train_peak_increase_mb"]:.0f} MB | {_mb(saved.get(name, r.get("saved_for_backward_mb")))} |')
    shown = re.sub(r' --(out|readme) \S+', '', rows[-1]['command'])  # where it wrote: not part of the measurement
    lines += ['', f'Command: `{shown}` (each method in a process of its own); the last column: the same command '
              'with `--activations-only`.', '']
    update_readme('\n'.join(lines), readme, TABLE_START, TABLE_END,
                  '## Semantic segmentation (real backbone, composed scenes)')


def _mb(value) -> str:
    return '-' if value is None else f'{value:.0f} MB'


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--methods', nargs='+', default=list(METHODS), choices=list(METHODS))
    ap.add_argument('--weights', default='/tmp/dinov2_vits14.safetensors')
    ap.add_argument('--data', default='/usr/share/datasets/fashion-mnist')
    ap.add_argument('--size', type=int, default=112)
    ap.add_argument('--train', dest='n_train', type=int, default=200)
    ap.add_argument('--eval', dest='n_eval', type=int, default=50)
    ap.add_argument('--epochs', type=int, default=10)
    ap.add_argument('--batch', type=int, default=8)
    ap.add_argument('--lr', type=float, default=2e-3)
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--threads', type=int, default=1)
    ap.add_argument('--out', default=DEFAULT_OUT)
    ap.add_argument('--scenes', help='folder for the composed scenes (default: a temporary one)')
    ap.add_argument('--run', choices=list(METHODS), help=argparse.SUPPRESS)  # the child process's method
    ap.add_argument('--train-dir', help=argparse.SUPPRESS)
    ap.add_argument('--eval-dir', help=argparse.SUPPRESS)
    ap.add_argument('--render-only', action='store_true')
    ap.add_argument('--cpu-allocator', choices=('default', 'lean'),
                    help="train.cpu_allocator: 'lean' returns freed memory at once, so peak RSS tracks live tensors")
    ap.add_argument('--activations-only', action='store_true',
                    help='only measure what one training step saves for backward, per method (no training)')
    ap.add_argument('--readme', default=README, help='where the table goes (default benchmarks/README.md)')
    args = ap.parse_args()
    if args.render_only:
        render(args.out, args.readme)
        return 0
    if args.run:
        print(json.dumps(run_one(args)))
        return 0
    root = args.scenes or tempfile.mkdtemp(prefix='scenes-')
    train_dir, eval_dir = make_scenes(args.data, root, args.n_train, args.n_eval, args.size, args.seed)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    for method in args.methods:
        cmd = [sys.executable, __file__, '--run', method, '--train-dir', train_dir, '--eval-dir', eval_dir] + \
            [a for a in sys.argv[1:] if a != '--methods' and a not in METHODS]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f'{method}: failed\n{proc.stderr[-3000:]}', file=sys.stderr)
            continue
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        result['command'] = 'python benchmarks/segmentation.py ' + ' '.join(sys.argv[1:])
        if args.activations_only:
            print(f'{method}: {result["saved_for_backward_mb"]:.1f} MB saved for backward per step', flush=True)
            append_rows(activations_path(args.out), [result])
            continue
        print(f'{method}: mIoU {100 * result["mIoU"]:.1f}, {result["train_s"] / 60:.1f} min, '
              f'peak {result["peak_rss_mb"]:.0f} MB', flush=True)
        append_rows(args.out, [result])
    render(args.out, args.readme)
    return 0


if __name__ == '__main__':
    sys.exit(main())
