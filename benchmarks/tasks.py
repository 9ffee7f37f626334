"""N bypass tasks trained together on one frozen forward per step, against one task trained alone.

    python benchmarks/tasks.py                      # N = 8 at 112 px
    python benchmarks/tasks.py --img-size 224 --epochs 5
    python benchmarks/tasks.py --render-only        # rewrite the README table from results/tasks.jsonl

DINOv2 ViT-S/14 (``--weights``, ``../shared/tools/real_backbone.py``), the tri-tuner + vertical tuner in bypass mode,
Fashion-MNIST ``--shots`` per class (seeded; Debian's ``dataset-fashion-mnist``). Task k is the same images with
their labels renamed by a seeded permutation of the 10 classes (task 0: the original labels): one image set with N
label columns. Each task is an ordinary ``build_trainer`` run (the trainer's defaults, batch 25; no random
augmentation and no shuffling, so that task 0's runs compare exactly; the frozen features are cached across epochs,
``train.feature_cache`` auto, in both runs); "alone" trains task 0 by itself, "together" trains all N with
``modelscope_utuning.train_bypass_tasks``. Timed: the training epochs (a hook on the first task stamps each epoch);
then every task's accuracy on ``--test-per-class`` x 10 test images (its labels renamed the same way) through
``pipeline()``, and whether task 0 ends at the same weights both ways.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # accuracy.py: data, configuration, lscpu, README tables
from accuracy import (  # noqa: E402  (data, configuration, results files, lscpu, README tables)
    CLASS_NAMES, TRI, VERTICAL, append_rows, commands_line, cpu_record, few_shot_arguments,
    load_fashion_mnist, read_rows, sample_per_class, update_readme, write_model_dir, write_split)
from feature_cache import epoch_clock  # noqa: E402  (stamps each epoch's end)
README = os.path.join(HERE, 'README.md')
DEFAULT_OUT = os.path.join(HERE, 'results', 'tasks.jsonl')
TABLE_START, TABLE_END = '<!-- tasks-table:start -->', '<!-- tasks-table:end -->'
SECTION = '## N bypass tasks trained together (one frozen forward per step)'


def relabel(k: int, seed: int):
    import numpy as np
    perm = np.arange(10) if k == 0 else np.random.default_rng(1000 * seed + k).permutation(10)
    return lambda y: int(perm[y])


def rows_of(folder: str, k: int, seed: int):
    from modelscope_utuning.data import from_image_folder
    ds = from_image_folder(folder, classes=CLASS_NAMES)
    f = relabel(k, seed)
    return [{'img_path:FILE': p, 'label': f(y)} for p, y in zip(ds.image_paths(), ds.labels)]


def trainer(args, root: str, model_dir: str, k: int, tag: str):
    from modelscope.metainfo import Trainers
    from modelscope.trainers import build_trainer

    def cfg_modify_fn(cfg):
        cfg.model.head.num_classes = len(CLASS_NAMES)
        cfg.model.backbone.tuners = TRI + [VERTICAL]
        cfg.model.backbone.bypass = True
        cfg.train.max_epochs = args.epochs
        cfg.train.lr_scheduler.T_max = args.epochs
        cfg.train.optimizer.lr = args.lr
        cfg.train.dataloader.batch_size_per_gpu = 25
        cfg.train.dataloader.workers_per_gpu = 0
        cfg.train.dataloader.shuffle = False  # task 0 alone and together then see one order: weights compare exactly
        cfg.train.checkpoint = {'period': {'interval': args.epochs}}
        cfg.preprocessor.train = {'augment': False}
        cfg.train.feature_cache = args.cache == 'auto'
        return cfg
    return build_trainer(name=Trainers.vision_efficient_tuning, default_args=dict(
        model=model_dir, work_dir=os.path.join(root, f'{tag}_task{k}'),
        train_dataset=rows_of(os.path.join(root, 'train'), k, args.seed), cfg_modify_fn=cfg_modify_fn, seed=args.seed))


def accuracy(output: str, test_rows) -> float:
    from modelscope.pipelines import pipeline
    p = pipeline('vision-efficient-tuning', output, device='cpu')
    results = p([r['img_path:FILE'] for r in test_rows], batch_size=100)
    # the rows carried label ids, so the model's class names are the ids' own names ('3' or 'class_3')
    return sum(int(re.sub(r'\D', '', r['labels'][0])) == t['label'] for r, t in zip(results, test_rows)) / len(test_rows)


def run(args) -> dict:
    import torch
    torch.set_num_threads(args.threads)
    import modelscope_utuning  # noqa: F401  (registers the plugin)
    root = tempfile.mkdtemp(prefix='tasks-bench-')
    fm = load_fashion_mnist(args.data)
    write_split(*fm['train'], sample_per_class(fm['train'][1], args.shots, args.seed), os.path.join(root, 'train'))
    write_split(*fm['test'], sample_per_class(fm['test'][1], args.test_per_class, args.seed), os.path.join(root, 'test'))
    model_dir = os.path.join(root, 'model')
    write_model_dir(model_dir, args.weights, args.img_size)
    out = {}
    alone = trainer(args, root, model_dir, 0, 'alone')
    c = epoch_clock()
    alone.register_hook(c)
    alone.train()
    out['alone_s'] = c.stamps[-1] - c.stamps[0]
    together = {f'task{k}': trainer(args, root, model_dir, k, 'together') for k in range(args.tasks)}
    c = epoch_clock()
    together['task0'].register_hook(c)
    outputs = modelscope_utuning.train_bypass_tasks(together)
    out['together_s'] = c.stamps[-1] - c.stamps[0]
    a = {n: p for n, p in alone.model_unwrapped.model.named_parameters() if p.requires_grad}
    b = dict(together['task0'].model_unwrapped.model.named_parameters())
    out['task0_max_weight_diff'] = max((a[n] - b[n]).abs().max().item() for n in a)
    out['accuracy_alone'] = accuracy(alone.output_dir, rows_of(os.path.join(root, 'test'), 0, args.seed))
    out['accuracy_together'] = [accuracy(outputs[f'task{k}'], rows_of(os.path.join(root, 'test'), k, args.seed))
                                for k in range(args.tasks)]
    return out


def render(out_path: str, readme: str = README) -> None:
    rows = read_rows(out_path)
    if not rows:
        return
    cpu = rows[-1]['cpu']
    lines = ['', f'DINOv2 ViT-S/14, tri-tuner + vertical tuner in bypass mode; Fashion-MNIST {rows[-1]["shots"]}-shot, '
                 f'task k = the same images with a seeded renaming of the 10 classes; batch 25, no augmentation or shuffling; '
                 f'the frozen features cached across epochs (train.feature_cache auto) or computed every step (off), '
                 f'the same in both runs; '
                 f'2 threads; CPU: {cpu.get("model")} ({cpu.get("flags")}).', '',
             '| px | frozen features | tasks | epochs | one task alone | N together | together / alone '
             '| task 0 alone vs together | accuracy alone | accuracy together (mean, min-max) |',
             '| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |']
    latest = {}
    for r in rows:
        latest[(r['img_size'], r.get('cache', 'auto'), r['tasks'], r['epochs'])] = r
    for (px, cache, n, ep), r in sorted(latest.items()):
        accs = r['accuracy_together']
        how = 'cached across epochs' if cache == 'auto' else 'computed every step'
        lines.append(f'| {px} | {how} | {n} | {ep} | {r["alone_s"]:.1f} s | {r["together_s"]:.1f} s | '
                     f'{r["together_s"] / r["alone_s"]:.2f}x | max \\|weight difference\\| '
                     f'{r["task0_max_weight_diff"]:.1e} | {100 * r["accuracy_alone"]:.1f} % | '
                     f'{100 * sum(accs) / len(accs):.1f} % ({100 * min(accs):.1f}-{100 * max(accs):.1f}) |')
    lines += commands_line(list(latest.values()))
    update_readme('\n'.join(lines), readme, TABLE_START, TABLE_END, SECTION)


def main() -> int:
    ap = few_shot_arguments(argparse.ArgumentParser(description=__doc__.split('\n')[0]), epochs=10)
    ap.add_argument('--tasks', type=int, default=8)
    ap.add_argument('--cache', choices=('auto', 'off'), default='auto',
                    help='train.feature_cache in every run: auto (frozen features kept across epochs) or off (the frozen '
                         'pass runs every step: one per step for all tasks together)')
    ap.add_argument('--out', default=DEFAULT_OUT)
    ap.add_argument('--render-only', action='store_true')
    args = ap.parse_args()
    if not args.render_only:
        import torch
        r = run(args)
        r.update(img_size=args.img_size, tasks=args.tasks, epochs=args.epochs, cache=args.cache, shots=args.shots, seed=args.seed,
                 lr=args.lr, cpu=cpu_record(),
                 torch=torch.__version__, command='python benchmarks/tasks.py ' + ' '.join(sys.argv[1:]))
        append_rows(args.out, [r])
        print(json.dumps(r), flush=True)
    render(args.out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
