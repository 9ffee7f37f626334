"""The embedded segmentation demo: pre-train a tiny ViT on scenes, freeze it, U-Tune a segmentation head on scenes
of unseen classes, predict with ``pipeline('semantic-segmentation', ...)``. Offline, a few minutes on 2 CPU cores.

Scenes are composed from the Fashion-MNIST items shipped with the package (:mod:`.segmentation.scenes`: items
pasted on textured backgrounds, exact masks):

1. stage 1 "pre-trains" a tiny ViT by full fine-tuning on scenes of classes 0-4 (T-shirt/top, Trouser, Pullover,
   Dress, Coat) through ``build_trainer(name='vision-efficient-tuning-segmentation')``;
2. stage 2 freezes it and U-Tunes the tri-tuner (parallel adapters on MHA and FFN, a parallel prefix on the block)
   with a new linear head on scenes of the unseen classes 5-9 (Sandal, Shirt, Sneaker, Bag, Ankle boot); the
   frozen linear head alone is trained the same way for comparison;
3. ``pipeline('semantic-segmentation', <output>)`` segments held-out scenes; the overlays are written as PNGs.

``modelscope-utuning demo --segmentation`` (``--quick`` for a smaller run) or ``python -m
modelscope_utuning.demo_segmentation``.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Callable, Dict, Optional

from .demo import PRETRAIN_CLASSES, FEWSHOT_CLASSES, quiet_console
from .deploy.app import overlay
from .registration import SEG_TASK, SEG_TYPE
from .segmentation.scenes import shipped_items, write_scenes
from .training.defaults import model_configuration

TRI = [{'type': 'adapter', 'op': 'mha', 'form': 'parallel', 'dim': 8},
       {'type': 'adapter', 'op': 'ffn', 'form': 'parallel', 'dim': 8},
       {'type': 'prefix', 'op': 'block', 'form': 'parallel', 'length': 8}]
FULL = dict(size=56, patch=7, dim=96, depth=4, heads=4, pretrain_scenes=300, pretrain_epochs=12, tune_scenes=60,
            eval_scenes=30, tune_epochs=12)
QUICK = dict(size=56, patch=7, dim=64, depth=2, heads=4, pretrain_scenes=80, pretrain_epochs=4, tune_scenes=24,
             eval_scenes=10, tune_epochs=4)


def _trainer(model: str, work_dir: str, train: str, evaluation: str, cfg_modify_fn: Callable):
    import modelscope_utuning  # noqa: F401  (registers the plugin)
    from modelscope.trainers import build_trainer
    return build_trainer(name=SEG_TYPE, default_args=dict(model=model, work_dir=work_dir, train_dataset=train,
                                                         eval_dataset=evaluation, cfg_modify_fn=cfg_modify_fn))


def _edit(num_classes: int, epochs: int, lr: float, **model_edits) -> Callable:
    def cfg_modify_fn(cfg):
        cfg.model.head.num_classes = num_classes
        cfg.train.max_epochs = epochs
        cfg.train.lr_scheduler.T_max = epochs
        cfg.train.optimizer.lr = lr
        cfg.train.dataloader.batch_size_per_gpu = 16
        cfg.train.amp = 'fp32'
        cfg.evaluation.period = {'interval': epochs}  # one evaluation, at the end
        for key, value in model_edits.items():
            cfg.model[key] = value
        return cfg
    return cfg_modify_fn


def run_segmentation_demo(work_dir: Optional[str] = None, quick: bool = False, threads: int = 1,
                          show_logs: bool = False, print_fn: Callable[[str], None] = print) -> Dict:
    """Run the demo (see the module docstring); returns the measured mIoUs, times and paths."""
    import torch
    s = QUICK if quick else FULL
    say = print_fn
    t0 = time.time()
    work_dir = os.path.abspath(work_dir or tempfile.mkdtemp(prefix='utuning-seg-demo-'))
    os.makedirs(work_dir, exist_ok=True)
    saved = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        data = os.path.join(work_dir, 'data')
        pre_items = shipped_items(list(PRETRAIN_CLASSES))
        new_items = shipped_items(list(FEWSHOT_CLASSES))
        pre_train = write_scenes(os.path.join(data, 'pretrain'), *pre_items, s['pretrain_scenes'], seed=0,
                                 size=s['size'])
        pre_eval = write_scenes(os.path.join(data, 'pretrain_eval'), *pre_items, 20, seed=1, size=s['size'])
        tune = write_scenes(os.path.join(data, 'tune'), *new_items, s['tune_scenes'], seed=2, size=s['size'])
        held_out = write_scenes(os.path.join(data, 'held_out'), *new_items, s['eval_scenes'], seed=3, size=s['size'])
        say(f'U-Tuning segmentation demo ({"quick" if quick else "full"}) in {work_dir}')
        say(f'[data] scenes of shipped Fashion-MNIST items on textured backgrounds, {s["size"]} px: '
            f'{s["pretrain_scenes"]} of classes 0-4 for pre-training; {s["tune_scenes"]} for tuning and '
            f'{s["eval_scenes"]} held out of the unseen classes 5-9 (6 classes with the background)')
        base = os.path.join(work_dir, 'tiny_vit')
        os.makedirs(base, exist_ok=True)
        cfg = model_configuration(dict(img_size=s['size'], patch_size=s['patch'], embed_dim=s['dim'],
                                       depth=s['depth'], num_heads=s['heads']), {'type': 'linear', 'num_classes': 6},
                                  preprocessor={'type': 'vision-efficient-tuning-segmentation-preprocessor',
                                                'img_size': s['size'], 'mean': [0.5] * 3, 'std': [0.25] * 3})
        cfg.update(task=SEG_TASK, pipeline={'type': SEG_TYPE})
        cfg['model']['type'] = SEG_TYPE
        with open(os.path.join(base, 'configuration.json'), 'w', encoding='utf-8') as f:
            json.dump(cfg, f, indent=2)
        times = {}
        with quiet_console(None if show_logs else os.path.join(work_dir, 'console.log')):
            say(f'[1/3] pre-training a tiny ViT ({s["depth"]} layers, {s["dim"]} wide) on scenes of classes 0-4, '
                f'{s["pretrain_epochs"]} epochs, every weight trained ...')
            t = time.time()
            stage1 = _trainer(base, os.path.join(work_dir, 'stage1_pretrain'), pre_train, pre_eval,
                              _edit(6, s['pretrain_epochs'], 2e-3, freeze_cfg={'train_part': {'backbone': ['']}}))
            stage1.train()
            pre = stage1.evaluate()
            times['pretrain'] = time.time() - t
            say(f'      mIoU {pre["mIoU"]:.3f} on held-out scenes of classes 0-4, {times["pretrain"]:.0f} s')
            results = {}
            for name, tuners in (('linear head', []), ('U-Tuning tri-tuner', TRI)):
                t = time.time()
                say(f'[2/3] {name}: the backbone frozen, a new head on the unseen classes 5-9 ...')
                trainer = _trainer(stage1.output_dir, os.path.join(work_dir, 'stage2_' + name.split()[0].lower()),
                                   tune, held_out, _edit(6, s['tune_epochs'], 5e-3, finetune=True, freeze_cfg={},
                                                         pretrained_cfg={'unload_part': {'head': ['']}},
                                                         backbone={**cfg['model']['backbone'], 'tuners': tuners}))
                trainer.train()
                result = trainer.evaluate()
                trainable, total = trainer.model_unwrapped.trainable_parameters()
                times[name] = time.time() - t
                results[name] = {'mIoU': result['mIoU'], 'pixel_accuracy': result['pixel_accuracy'],
                                 'trainable': trainable, 'total': total, 'output': trainer.output_dir}
                say(f'      held-out mIoU {result["mIoU"]:.3f}, pixel accuracy {result["pixel_accuracy"]:.3f}; '
                    f'{trainable:,} of {total:,} parameters trained, {times[name]:.0f} s')
            from modelscope.pipelines import pipeline
            out = results['U-Tuning tri-tuner']['output']
            segmenter = pipeline(SEG_TASK, out, device='cpu')
            shown = os.path.join(work_dir, 'overlays')
            os.makedirs(shown, exist_ok=True)
            images = [os.path.join(held_out, 'images', f'{k:04d}.png') for k in range(min(4, s['eval_scenes']))]
            for path, answer in zip(images, segmenter(images)):
                overlay(path, answer['masks'], len(answer['labels'])).save(os.path.join(shown, os.path.basename(path)))
        say(f"[3/3] pipeline('semantic-segmentation', '{out}'): overlays of {len(images)} held-out scenes in {shown}")
        say(f'  mIoU on the unseen classes: linear head {results["linear head"]["mIoU"]:.3f}, U-Tuning tri-tuner '
            f'{results["U-Tuning tri-tuner"]["mIoU"]:.3f}; {time.time() - t0:.0f} s in all')
        return {'pretrain_mIoU': pre['mIoU'], 'results': results, 'seconds': time.time() - t0,
                'stage_seconds': times, 'output_dir': out, 'overlays': shown, 'work_dir': work_dir}
    finally:
        torch.set_num_threads(saved)


def main(argv=None) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog='python -m modelscope_utuning.demo_segmentation',
                                     description=__doc__.split('\n\n')[0])
    parser.add_argument('--quick', action='store_true')
    parser.add_argument('--work-dir', default=None)
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--show-logs', action='store_true')
    args = parser.parse_args(argv)
    run_segmentation_demo(args.work_dir, args.quick, args.threads, args.show_logs)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
