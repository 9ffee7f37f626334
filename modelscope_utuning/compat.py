"""Every workaround for a difference between ModelScope releases, in one place.

We support ModelScope 1.27 up to the newest 1.x (setup.cfg; checked on 1.27.0, 1.27.1, 1.30.0, 1.35.4, 1.39.1 and
1.40.2; CI runs ``tests/compat_smoke.py`` on the floor). Each workaround below tests the capability itself (an
attribute, a signature, a constructor call); none reads a version number. Each touches only our own objects or
folders: nothing here changes what ModelScope does for another model. Release numbers below say where each
difference was observed, for the record only.

1. :func:`guard_trusted_source_lookup` - ``modelscope.utils.automodel_utils.is_model_from_trusted_source``
   (1.40.1 on; absent up to 1.40.0). ``pipeline()`` and ``build_trainer()`` call it on the model argument before
   anything of ours runs. For a relative local folder like ``work_dir/output`` (one slash, so it reads as a hub
   id) it asks the hub, which offline stalls with retries (15.8 s measured on 1.40.2); the answer ModelScope
   means for a local folder is "untrusted" anyway. We wrap it so that an existing local folder whose
   ``configuration.json`` is one of ours (model type or task ``vision-efficient-tuning``) is answered False
   without the lookup; every other argument goes to ModelScope's function unchanged. Where the function does not
   exist nothing is wrapped.
2. :func:`trainer_trust_remote_code` - ``EpochBasedTrainer.trust_remote_code`` (set in ``__init__`` from 1.37;
   absent up to 1.36, where ``build_model`` passed nothing). Read with a False default.
3. :func:`from_pretrained_trust_kwargs` - the ``trust_remote_code`` parameter of ``Model.from_pretrained``
   (1.28 on). Passed only where the signature has it: up to 1.27 ``from_pretrained`` copies unknown keywords into
   ``cfg.model``, i.e. into the trainer's configuration, which then saved ``trust_remote_code`` into
   ``work_dir/output/configuration.json``.
4. :func:`warmup_options` - ``modelscope.trainers.lrscheduler.warmup.base.BaseWarmup`` passes ``verbose=`` to
   torch's ``LRScheduler.__init__`` up to 1.34 (1.35 dropped it); torch 2.13 no longer takes it, so ModelScope's
   ``LinearWarmup`` (our default for runs of 5+ epochs, in the presets and hub configs) raises ``TypeError``. Where
   building the configured warm-up class on a dummy optimizer fails that way, our trainer's warm-up options (not the
   configuration, which is saved as it is) name a subclass registered as ``utuning-<Name>`` that drops the
   keyword; the warm-up maths are ModelScope's.
6. :func:`quiet_upload_queue` - ``CheckpointHook.after_run`` starts ModelScope's hub-upload queue (a
   ``multiprocessing`` Manager server and a submitter process) at the end of every run, also when nothing is to be
   uploaded (``push_to_hub`` false). Those two processes outlive a run that is killed at its end and keep its
   output pipes open. Our trainer's checkpoint hooks that upload nothing get a subclass whose ``after_run`` skips
   the queue (only when the hook has the ``push_to_hub`` attribute and it is false); uploading hooks keep
   ModelScope's.
7. :func:`own_default_hooks` - ``EpochBasedTrainer.__init__`` merges ``default_config.DEFAULT_HOOKS_CONFIG`` into
   the trainer's configuration by reference, then ``update_cfg`` empties those hook dicts in place: the first
   trainer of a process that relies on the defaults wipes them (checked on 1.40.2: afterwards
   ``DEFAULT_HOOKS_CONFIG['train.hooks'] == [{}, {}, {'type': 'IterTimerHook'}]``), and every later trainer of the
   process runs without a checkpoint hook and without a log. Where our trainer's configuration holds those very
   dicts, it gets copies of the defaults as they were when the package was imported; ModelScope's own dicts are
   left as they are.
8. :func:`refuse_missing_model_path` - ModelScope's ``pipeline()`` and ``build_trainer()`` ask the hub about their
   model argument (the trusted-source lookup of 1., then ``is_official_hub_path`` and ``snapshot_download``) before
   our pipeline or trainer class runs, so a typo in a relative folder (``pipeline('vision-efficient-tuning',
   ['a/output', 'std/outptu'])``) failed after 15 s of hub retries with a connection error. The guard of 1. is the
   first thing both builders call; when it is called by ModelScope's ``pipeline()`` for our task or pipeline type, or
   by ``build_trainer()`` for our trainer (read from the caller's frame, by the identity of the builder's code
   object and its ``task`` / ``pipeline_name`` / ``name`` / ``model`` / ``default_args`` locals), or when another
   model of the list is one of our local folders, every model string is checked with
   :func:`modelscope_utuning.location.locate_model_source`, and a missing local path is named at once (a
   ValueError). Calls for other tasks, and builders whose code is not the one recognised, are left as they are.
   ``pipeline(..., trust_remote_code=True)`` makes no trusted-source lookup: there ModelScope still asks the hub
   first (our pipeline class names the path when the hub does not know it).
5. :func:`explain_import_error` - ``modelscope.utils.plugins`` imports ``pkg_resources`` at module level up to
   1.34; setuptools 82 removed it, so ModelScope itself does not import there. No patch can fix that without
   changing the environment for everyone: ``import modelscope_utuning`` re-raises the error with the fix
   (``pip install 'setuptools<82'`` or a newer ModelScope).
"""
from __future__ import annotations

