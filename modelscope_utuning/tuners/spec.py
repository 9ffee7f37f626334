"""Tuner entries: the ``model.backbone.tuners`` list of configuration.json, and ModelScope's legacy keys.

One entry per tuner kind and OP, e.g.::

    {"type": "adapter", "op": "mha",   "form": "parallel", "dim": 10}
    {"type": "prefix",  "op": "block", "form": "parallel", "length": 10, "scale": "channel", "layers": "all"}
    {"type": "lora",    "op": "mha",   "rank": 8, "alpha": 8}
    {"type": "bitfit"}

``layers`` is ``"all"``, one index or a list of indices; the size (the kind's ``size_keys``: dim / length /
rank) may be a per-layer list, where 0 means "no tuner on that layer". Everything a kind accepts comes from its
declaration (:mod:`.base`): this module knows no kind by name. The legacy hub keys (``adapter_length`` ...) are
translated by the kind that answers them (:meth:`~.base.Tuner.legacy_entry`).

Parsing is one pass: ``entry -> check -> resolve -> TunerSpec``. The kind's :meth:`~.base.Tuner.check` only
validates what the entry says; its :meth:`~.base.Tuner.resolve` fills in every default (its real value on this
backbone: the backbone's activation, the parallel form's scale and join ...). The spec it returns is frozen:
no later code fills or changes a default. What every file stores is :meth:`TunerSpec.to_entry`, which parses back
to an equal spec.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Type, Union

from ..backbone.hooks import OPS
from .base import Dims, Tuner, TunerConfig, tuner_kinds

@dataclass(frozen=True)
class TunerSpec:
    """One validated, resolved entry; ``sizes[i]`` is its size on layer i (0: absent there). ``options`` holds every
    option of the kind with its resolved value (``None`` only where the kind documents it as a value, e.g. LoRA's
    ``alpha``: the rank). ``source`` is the entry as written, kept for error messages."""
    type: str
    op: Optional[str] = None
    form: Optional[str] = None
    sizes: Tuple[int, ...] = ()
    options: TunerConfig = field(default_factory=TunerConfig)
    source: Mapping[str, Any] = field(default_factory=dict, compare=False)
    embed_dim: int = 0  # the backbone width it was parsed for

    @property
    def kind(self) -> Type[Tuner]:
        return tuner_kinds()[self.type]

    def __getattr__(self, name: str) -> Any:
        # The kind's options read as attributes (``spec.scale``, ``spec.alpha`` ...).
        options = self.__dict__.get('options')
        if options is not None and name in {f.name for f in dataclasses.fields(options)}:
            return getattr(options, name)
        raise AttributeError(name)

    def fail(self, message: str) -> None:
        _fail(self.source, message)

    def to_entry(self) -> Dict[str, Any]:
        """The entry every file stores: as written (its ``layers`` and per-layer sizes), the size under the kind's
        canonical key (``dim`` / ``length`` / ``rank``: the first of its ``size_keys``), ``op`` and ``form``
        (block kinds) and every option resolved, so that a saved entry means the same to a later version whose
        defaults differ (see :mod:`..checkpoint.migrate`). ``parse_tuner(spec.to_entry(), dims) == spec``."""
        cls = self.kind
        entry = {k: v for k, v in self.source.items() if k not in cls.size_keys}
        given = next((k for k in cls.size_keys if k in self.source), None)
        if given is not None:
            entry[cls.size_keys[0]] = copy.deepcopy(self.source[given])
        if cls.level == 'block':
            entry['op'], entry['form'] = self.op, self.form
        entry.update(dataclasses.asdict(self.options))
        return entry

    def signature(self) -> tuple:
        """What the entry computes, independent of spelling and of options that only set initial values."""
        opts = tuple(sorted((f.name, _hashable(getattr(self.options, f.name)))
                            for f in dataclasses.fields(self.options) if not f.metadata.get('init_only')))
        return (self.type, self.op or '', self.form or '', tuple(self.sizes), opts)


def _hashable(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def _fail(entry: Any, msg: str) -> None:
    raise ValueError(f'tuner entry {entry!r}: {msg}')


def _layer_sizes(entry: Dict[str, Any], size: Union[int, Sequence[int]], depth: int) -> List[int]:
    if isinstance(size, (list, tuple)):
        if len(size) != depth:
            _fail(entry, f'a per-layer size list needs {depth} values (one per layer), got {len(size)}')
        sizes = list(size)
    else:
        sizes = [size] * depth
    for s in sizes:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            _fail(entry, f'sizes must be non-negative integers, got {s!r}')
    layers = entry.get('layers', 'all')
    if layers != 'all':
        wanted = [layers] if isinstance(layers, int) and not isinstance(layers, bool) else layers
        if not isinstance(wanted, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                            for i in wanted):
            _fail(entry, f"layers must be 'all', an index or a list of indices, got {layers!r}")
        bad = [i for i in wanted if not -depth <= i < depth]
        if bad:
            _fail(entry, f'layer index {bad[0]} is out of range for a backbone of depth {depth}')
        keep = {i % depth for i in wanted}
        sizes = [s if i in keep else 0 for i, s in enumerate(sizes)]
    if not any(sizes):
        _fail(entry, 'it attaches to no layer (every size is 0 or no layer selected)')
    return sizes


def _options(cls: Type[Tuner], entry: Dict[str, Any]) -> TunerConfig:
    values = {}
    for f in dataclasses.fields(cls.Config):
        if entry.get(f.name) is not None:  # null: the default (a resolved entry writes every option)
            value = entry[f.name]
            choices = f.metadata.get('choices')
            if choices is not None and value not in choices:
                _fail(entry, f'unknown {f.name} {value!r}; expected one of {tuple(choices)}')
            values[f.name] = value
    return cls.Config(**values)


def parse_tuner(entry: Dict[str, Any], dims: Dims) -> TunerSpec:
    """Validate one configuration entry for a backbone of ``dims`` and resolve it (module docstring); raise
    ValueError naming the entry on anything wrong."""
    if not isinstance(entry, dict):
        _fail(entry, 'expected a mapping with a "type" key')
    kinds = tuner_kinds()
    kind = entry.get('type')
    if kind not in kinds:
        _fail(entry, f'unknown type {kind!r}; expected one of {tuple(kinds)}')
    cls = kinds[kind]
    allowed = {'type', 'layers'} | set(cls.size_keys) | {f.name for f in dataclasses.fields(cls.Config)}
    if cls.level == 'block':
        allowed |= {'op', 'form'}
    unknown = set(entry) - allowed
    if unknown:
        _fail(entry, f'unknown key(s) {sorted(unknown)} for a {kind} tuner; allowed: {sorted(allowed)}')
    given = [k for k in cls.size_keys if k in entry]
    if len(given) > 1:
        _fail(entry, f'{" and ".join(given)} both give the size; write one ({cls.size_keys[0]!r})')
    if not given:
        if cls.size_required:
            _fail(entry, f'a {kind} tuner needs a size: one of {cls.size_keys}')
        size: Any = 1
    else:
        size = entry[given[0]]
        if isinstance(size, (int, float)) and not isinstance(size, bool) and size <= 0:
            _fail(entry, f'{given[0]} must be > 0, got {size}')
    depth = dims.depth
    op = form = None
    if cls.level == 'block':
        sizes = _layer_sizes(entry, size, depth)
        op = entry.get('op', cls.default_op)
        if op not in OPS:
            _fail(entry, f'unknown op {op!r}; expected one of {OPS}')
        form = entry.get('form', cls.default_form)
        if form not in ('parallel', 'sequential'):
            _fail(entry, f"unknown form {form!r}; expected one of ('sequential', 'parallel')")
    else:
        sizes = _layer_sizes(entry, size, depth) if 'layers' in entry or isinstance(size, list) else [size] * depth
    spec = TunerSpec(type=kind, op=op, form=form, sizes=tuple(sizes), options=_options(cls, entry),
                     source=copy.deepcopy(entry), embed_dim=dims.embed_dim)
    cls.check(spec)
    if cls.level == 'block':
        if spec.form not in cls.forms:
            _fail(entry, f'a {kind} tuner has the form(s) {cls.forms}, not {spec.form!r}')
        if spec.op not in cls.ops:
            _fail(entry, f'a {kind} tuner attaches to op {" or ".join(map(repr, cls.ops))}, not {spec.op!r}')
    return cls.resolve(spec, dims)


def legacy_entries(backbone_cfg: Dict[str, Any]) -> List[Dict[str, Any]]:
    """ModelScope's legacy keys (``adapter_length`` ...) as entries meaning what the built-in computes."""
    entries = []
    for cls in tuner_kinds().values():
        entry = cls.legacy_entry(backbone_cfg)
        if entry is not None:
            entries.append(entry)
    return entries


