"""Configuration values checked when the trainer is built, each error naming the key and what was expected.

A value that would only fail at the first step (``train.max_epochs = "abc"``: a bare TypeError deep in the loop)
or, worse, run and write a misleading result (``train.max_epochs = 0``: an untrained ``output/`` with a model
card) is refused here. Two kinds of checks:

- values of our keys and ModelScope's common training keys (:data:`CHECKS`);
- names that ModelScope looks up in its registries only when it first needs them (``train.optimizer.type`` and
  ``train.lr_scheduler.type`` at iteration 0, ``evaluation.metrics`` after the first epoch, ``train.hooks``) and
  the keyword arguments handed to what they name (an optimizer option ``momentumm`` would be a TypeError at
  iteration 0; ``optimizer.options.grad_clipp`` would be silently ignored). The registries themselves are asked,
  exactly as ModelScope's ``build_from_cfg`` asks them, and the signatures read (:func:`check_registered`).

Unknown sections are left to ModelScope.
"""
from __future__ import annotations

import numbers
import inspect
from typing import Any, Callable, Iterable, List, Optional, Tuple

from ..model import VisionEfficientTuningModel
from .defaults import read_drop_path
from .feature_cache import read_settings as read_feature_cache
from .precision import PRECISIONS
from .schedule import probe_epochs
from .warmup import warmup_iters


def _int(low: int) -> Callable[[Any], Optional[str]]:
    def check(v: Any) -> Optional[str]:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low:
            return f'expected an integer >= {low}'
        return None
    return check


def _number(low: float, strict: bool = True, high: Optional[float] = None) -> Callable[[Any], Optional[str]]:
    def check(v: Any) -> Optional[str]:
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or v != v or \
                (v <= low if strict else v < low) or (high is not None and v >= high):
            rng = f'{">" if strict else ">="} {low:g}' + (f' and < {high:g}' if high is not None else '')
            return f'expected a number {rng}'
        return None
    return check


def _choice(*values) -> Callable[[Any], Optional[str]]:
    def check(v: Any) -> Optional[str]:
        return None if v in values else f'expected one of {values}'
    return check


def _bool(v: Any) -> Optional[str]:
    return None if isinstance(v, bool) else 'expected true or false'


def _read_by(reader: Callable[[Any], Any], key: str) -> Callable[[Any], Optional[str]]:
    """A check that runs the setting's own reader and returns its ValueError's message (without the leading
    ``key=value: `` that the caller adds; a message about a sub-key keeps its name)."""
    def check(v: Any) -> Optional[str]:
        try:
            reader(v)
        except ValueError as e:
            return str(e).split(': ', 1)[-1] if str(e).startswith(key + '=') else str(e)
        return None
    return check


# (dotted key, check); a key that is absent or null is not checked (the defaults fill it).
CHECKS: List[Tuple[str, Callable[[Any], Optional[str]]]] = [
    ('train.max_epochs', _int(1)),
    ('train.dataloader.batch_size_per_gpu', _int(1)),
    ('train.dataloader.workers_per_gpu', _int(0)),
    ('evaluation.dataloader.batch_size_per_gpu', _int(1)),
    ('evaluation.dataloader.workers_per_gpu', _int(0)),
    ('train.optimizer.lr', _number(0.0)),
    ('train.optimizer.head_lr', _number(0.0)),
    ('train.optimizer.weight_decay', _number(0.0, strict=False)),
    ('train.lr_scheduler.T_max', _int(1)),
    ('train.amp', _choice(*PRECISIONS)),
    ('train.warmup', _read_by(lambda v: warmup_iters(v, 100, False), 'train.warmup')),
    ('train.probe_epochs', _read_by(lambda v: probe_epochs(v, 100, True, False), 'train.probe_epochs')),
    ('train.on_bad_image', _choice('raise', 'skip')),
    ('train.cpu_allocator', _choice('default', 'lean')),
    ('train.feature_cache', _read_by(read_feature_cache, 'train.feature_cache')),
    ('train.drop_path', _read_by(read_drop_path, 'train.drop_path')),
    ('model.head.num_classes', _int(1)),
    ('model.loss.label_smoothing', _number(0.0, strict=False, high=1.0)),
    ('model.finetune', _bool),
]


def _get(cfg: Any, key: str) -> Any:
    if hasattr(cfg, 'safe_get'):  # a ModelScope Config (not a dict itself)
        return cfg.safe_get(key)
    node = cfg
    for part in key.split('.'):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def validate_config(cfg: Any, own_optimizer_keys: Iterable[str] = ('head_lr',)) -> None:
    """ValueError listing every checked key whose value does not fit (``cfg``: a ModelScope Config or a dict).
    ``own_optimizer_keys``: keys of ``train.optimizer`` that the trainer consumes before ModelScope sees them."""
    problems = []
    for key, check in CHECKS:
        value = _get(cfg, key)
        if value is None:
            continue
        problem = check(value)
        if problem:
            problems.append(f'{key}={value!r}: {problem}')
    problems += check_registered(cfg, own_optimizer_keys)
    problems += check_sections(cfg)
    if problems:
        raise ValueError('configuration: ' + '; '.join(problems))