import functools
import inspect
import json
import os
import sys
from typing import Any, Optional

from .location import locate_model_source

OUR_NAME = 'vision-efficient-tuning'  # Tasks.vision_efficient_tuning == Models.vision_efficient_tuning

# -- 1. the hub lookup for trusted publishers --------------------------------------------------------------------
TRUSTED_SOURCE_FUNCTION = 'is_model_from_trusted_source'
_GUARD_MARK = '_utuning_guard_of'


def is_our_local_model(model_id: Any) -> bool:
    """True for an existing local folder (or its ``configuration.json``) whose configuration names our model
    type or task; False for anything else, including hub ids and folders of other models."""
    if not isinstance(model_id, (str, os.PathLike)):
        return False
    path = os.fspath(model_id)
    if os.path.isdir(path):
        path = os.path.join(path, 'configuration.json')
    elif os.path.basename(path) != 'configuration.json':
        return False
    try:
        with open(path, encoding='utf-8') as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return False
    if not isinstance(cfg, dict):
        return False
    model = cfg.get('model')
    model_type = (model.get('type') or model.get('model_type')) if isinstance(model, dict) else None
    return model_type == OUR_NAME or cfg.get('task') == OUR_NAME


def guard_trusted_source_lookup() -> bool:
    """Wrap ModelScope's trusted-source check where it exists (see 1. above); idempotent. Returns whether the
    guard is in place."""
    try:
        from modelscope.utils import automodel_utils
    except ImportError:
        return False
    original = getattr(automodel_utils, TRUSTED_SOURCE_FUNCTION, None)
    if not callable(original):
        return False  # ModelScope <= 1.40.0: no hub lookup to avoid
    if getattr(original, _GUARD_MARK, None) is not None:
        return True

    @functools.wraps(original)
    def is_model_from_trusted_source(model_id, *args, **kwargs):
        refuse_missing_model_path(sys._getframe(1))  # 8.
        if is_our_local_model(model_id):
            return False  # ModelScope's own answer for a local folder, without asking the hub
        return original(model_id, *args, **kwargs)

    setattr(is_model_from_trusted_source, _GUARD_MARK, original)
    automodel_utils.is_model_from_trusted_source = is_model_from_trusted_source
    # modules that imported the function by name before us (the builders) get the guard too; the ones
    # imported later read it from automodel_utils
    for name, module in list(sys.modules.items()):
        if name.startswith('modelscope.') and module is not None and \
                vars(module).get(TRUSTED_SOURCE_FUNCTION) is original:
            setattr(module, TRUSTED_SOURCE_FUNCTION, is_model_from_trusted_source)
    return True


