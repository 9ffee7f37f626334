"""How the embedded demo (``modelscope_utuning.demo``) runs its stages through ModelScope's public APIs.

- ``quiet_console``: ModelScope's INFO lines and progress bars kept off the console while the demo prints its own;
- ``train_stage``: one ``build_trainer(name=Trainers.vision_efficient_tuning, ...)`` run, trained and evaluated,
  with what it measured (accuracy before / after, trainable parameters, seconds, the output folder);
- ``example_images``: the held-out images the demo shows through ``pipeline()``, spread over the classes.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Callable, Dict, List, Optional


@contextlib.contextmanager
def quiet_console(log_path: Optional[str]):
    """Keep ModelScope's INFO lines (in the work_dir log files) and its progress bars (in ``log_path``) off the
    console while the demo prints its own lines; warnings and errors still show. ``None``: change nothing."""
    if log_path is None:
        yield
        return
    from modelscope.utils.logger import get_logger
    logger = get_logger()  # created now, so that its console handler is bound to the real stderr
    saved = [(h, h.level) for h in logger.handlers if type(h) is logging.StreamHandler]
    for h, _ in saved:
        h.setLevel(logging.ERROR)
    with open(log_path, 'a', encoding='utf-8') as sink, contextlib.redirect_stderr(sink):
        try:
            yield
        finally:
            for h, level in saved:
                h.setLevel(level)


def train_stage(model: str, work_dir: str, train: str, val: str, cfg_modify_fn: Optional[Callable] = None,
                evaluate_first: bool = False) -> Dict:
    from modelscope.metainfo import Trainers
    from modelscope.trainers import build_trainer
    import modelscope_utuning  # noqa: F401  (registers the plugin)
    args = dict(model=model, work_dir=work_dir, train_dataset=train, eval_dataset=val)
    if cfg_modify_fn is not None:
        args['cfg_modify_fn'] = cfg_modify_fn
    trainer = build_trainer(name=Trainers.vision_efficient_tuning, default_args=args)
    before = trainer.evaluate() if evaluate_first else None
    start = time.time()
    trainer.train()
    train_s = time.time() - start
    after = trainer.evaluate()
    trainable, total = trainer.model_unwrapped.trainable_parameters()
    return {'accuracy_before': (before or {}).get('accuracy'), 'accuracy': after.get('accuracy'),
            'trainable': trainable, 'total': total, 'train_seconds': train_s,
            'output': trainer.output_dir}


def example_images(root: str, n: int) -> List[tuple]:
    """``n`` images spread over the class folders of ``root``: [(path, class name)]."""
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    per_class = {c: sorted(os.listdir(os.path.join(root, c))) for c in classes}
    picked, i = [], 0
    while len(picked) < n and any(i < len(v) for v in per_class.values()):
        for c in classes:
            if i < len(per_class[c]) and len(picked) < n:
                picked.append((os.path.join(root, c, per_class[c][-1 - i]), c))
        i += 1
    return picked
