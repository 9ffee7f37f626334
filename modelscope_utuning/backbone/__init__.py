"""The frozen backbone: a timm-named Vision Transformer whose OPs (mha, ffn, block) host U-Tuners through the hook
points of :mod:`.hooks` (its blocks: :mod:`.block`, their parts: :mod:`.layers`); :mod:`.bypass` runs the tuners
beside the frozen blocks, :mod:`.kernels` picks the fastest kernels."""
from .hooks import OPS
from .pos_embed import resample_abs_pos_embed
from .vit import Attention, Block, Mlp, VisionTransformer

__all__ = ['OPS', 'Attention', 'Block', 'Mlp', 'VisionTransformer', 'resample_abs_pos_embed']
