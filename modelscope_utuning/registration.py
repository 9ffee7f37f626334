"""The one place where modelscope-utuning plugs into ModelScope.

Registers our model, preprocessor, pipeline and trainer under the ``vision-efficient-tuning`` names, and points
ModelScope's lazy-import index at our modules for those names. Without the second step ModelScope would import
its built-in module before every build (and fail where torchvision / opencv are missing, or re-register the
built-in over ours). Other models' registrations are not touched.
"""
from __future__ import annotations

from modelscope.metainfo import Models, Pipelines, Trainers
from modelscope.metrics.builder import METRICS
from modelscope.models.builder import MODELS
from modelscope.pipelines.builder import PIPELINES
from modelscope.preprocessors.builder import PREPROCESSORS
from modelscope.trainers.builder import TRAINERS
from modelscope.utils.ast_utils import INDEX_KEY, MODULE_KEY, REQUIREMENT_KEY
from modelscope.utils.constant import Fields, Tasks
from modelscope.utils.import_utils import LazyImportModule

TASK = Tasks.vision_efficient_tuning
PREPROCESSOR_NAME = 'vision-efficient-tuning-preprocessor'


def _entries():
    from .model import VisionEfficientTuningModel
    from .pipeline import VisionEfficientTuningPipeline
    from .preprocessing.preprocessor import VisionEfficientTuningPreprocessor
    from .training.metrics import TOPK_METRIC, TopKAccuracy
    from .training.trainer import VisionEfficientTuningTrainer
    return [
        (MODELS, TASK, Models.vision_efficient_tuning, VisionEfficientTuningModel),
        (PIPELINES, TASK, Pipelines.vision_efficient_tuning, VisionEfficientTuningPipeline),
        (PREPROCESSORS, Fields.cv, PREPROCESSOR_NAME, VisionEfficientTuningPreprocessor),
        (TRAINERS, 'default', Trainers.vision_efficient_tuning, VisionEfficientTuningTrainer),
        (METRICS, 'default', TOPK_METRIC, TopKAccuracy),
    ]


def _local_paths_skip_hub_lookup() -> None:
    """ModelScope's builders ask the hub whether a model comes from a trusted publisher, for local folders too;
    offline that stalls for seconds with retries, and a local folder is untrusted by ModelScope's own rule
    (its answer is always False). Answer False for existing local paths without the lookup; hub ids unchanged."""
    import os
    import sys
    from modelscope.utils import automodel_utils
    original = automodel_utils.is_model_from_trusted_source
    if getattr(original, '_utuning_local_first', False):
        return

    def is_model_from_trusted_source(model_id, revision=None, trusted_owners=None):
        if isinstance(model_id, (str, os.PathLike)) and os.path.exists(model_id):
            return False
        return original(model_id, revision, trusted_owners)

    is_model_from_trusted_source._utuning_local_first = True
    for name in ('modelscope.utils.automodel_utils', 'modelscope.pipelines.builder', 'modelscope.trainers.builder',
                 'modelscope.models.base.base_model'):
        module = sys.modules.get(name)
        if module is None:
            module = __import__(name, fromlist=['_'])
        if hasattr(module, 'is_model_from_trusted_source'):
            module.is_model_from_trusted_source = is_model_from_trusted_source


def register() -> None:
    """Idempotent: safe to call again (e.g. after another package re-registered the built-in)."""
    index = LazyImportModule.get_ast_index()
    for registry, group, name, cls in _entries():
        registry.register_module(group, module_name=name, module_cls=cls, force=True)
        signature = (registry.name.upper(), group, name)
        index[INDEX_KEY][signature] = {'filepath': __file__, 'imports': [], MODULE_KEY: cls.__module__}
        index[REQUIREMENT_KEY].pop(cls.__module__, None)
    _local_paths_skip_hub_lookup()


register()
