"""Image-classification datasets for the trainer: rows ``{'img_path:FILE' | 'image', 'label'}`` and their readers."""
from .datasets import IMAGE_KEY, LABEL_KEY, PATH_KEY, ImageRowsDataset, UnreadableImageError  # noqa: F401
from .readers import (IMAGE_EXTENSIONS, from_fgvc_json, from_hf_dataset, from_image_folder,  # noqa: F401
                      from_manifest, from_msdataset, from_rows, from_vtab_list, load_dataset_any,
                      read_class_names)

__all__ = [
    'PATH_KEY', 'IMAGE_KEY', 'LABEL_KEY', 'IMAGE_EXTENSIONS', 'ImageRowsDataset', 'UnreadableImageError',
    'read_class_names', 'from_rows', 'from_image_folder', 'from_manifest', 'from_vtab_list',
    'from_fgvc_json', 'from_hf_dataset', 'from_msdataset', 'load_dataset_any',
]
