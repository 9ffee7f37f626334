"""The decisions a training run makes about its configuration, its head and where it starts, in one place.

The trainer (:class:`.trainer.VisionEfficientTuningTrainer`) and the ``train`` / ``eval`` commands both use this
module, so that the command line only parses arguments, locates files and prints. The rules:

1. **The configuration a run trains with** (:func:`resolve_config`): ModelScope's shared default hooks made the
   run's own copies (``compat.own_default_hooks``), then our defaults for what configuration.json leaves out
   (:mod:`.defaults`), then the caller's ``cfg_modify_fn``. Defaults come first so that a ``cfg_modify_fn`` always
   has something to edit (``cfg.train.lr_scheduler.T_max = ...``) and never has its edits overwritten. The trainer
   builds its configuration this way; :func:`check_configuration` builds the same one from a model folder and
   checks it (:mod:`.validate`) before any data or model is built, so that a command refuses a bad override at
   once, with the key named, and writes nothing.
2. **The head has as many outputs as the training data has classes** (:func:`fit_head`, :func:`head_size`):
   ``len(classes)`` when the data names its classes, else ``max(label) + 1``. The trainer refuses data with more
   classes than the head (:func:`.labels.reference_classes`), and with fewer it would train outputs no image ever
   targets; a command that is given a dataset to train on means "a classifier for these classes". A
   ``model.head.num_classes`` the user set explicitly is left as it is (the trainer then says what does not fit).
3. **A new head is trained when the checkpoint's head has another size** (:func:`fit_head`): when the model folder
   holds trained weights (:func:`has_trained_weights`) and its configured head size (the size configuration.json
   was written with, that of the checkpoint's head) differs from the data's, ``model.finetune`` is set. The
   checkpoint's head cannot be loaded into a head of another size; with ``finetune`` the model starts the head
   fresh and keeps the backbone and tuners it learnt (``fresh_on_mismatch`` in ``network_files``). Without trained
   weights there is no head to replace; without a configured size there is nothing to compare; and a
   ``model.finetune`` the user set explicitly wins.
4. **The cosine schedule spans the run** (:func:`follow_epochs`): when the number of epochs is given for the run,
   a ``train.lr_scheduler.T_max`` present in the configuration becomes that number, unless the user set
   ``T_max`` explicitly: otherwise the learning rate would stop annealing half way (or restart) with more or fewer
   epochs than the configuration was written for.
5. **A backbone without weights is random** (:func:`backbone_is_random`): neither trained weights in the model
   folder nor ``model.backbone.pretrained_weights``. Training then starts from a random initialisation, which is
   legal (a smoke test, a tiny model) but almost never what is meant, so callers say it.
6. **Labels mean the model's classes** (:func:`model_classes`): a trained model's evaluation data is read against
   the classes its head stands for, found in the model folder as the loaders find them: the tuner-only export's
   ``CLASSES``, else the checkpoint's, else configuration.json's ``model.CLASSES``. The trainer maps every
   dataset onto the same class list (:mod:`.labels`); reading the data against it names a class the model does
   not know before anything is built.
7. **A run resumes from its newest readable epoch** (:func:`.checkpointing.resume_plan`, which
   ``checkpointing.latest_checkpoint`` and the command line's ``--resume`` both call):
   the newest ``epoch_N.pth`` whose model file and trainer state both load; a newer one that does not (half-written
   by a kill, its state missing) is skipped with the reason, and none at all means starting at epoch 1.
8. **Tuned paths train with stochastic depth** (:func:`drop_path_rate`): ``train.drop_path`` when set (a number in
   [0, 1)), else the model's own ``model.backbone.drop_path_rate`` when its configuration names one, else
   ``defaults.DEFAULT_DROP_PATH`` when anything but the head trains in standard mode; 0 for a linear probe (only
   the head trains: dropping branches of a frozen backbone only adds noise to the features it fits; measured, the
   probe lost 2.6 points with it) and in bypass mode (the frozen blocks run whole there, so the rate would do
   nothing, and the frozen features stay cacheable). It changes training only: evaluation and exports never drop.
9. **A fresh parallel tuner grows at least at the pace of lr 4e-3** (:func:`start_parallel_scales`): with an
   Adam-family optimizer (``Adam``, ``AdamW``) at ``lr`` below ``defaults.PARALLEL_SPEED_LR`` (4e-3), every parallel
   adapter or prefix entry that names no ``scale_init`` gets ``scale_init = PARALLEL_SPEED_LR / lr`` (8 at 5e-4, 4
   at the default 1e-3, 2 at 2e-3). Why: such a tuner starts silent because its output weights (an adapter's
   up-projection, a prefix's values) start at zero, and Adam moves each of them by about ``lr`` per step whatever the
   gradient's size, so the branch ``s * U(h)`` grows at about ``s * lr`` per step: at low rates a short run ended
   before the tuners had done much, and the model was little more than its probe trained under stochastic depth,
   which costs the probe points (the tri-tuner 1.1 points under its probe at lr 5e-4 on 10-shot Fashion-MNIST, 5.9
   over it with this rule). The randomly started weights still move at the user's rate, and from 4e-3 up nothing
   changes (measured: a faster pace everywhere, the scale at 4 at lr 1e-2, ended 4 points under the probe). The
   value is written into the entry, so the configuration a run saves says how it started; trained weights loaded over
   it keep their own scale. P-Prompts (whose scale itself starts at 0), sequential forms and other optimizers are
   left as they are.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Collection, List, Mapping, Optional, Tuple

from modelscope.utils.logger import get_logger

from ..checkpoint import tuner_only
from ..checkpoint.hub_layout import CHECKPOINT_FILE, read_checkpoint
from ..compat import own_default_hooks
from ..fileio import read_json_object
from ..tuners.base import tuner_kinds
from ..tuners.parallel import DEFAULT_SCALE_INIT, ParallelTuner
from .defaults import DEFAULT_DROP_PATH, DROP_PATH_KEY, PARALLEL_SPEED_LR, apply_defaults, read_drop_path
from .validate import validate_config

HEAD_SIZE_KEY = 'model.head.num_classes'
MODEL_DROP_PATH_KEY = 'model.backbone.drop_path_rate'
FINETUNE_KEY = 'model.finetune'
T_MAX_KEY = 'train.lr_scheduler.T_max'


# -- 1. the configuration ----------------------------------------------------------------------------------------
def resolve_config(cfg, cfg_modify_fn: Optional[Callable[[Any], Any]] = None, announce: bool = True):
    """``cfg`` as a run trains with it (rule 1): ModelScope's default hooks made its own, our defaults filled,
    then ``cfg_modify_fn`` (the trainer passes ModelScope's ``rebuild_config``, which calls the user's), then rule 9.
    ``announce``: log what rule 9 set (off for a check before the run, so that a command says it once)."""
    own_default_hooks(cfg)
    cfg = apply_defaults(cfg)
    if cfg_modify_fn is not None:
        cfg = cfg_modify_fn(cfg)
    start = start_parallel_scales(cfg)  # rule 9: after the user's edits, which may change the lr or the tuners
    if start is not None and announce:
        get_logger().info(f'fresh parallel tuners start with scale {start:g}, so that they grow at the pace of lr '
                          f'{PARALLEL_SPEED_LR:g} (policy rule 9; an entry\'s scale_init chooses its own)')
    return cfg


def check_configuration(model_dir: str, cfg_modify_fn: Optional[Callable[[Any], Any]] = None):
    """The configuration the trainer will build from ``model_dir/configuration.json`` with ``cfg_modify_fn``,
    checked as the trainer checks it (:func:`.validate.validate_config`: ValueError naming every bad key), without
    building a model or reading data."""
    from modelscope.utils.config import Config
    cfg = resolve_config(Config.from_file(os.path.join(model_dir, 'configuration.json')), cfg_modify_fn,
                         announce=False)
    validate_config(cfg)
    return cfg


# -- 2, 3. the head ------------------------------------------------------------------------------------------------
def has_trained_weights(model: str) -> bool:
    """Whether ``model`` is a local folder holding trained weights (the hub-layout checkpoint)."""
    return os.path.isdir(model) and os.path.isfile(os.path.join(model, CHECKPOINT_FILE))


def head_size(train_dataset) -> int:
    """The head size the training data asks for (rule 2): its number of classes."""
    return train_dataset.num_classes


@dataclass(frozen=True)
class HeadChange:
    """What :func:`fit_head` changed: the head's new size, its configured size before, and whether
    ``model.finetune`` was set for it (a new head replacing the checkpoint's)."""
    num_classes: int
    previous: Optional[int]
    finetune: bool

    @property
    def note(self) -> Optional[str]:
        """One line for the user when a trained head is replaced; None otherwise."""
        if not self.finetune:
            return None
        return (f'the dataset has {self.num_classes} classes, the model {self.previous}: a new head is trained '
                '(model.head.num_classes and model.finetune set)')


def fit_head(cfg, num_classes: int, has_weights: bool, user_keys: Collection[str] = ()) -> Optional[HeadChange]:
    """Rules 2 and 3 on ``cfg`` (changed in place): ``model.head.num_classes = num_classes`` unless the user set it
    (``user_keys``, dotted keys) or it already is; ``model.finetune = True`` when ``has_weights``, the head had a
    configured size and the user did not set ``model.finetune``. Returns what changed, or None."""
    head = cfg.model.get('head') or {}
    if HEAD_SIZE_KEY in user_keys or head.get('num_classes') == num_classes:
        return None
    if not cfg.model.get('head'):
        from modelscope.utils.config import ConfigDict
        cfg.model.head = ConfigDict()  # a plain {} would not take attribute assignment
    previous = head.get('num_classes')
    cfg.model.head.num_classes = num_classes
    finetune = bool(has_weights and previous is not None and FINETUNE_KEY not in user_keys)
    if finetune:
        cfg.model.finetune = True
    return HeadChange(num_classes, previous, finetune)


# -- 4, 5. schedule and backbone -----------------------------------------------------------------------------------
def follow_epochs(cfg, epochs: Optional[int], user_keys: Collection[str] = ()) -> bool:
    """Rule 4 on ``cfg`` (in place): ``train.lr_scheduler.T_max = epochs`` when ``epochs`` is given, the
    configuration has a ``T_max`` and the user did not set it. Returns whether it changed ``cfg``."""
    if epochs is None or cfg.safe_get(T_MAX_KEY) is None or T_MAX_KEY in user_keys:
        return False
    cfg.train.lr_scheduler.T_max = epochs
    return True


def backbone_is_random(cfg, has_weights: bool) -> bool:
    """Rule 5: no trained weights and no ``model.backbone.pretrained_weights``."""
    return not has_weights and not cfg.safe_get('model.backbone.pretrained_weights')


# -- 6. classes ----------------------------------------------------------------------------------------------------
def model_classes(model_dir: str, read_config: Optional[Callable[[str], dict]] = None) -> Optional[List[str]]:
    """The class names a local model folder was trained with (rule 6): its tuner-only configuration, else its
    checkpoint, else configuration.json (read with ``read_config``, by default
    :func:`..fileio.read_json_object`: ValueError for a file that is no JSON object); None when none names them."""
    if read_config is None:
        read_config = read_json_object
    classes = None
    if os.path.isfile(os.path.join(model_dir, tuner_only.CONFIG_FILE)):
        try:
            classes = tuner_only.read_tuner_config(model_dir).get('CLASSES')
        except ValueError:
            classes = None
    ckpt = os.path.join(model_dir, CHECKPOINT_FILE)
    if not classes and os.path.isfile(ckpt):
        classes = read_checkpoint(ckpt).get('CLASSES')
    cfg = os.path.join(model_dir, 'configuration.json')
    if not classes and os.path.isfile(cfg):
        classes = (read_config(cfg).get('model') or {}).get('CLASSES')
    return [str(c) for c in classes] if classes else None


# -- 8. stochastic depth -------------------------------------------------------------------------------------------
def drop_path_rate(cfg, roles: Mapping[str, str], bypass: bool,
                   default: float = DEFAULT_DROP_PATH) -> Tuple[float, str]:
    """Rule 8: the stochastic-depth rate a run trains with, and why (one line for the log).

    ``roles``: trainable parameter name -> 'head' | 'tuner' | 'backbone' (the network's ``parameter_roles``);
    ``bypass``: whether the model runs in bypass mode; ``default``: the rate when nothing else decides (the
    segmentation trainer's is 0: unmeasured there). An explicit ``train.drop_path`` above 0 in bypass mode is a
    ValueError: it would do nothing."""
    setting = read_drop_path(cfg.safe_get(DROP_PATH_KEY))
    if setting is not None:
        if bypass and setting > 0:
            raise ValueError(f'{DROP_PATH_KEY}={setting!r}: bypass mode runs the frozen blocks whole, so stochastic '
                             f'depth would do nothing there; expected 0 or \'auto\'')
        return setting, DROP_PATH_KEY
    own = cfg.safe_get(MODEL_DROP_PATH_KEY)
    if own is not None:
        return float(own), MODEL_DROP_PATH_KEY
    if bypass:
        return 0.0, 'bypass mode: the frozen blocks run whole'
    if all(role == 'head' for role in roles.values()):
        return 0.0, 'only the head trains (a linear probe)'
    if default == 0:
        return 0.0, 'no stochastic depth by default for this task'
    return default, 'the default while tuners or the backbone train'


# -- 9. the parallel scale's start -----------------------------------------------------------------------------------
ADAM_OPTIMIZERS = ('Adam', 'AdamW')  # per-step moves of about lr, whatever the gradient's size


def parallel_scale_start(lr: float) -> float:
    """Rule 9's initial scale for a fresh parallel adapter / prefix trained with Adam at ``lr``:
    ``max(1, PARALLEL_SPEED_LR / lr)`` (8 at 5e-4, 4 at 1e-3, 2 at 2e-3, 1 from 4e-3 up), to 6 significant digits."""
    return float(f'{max(DEFAULT_SCALE_INIT, PARALLEL_SPEED_LR / lr):.6g}')


def start_parallel_scales(cfg) -> Optional[float]:
    """Rule 9 on ``cfg`` (in place): ``scale_init`` written into every ``model.backbone.tuners`` entry of a parallel
    kind whose scale starts at 1 (adapter, prefix; form parallel) that names none, when the optimizer is Adam-family
    and its lr is below ``PARALLEL_SPEED_LR``. Returns the value written, or None when nothing changed. Entries it
    cannot read are left for the configuration checks (:mod:`.validate`) to name."""
    optimizer = cfg.safe_get('train.optimizer') or {}
    lr = optimizer.get('lr')
    if optimizer.get('type') not in ADAM_OPTIMIZERS or isinstance(lr, bool) or not isinstance(lr, (int, float)) \
            or lr <= 0:
        return None
    start = parallel_scale_start(lr)
    entries = cfg.safe_get('model.backbone.tuners')
    if start == DEFAULT_SCALE_INIT or not isinstance(entries, (list, tuple)):
        return None
    kinds = tuner_kinds()
    changed = False
    for entry in entries:
        kind = kinds.get(entry.get('type')) if isinstance(entry, dict) else None
        if kind is not None and issubclass(kind, ParallelTuner) and kind.starts_at_default_scale(entry):
            entry['scale_init'] = start
            changed = True
    return start if changed else None