# -- 8. a missing local path given to ModelScope's builders for our task -----------------------------------------------
def _builder_model_argument(frame) -> Any:
    """The model argument of the ModelScope builder call that ``frame`` runs when that call is for our task,
    pipeline or trainer; None for any other frame or call."""
    from .registration import PLUGIN_TYPE, SEG_TYPE, TASK  # cycle: registration imports compat at import time
    pipelines = sys.modules.get('modelscope.pipelines.builder')
    trainers = sys.modules.get('modelscope.trainers.builder')
    code = frame.f_code if frame is not None else None
    pipeline_code = getattr(getattr(pipelines, 'pipeline', None), '__code__', None)
    trainer_code = getattr(getattr(trainers, 'build_trainer', None), '__code__', None)
    names = {TASK, PLUGIN_TYPE, SEG_TYPE}
    if code is None or code not in (pipeline_code, trainer_code):
        return None
    local = frame.f_locals
    if code is pipeline_code and {'task', 'pipeline_name', 'model'} <= set(code.co_varnames):
        model, ours = local.get('model'), local.get('task') in names or local.get('pipeline_name') in names
    elif code is trainer_code and {'name', 'default_args'} <= set(code.co_varnames):
        model, ours = (local.get('default_args') or {}).get('model'), local.get('name') in names
    else:
        return None
    items = model if isinstance(model, (list, tuple)) else [model]
    return model if ours or any(is_our_local_model(m) for m in items) else None


def refuse_missing_model_path(frame) -> None:
    """When ``frame`` is ModelScope's ``pipeline()`` / ``build_trainer()`` building one of ours (see 8. above),
    raise :class:`~modelscope_utuning.location.ModelLocationError` for a model string that is a missing local path,
    before ModelScope asks the hub about it."""
    model = _builder_model_argument(frame)
    if model is None:
        return
    for item in model if isinstance(model, (list, tuple)) else [model]:
        if isinstance(item, (str, os.PathLike)):
            locate_model_source(item)


# -- 2., 3. trust_remote_code through the trainer ----------------------------------------------------------------
def trainer_trust_remote_code(trainer: Any) -> bool:
    return bool(getattr(trainer, 'trust_remote_code', False))


@functools.lru_cache(maxsize=None)
def _from_pretrained_takes_trust_remote_code() -> bool:
    from modelscope.models.base import Model
    try:
        return 'trust_remote_code' in inspect.signature(Model.from_pretrained).parameters
    except (TypeError, ValueError):
        return False


def from_pretrained_trust_kwargs(trust_remote_code: bool) -> dict:
    return {'trust_remote_code': trust_remote_code} if _from_pretrained_takes_trust_remote_code() else {}


# -- 4. ModelScope's warm-up schedulers on a torch without ``verbose`` ----------------------------------------------
FIXED_WARMUP_PREFIX = 'utuning-'


@functools.lru_cache(maxsize=None)
def builtin_warmup_builds(cls: type) -> bool:
    """Whether ModelScope's warm-up class ``cls`` can be built on this torch (tried on a dummy optimizer)."""
    import torch
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    base = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    try:
        cls(base, warmup_iters=1)
    except TypeError as e:
        return 'verbose' not in str(e)  # another complaint (e.g. a required argument) is not ours to fix
    return True


@functools.lru_cache(maxsize=None)
def fixed_warmup_class(cls: type) -> type:
    """``cls`` with ``BaseWarmup``'s call to torch's ``LRScheduler.__init__`` stripped of ``verbose``: a class
    put between ``BaseWarmup`` and torch's scheduler in the MRO. Everything else is ModelScope's."""
    from modelscope.trainers.lrscheduler.warmup.base import BaseWarmup
    torch_scheduler = BaseWarmup.__mro__[1]

    class _WithoutVerbose(torch_scheduler):
        def __init__(self, optimizer, last_epoch=-1, verbose=None):  # noqa: ARG002 - torch dropped it
            super().__init__(optimizer, last_epoch=last_epoch)

    return type(cls.__name__, (cls, _WithoutVerbose), {
        '__module__': __name__, '__qualname__': f'fixed_warmup_class.{cls.__name__}',
        '__doc__': f"ModelScope's {cls.__name__} without the ``verbose`` argument torch no longer takes."})


