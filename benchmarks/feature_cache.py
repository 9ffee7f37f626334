"""Bypass training with and without cached frozen features (``train.feature_cache``): time per epoch and accuracy.

    python benchmarks/feature_cache.py                       # 112 px; deterministic and 3-view runs, each both ways
    python benchmarks/feature_cache.py --img-size 224
    python benchmarks/feature_cache.py --render-only         # rewrite the README table from results/feature_cache.jsonl

DINOv2 ViT-S/14 (``--weights``, ``../shared/tools/real_backbone.py``) with the tri-tuner in bypass mode plus a
vertical tuner (Res-Tuning-Bypass), Fashion-MNIST ``--shots`` per class (seeded, Debian's ``dataset-fashion-mnist``),
``--epochs`` epochs of batch 25, everything else the trainer's default, through ``build_trainer`` as
``benchmarks/accuracy.py`` does. Two data settings, each trained with ``train.feature_cache.enabled`` false and then
true (same seed):

- ``deterministic``: ``preprocessor.train.augment = false`` (the evaluation transform);
- ``views 3``: the benchmark's random crops and flips, ``train.feature_cache.views = 3`` (three fixed views per image).

Per run: the first epoch's and the later epochs' wall time (a trainer hook stamps each epoch's end), the whole
training, the final accuracy on ``--test-per-class`` x 10 test images (one evaluation, after training), the cache's
summary and the largest difference of the trained weights from the uncached run's.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # accuracy.py: data, configuration, lscpu, README tables
from accuracy import (  # noqa: E402  (data, configuration, results files, lscpu, README tables)
    CLASS_NAMES, TRI, VERTICAL, append_rows, commands_line, cpu_record, few_shot_arguments,
    load_fashion_mnist, read_rows, sample_per_class, update_readme, write_model_dir, write_split)
README = os.path.join(HERE, 'README.md')
DEFAULT_OUT = os.path.join(HERE, 'results', 'feature_cache.jsonl')
TABLE_START, TABLE_END = '<!-- feature-cache-table:start -->', '<!-- feature-cache-table:end -->'
SECTION = '## Cached frozen features (bypass training)'
SETTINGS = {'deterministic': ({'augment': False}, 0), 'views 3': (None, 3)}


def epoch_clock():
    from modelscope.trainers.hooks import Hook

    class EpochClock(Hook):
        def before_run(self, trainer):
            self.stamps = [time.perf_counter()]

        def after_train_epoch(self, trainer):
            self.stamps.append(time.perf_counter())
    return EpochClock()


def run(args, data: str, setting: str, cached: bool, root: str) -> dict:
    import torch
    import modelscope_utuning  # noqa: F401  (registers the plugin)
    from modelscope.metainfo import Trainers
    from modelscope.trainers import build_trainer
    train_spec, views = SETTINGS[setting]
    tag = f'{setting.replace(" ", "")}_{"cached" if cached else "plain"}'
    model_dir, work_dir = os.path.join(root, tag + '_model'), os.path.join(root, tag + '_work')
    write_model_dir(model_dir, args.weights, args.img_size)

    def cfg_modify_fn(cfg):
        cfg.model.head.num_classes = len(CLASS_NAMES)
        cfg.model.backbone.tuners = TRI + [VERTICAL]
        cfg.model.backbone.bypass = True
        cfg.train.max_epochs = args.epochs
        cfg.train.lr_scheduler.T_max = args.epochs
        cfg.train.optimizer.lr = args.lr
        cfg.train.dataloader.batch_size_per_gpu = 25
        cfg.train.dataloader.workers_per_gpu = 0
        cfg.evaluation.dataloader.batch_size_per_gpu = 100
        cfg.evaluation.dataloader.workers_per_gpu = 0
        cfg.evaluation.period = {'interval': args.epochs}
        cfg.train.checkpoint = {'period': {'interval': args.epochs}}
        if train_spec is not None:
            cfg.preprocessor.train = train_spec
        cfg.train.feature_cache = {'enabled': cached, 'views': views}
        return cfg

    torch.manual_seed(args.seed)
    clock = epoch_clock()
    trainer = build_trainer(name=Trainers.vision_efficient_tuning, default_args=dict(
        model=model_dir, work_dir=work_dir, train_dataset=os.path.join(data, 'train'),
        eval_dataset=os.path.join(data, 'test'), cfg_modify_fn=cfg_modify_fn, seed=args.seed, callbacks=[clock]))
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    result = dict(trainer.metric_values or {}) or trainer.evaluate()
    epochs = [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]
    weights = {n: p.detach().clone() for n, p in trainer.model_unwrapped.model.named_parameters() if p.requires_grad}
    return {'setting': setting, 'cached': cached, 'img_size': args.img_size, 'epochs': args.epochs,
            'first_epoch_s': round(epochs[0], 2), 'later_epoch_s': round(statistics.mean(epochs[1:]), 3),
            'train_s': round(total, 1), 'accuracy': float(result['accuracy']),
            'cache': getattr(trainer, 'feature_cache_summary', None), 'weights': weights}


def render(out_path: str, readme: str = README) -> None:
    rows = read_rows(out_path)
    if not rows:
        return
    latest = {}
    for r in rows:
        latest[(r['img_size'], r['setting'], r['cached'])] = r
    cpu = rows[-1]['cpu']
    lines = ['', f'DINOv2 ViT-S/14, tri-tuner + vertical tuner in bypass mode, Fashion-MNIST '
                 f'{rows[-1]["shots"]}-shot ({10 * rows[-1]["shots"]} training images), batch 25, '
                 f'{rows[-1]["epochs"]} epochs, one evaluation after training; 2 threads; CPU: {cpu.get("model")} '
                 f'({cpu.get("flags")}).', '',
             '| px | training images | cache | first epoch | later epochs (mean) | later-epoch speed-up | all epochs '
             '| speed-up | train() incl. final evaluation | accuracy | cache held | max \\|weight difference\\| |',
             '| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |']
    for (px, setting, cached), r in sorted(latest.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        base = latest.get((px, setting, False))
        later = f'{base["later_epoch_s"] / r["later_epoch_s"]:.1f}x' if base and cached else ''
        epochs = r['first_epoch_s'] + (r['epochs'] - 1) * r['later_epoch_s']
        base_epochs = base['first_epoch_s'] + (base['epochs'] - 1) * base['later_epoch_s'] if base else None
        whole = f'{base_epochs / epochs:.1f}x' if base and cached else ''
        held = (f'{r["cache"]["images"]} images, {r["cache"]["mb"]} MB; {r["cache"]["hits"]} hits, '
                f'{r["cache"]["misses"]} misses') if r.get('cache') else ''
        diff = f'{r["max_weight_diff"]:.1e}' if cached and r.get('max_weight_diff') is not None else ''
        lines.append(f'| {px} | {setting} | {"on" if cached else "off"} | {r["first_epoch_s"]:.2f} s | '
                     f'{r["later_epoch_s"]:.3f} s | {later} | {epochs:.1f} s | {whole} | {r["train_s"]:.1f} s | '
                     f'{100 * r["accuracy"]:.1f} % | {held} | {diff} |')
    lines += commands_line(list(latest.values()))
    update_readme('\n'.join(lines), readme, TABLE_START, TABLE_END, SECTION)


def main() -> int:
    ap = few_shot_arguments(argparse.ArgumentParser(description=__doc__.split('\n')[0]), epochs=15)
    ap.add_argument('--settings', nargs='+', default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument('--out', default=DEFAULT_OUT)
    ap.add_argument('--render-only', action='store_true')
    args = ap.parse_args()
    if not args.render_only:
        import torch
        torch.set_num_threads(args.threads)
        root = tempfile.mkdtemp(prefix='feature-cache-bench-')
        fm = load_fashion_mnist(args.data)
        write_split(*fm['train'], sample_per_class(fm['train'][1], args.shots, args.seed), os.path.join(root, 'train'))
        write_split(*fm['test'], sample_per_class(fm['test'][1], args.test_per_class, args.seed),
                    os.path.join(root, 'test'))
        cpu = cpu_record()
        for setting in args.settings:
            plain = run(args, root, setting, False, root)
            cached = run(args, root, setting, True, root)
            cached['max_weight_diff'] = max((cached['weights'][k] - plain['weights'][k]).abs().max().item()
                                            for k in plain['weights'])
            for r in (plain, cached):
                r.pop('weights')
                r.update(shots=args.shots, test_per_class=args.test_per_class, lr=args.lr, seed=args.seed, cpu=cpu,
                         torch=torch.__version__,
                         command='python benchmarks/feature_cache.py ' + ' '.join(sys.argv[1:]))
                print(json.dumps({k: r.get(k) for k in ('setting', 'cached', 'first_epoch_s', 'later_epoch_s',
                                                        'train_s', 'accuracy', 'cache', 'max_weight_diff')}),
                      flush=True)
            append_rows(args.out, [plain, cached])
    render(args.out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
