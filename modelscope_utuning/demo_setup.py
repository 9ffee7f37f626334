"""What the embedded demo (``modelscope_utuning.demo``) prepares before it trains.

- the data: the real images shipped with the package (``demo_data/``, a Fashion-MNIST subset), which classes each
  stage uses, and writing them as PNG files in image-folder layout (one sub-directory per class);
- the configuration: ``configuration.json`` of the untrained tiny ViT set up for stage 1 (full fine-tuning), and
  stage 2's ``cfg_modify_fn`` (a fresh head for the unseen classes, the backbone frozen, the tuners added).

Re-exported by ``modelscope_utuning.demo``, where these names have always been importable.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Callable, Dict, List

import numpy as np

from .training.defaults import model_configuration

if TYPE_CHECKING:  # only for annotations: demo.py imports this module
    from .demo import DemoSettings

DATA_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'demo_data', 'fashion_mnist_subset.npz')
PRETRAIN_CLASSES = (0, 1, 2, 3, 4)
FEWSHOT_CLASSES = (5, 6, 7, 8, 9)
# Fashion-MNIST's pixel statistics (the images are gray; the preprocessor makes them RGB).
MEAN, STD = [0.286, 0.286, 0.286], [0.353, 0.353, 0.353]


# -- data ----------------------------------------------------------------------------------------------------------
def load_demo_arrays(path: str = DATA_FILE) -> Dict[str, np.ndarray]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f'the demo data {path!r} is missing; rebuild it with tools/make_demo_data.py')
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def folder_name(class_name: str) -> str:
    """A class name as a directory name ('T-shirt/top' -> 'T-shirt-top')."""
    return class_name.replace('/', '-').replace(os.sep, '-')


def write_image_folder(arrays: Dict[str, np.ndarray], split: str, per_class: int, root: str) -> Dict[str, int]:
    """Write the first ``per_class`` images of each class of ``split`` as PNGs under ``root/<class>/``."""
    from PIL import Image
    names = [str(n) for n in arrays['class_names']]
    in_split = arrays['split'] == split
    counts = {}
    for c in sorted(set(arrays['labels'][in_split].tolist())):
        rows = np.flatnonzero(in_split & (arrays['labels'] == c))[:per_class]
        folder = os.path.join(root, folder_name(names[c]))
        os.makedirs(folder, exist_ok=True)
        for i in rows:
            Image.fromarray(arrays['images'][i], mode='L').save(os.path.join(folder, f'{split}_{i:05d}.png'))
        counts[names[c]] = len(rows)
    return counts


# -- configuration -----------------------------------------------------------------------------------------------
def base_configuration(s: DemoSettings) -> Dict:
    """configuration.json of the untrained tiny ViT (no pytorch_model.pt beside it), set up for full fine-tuning."""
    cfg = model_configuration(
        backbone={'img_size': s.img_size, 'patch_size': s.patch_size, 'embed_dim': s.embed_dim, 'depth': s.depth,
                  'num_heads': s.num_heads, 'global_pool': s.global_pool, 'tuners': []},
        head={'num_classes': len(PRETRAIN_CLASSES)},
        # 28-px images: the eval transform keeps the whole image (crop_pct 1: resize to img_size, no 256-style
        # resize then crop); training adds mild random crops and flips.
        preprocessor={'type': 'vision-efficient-tuning-preprocessor', 'img_size': s.img_size, 'crop_pct': 1.0,
                      'mean': MEAN, 'std': STD,
                      'train': {'scale': [0.8, 1.0], 'ratio': [0.9, 1.1], 'hflip': 0.5}},
        train={
            'max_epochs': s.pretrain_epochs,
            'dataloader': {'batch_size_per_gpu': s.batch_size, 'workers_per_gpu': 0},
            'optimizer': {'type': 'AdamW', 'lr': s.pretrain_lr, 'weight_decay': 0.05},
            'lr_scheduler': {'type': 'CosineAnnealingLR', 'T_max': s.pretrain_epochs, 'options': {'by_epoch': True}},
            'logging': {'interval': 10},
            'checkpoint': {'period': {'interval': s.pretrain_epochs}},  # one epoch_N.pth, at the end
        },
        evaluation={'dataloader': {'batch_size_per_gpu': 100, 'workers_per_gpu': 0, 'shuffle': False},
                    'metrics': ['accuracy']})
    # Full fine-tuning: every backbone parameter trainable ('' matches every name).
    cfg['model']['freeze_cfg'] = {'train_part': {'backbone': ['']}}
    return cfg


def make_cfg_modify_fn(s: DemoSettings, tuners: List[Dict]) -> Callable:
    """Stage 2's ``cfg_modify_fn``: the seed's edits (classes, finetune, epochs, schedule) plus the tuners."""
    def cfg_modify_fn(cfg):
        cfg.model.head.num_classes = len(FEWSHOT_CLASSES)
        cfg.model.finetune = True
        cfg.model.pretrained_cfg = {'unload_part': {'head': ['fc']}}  # a fresh head for the new classes
        cfg.model.freeze_cfg = None  # back to U-Tuning's policy: backbone frozen, tuners and head trainable
        cfg.model.backbone.tuners = tuners
        cfg.train.max_epochs = s.tune_epochs
        cfg.train.lr_scheduler.T_max = s.tune_epochs
        cfg.train.optimizer.lr = s.tune_lr
        cfg.train.optimizer.weight_decay = 1e-4
        cfg.train.dataloader.batch_size_per_gpu = s.tune_batch_size
        cfg.train.checkpoint = {'period': {'interval': s.tune_epochs}}
        cfg.train.logging = {'interval': 4}
        return cfg
    return cfg_modify_fn
