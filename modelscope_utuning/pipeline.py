"""Placeholder: replaced by the pipeline implementation."""
from modelscope.pipelines.base import Pipeline


class VisionEfficientTuningPipeline(Pipeline):
    pass
