"""The tuner protocol: everything a tuner kind is, declared once, in its own file; and the registry.

A kind is a subclass of :class:`Tuner` decorated with :func:`register_tuner`. It declares:

- ``kind``: its name in configuration entries (``{"type": kind, ...}``);
- ``Config``: a frozen dataclass of its entry options, each field with ``metadata={'help': ...}`` (and
  ``'init_only': True`` for options that only set initial values, so they do not make two models differ);
- ``ops`` / ``forms`` / ``default_op`` / ``default_form``: where it attaches and in which forms;
  ``level``: ``'block'`` (one tuner per selected layer, attached to the block as ``{op}_{kind}``) or
  ``'network'`` (one per model, attached to the network as ``{kind}``);
- ``size_keys``: the entry keys that give its size (the first is the canonical one; per-layer lists allowed);
- ``num_trainable(spec, size, dims)``: the closed form of the trainable parameters it adds;
- ``bypass_forms``: the forms that can run on the bypass path (their ``combine`` is ``y + delta``);
- ``mergeable`` and :meth:`Tuner.merge`: whether and how it folds into the frozen weights;
  :meth:`Tuner.modifies`: which frozen projections merging changes; :meth:`Tuner.borrows`: which it reads;
- ``hub_names``: its parameter names in ModelScope's hub layout (built-in name, our name, form);
- ``legacy_keys`` / :meth:`Tuner.legacy_entry`: the ModelScope ``*_length`` keys it answers.

An instance implements the hook points it lists in ``points`` (see :mod:`..backbone.hooks`) and, through
:meth:`Tuner.adapter_params` (torchtune's protocol), says which parameters train. Which parameters train, what
the tuner-only file holds and the optimizer's groups all follow from these module types, never from names.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Iterable, List, Optional, Sequence, Tuple, Type

import torch.nn as nn

from ..backbone.hooks import OPS, TunerHooks

LEVELS = ('block', 'network')


@dataclass(frozen=True)
class Dims:
    """The backbone sizes a tuner is built for."""
    embed_dim: int
    num_heads: int
    mlp_hidden: int
    depth: int
    act: str = 'gelu'


@dataclass(frozen=True)
class TunerConfig:
    """Options common to every entry. Kinds subclass it (frozen too); ``type``, ``op``, ``form``, ``layers`` and
    the size keys are parsed by :mod:`.spec` and are not fields here. A field's default is its real default, or
    ``None`` where the value comes from the backbone or the form (filled by the kind's :meth:`Tuner.resolve`)."""


def option(default: Any, help: str, init_only: bool = False, choices: Optional[Sequence[Any]] = None):
    """A Config field with its help text (``choices`` are checked when the entry is parsed)."""
    return dataclasses.field(default=default, metadata={'help': help, 'init_only': init_only, 'choices': choices})


class Tuner(nn.Module, TunerHooks):
    """Base class of every tuner kind (see the module docstring for what a kind declares)."""

    kind: ClassVar[str] = ''
    Config: ClassVar[Type[TunerConfig]] = TunerConfig
    ops: ClassVar[Tuple[str, ...]] = ()
    forms: ClassVar[Tuple[str, ...]] = ('parallel',)
    default_op: ClassVar[Optional[str]] = None
    default_form: ClassVar[str] = 'parallel'
    level: ClassVar[str] = 'block'
    size_keys: ClassVar[Tuple[str, ...]] = ()
    size_required: ClassVar[bool] = True
    bypass_forms: ClassVar[Tuple[str, ...]] = ()
    mergeable: ClassVar[bool] = False
    hub_names: ClassVar[Tuple[Tuple[str, str, Optional[str]], ...]] = ()
    legacy_keys: ClassVar[Tuple[str, ...]] = ()
    requires_bypass: ClassVar[bool] = False

    # -- declarations used before a module exists ----------------------------------------------------------------
    @classmethod
    def check(cls, spec) -> None:
        """Validate what a parsed entry says (raise with ``spec.fail(message)``); ``spec.options`` holds the
        entry's own values, ``None`` where it gave none. Only validates: defaults are :meth:`resolve`'s."""

    @classmethod
    def resolve(cls, spec, dims: Dims):
        """The checked ``spec`` with every default filled in for a backbone of ``dims`` (a new frozen spec, e.g.
        ``dataclasses.replace(spec, options=...)``): the one place a kind's defaults are decided."""
        return spec

    @classmethod
    def num_trainable(cls, spec, size: int, dims: Dims) -> int:
        """Closed-form number of trainable parameters of one tuner of this size (one layer)."""
        raise NotImplementedError

    @classmethod
    def count_trainable(cls, spec, backbone) -> int:
        """Closed-form trainable parameters of a whole entry on ``backbone`` (every selected layer)."""
        dims = dims_of(backbone)
        if cls.level == 'block':
            return sum(cls.num_trainable(spec, size, dims) for size in spec.sizes if size)
        return cls.num_trainable(spec, spec.sizes[0] if spec.sizes else 1, dims)

    @classmethod
    def legacy_entry(cls, backbone_cfg: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        """The entry meaning what ModelScope's built-in computes for this kind's ``legacy_keys`` (None if absent)."""
        return None

    @classmethod
    def form_class(cls, form: Optional[str]) -> Type['Tuner']:
        """The module class of one form of this kind (a kind with two forms implements each in its own small
        class, e.g. ``Adapter`` (parallel) and ``SequentialAdapter``); default: this class."""
        return cls

    # -- an instance ------------------------------------------------------------------------------------------
    def __init__(self, spec, size: int, dims: Dims):
        super().__init__()
        self.op, self.form, self.size = spec.op, spec.form, size

    def modifies(self) -> Tuple[str, ...]:
        """The frozen projections ('q', 'k', 'v', 'proj', 'fc1', 'fc2') whose weights :meth:`merge` changes."""
        return ()

    def borrows(self) -> Tuple[str, ...]:
        """The frozen projections ('q', 'k', 'v') this tuner computes itself from the frozen weights (rather than
        reading what the attention computed), so that merging another tuner into them would change its output."""
        return ()

    def adapter_params(self, host: nn.Module) -> Dict[str, nn.Parameter]:
        """The parameters this tuner trains, by name relative to this module (or, for tuners that train parameters
        of the backbone such as BitFit, relative to ``host``). Default: all of its own."""
        return dict(self.named_parameters())

    def no_weight_decay(self) -> set:
        """Own parameter names that weight decay would only pull towards zero (learned tokens, offsets, scales);
        1-d parameters are exempt anyway."""
        return set()

    def lr_scales(self) -> Dict[str, float]:
        """Own parameter name -> factor on the tuner learning rate, for parameters whose update must be smaller
        (or larger) than the rest to keep one optimizer step's effect on the OP's output of the order of the
        learning rate (see LoRA). Default: none, every parameter learns at the tuner learning rate."""
        return {}

    def merge(self, host: nn.Module) -> None:
        """Fold this tuner into ``host``'s frozen weights (mergeable kinds); the caller then detaches it."""
        raise NotImplementedError(f'{self.kind} tuners do not merge into the frozen weights')

    def extra_repr(self) -> str:
        return f'op={self.op}, form={self.form}, size={self.size}'


def dims_of(backbone) -> Dims:
    return Dims(backbone.embed_dim, backbone.num_heads, backbone.mlp_hidden, backbone.depth,
                getattr(backbone, 'act', 'gelu'))


# -- the registry ---------------------------------------------------------------------------------------------------
_REGISTRY: Dict[str, Type[Tuner]] = {}


def register_tuner(cls: Type[Tuner]) -> Type[Tuner]:
    """Class decorator: make ``cls`` the tuner of kind ``cls.kind`` (once)."""
    if not cls.kind:
        raise ValueError(f'{cls.__name__} declares no kind')
    if cls.kind in _REGISTRY and _REGISTRY[cls.kind] is not cls:
        raise ValueError(f'tuner kind {cls.kind!r} is already registered by {_REGISTRY[cls.kind].__name__}')
    if cls.level not in LEVELS:
        raise ValueError(f'{cls.__name__}.level={cls.level!r}: expected one of {LEVELS}')
    if not dataclasses.is_dataclass(cls.Config):
        raise ValueError(f'{cls.__name__}.Config must be a dataclass')
    _REGISTRY[cls.kind] = cls
    return cls


def tuner_kinds() -> Dict[str, Type[Tuner]]:
    """Kind name -> class, for every registered kind."""
    from . import _discover  # cycle: the tuners package imports this module before it defines _discover
    _discover()
    return dict(_REGISTRY)


def tuner_class(kind: str) -> Optional[Type[Tuner]]:
    return tuner_kinds().get(kind)


def slot_name(kind_cls: Type[Tuner], op: Optional[str]) -> str:
    """Where a tuner lives: ``{op}_{kind}`` inside a block, ``{kind}`` on the network."""
    return f'{op}_{kind_cls.kind}' if kind_cls.level == 'block' else kind_cls.kind


def slot_names() -> List[str]:
    """Every child name a registered tuner may have (to recognise tuner weights in a foreign file)."""
    names = []
    for cls in tuner_kinds().values():
        names += [slot_name(cls, op) for op in (cls.ops or OPS)] if cls.level == 'block' else [slot_name(cls, None)]
    return names


def legacy_keys() -> Tuple[str, ...]:
    """Every ModelScope legacy configuration key some kind answers (``adapter_length``, ``adapter_type`` ...)."""
    keys: List[str] = []
    for cls in tuner_kinds().values():
        keys += list(cls.legacy_keys)
    return tuple(keys)


def iter_tuners(root: nn.Module) -> Iterable[Tuple[str, Tuner]]:
    """``(qualified name, tuner)`` for every tuner module under ``root``."""
    for name, module in root.named_modules():
        if isinstance(module, Tuner):
            yield name, module


def tuner_state_keys(root: nn.Module) -> set:
    """State-dict keys of ``root`` that belong to tuner modules (found by type)."""
    keys = set()
    for name, tuner in iter_tuners(root):
        prefix = f'{name}.' if name else ''
        keys |= {prefix + k for k in tuner.state_dict()}
    return keys