# -- names ModelScope resolves late ------------------------------------------------------------------------------
def _lookup(registry_name: str, name: str):
    """The class ModelScope would build for ``name`` from its registry ``registry_name`` (OPTIMIZERS,
    LR_SCHEDULER, METRICS, HOOKS), or None. The same two steps as ``build_from_cfg``: the lazy import of the
    module that registers the name (its AST index), then the registry's own lookup."""
    from modelscope.utils.import_utils import LazyImportModule
    from modelscope.utils.registry import default_group
    registry = _registry(registry_name)
    found = registry.get(name, group_key=default_group)
    if found is None:  # not imported yet (the lazy import warns about names its index lacks: only when needed)
        try:
            LazyImportModule.import_module((registry_name, default_group, name))
        except Exception:  # noqa: BLE001  (a name the index does not know)
            pass
        found = registry.get(name, group_key=default_group)
    return found


def _registry(registry_name: str):
    if registry_name == 'OPTIMIZERS':
        from modelscope.trainers.optimizer.builder import OPTIMIZERS as registry
    elif registry_name == 'LR_SCHEDULER':
        from modelscope.trainers.lrscheduler.builder import LR_SCHEDULER as registry
    elif registry_name == 'METRICS':
        from modelscope.metrics.builder import METRICS as registry
    else:
        from modelscope.trainers.hooks.builder import HOOKS as registry
    return registry


def _names(registry_name: str) -> List[str]:
    """Every name the registry holds or ModelScope's AST index says a module registers (lazily imported)."""
    from modelscope.utils.registry import default_group
    names = set(_registry(registry_name).modules.get(default_group, {}))
    try:
        from modelscope.utils.ast_utils import load_index
        names |= {k[2] for k in load_index().get('index', {}) if k[0] == registry_name and k[1] == default_group}
    except Exception:  # noqa: BLE001  (only for the message)
        pass
    return sorted(n for n in names if isinstance(n, str) and not n.startswith('_'))


def _known(registry_name: str, name: str, limit: int = 12) -> str:
    """'did you mean X? known: ...' for an unknown ``name``."""
    import difflib
    names = _names(registry_name)
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    known = ', '.join(names[:limit]) + (f', ... ({len(names)} in all)' if len(names) > limit else '')
    return (f'did you mean {" or ".join(repr(c) for c in close)}? ' if close else '') + f'known: {known}'


