"""Placeholder: replaced by the preprocessor implementation."""
from modelscope.preprocessors.base import Preprocessor


class VisionEfficientTuningPreprocessor(Preprocessor):
    pass
