"""The one place where modelscope-utuning plugs into ModelScope.

Our model, preprocessor, pipeline, trainer and top-5 metric take ModelScope's ``vision-efficient-tuning`` names.
Importing the package only points ModelScope's lazy-import index at our modules for those names (and registers
the model, which the package exports); ModelScope's builders then import the module they need when they build
it, and the module registers its class as it loads. So ``import modelscope_utuning`` costs what the model costs,
not the pipeline and trainer stacks (about 0.1 GB of resident memory), and ModelScope never imports its built-in
module for these names (which fails where torchvision / opencv are missing, or re-registers the built-in over
ours). Other models' registrations are not touched. :func:`register` does all of it eagerly.

Workarounds for differences between ModelScope releases live in :mod:`modelscope_utuning.compat`.
"""
from __future__ import annotations

import importlib
import os

from modelscope.metainfo import Models, Pipelines, Trainers
from modelscope.utils.ast_utils import INDEX_KEY, MODULE_KEY, REQUIREMENT_KEY
from modelscope.utils.constant import Fields, Tasks
from modelscope.utils.import_utils import LazyImportModule

from .compat import guard_trusted_source_lookup

TASK = Tasks.vision_efficient_tuning
PREPROCESSOR_NAME = 'vision-efficient-tuning-preprocessor'
TOPK_METRIC = 'vision-efficient-tuning-top5'
# The model and pipeline type of trained folders that ModelScope's built-in cannot compute (see model_type_for):
# without the plugin, ModelScope's registry error then names the package to install.
PLUGIN_TYPE = 'vision-efficient-tuning@modelscope-utuning'

# Semantic segmentation: one name for model type, pipeline, trainer (issue 21); the task is ModelScope's own.
SEG_TASK = Tasks.semantic_segmentation
SEG_TYPE = 'vision-efficient-tuning-segmentation'
SEG_PREPROCESSOR_NAME = 'vision-efficient-tuning-segmentation-preprocessor'
SEG_METRIC = 'vision-efficient-tuning-miou'

_REGISTRIES = {  # registry name -> (module, attribute)
    'models': ('modelscope.models.builder', 'MODELS'),
    'pipelines': ('modelscope.pipelines.builder', 'PIPELINES'),
    'preprocessors': ('modelscope.preprocessors.builder', 'PREPROCESSORS'),
    'trainers': ('modelscope.trainers.builder', 'TRAINERS'),
    'metrics': ('modelscope.metrics.builder', 'METRICS'),
}
# (registry, group, registered name, our module, our class)
ENTRIES = (
    ('models', TASK, Models.vision_efficient_tuning, 'modelscope_utuning.model', 'VisionEfficientTuningModel'),
    ('models', TASK, PLUGIN_TYPE, 'modelscope_utuning.model', 'VisionEfficientTuningModel'),
    ('pipelines', TASK, Pipelines.vision_efficient_tuning, 'modelscope_utuning.pipeline',
     'VisionEfficientTuningPipeline'),
    ('pipelines', TASK, PLUGIN_TYPE, 'modelscope_utuning.pipeline', 'VisionEfficientTuningPipeline'),
    ('preprocessors', Fields.cv, PREPROCESSOR_NAME, 'modelscope_utuning.preprocessing.preprocessor',
     'VisionEfficientTuningPreprocessor'),
    ('trainers', 'default', Trainers.vision_efficient_tuning, 'modelscope_utuning.training.trainer',
     'VisionEfficientTuningTrainer'),
    ('metrics', 'default', TOPK_METRIC, 'modelscope_utuning.training.metrics', 'TopKAccuracy'),
    # semantic segmentation on the same frozen backbone and tuners (modelscope_utuning/segmentation)
    ('models', SEG_TASK, SEG_TYPE, 'modelscope_utuning.segmentation.model',
     'VisionEfficientTuningSegmentationModel'),
    ('pipelines', SEG_TASK, SEG_TYPE, 'modelscope_utuning.segmentation.pipeline', 'SegmentationPipeline'),
    ('pipelines', SEG_TYPE, SEG_TYPE, 'modelscope_utuning.segmentation.pipeline', 'SegmentationPipeline'),
    ('preprocessors', Fields.cv, SEG_PREPROCESSOR_NAME, 'modelscope_utuning.segmentation.preprocessor',
     'SegmentationPreprocessor'),
    ('trainers', 'default', SEG_TYPE, 'modelscope_utuning.segmentation.trainer', 'SegmentationTrainer'),
    ('metrics', 'default', SEG_METRIC, 'modelscope_utuning.segmentation.metrics', 'SegmentationMetric'),
)


def _module_file(module: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), *module.split('.')[1:]) + '.py'


def point_index_at_our_modules() -> None:
    index = LazyImportModule.get_ast_index()
    for registry, group, name, module, _ in ENTRIES:
        index[INDEX_KEY][(registry.upper(), group, name)] = {
            'filepath': _module_file(module), 'imports': [], MODULE_KEY: module}
        index[REQUIREMENT_KEY].pop(module, None)  # our modules need no torchvision / opencv


def register_class(cls: type) -> type:
    """Put one of our classes into its ModelScope registry under each of its names (called by each module as it
    loads)."""
    found = False
    for registry, group, name, module, qualname in ENTRIES:
        if cls.__module__ == module and cls.__name__ == qualname:
            registry_module, attribute = _REGISTRIES[registry]
            getattr(importlib.import_module(registry_module), attribute).register_module(
                group, module_name=name, module_cls=cls, force=True)
            found = True
    if not found:
        raise ValueError(f'{cls.__module__}.{cls.__name__} is not one of the classes modelscope-utuning registers')
    return cls


def model_type_for(backbone_cfg: dict) -> str:
    """The model / pipeline type a trained folder declares: the built-in's name when the built-in computes the same
    model (legacy ``*_length`` keys only), else :data:`PLUGIN_TYPE`."""
    if (backbone_cfg or {}).get('tuners') or (backbone_cfg or {}).get('bypass'):
        return PLUGIN_TYPE
    return Models.vision_efficient_tuning


def register() -> None:
    """Everything at once, idempotent: safe to call again (e.g. after another package re-registered the
    built-in under these names)."""
    point_index_at_our_modules()
    guard_trusted_source_lookup()
    for _, _, _, module, qualname in ENTRIES:
        register_class(getattr(importlib.import_module(module), qualname))


point_index_at_our_modules()
guard_trusted_source_lookup()  # local folders of ours skip the hub lookup (compat.py, 1.)
