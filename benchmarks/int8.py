"""int8 inference on a real backbone: top-1 agreement with fp32 and accuracy, torch and ONNX Runtime.

    python benchmarks/int8.py                 # train once, then compare the five inference paths
    python benchmarks/int8.py --render-only   # rewrite the README table from results/int8.jsonl

A U-Tuning tri-tuner is trained once on DINOv2 ViT-S/14 (``--weights``, ``../shared/tools/real_backbone.py``) and
Fashion-MNIST few-shot (``--shots`` per class from the official train split, seeded; Debian's
``dataset-fashion-mnist``), through ``build_trainer`` with the trainer's defaults, as ``benchmarks/accuracy.py``
does. Its ``output/`` is then run on ``--test-per-class`` x 10 test images by: ``pipeline()`` in fp32,
``pipeline(precision='int8')`` without and with ``calibration=`` the training images, and the ``export --onnx`` / ``export --onnx --int8`` folders in ONNX Runtime.
Reported per path: accuracy and top-1 agreement with the fp32 pipeline, largest |score difference|. Speed of the
same paths on ViT-B/16: ``benchmarks/speed.py --precision int8`` and ``--impl onnx`` (see benchmarks/README.md).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # the other benchmark scripts (accuracy.py: data, configuration, README tables)
from accuracy import (  # noqa: E402  (data, configuration, results files, lscpu, README tables)
    CLASS_NAMES, append_rows, cpu_record, few_shot_arguments, load_fashion_mnist, read_rows, sample_per_class,
    update_readme, write_model_dir, write_split)
README = os.path.join(HERE, 'README.md')
DEFAULT_OUT = os.path.join(HERE, 'results', 'int8.jsonl')
TABLE_START, TABLE_END = '<!-- int8-table:start -->', '<!-- int8-table:end -->'
TRI = [{'type': 'adapter', 'op': 'mha', 'form': 'parallel', 'dim': 10},
       {'type': 'adapter', 'op': 'ffn', 'form': 'parallel', 'dim': 10},
       {'type': 'prefix', 'op': 'block', 'form': 'parallel', 'length': 10}]
PATHS = ('torch fp32', 'torch int8', 'torch int8, calibrated', 'onnxruntime fp32', 'onnxruntime int8')


def train(args, root: str) -> tuple:
    import torch
    torch.set_num_threads(args.threads)
    import modelscope_utuning  # noqa: F401  (registers the plugin)
    from modelscope.metainfo import Trainers
    from modelscope.trainers import build_trainer
    fm = load_fashion_mnist(args.data)
    train_dir = write_split(*fm['train'], sample_per_class(fm['train'][1], args.shots, args.seed),
                            os.path.join(root, 'train'))
    test_dir = write_split(*fm['test'], sample_per_class(fm['test'][1], args.test_per_class, args.seed),
                           os.path.join(root, 'test'))
    model_dir = os.path.join(root, 'model')
    write_model_dir(model_dir, args.weights, args.img_size)

    def cfg_modify_fn(cfg):
        cfg.model.head.num_classes = len(CLASS_NAMES)
        cfg.model.backbone.tuners = TRI
        cfg.train.max_epochs = args.epochs
        cfg.train.lr_scheduler.T_max = args.epochs
        cfg.train.optimizer.lr = args.lr
        cfg.train.dataloader.batch_size_per_gpu = 25
        cfg.evaluation.period = {'interval': args.epochs}
        return cfg
    trainer = build_trainer(name=Trainers.vision_efficient_tuning, default_args=dict(
        model=model_dir, work_dir=os.path.join(root, 'work'), train_dataset=train_dir, eval_dataset=test_dir,
        cfg_modify_fn=cfg_modify_fn, seed=args.seed))
    trainer.train()
    return os.path.join(root, 'work', 'output'), train_dir, test_dir


def compare(output: str, train_dir: str, test_dir: str, root: str, threads: int) -> list:
    import torch
    torch.set_num_threads(threads)
    from modelscope.pipelines import pipeline
    from modelscope_utuning.cli import main as cli
    from modelscope_utuning.deploy.onnx_export import OnnxClassifier
    files = sorted((os.path.join(test_dir, c, f), c) for c in sorted(os.listdir(test_dir))
                   for f in sorted(os.listdir(os.path.join(test_dir, c))))
    for name, flags in (('onnx_fp32', []), ('onnx_int8', ['--int8'])):
        assert cli(['export', output, os.path.join(root, name), '--onnx'] + flags) == 0
    runners = {'torch fp32': pipeline('vision-efficient-tuning', output, device='cpu'),
               'torch int8': pipeline('vision-efficient-tuning', output, device='cpu', precision='int8'),
               # calibrated on the training images (what a user has at hand), evaluated on the test images
               'torch int8, calibrated': pipeline('vision-efficient-tuning', output, device='cpu', precision='int8',
                                                  calibration=train_dir),
               'onnxruntime fp32': OnnxClassifier(os.path.join(root, 'onnx_fp32'), threads=threads),
               'onnxruntime int8': OnnxClassifier(os.path.join(root, 'onnx_int8'), threads=threads)}
    answers = {}
    for path, run in runners.items():
        answers[path] = [run(f, topk=10) for f, _ in files]
    truth = [c for _, c in files]
    ref = answers['torch fp32']
    rows = []
    for path in PATHS:
        got = answers[path]
        scores = [max(abs(dict(zip(a['labels'], a['scores']))[k] - s) for k, s in zip(b['labels'], b['scores']))
                  for a, b in zip(ref, got)]
        rows.append({'path': path, 'images': len(files),
                     'accuracy': float(np.mean([g['labels'][0] == t for g, t in zip(got, truth)])),
                     'top1_agreement': float(np.mean([g['labels'][0] == r['labels'][0] for g, r in zip(got, ref)])),
                     'max_score_diff': float(max(scores))})
    return rows


def int8_kernel() -> str:
    from modelscope_utuning.backbone import int8
    return int8.kernel()


def render(out_path: str, readme: str = README) -> None:
    """The README table: per inference path, accuracy and top-1 agreement with fp32 for each seed (the latest run
    of each seed and path on the latest CPU), their means and the mean accuracy change from fp32."""
    rows = read_rows(out_path)
    if not rows:
        return
    cpu = rows[-1]['cpu']
    rows = [r for r in rows if r['cpu'] == cpu]
    latest = {(r['settings']['seed'], r['path']): r for r in rows}
    seeds = sorted({seed for seed, _ in latest})
    last = rows[-1]['settings']
    kernel = rows[-1].get('int8_kernel')
    lines = ['',
             f'DINOv2 ViT-S/14 + U-Tuning tri-tuner trained on Fashion-MNIST {last["shots"]}-shot at '
             f'{last["img_size"]} px (lr {last["lr"]:g}, {last["epochs"]} epochs), one model per seed; '
             f'{rows[-1]["images"]} test images; torch int8 products: {kernel or "per-tensor 7-bit"}; calibration: '
             f'the 100 training images; CPU: {cpu.get("model")} ({cpu.get("flags")}).', '',
             '| inference path | ' + ' | '.join(f'seed {s}: accuracy / agreement' for s in seeds)
             + ' | mean agreement with fp32 | mean accuracy change |',
             '| --- |' + ' ---: |' * (len(seeds) + 2)]
    for path in PATHS:
        got = [(s, latest.get((s, path)), latest.get((s, 'torch fp32'))) for s in seeds]
        got = [(s, r, ref) for s, r, ref in got if r is not None and ref is not None]
        if not got:
            continue
        cells = {s: f'{100 * r["accuracy"]:.1f} / {100 * r["top1_agreement"]:.1f} %' for s, r, _ in got}
        agreement = np.mean([r['top1_agreement'] for _, r, _ in got])
        change = np.mean([r['accuracy'] - ref['accuracy'] for _, r, ref in got])
        lines.append(f'| {path} | ' + ' | '.join(cells.get(s, '-') for s in seeds)
                     + f' | {100 * agreement:.1f} % | {100 * change:+.1f} |')
    commands = sorted({re.sub(r' --(out|root) \S+', '', r['command']) for r in rows})  # not part of the measurement
    lines += ['', 'Commands: ' + ', '.join(f'`{c}`' for c in commands) + '.', '']
    update_readme('\n'.join(lines), readme, TABLE_START, TABLE_END, '## int8 inference (real backbone)')


def main() -> int:
    ap = few_shot_arguments(argparse.ArgumentParser(description=__doc__.split('\n')[0]), epochs=15)
    ap.add_argument('--out', default=DEFAULT_OUT)
    ap.add_argument('--render-only', action='store_true')
    ap.add_argument('--root', help='scratch folder, kept; a model trained there before (same settings) is reused')
    args = ap.parse_args()
    if not args.render_only:
        root = args.root or tempfile.mkdtemp(prefix='int8-bench-')
        output = os.path.join(root, 'work', 'output')
        if os.path.isfile(os.path.join(output, 'configuration.json')):
            train_dir, test_dir = os.path.join(root, 'train'), os.path.join(root, 'test')
        else:
            output, train_dir, test_dir = train(args, root)
        rows = compare(output, train_dir, test_dir, root, args.threads)
        settings = {k: getattr(args, k) for k in ('shots', 'test_per_class', 'img_size', 'epochs', 'lr', 'seed')}
        import torch
        cpu = cpu_record()
        for r in rows:
            r.update(settings=settings, cpu=cpu, torch=torch.__version__, int8_kernel=int8_kernel(),
                     command='python benchmarks/int8.py ' + ' '.join(sys.argv[1:]))
            print(json.dumps({k: r[k] for k in ('path', 'accuracy', 'top1_agreement', 'max_score_diff')}))
        append_rows(args.out, rows)
    render(args.out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
