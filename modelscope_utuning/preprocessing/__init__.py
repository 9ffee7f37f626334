"""Image loading, pillow + torch transforms and the ``vision-efficient-tuning`` preprocessor."""
from .image_io import ImageInputError, load_image
from .preprocessor import VisionEfficientTuningPreprocessor
from .transforms import eval_transform, train_transform

__all__ = ['ImageInputError', 'load_image', 'VisionEfficientTuningPreprocessor', 'eval_transform',
           'train_transform']