def legacy_size(backbone_cfg: Dict[str, Any], key: str) -> Optional[Union[int, List[int]]]:
    """A legacy ``*_length`` value, or None when it is absent or switches the tuner off (0 / all zeros)."""
    size = backbone_cfg.get(key)
    if size is None:
        return None
    sizes = list(size) if isinstance(size, (list, tuple)) else size
    if (isinstance(sizes, list) and not any(sizes)) or sizes == 0:
        return None
    return sizes


def parse_tuners(entries: Optional[Sequence[Dict[str, Any]]], dims: Dims) -> List[TunerSpec]:
    """Validate a whole list: every entry, and that no (type, op) pair is configured twice on a layer."""
    if entries is None:
        return []
    if not isinstance(entries, (list, tuple)):
        raise ValueError(f'model.backbone.tuners must be a list of tuner entries, got {entries!r}')
    specs = [parse_tuner(e, dims) for e in entries]
    seen: Dict[tuple, List[TunerSpec]] = {}
    for spec in specs:
        key = (spec.type, spec.op)
        for earlier in seen.get(key, []):  # every earlier entry of the same (type, op), not only the last
            for i, (a, b) in enumerate(zip(earlier.sizes, spec.sizes)):
                if a and b:
                    _fail(spec.source, f'layer {i} already has a {spec.type} tuner'
                                       + (f' on op {spec.op!r}' if spec.op else '') + f' (from {earlier.source!r})')
        seen.setdefault(key, []).append(spec)
    return specs
