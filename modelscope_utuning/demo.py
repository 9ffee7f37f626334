"""The embedded demo: pre-train a tiny ViT, freeze it, U-Tune it on unseen classes, predict with ``pipeline()``.

Runs offline on real images shipped with the package (a Fashion-MNIST subset, ``demo_data/``), through the public
APIs a user calls:

1. the images are written as PNG files in image-folder layout (one sub-directory per class);
2. stage 1 "pre-trains" a tiny ViT with full fine-tuning on classes 0-4 (T-shirt/top, Trouser, Pullover, Dress,
   Coat): ``build_trainer(name=Trainers.vision_efficient_tuning, default_args=dict(model=<dir with
   configuration.json and no weights>, ...))`` with ``freeze_cfg.train_part.backbone = ['']``;
3. stage 2 freezes that backbone and U-Tunes it, few-shot, on the unseen classes 5-9 (Sandal, Shirt, Sneaker,
   Bag, Ankle boot) with the paper's tri-tuner (parallel adapter on MHA + parallel adapter on FFN + parallel
   prefix on the block), through a ``cfg_modify_fn`` as in ModelScope's own example; a linear probe (head only)
   on the same backbone and data is trained the same way for comparison;
4. ``pipeline('vision-efficient-tuning', <work_dir>/output)`` classifies held-out images.

``python -m modelscope_utuning.demo`` or ``modelscope-utuning demo`` (``--quick`` for a smaller run).

This module is the entry point (settings, the run stage by stage, its summary, the command line); what the demo
prepares (images, configurations) is in ``demo_setup.py`` and how it runs one stage in ``demo_stages.py``.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import textwrap
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Dict, List, Optional

# What the demo writes before it trains (data, configurations) and how it runs a stage: modules of their own,
# their names importable from here as they always were.
from .demo_setup import (DATA_FILE, FEWSHOT_CLASSES, MEAN, PRETRAIN_CLASSES, STD,  # noqa: F401
                         base_configuration, folder_name, load_demo_arrays, make_cfg_modify_fn, write_image_folder)
from .demo_stages import example_images, quiet_console, train_stage

# The folders run_demo writes under its work_dir (and clears on a rerun), beside data/.
STAGE_DIRS = ('tiny_vit', 'stage1_pretrain', 'stage2_utuning', 'stage2_linear_probe')


@dataclass
class DemoSettings:
    """Sizes of one demo run (the full one fits ~5 minutes on 2 CPU cores, the quick one well under a minute)."""
    img_size: int = 28                # the images' own size: no resizing
    patch_size: int = 7               # a 4 x 4 grid of patches
    embed_dim: int = 128
    depth: int = 6
    num_heads: int = 4
    global_pool: str = 'avg'
    pretrain_per_class: int = 400     # of classes 0-4, for the "pre-training" stage
    pretrain_val_per_class: int = 40
    pretrain_epochs: int = 10
    pretrain_lr: float = 1e-3
    fewshot_per_class: int = 20       # of the unseen classes 5-9
    fewshot_val_per_class: int = 60
    tune_epochs: int = 40
    tune_lr: float = 5e-3
    tuner_dim: int = 8                # adapter bottleneck and prefix length
    batch_size: int = 64
    tune_batch_size: int = 25
    examples: int = 8                 # held-out images shown through pipeline()
    linear_probe: bool = True
    # Intra-op threads for the run. These matrices are small: on 2 cores a second OpenMP thread gains little,
    # and when anything else runs on the machine it makes every step several times slower. 0: torch's default.
    threads: int = 1
    tuners: List[Dict] = field(default_factory=list)

    def tri_tuner(self) -> List[Dict]:
        """U-Tuning's tri-tuner (paper Table 6): parallel adapter on MHA and FFN, parallel prefix on the block."""
        return self.tuners or [
            {'type': 'adapter', 'op': 'mha', 'form': 'parallel', 'dim': self.tuner_dim},
            {'type': 'adapter', 'op': 'ffn', 'form': 'parallel', 'dim': self.tuner_dim},
            {'type': 'prefix', 'op': 'block', 'form': 'parallel', 'length': self.tuner_dim},
        ]