def _parameters(fn: Callable) -> Tuple[set, bool]:
    """(named keyword parameters, accepts **kwargs) of ``fn``."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return set(), True
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return named - {'self'}, any(p.kind == p.VAR_KEYWORD for p in params)


def _unknown_kwargs(key: str, given: Iterable[str], target: Callable, what: str,
                    exclude: Iterable[str] = ()) -> List[str]:
    named, var_kw = _parameters(target)
    named -= set(exclude)
    if var_kw:
        return []
    bad = sorted(k for k in given if k not in named)
    return [f'{key}.{k}: {what} takes no option {k!r} (its options: {", ".join(sorted(named)) or "none"})'
            for k in bad]


def _missing_required(key: str, given: Iterable[str], target: Callable, what: str,
                      exclude: Iterable[str] = ()) -> List[str]:
    """Options ``target`` requires (no default) that the section does not give: ModelScope would call it at
    iteration 0 and fail with a TypeError there."""
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return []
    required = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                and p.default is p.empty and p.name not in {'self', *exclude}]
    return [f'{key}.{name}: {what} needs this option (it has no default)' for name in required
            if name not in set(given)]


def _type_of(section: Any, key: str) -> Tuple[Optional[Any], List[str]]:
    if not isinstance(section, dict):
        return None, [f'{key}={section!r}: expected a mapping with a "type"']
    name = section.get('type')
    if name is None:
        return None, [f'{key}.type=None: expected a name'] if 'type' in section else []
    if not isinstance(name, str):
        return None, [f'{key}.type={name!r}: expected a name']
    return name, []


def check_registered(cfg: Any, own_optimizer_keys: Iterable[str] = ('head_lr',)) -> List[str]:
    """Problems with the names ModelScope resolves late and the options handed to them (see the module doc)."""
    from modelscope.trainers.hooks import LrSchedulerHook, OptimizerHook, TorchAMPOptimizerHook
    problems: List[str] = []

    optimizer = _get(cfg, 'train.optimizer')
    if optimizer is not None:
        name, problems_here = _type_of(optimizer, 'train.optimizer')
        problems += problems_here
        cls = _lookup('OPTIMIZERS', name) if name else None
        if name and cls is None:
            problems.append(f'train.optimizer.type={name!r}: not an optimizer ModelScope knows '
                            f'({_known("OPTIMIZERS", name)})')
        if cls is not None:
            given = [k for k in optimizer if k not in ('type', 'options') and k not in set(own_optimizer_keys)]
            problems += _unknown_kwargs('train.optimizer', given, cls.__init__, name, exclude=('params',))
            problems += _missing_required('train.optimizer', given, cls.__init__, name, exclude=('params',))
        options = optimizer.get('options') if isinstance(optimizer, dict) else None
        if isinstance(options, dict):
            allowed = _parameters(OptimizerHook.__init__)[0] | _parameters(TorchAMPOptimizerHook.__init__)[0]
            problems += [f'train.optimizer.options.{k}: not an option of ModelScope\'s optimizer hook '
                         f'(expected one of {", ".join(sorted(allowed))}); it would be ignored'
                         for k in sorted(options) if k not in allowed]

    scheduler = _get(cfg, 'train.lr_scheduler')
    if scheduler is not None:
        name, problems_here = _type_of(scheduler, 'train.lr_scheduler')
        problems += problems_here
        cls = _lookup('LR_SCHEDULER', name) if name else None
        if name and cls is None:
            problems.append(f'train.lr_scheduler.type={name!r}: not a learning-rate scheduler ModelScope knows '
                            f'({_known("LR_SCHEDULER", name)})')
        if cls is not None:
            given = [k for k in scheduler if k not in ('type', 'options')]
            problems += _unknown_kwargs('train.lr_scheduler', given, cls.__init__, name,
                                        exclude=('optimizer', 'base_scheduler'))
            problems += _missing_required('train.lr_scheduler', given, cls.__init__, name,
                                          exclude=('optimizer', 'base_scheduler'))
        options = scheduler.get('options') if isinstance(scheduler, dict) else None
        if isinstance(options, dict):
            allowed = _parameters(LrSchedulerHook.__init__)[0] | {'by_epoch'}
            problems += [f'train.lr_scheduler.options.{k}: not an option of ModelScope\'s lr scheduler hook '
                         f'(expected one of {", ".join(sorted(allowed))}); it would be ignored'
                         for k in sorted(options) if k not in allowed]

    metrics = _get(cfg, 'evaluation.metrics')
    if metrics is not None:
        for i, metric in enumerate([metrics] if isinstance(metrics, (str, dict)) else list(metrics)):
            name = metric.get('type') if isinstance(metric, dict) else metric
            if not isinstance(name, str):
                problems.append(f'evaluation.metrics[{i}]={metric!r}: expected a metric name or {{"type": name}}')
            elif _lookup('METRICS', name) is None:
                problems.append(f'evaluation.metrics[{i}]={name!r}: not a metric ModelScope knows '
                                f'({_known("METRICS", name)})')

    for i, hook in enumerate(_get(cfg, 'train.hooks') or []):
        name = hook.get('type') if isinstance(hook, dict) else None
        if not isinstance(name, str):
            problems.append(f'train.hooks[{i}]={hook!r}: expected {{"type": HookName, ...}}')
            continue
        cls = _lookup('HOOKS', name)
        if cls is None:
            problems.append(f'train.hooks[{i}].type={name!r}: not a hook ModelScope knows '
                            f'({_known("HOOKS", name)})')
        else:
            given = [k for k in hook if k != 'type']
            problems += _unknown_kwargs(f'train.hooks[{i}]', given, cls.__init__, name)
            problems += _missing_required(f'train.hooks[{i}]', given, cls.__init__, name)
    return problems



# -- keys of sections whose readers ignore what they do not know -------------------------------------------------
# ModelScope hands these sections to constructors that take **kwargs (hooks) or reads only the keys it knows
# (train, model), so a misspelt key there is silently ignored: ``train.max_epoch: 3`` trains for the default
# number of epochs. A key that is no known key but close to one is refused with the key it resembles; other
# unknown keys are only logged (other ModelScope releases and hub configurations carry keys of their own).
TRAIN_KEYS = ('work_dir', 'max_epochs', 'max_iters', 'train_iters_per_epoch', 'dataloader', 'optimizer',
              'lr_scheduler', 'hooks', 'checkpoint', 'logging', 'optimizer_hook', 'lr_scheduler_hook',
              'amp', 'warmup', 'probe_epochs', 'on_bad_image', 'cpu_allocator', 'feature_cache', 'drop_path')
EVALUATION_KEYS = ('dataloader', 'metrics', 'period', 'val_iters_per_epoch')
MODEL_EXTRA_KEYS = ('type', 'model_dir', 'device')


def _dataloader_keys() -> set:
    from torch.utils.data import DataLoader
    from modelscope.trainers.trainer import EpochBasedTrainer
    return (_parameters(EpochBasedTrainer._build_dataloader_with_dataset)[0] | _parameters(DataLoader.__init__)[0]) \
        - {'dataset', 'sampler', 'batch_sampler', 'collate_fn', 'batch_size', 'num_workers'}


def _model_keys() -> set:
    return _parameters(VisionEfficientTuningModel.__init__)[0] | set(MODEL_EXTRA_KEYS)


def _typos(key: str, given: Iterable[str], known: Iterable[str]) -> List[str]:
    import difflib
    import logging
    known = sorted(set(known))
    problems = []
    for name in given:
        if name in known:
            continue
        close = difflib.get_close_matches(str(name), known, n=2, cutoff=0.75)
        if close:
            problems.append(f'{key}.{name}: unknown key, did you mean {" or ".join(repr(c) for c in close)}? '
                            '(an unknown key is ignored)')
        else:
            logging.getLogger('modelscope.utuning').warning(f'configuration: {key}.{name} is not a key this '
                                                            'package or ModelScope reads; it is ignored')
    return problems


def _hook_section(key: str, hook: str) -> Callable[[], Tuple[set, bool]]:
    def signature():
        from modelscope.trainers import hooks
        return _parameters(getattr(hooks, hook).__init__)
    return signature


# (section, hook whose constructor receives it): ModelScope turns these sections into hooks (default_config.py)
HOOK_SECTIONS = (('train.checkpoint.period', 'CheckpointHook'), ('train.checkpoint.best', 'BestCkptSaverHook'),
                 ('train.logging', 'TextLoggerHook'), ('evaluation.period', 'EvaluationHook'))


def check_sections(cfg: Any) -> List[str]:
    """Misspelt keys of sections whose readers ignore unknown keys, and the values that such sections and
    ``grad_clip`` / ``warmup`` hand on to code that only runs once training has started."""
    problems: List[str] = []
    for key, known in (('train', TRAIN_KEYS), ('evaluation', EVALUATION_KEYS), ('model', None),
                       ('train.dataloader', None), ('evaluation.dataloader', None), ('model.loss', None)):
        section = _get(cfg, key)
        if not isinstance(section, dict):
            continue
        if key == 'model':
            known = _model_keys()
        elif key.endswith('dataloader'):  # handed to torch's DataLoader: an unknown key is a TypeError there
            import difflib
            known = _dataloader_keys() | {'batch_size_per_gpu', 'workers_per_gpu'}
            for k in section:
                if k not in known:
                    close = difflib.get_close_matches(str(k), sorted(known), n=2, cutoff=0.6)
                    hint = f'did you mean {" or ".join(repr(c) for c in close)}?' if close else \
                        f'expected one of {", ".join(sorted(known))}'
                    problems.append(f'{key}.{k}: not a data loader option; {hint}')
            continue
        elif key == 'model.loss':  # ours alone: every unknown key is a mistake
            problems += [f'model.loss.{k}: unknown key; expected label_smoothing' for k in section
                         if k != 'label_smoothing']
            continue
        problems += _typos(key, list(section), known)
    for key, hook in HOOK_SECTIONS:
        section = _get(cfg, key)
        if not isinstance(section, dict):
            continue
        from modelscope.trainers import hooks
        named = _parameters(getattr(hooks, hook).__init__)[0]
        problems += _typos(key, list(section), named | {'type'})
        interval = section.get('interval')
        if interval is not None and _int(1)(interval):
            problems.append(f'{key}.interval={interval!r}: expected an integer >= 1')
    grad_clip = _get(cfg, 'train.optimizer.options.grad_clip')
    if grad_clip is not None:
        from torch.nn.utils import clip_grad_norm_
        if not isinstance(grad_clip, dict):
            problems.append(f'train.optimizer.options.grad_clip={grad_clip!r}: expected a mapping of '
                            'clip_grad_norm_ options, e.g. {"max_norm": 1.0}')
        else:
            problems += _unknown_kwargs('train.optimizer.options.grad_clip', list(grad_clip), clip_grad_norm_,
                                        'clip_grad_norm_', exclude=('parameters',))
            if 'max_norm' not in grad_clip:
                problems.append('train.optimizer.options.grad_clip: needs max_norm')
    warmup = _get(cfg, 'train.lr_scheduler.options.warmup')
    if isinstance(warmup, dict) and isinstance(warmup.get('type'), str):
        import modelscope.trainers.lrscheduler.warmup.warmup  # noqa: F401  (registers the built-in warm-ups)
        name = warmup['type']
        if _lookup('LR_SCHEDULER', name) is None:
            problems.append(f'train.lr_scheduler.options.warmup.type={name!r}: not a warm-up ModelScope knows '
                            f'({_known("LR_SCHEDULER", name)})')
    return problems
