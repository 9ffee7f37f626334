"""One migration of saved tuner entries, called by every reader of every saved format.

A tuner entry that leaves an option out means the default *of the version that wrote it*. Defaults change (0.2
made parallel tuners join the residual stream in its own units, ``join: residual``, where 0.1 added them in
absolute units, now ``join: absolute``), so a reader fills what an entry leaves out from the writer's defaults
(:data:`WRITER_DEFAULTS`), never from today's. Writers store every option explicitly
(:meth:`~..tuners.spec.TunerSpec.to_entry`) together with their version, so a file written from now on
does not depend on any default.

Which version wrote a file (the rule for each format, :func:`writer_of_configuration`,
:func:`writer_of_tuner_config`, :func:`writer_of_checkpoint`):

- ``configuration.json``: ``utuning.version``, which every version of this package writes into its output
  folders. Without it the file was not written by this package (a configuration written by hand or ModelScope's
  built-in hub model): it means today's defaults.
- ``adapter_config.json`` (tuner-only files): ``written_by.version`` (written since this rule exists); else the
  ``utuning.version`` of the ``configuration.json`` beside it (a trainer's output folder); else by its layout:
  ``format_version`` 1 (or absent) is what 0.1 wrote (``save_tuners``: ``tuners`` as the user wrote them, ``base``,
  ``head``, ``CLASSES``, no ``backbone_fingerprint``) -> 0.1.0; ``format_version`` 2 without a marker -> 0.2.0
  (format 2 came with the restructuring released as 0.2.0).
- ``epoch_N.pth`` (trainer checkpoints with ``model_cfg``): ``utuning.version`` in the file; without it -> 0.2.0,
  the first version whose epoch files carried a model configuration.

A writer version this code does not know (newer) fills nothing: such files carry resolved entries.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence

from .. import __version__
from ..fileio import read_json_object
from ..tuners.base import tuner_kinds

PACKAGE = 'modelscope-utuning'
# What an entry that left an option out meant, per writer version (major.minor). Only options whose default
# changed between versions are listed; a version that changes a default adds a row (tests/test_migration.py
# checks that the row of the running version is the live default).
WRITER_DEFAULTS: Dict[str, Dict[str, Any]] = {
    '0.1': {'join': 'absolute'},
    '0.2': {'join': 'residual'},
}
# options that exist only in some forms: (option, the form it belongs to)
FORM_OF_OPTION = {'join': 'parallel'}


def writer_marker() -> Dict[str, str]:
    """What a writer records about itself (``written_by`` / ``utuning``)."""
    return {'package': PACKAGE, 'version': __version__}


def _minor(version: Optional[str]) -> Optional[str]:
    if not version:
        return None
    parts = str(version).split('.')
    return '.'.join(parts[:2]) if len(parts) >= 2 else str(version)


def migrate(entries: Optional[Sequence[Any]], written_by: Optional[str], format_version: Optional[int] = None,
            source: str = 'saved tuner entries') -> Optional[List[Any]]:
    """``entries`` as saved by version ``written_by`` -> entries meaning the same to this version: every option
    the entry left out whose default differed then is written in. ``written_by`` None: not written by this
    package (today's defaults), unless ``format_version`` (of a tuner-only file) is given: then the version its
    layout says. Entries are copied, never changed in place; anything that is not an entry of a known kind passes
    through (the parser names it later). ``source`` names the file in errors."""
    if entries is None:
        return None
    if written_by is None and format_version is not None:  # an unmarked tuner-only file: its layout says
        written_by = writer_of_tuner_format(format_version)
    if not isinstance(entries, (list, tuple)):
        raise ValueError(f'{source}: "tuners" must be a list of tuner entries, got {type(entries).__name__}')
    defaults = WRITER_DEFAULTS.get(_minor(written_by) or '', {}) if written_by else {}
    if not defaults:
        return [dict(e) if isinstance(e, Mapping) else e for e in entries]
    kinds = tuner_kinds()
    out = []
    for e in entries:
        cls = kinds.get(e.get('type')) if isinstance(e, Mapping) else None
        if cls is None:
            out.append(dict(e) if isinstance(e, Mapping) else e)
            continue
        e = dict(e)
        fields = {f.name for f in dataclasses.fields(cls.Config)}
        form = e.get('form', cls.default_form)
        for option, value in defaults.items():
            if option in fields and e.get(option) is None and FORM_OF_OPTION.get(option, form) == form:
                e[option] = value
        out.append(e)
    return out


def migrate_backbone(backbone_cfg: Mapping[str, Any], written_by: Optional[str],
                     source: str = 'configuration.json') -> Dict[str, Any]:
    """A ``model.backbone`` section with its ``tuners`` migrated (legacy ``*_length`` keys mean ModelScope's
    built-in and have no options to migrate)."""
    out = dict(backbone_cfg or {})
    if out.get('tuners'):
        out['tuners'] = migrate(out['tuners'], written_by, source=f'{source} model.backbone')
    return out


def writer_of_configuration(cfg: Optional[Mapping[str, Any]]) -> Optional[str]:
    """The version that wrote a configuration.json (its ``utuning.version``), None when this package did not."""
    section = (cfg or {}).get('utuning') if isinstance(cfg, Mapping) else None
    version = section.get('version') if isinstance(section, Mapping) else None
    return str(version) if version else None


def writer_of_folder(folder: Optional[str]) -> Optional[str]:
    """:func:`writer_of_configuration` of ``folder/configuration.json`` (None without one or when unreadable)."""
    path = os.path.join(folder, 'configuration.json') if folder else None
    if not path or not os.path.isfile(path):
        return None
    try:
        return writer_of_configuration(read_json_object(path))
    except ValueError:
        return None


def writer_of_tuner_config(cfg: Mapping[str, Any], folder: Optional[str] = None) -> str:
    """The version that wrote an adapter_config.json (module docstring: marker, configuration.json beside it,
    else its layout)."""
    marker = cfg.get('written_by')
    if isinstance(marker, Mapping) and marker.get('version'):
        return str(marker['version'])
    beside = writer_of_folder(folder)
    if beside:
        return beside
    return writer_of_tuner_format(cfg.get('format_version', 1))


def writer_of_tuner_format(format_version: Any) -> str:
    """The version that wrote an unmarked adapter_config.json of ``format_version`` (1: 0.1.0, 2: 0.2.0)."""
    try:
        return '0.1.0' if int(format_version) < 2 else '0.2.0'
    except (TypeError, ValueError):
        raise ValueError(f'adapter_config.json format_version={format_version!r}: expected an integer') from None


def writer_of_checkpoint(ckpt: Mapping[str, Any]) -> str:
    """The version that wrote a trainer's ``epoch_N.pth`` (its ``utuning.version``, else 0.2.0)."""
    return writer_of_configuration(ckpt) or '0.2.0'


__all__ = ['WRITER_DEFAULTS', 'migrate', 'migrate_backbone', 'writer_marker', 'writer_of_checkpoint',
           'writer_of_configuration', 'writer_of_folder', 'writer_of_tuner_config', 'writer_of_tuner_format']