FULL = DemoSettings()
QUICK = DemoSettings(embed_dim=64, depth=2, pretrain_per_class=200, pretrain_val_per_class=20, pretrain_epochs=5,
                     pretrain_lr=2e-3, fewshot_per_class=10, fewshot_val_per_class=20, tune_epochs=10, examples=4)


def run_demo(work_dir: Optional[str] = None, quick: bool = False, settings: Optional[DemoSettings] = None,
             verbose: bool = True, show_logs: bool = False, threads: Optional[int] = None,
             print_fn: Callable[[str], None] = print) -> Dict:
    """Run the demo; returns what it measured.

    Args:
        work_dir: where images, model folders and outputs go (a new temporary folder when None; it is kept, and
            its path returned, so that the trained ``output/`` can be used afterwards).
        quick: a smaller, faster run (tests).
        settings: explicit sizes (overrides ``quick``).
        verbose: print progress and results.
        show_logs: let ModelScope's INFO logs and progress bars reach the console (else they go to the log files
            in work_dir and ``work_dir/console.log``).
        threads: torch intra-op threads during the run (default ``settings.threads``, 1; 0: leave torch's).
    Returns:
        {'accuracy_before', 'accuracy_after', 'linear_probe_accuracy', 'pretrain_accuracy', 'trainable_params',
        'total_params', 'trainable_percent', 'seconds', 'stage_seconds', 'predictions', 'output_dir', 'work_dir',
        'settings'}; accuracies in [0, 1].
    """
    s = settings or (QUICK if quick else FULL)
    if threads is not None:
        s = replace(s, threads=threads)
    say = print_fn if verbose else (lambda *_: None)
    t0 = time.time()
    if work_dir is None:
        work_dir = tempfile.mkdtemp(prefix='utuning-demo-')
    work_dir = os.path.abspath(work_dir)
    os.makedirs(work_dir, exist_ok=True)
    stage_s: Dict[str, float] = {}
    import torch
    saved_threads = torch.get_num_threads()
    if s.threads:
        torch.set_num_threads(s.threads)
    try:
        return _run(s, work_dir, quick, verbose, show_logs, say, t0, stage_s)
    finally:
        torch.set_num_threads(saved_threads)