def warmup_options(lr_options: Optional[dict]) -> Optional[dict]:
    """The trainer's LrSchedulerHook options, with a built-in warm-up type that cannot be built on this torch
    replaced by ``utuning-<type>`` (see 4. above); the configuration itself is not touched."""
    warmup = (lr_options or {}).get('warmup')
    if not isinstance(warmup, dict) or not isinstance(warmup.get('type'), str):
        return lr_options
    import modelscope.trainers.lrscheduler.warmup.warmup  # noqa: F401  (registers the built-in warm-ups)
    from modelscope.trainers.lrscheduler.builder import LR_SCHEDULER
    from modelscope.trainers.lrscheduler.warmup.base import BaseWarmup
    name = warmup['type']
    cls = LR_SCHEDULER.get(name)
    if not (isinstance(cls, type) and issubclass(cls, BaseWarmup)) or builtin_warmup_builds(cls):
        return lr_options
    fixed_name = FIXED_WARMUP_PREFIX + name
    if LR_SCHEDULER.get(fixed_name) is None:
        LR_SCHEDULER.register_module(module_name=fixed_name, module_cls=fixed_warmup_class(cls))
    options = type(lr_options)(lr_options)
    options['warmup'] = type(warmup)({**warmup, 'type': fixed_name})
    return options


# -- 5. ModelScope releases that import pkg_resources -------------------------------------------------------------
def explain_import_error(error: BaseException) -> Optional[ImportError]:
    """An ImportError saying what to do, for ModelScope's own import failures we know; None otherwise."""
    if isinstance(error, ModuleNotFoundError) and error.name == 'pkg_resources':
        return ImportError(
            'this ModelScope release imports pkg_resources, which setuptools 82 removed: '
            "run `pip install 'setuptools<82'`, or upgrade ModelScope (1.35 and later do not need it)")
    return None


# -- 6. the upload queue of a checkpoint hook that uploads nothing ---------------------------------------------------
def quiet_upload_queue(hook) -> bool:
    """Make ``hook`` (a ModelScope CheckpointHook of our trainer) skip the upload queue at the end of the run when it
    uploads nothing; returns whether it did."""
    if getattr(hook, 'push_to_hub', None) is not False or not callable(getattr(hook, 'after_run', None)):
        return False
    base = type(hook)
    if getattr(base, '_utuning_quiet', False):
        return True
    hook.__class__ = _quiet_subclass(base)
    return True


@functools.lru_cache(maxsize=None)
def _quiet_subclass(base: type) -> type:
    def after_run(self, trainer):
        self.logger.info('Train finished.')

    return type(base.__name__, (base,), {'after_run': after_run, '_utuning_quiet': True,
                                         '__doc__': base.__doc__, '__module__': base.__module__})


# -- 7. ModelScope's default hooks, shared by reference ------------------------------------------------------------
def _default_hooks_config():
    try:
        from modelscope.trainers import default_config
    except ImportError:
        return None
    return getattr(default_config, 'DEFAULT_HOOKS_CONFIG', None)


def _snapshot_default_hooks():
    import copy
    cfg = _default_hooks_config()
    hooks = (cfg or {}).get('train.hooks')
    if isinstance(hooks, list) and hooks and all(isinstance(h, dict) and h.get('type') for h in hooks):
        return copy.deepcopy(hooks)
    return None


_PRISTINE_DEFAULT_HOOKS = _snapshot_default_hooks()


def own_default_hooks(cfg) -> bool:
    """Give ``cfg`` (a trainer's configuration, after ModelScope merged its defaults) its own copies of the
    default hooks where it holds ModelScope's shared dicts (see 7. above); returns whether it did."""
    import copy
    shared = (_default_hooks_config() or {}).get('train.hooks')
    hooks = cfg.safe_get('train.hooks') if hasattr(cfg, 'safe_get') else None
    if not isinstance(shared, list) or not isinstance(hooks, list):
        return False
    ids = {id(h) for h in shared}
    if not any(id(h) in ids for h in hooks):
        return False
    pristine = _PRISTINE_DEFAULT_HOOKS or [h for h in shared if h]
    own = [copy.deepcopy(h) for h in hooks if id(h) not in ids] + copy.deepcopy(pristine)
    cfg.train.hooks = own
    return True
