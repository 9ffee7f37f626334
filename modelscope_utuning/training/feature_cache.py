"""``train.feature_cache``: train bypass models on cached frozen features.

In bypass mode the frozen backbone's pass over an image does not depend on the tuners, so when the training images
repeat from epoch to epoch, epochs after the first can read it back (:class:`~..backbone.feature_cache.
FrozenFeatureCache`) and only the tuners and the head run. Configuration::

    "train": {"feature_cache": {"enabled": "auto",   # auto | true | false (a bare true / false works too)
                                "max_mb": 2048,      # the most the cache holds; images beyond it are recomputed
                                "views": 0}}         # > 0: each training image gets this many fixed augmented views

- ``auto`` (the default) caches when it is exact and useful: bypass mode, no dropout in the frozen backbone, and
  training images that repeat: a deterministic training transform, or ``views > 0``.
- ``true`` asks for it: a configuration where it cannot work is an error when the trainer is built, naming why.
- ``views: K`` fixes K augmented views per image: each time an image is read, one of its K views is drawn (the
  augmentation's random numbers are seeded by (run seed, image, view)); each view's features are computed the first
  time it is drawn and read back after. The views apply with the cache off too (the same images either way).
  Random augmentation with ``views: 0`` sees a new view of every image in every epoch: nothing repeats and auto
  leaves the cache off.

The log reports at the end of training what the cache held (images, MB) and its hits and misses.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from modelscope.utils.logger import get_logger

from ..backbone.feature_cache import FrozenFeatureCache

logger = get_logger()

SETTING = 'train.feature_cache'
DEFAULTS = {'enabled': 'auto', 'max_mb': 2048, 'views': 0}
ENABLED_CHOICES = ('auto', True, False)


@dataclass(frozen=True)
class CachePlan:
    """What the trainer does: cache or not (and why), its bound, the fixed views per training image (0: the
    transform as it is; the views apply with the cache off too, so a run with and one without it see the same
    images)."""
    on: bool
    reason: str
    max_mb: float
    views: int


def read_settings(value: Any) -> dict:
    """``train.feature_cache`` as ``{enabled, max_mb, views}`` with defaults; ValueError naming the key when bad."""
    if value is None:
        return dict(DEFAULTS)
    if isinstance(value, bool) or value == 'auto':
        return {**DEFAULTS, 'enabled': value}
    if not isinstance(value, Mapping):
        raise ValueError(f'{SETTING}={value!r}: expected auto, true, false or a dict with keys {sorted(DEFAULTS)}')
    unknown = sorted(set(value) - set(DEFAULTS))
    if unknown:
        raise ValueError(f'{SETTING}: unknown key(s) {unknown}; expected {sorted(DEFAULTS)}')
    out = {**DEFAULTS, **{k: v for k, v in value.items() if v is not None}}
    if out['enabled'] not in ENABLED_CHOICES or out['enabled'] in (0, 1) and not isinstance(out['enabled'], bool):
        raise ValueError(f"{SETTING}.enabled={out['enabled']!r}: expected auto, true or false")
    mb = out['max_mb']
    if isinstance(mb, bool) or not isinstance(mb, (int, float)) or not mb >= 0:
        raise ValueError(f'{SETTING}.max_mb={mb!r}: expected a number of megabytes >= 0')
    views = out['views']
    if isinstance(views, bool) or not isinstance(views, int) or views < 0:
        raise ValueError(f'{SETTING}.views={views!r}: expected an integer >= 0 (0: the training transform as it is)')
    return out


def plan(value: Any, vit, transform_random: Optional[bool]) -> CachePlan:
    """Decide from the settings, the backbone and whether the training transform draws random numbers (None: it
    cannot be told, e.g. a preprocessor of the user's own). ValueError when ``enabled: true`` cannot be honoured."""
    s = read_settings(value)
    asked = s['enabled'] is True
    views = s['views']

    def off(why: str) -> CachePlan:
        if asked:
            raise ValueError(f'{SETTING}.enabled=true: {why}')
        return CachePlan(False, why, s['max_mb'], views)

    if s['enabled'] is False:
        return CachePlan(False, f'{SETTING}.enabled=false', s['max_mb'], views)
    if not vit.bypass:
        return off('the frozen features depend on the tuners outside bypass mode; expected model.backbone.bypass=true')
    if vit.frozen_path_is_random(training=True):
        return off('the backbone applies dropout in training (drop_rate / attn_drop_rate > 0), so its features '
                   'differ at every pass; expected those rates at 0')
    if not views and transform_random is not False:
        if transform_random is None and asked:
            return CachePlan(True, 'asked for; the training transform is taken to be deterministic', s['max_mb'], 0)
        return off('the training transform augments at random, so no image repeats; set '
                   f'{SETTING}.views to a number of fixed views per image, or use a deterministic preprocessor.train'
                   if transform_random else 'whether the training transform is deterministic cannot be told')
    why = f'{views} fixed view(s) per training image' if views else 'the training transform is deterministic'
    return CachePlan(True, why, s['max_mb'], views)


def plan_for(trainer, preprocessor) -> CachePlan:
    """The plan of a trainer's run, from its configuration, its backbone and its training ``preprocessor`` (asked
    ``train_is_random()`` when it can answer); logged when bypass mode makes it matter."""
    is_random = getattr(preprocessor, 'train_is_random', None)
    vit = trainer.model_unwrapped.model.backbone
    decided = plan(trainer.cfg.safe_get(SETTING), vit, is_random() if callable(is_random) else None)
    if decided.on or vit.bypass:
        logger.info(f'frozen feature cache {"on" if decided.on else "off"}: {decided.reason}')
    return decided


@contextlib.contextmanager
def active(trainer):
    """While the body runs (training, and the evaluations in between), the trainer's bypass backbone reads and fills
    a :class:`FrozenFeatureCache` if its plan says so; afterwards the cache is dropped, and what it did is logged and
    kept in ``trainer.feature_cache_summary``."""
    decided = getattr(trainer, 'feature_cache_plan', None)
    if decided is None or not decided.on:
        yield
        return
    vit = trainer.model_unwrapped.model.backbone
    vit.feature_cache = FrozenFeatureCache(int(decided.max_mb * 2 ** 20))
    try:
        yield
    finally:
        trainer.feature_cache_summary = vit.feature_cache.summary()
        vit.feature_cache = None
        logger.info(f'frozen feature cache: {trainer.feature_cache_summary}')