def _run(s: DemoSettings, work_dir: str, quick: bool, verbose: bool, show_logs: bool, say: Callable,
         t0: float, stage_s: Dict[str, float]) -> Dict:
    say(f'U-Tuning demo ({"quick" if quick else "full"}) in {work_dir}')
    arrays = load_demo_arrays()
    names = [str(n) for n in arrays['class_names']]
    data = os.path.join(work_dir, 'data')
    for ours in (data, *(os.path.join(work_dir, d) for d in STAGE_DIRS)):
        if os.path.isdir(ours):
            shutil.rmtree(ours)  # a rerun in the same folder starts afresh
    folders = {
        'pretrain_train': (s.pretrain_per_class, os.path.join(data, 'pretrain', 'train')),
        'pretrain_val': (s.pretrain_val_per_class, os.path.join(data, 'pretrain', 'val')),
        'fewshot_train': (s.fewshot_per_class, os.path.join(data, 'fewshot', 'train')),
        'fewshot_val': (s.fewshot_val_per_class, os.path.join(data, 'fewshot', 'val')),
    }
    counts = {split: sum(write_image_folder(arrays, split, n, path).values())
              for split, (n, path) in folders.items()}
    stage_s['write_images'] = time.time() - t0
    say(f'[data] real Fashion-MNIST images as PNG folders under {data}: '
        f'pre-training {counts["pretrain_train"]} train / {counts["pretrain_val"]} val on '
        f'{", ".join(names[c] for c in PRETRAIN_CLASSES)}; few-shot {counts["fewshot_train"]} train '
        f'({s.fewshot_per_class} per class) / {counts["fewshot_val"]} val on the unseen '
        f'{", ".join(names[c] for c in FEWSHOT_CLASSES)}')

    base_dir = os.path.join(work_dir, 'tiny_vit')
    os.makedirs(base_dir)
    with open(os.path.join(base_dir, 'configuration.json'), 'w', encoding='utf-8') as f:
        json.dump(base_configuration(s), f, indent=2)

    with quiet_console(None if show_logs else os.path.join(work_dir, 'console.log')):
        # Stage 1: full fine-tuning of a randomly initialised tiny ViT on classes 0-4.
        say(f'[1/3] pre-training a tiny ViT (img {s.img_size}, patch {s.patch_size}, dim {s.embed_dim}, depth '
            f'{s.depth}) with full fine-tuning on classes 0-4, {s.pretrain_epochs} epochs ...')
        t = time.time()
        pre = train_stage(base_dir, os.path.join(work_dir, 'stage1_pretrain'), folders['pretrain_train'][1],
                          folders['pretrain_val'][1])
        stage_s['pretrain'] = time.time() - t
        say(f'      val accuracy {pre["accuracy"]:.3f} on classes 0-4, {pre["trainable"]:,} of {pre["total"]:,} '
            f'parameters trained, {stage_s["pretrain"]:.0f} s')

        # Stage 2: U-Tuning on the unseen classes 5-9 with the backbone frozen.
        backbone_dir = pre['output']
        tuners = s.tri_tuner()
        say(f'[2/3] U-Tuning the frozen backbone on the unseen classes 5-9 ({s.fewshot_per_class}-shot) with the '
            f'tri-tuner (parallel adapter on MHA + parallel adapter on FFN + parallel prefix on the block), '
            f'{s.tune_epochs} epochs ...')
        t = time.time()
        tuned = train_stage(backbone_dir, os.path.join(work_dir, 'stage2_utuning'), folders['fewshot_train'][1],
                            folders['fewshot_val'][1], make_cfg_modify_fn(s, tuners), evaluate_first=True)
        stage_s['utuning'] = time.time() - t
        say(f'      val accuracy {tuned["accuracy_before"]:.3f} before (frozen backbone + untrained head) -> '
            f'{tuned["accuracy"]:.3f} after; {tuned["trainable"]:,} of {tuned["total"]:,} parameters trained '
            f'({100.0 * tuned["trainable"] / tuned["total"]:.2f}%), {stage_s["utuning"]:.0f} s')

        probe = None
        if s.linear_probe:
            t = time.time()
            probe = train_stage(backbone_dir, os.path.join(work_dir, 'stage2_linear_probe'),
                                folders['fewshot_train'][1], folders['fewshot_val'][1], make_cfg_modify_fn(s, []))
            stage_s['linear_probe'] = time.time() - t
            say(f'      linear probe (head only, same backbone, data and epochs): val accuracy '
                f'{probe["accuracy"]:.3f}, {probe["trainable"]:,} parameters trained, '
                f'{stage_s["linear_probe"]:.0f} s')

        # Stage 3: the trained output folder through ModelScope's pipeline().
        from modelscope.pipelines import pipeline
        t = time.time()
        out_dir = tuned['output']
        classifier = pipeline('vision-efficient-tuning', out_dir, device='cpu')
        val_root = folders['fewshot_val'][1]
        examples = example_images(val_root, s.examples)
        results = classifier([path for path, _ in examples], topk=1)
        stage_s['pipeline'] = time.time() - t
    predictions = [{'image': os.path.relpath(path, work_dir), 'true': truth, 'predicted': r['labels'][0],
                    'score': float(r['scores'][0])} for (path, truth), r in zip(examples, results)]
    say(f"[3/3] pipeline('vision-efficient-tuning', '{out_dir}') on held-out images:")
    width = max(len(p['image']) for p in predictions) if predictions else 10
    for p in predictions:
        mark = 'ok' if p['predicted'] == p['true'] else 'WRONG'
        say(f'      {p["image"]:<{width}}  true {p["true"]:<11} predicted {p["predicted"]:<11} '
            f'p={p["score"]:.2f}  {mark}')
    say(f'      {sum(p["predicted"] == p["true"] for p in predictions)} of {len(predictions)} right')

    seconds = time.time() - t0
    result = {
        'accuracy_before': tuned['accuracy_before'],
        'accuracy_after': tuned['accuracy'],
        'linear_probe_accuracy': probe['accuracy'] if probe else None,
        'pretrain_accuracy': pre['accuracy'],
        'trainable_params': tuned['trainable'],
        'total_params': tuned['total'],
        'trainable_percent': 100.0 * tuned['trainable'] / tuned['total'],
        'linear_probe_trainable_params': probe['trainable'] if probe else None,
        'pretrain_trainable_params': pre['trainable'],
        'seconds': seconds,
        'stage_seconds': stage_s,
        'predictions': predictions,
        'output_dir': out_dir,
        'work_dir': work_dir,
        'settings': asdict(s),
        'quick': bool(quick),
    }
    say('')
    say('Summary')
    say(f'  accuracy on unseen classes 5-9, {counts["fewshot_val"]} held-out images (chance 0.200):')
    say(f'    frozen backbone + untrained head  {result["accuracy_before"]:.3f}')
    if probe:
        say(f'    linear probe (head only)          {result["linear_probe_accuracy"]:.3f}   '
            f'({probe["trainable"]:,} trainable parameters)')
    say(f'    U-Tuning tri-tuner + head         {result["accuracy_after"]:.3f}   ({tuned["trainable"]:,} trainable '
        f'of {tuned["total"]:,}, {result["trainable_percent"]:.2f}%)')
    say(f'  time: {seconds:.0f} s in all (' + ', '.join(f'{k} {v:.0f} s' for k, v in stage_s.items()) + ')')
    say(f'  trained model: {out_dir} (loads with pipeline() / Model.from_pretrained; see its README.md)')
    say('')
    se = (0.25 / max(counts['fewshot_val'], 1)) ** 0.5  # the largest standard error of an accuracy
    say(textwrap.fill('What this shows, honestly: the whole U-Tuning flow (build_trainer with cfg_modify_fn, a frozen backbone '
        'with parallel tuners, a reloadable output folder, pipeline()) running end to end on real images, on a CPU, '
        f'in minutes. It does not reproduce the paper: the backbone is a {s.depth}-layer, {s.embed_dim}-wide ViT '
        f'pre-trained for {s.pretrain_epochs} epochs on {counts["pretrain_train"]:,} {s.img_size}-pixel images, not '
        f'ViT-B/16 pre-trained on ImageNet-21k; the tuning is {s.fewshot_per_class}-shot for {s.tune_epochs} '
        f'epochs; on a backbone this small the tuners and head are {result["trainable_percent"]:.1f}% of the '
        'parameters (the same tri-tuner on ViT-B/16 is about 0.7%); and each accuracy above, measured on '
        f'{counts["fewshot_val"]} images, has a standard error of up to +-{se:.3f}. The paper\'s numbers (VTAB-1K, '
        'FGVC) need a real pre-trained backbone and a GPU; see README.md and benchmarks/.', width=110))
    return result


def main(argv=None) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog='python -m modelscope_utuning.demo', description=__doc__.split('\n\n')[0])
    parser.add_argument('--quick', action='store_true', help='a smaller run (well under a minute)')
    parser.add_argument('--work-dir', default=None, help='where to write images and models (default: a temp dir)')
    parser.add_argument('--threads', type=int, default=None, help='torch threads (default 1; 0: torch default)')
    parser.add_argument('--show-logs', action='store_true', help="show ModelScope's logs on the console")
    args = parser.parse_args(argv)
    run_demo(args.work_dir, quick=args.quick, threads=args.threads, show_logs=args.show_logs)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
