"""Optional dependencies: import one, or fail with the ``pip install`` line of the extra that brings it.

The runtime needs only ModelScope, torch and a few small packages (setup.cfg's ``install_requires``). ONNX export,
the web demo, matplotlib plots, TensorBoard logging and ms-swift tuners each live behind an extra of setup.cfg;
the code that needs one calls :func:`require` where it starts, so a user without it learns what to install
instead of reading an ``ImportError`` from deep inside a library.
"""
from __future__ import annotations

import importlib
from types import ModuleType

PACKAGE = 'modelscope-utuning'


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message says which extra installs it."""


def install_hint(extra: str) -> str:
    return f"pip install '{PACKAGE}[{extra}]'"


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """``importlib.import_module(module)``, or MissingExtraError: '<purpose> needs <module>: pip install ...'."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtraError(f'{purpose} needs the Python package {module.split(".")[0]!r}, which is not '
                                f'installed ({e}): {install_hint(extra)}') from e


def available(module: str) -> bool:
    """Whether ``module`` imports (for optional features with a fallback, e.g. the Pillow training curve)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True
