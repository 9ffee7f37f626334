"""modelscope-utuning: U-Tuning (arXiv 2303.00690) parameter-efficient tuning of ViTs for ModelScope.

Importing the package registers our model, preprocessor, pipeline and trainer under ModelScope's
``vision-efficient-tuning`` names (see :mod:`modelscope_utuning.registration`).
"""
__version__ = '0.1.0'

from . import registration  # noqa: E402,F401  (registers with ModelScope on import)
from .model import VisionEfficientTuningModel  # noqa: E402

__all__ = ['VisionEfficientTuningModel', '__version__']
