"""The frozen backbone: a timm-named Vision Transformer whose OPs (mha, ffn, block) host U-Tuners."""
from .pos_embed import resample_abs_pos_embed
from .vit import OPS, Attention, Block, Mlp, VisionTransformer

__all__ = ['OPS', 'Attention', 'Block', 'Mlp', 'VisionTransformer', 'resample_abs_pos_embed']
