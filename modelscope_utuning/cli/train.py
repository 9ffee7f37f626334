"""``train`` and ``eval``: ModelScope's trainer on a dataset, with overrides, a locked work_dir and ``--resume``."""
from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import sys
import tempfile
from typing import Any, List, Optional, Tuple

from ..training import policy
from ..training.checkpointing import epoch_files, resume_plan
from ..training.workdir import WorkDirBusyError, WorkDirLock
from .common import CLIError, build_trainer, print_metrics, read_json
from .models import load_data, locate_model, resolve_model
from .overrides import apply_overrides, parse_overrides

def _default_work_dir(spec: str) -> str:
    name = re.sub(r'[^A-Za-z0-9_.\-]+', '-', os.path.basename(os.path.normpath(spec)) or 'model')
    name = name[:-5] if name.endswith('.json') else name
    stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
    return os.path.join('work_dirs', f'{name}-{stamp}')


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
    load (:func:`..training.checkpointing.resume_plan`; an unreadable newest one, e.g. half-written by a kill, falls back to
    the one before, said on stderr), or None to start at epoch 1 when there is none (said too). Without ``resume``,
    CLIError when the work_dir holds epoch files: re-running a command does not silently start the run again over
    its checkpoints."""
    if not resume:
        files = epoch_files(work_dir)
        if files:
            names = [os.path.basename(files[n][0]) for n in sorted(files)]
            raise CLIError(f'--work-dir {work_dir!r} holds the checkpoints of an earlier run ({", ".join(names)}): '
                           'pass --resume to continue it from its newest readable epoch, or use another --work-dir '
                           '(or delete them to start over)')
        return None
    plan = resume_plan(work_dir)
    if not plan.files:
        print(f'--resume: nothing to resume in {work_dir} (no epoch_N.pth yet): starting at epoch 1', file=sys.stderr)
        return None
    for problem in plan.skipped:
        print(f'--resume: {problem}: falling back to the epoch before', file=sys.stderr)
    if plan.checkpoint is not None:
        print(f'--resume: continuing from {plan.checkpoint} (epoch {plan.epoch} done)', file=sys.stderr)
        return plan.checkpoint
    print(f'--resume: no readable epoch file in {work_dir} ({", ".join(plan.files)}): starting at epoch 1',
          file=sys.stderr)
    return None


def _train(args, work_dir: str, overrides: List[Tuple[str, Any]], explicit: set, train_ds, eval_ds) -> int:
    """``train`` once the work_dir is locked: where to start, the model folder, the trainer, the run. What the run
    decides about its configuration (head size, finetune, T_max) is :mod:`..training.policy`'s."""
    checkpoint = resume_point(work_dir, args.resume)
    model = resolve_model(args.model, work_dir)
    has_weights = policy.has_trained_weights(model)
    num_classes = policy.head_size(train_ds)
    notes: List[str] = []

    def cfg_modify_fn(cfg):
        apply_overrides(cfg, overrides)
        policy.follow_epochs(cfg, args.epochs, explicit)
        if policy.backbone_is_random(cfg, has_weights):
            notes.append('no pre-trained weights: the backbone starts from a random initialisation (pass '
                         '--backbone-weights FILE, or start from a trained model folder)')
        change = policy.fit_head(cfg, num_classes, has_weights, explicit)
        if change is not None and change.note:
            notes.append(change.note)
        return cfg

    if os.path.isdir(model):  # check the overrides now, with a clear message, before anything is built
        try:
            policy.check_configuration(model, cfg_modify_fn)
        except ValueError as e:
            raise CLIError(str(e)) from None
        notes.clear()
    print(f'training {args.model} on {args.train_data} ({len(train_ds)} images, {train_ds.num_classes} classes); '
          f'work dir {work_dir}', file=sys.stderr)
    trainer = build_trainer(model=model, work_dir=work_dir, train_dataset=train_ds, eval_dataset=eval_ds,
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
            print_metrics(metrics, False)
        print(f'model saved to {trainer.output_dir}')
    return 0


def cmd_eval(args) -> int:
    model = resolve_model(args.model, allow_config=False)
    classes = policy.model_classes(model, read_config=read_json) if os.path.isdir(model) else None
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
        trainer = build_trainer(model=model, work_dir=work_dir, eval_dataset=ds, cfg_modify_fn=cfg_modify_fn)
        metrics = trainer.evaluate()
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    metrics = {k: (float(v) if hasattr(v, '__float__') and not isinstance(v, (int, bool)) else v)
               for k, v in (metrics or {}).items()}
    if not args.json:
        print(f'{len(ds)} images from {args.data}', file=sys.stderr)
    print_metrics(metrics, args.json)
    return 0

