"""modelscope-utuning: U-Tuning (arXiv 2303.00690) parameter-efficient tuning of ViTs for ModelScope.

Importing the package gives our model, preprocessor, pipeline, trainer and metric ModelScope's
``vision-efficient-tuning`` names; each module loads when ModelScope first builds it (see
:mod:`modelscope_utuning.registration`).
"""
__version__ = '0.2.0'  # before the imports below: checkpoint.migrate reads it as it loads

try:
    from . import registration  # noqa: E402,F401  (points ModelScope's builders at our modules)
    from .model import (VisionEfficientTuningModel, has_lora, load_model, load_tuners,  # noqa: E402
                        merge_lora, model_from_tuners, save_tuners)
    from .network import VisionEfficientTuning  # noqa: E402
except ImportError as error:  # a ModelScope release that cannot import here: say what to do (compat.py, 5.)
    from .compat import explain_import_error
    explained = explain_import_error(error)
    if explained is None:
        raise
    raise explained from error



def train_bypass_tasks(trainers):
    """Train several bypass tasks in one run on one frozen forward per step: ``{name: trainer}`` -> ``{name: output
    folder}`` (see :mod:`modelscope_utuning.training.tasks`)."""
    from .training.tasks import train_bypass_tasks as run  # keeps `import modelscope_utuning` light (training)
    return run(trainers)


__all__ = ['VisionEfficientTuning', 'VisionEfficientTuningModel', '__version__', 'has_lora', 'load_model', 'load_tuners',
           'merge_lora', 'model_from_tuners', 'save_tuners', 'train_bypass_tasks']
