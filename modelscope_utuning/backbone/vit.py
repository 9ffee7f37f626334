"""A plain Vision Transformer whose operations are the attachment points of U-Tuners.

Parameter names follow timm's ``vision_transformer.py`` (``patch_embed.proj``, ``cls_token``, ``pos_embed``,
``blocks.N.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2, ls2.gamma}``, ``norm``, ``fc_norm``),
so timm / ModelScope checkpoints load by name.

Each :class:`Block` exposes three frozen operations (OPs) on a token tensor ``x`` of shape ``(B, N, C)``::

    mha(h)   = ls1(Attn(h))            with h = norm1(x)
    ffn(h)   = ls2(MLP(h))             with h = norm2(x)
    block(x) = x + mha(norm1(x)) -> then + ffn(norm2(.))   (the whole residual block)

and every tuner attached to an OP rewrites it (see :mod:`modelscope_utuning.tuners`), e.g. the U-Tuning
parallel form ``OP'(h) = OP(h) + s * U(h)``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn

from .block import OP_FIELDS, Block, FrozenStep  # noqa: F401  (re-exported: the backbone's public names)
from .bypass import forward_bypass
from .hooks import TokenState
from .layers import ACTIVATIONS, Attention, Mlp, PatchEmbed, QuickGELU, make_activation  # noqa: F401
from .pos_embed import resample_abs_pos_embed


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v


def check_arguments(prefix: str = '', **kw) -> None:
    """ValueError naming every ViT argument in ``kw`` that cannot build a working network (``prefix``, e.g.
    ``'model.backbone.'``, makes the names those of the configuration). Checked here, when the model is built,
    because each of these otherwise fails late or not at all: ``depth=0`` in an IndexError at the first forward,
    ``patch_size=0`` in a ZeroDivisionError, ``mlp_ratio=-1`` in a negative-dimension RuntimeError, and an
    ``img_size`` that ``patch_size`` does not divide would silently drop the image's last rows and columns."""
    problems = []

    def need(key, ok, expected):
        if key in kw and not ok(kw[key]):
            problems.append(f'{prefix}{key}={kw[key]!r}: expected {expected}')

    for key in ('img_size', 'patch_size', 'in_chans', 'embed_dim', 'depth', 'num_heads'):
        need(key, lambda v: _is_int(v) and v >= 1, 'an integer >= 1')
    need('num_classes', lambda v: _is_int(v) and v >= 0, 'an integer >= 0')
    need('mlp_ratio', lambda v: _is_number(v) and v > 0, 'a number > 0')
    need('norm_eps', lambda v: _is_number(v) and v > 0, 'a number > 0')
    for key in ('drop_rate', 'attn_drop_rate', 'drop_path_rate'):
        need(key, lambda v: _is_number(v) and 0 <= v < 1, 'a number in [0, 1)')
    need('init_values', lambda v: v is None or _is_number(v), 'a number or null')
    need('act', lambda v: v in ACTIVATIONS, f'one of {sorted(ACTIVATIONS)}')
    if not problems:
        img, patch = kw.get('img_size'), kw.get('patch_size')
        if _is_int(img) and _is_int(patch) and img % patch:
            problems.append(f'{prefix}img_size={img!r} is not a multiple of {prefix}patch_size={patch!r}: the last '
                            f'{img % patch} rows and columns of every image would be ignored; expected a multiple, '
                            f'e.g. {img - img % patch or patch} or {img - img % patch + patch}')
        dim, heads = kw.get('embed_dim'), kw.get('num_heads')
        if _is_int(dim) and _is_int(heads) and dim % heads:
            problems.append(f'{prefix}embed_dim={dim} must be divisible by {prefix}num_heads={heads}')
        ratio = kw.get('mlp_ratio')
        if _is_int(dim) and _is_number(ratio) and int(dim * ratio) < 1:
            problems.append(f'{prefix}mlp_ratio={ratio!r}: embed_dim * mlp_ratio = {dim * ratio:g} leaves the MLP no '
                            'hidden unit; expected a ratio with embed_dim * mlp_ratio >= 1')
    if problems:
        raise ValueError('; '.join(problems))



class VisionTransformer(nn.Module):
    """ViT backbone with timm's contract: ``forward_features(x)`` gives the tokens ``(B, N, C)`` after the final
    norm, ``forward_head(tokens)`` pools them (and applies the legacy head), ``forward(x) =
    forward_head(forward_features(x))``.

    ``num_classes > 0`` keeps a backbone-level ``head`` Linear (as the built-in ModelScope backbone does when its
    config leaves ``num_classes`` at 1000); the classifier proper is the network's separate head. The blocks run in
    :meth:`forward_blocks` (standard mode) or beside the tuners in :mod:`.bypass` (bypass mode).
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 init_values: Optional[float] = None, class_token: bool = True, global_pool: str = 'token',
                 fc_norm: Optional[bool] = None, pre_norm: bool = False, act: str = 'gelu',
                 norm_eps: float = 1e-6, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, num_classes: int = 0, no_embed_class: bool = False):
        super().__init__()
        check_arguments(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                        depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, init_values=init_values,
                        act=act, norm_eps=norm_eps, drop_rate=drop_rate, attn_drop_rate=attn_drop_rate,
                        drop_path_rate=drop_path_rate, num_classes=num_classes)
        if global_pool not in ('token', 'avg', ''):
            raise ValueError(f"global_pool={global_pool!r}: expected 'token', 'avg' or ''")
        if global_pool == 'token' and not class_token:
            raise ValueError("global_pool='token' needs class_token=True")
        self.embed_dim = self.num_features = embed_dim
        self.depth, self.num_heads, self.global_pool = depth, num_heads, global_pool
        self.num_prefix_tokens = 1 if class_token else 0
        self.no_embed_class = no_embed_class
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, bias=not pre_norm)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        embed_len = self.patch_embed.num_patches + (0 if no_embed_class else self.num_prefix_tokens)
        self.pos_embed = nn.Parameter(torch.randn(1, embed_len, embed_dim) * 0.02)
        self.pos_drop = nn.Dropout(drop_rate)
        self.norm_pre = nn.LayerNorm(embed_dim, eps=norm_eps) if pre_norm else nn.Identity()
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, init_values, drop_rate, attn_drop_rate, 0.0,
                  act, norm_eps, index=i) for i in range(depth)])
        self.set_drop_path_rate(drop_path_rate)
        use_fc_norm = global_pool == 'avg' if fc_norm is None else fc_norm
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps) if not use_fc_norm else nn.Identity()
        self.fc_norm = nn.LayerNorm(embed_dim, eps=norm_eps) if use_fc_norm else nn.Identity()
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.act = act
        self.bypass = False  # tuners run beside the frozen blocks (see .bypass)
        self.feature_cache = None  # bypass mode: a FrozenFeatureCache the frozen pass reads and fills (.feature_cache)
        self._init_weights()

    @property
    def out_dim(self) -> int:
        return self.head.out_features if isinstance(self.head, nn.Linear) else self.embed_dim

    @property
    def mlp_hidden(self) -> int:
        return self.blocks[0].mlp.fc1.out_features

    def no_weight_decay(self) -> set:
        """Parameters that weight decay would only pull towards zero (timm's convention): position embedding and
        class token; every 1-d parameter (norms, biases, layer scales) is exempt as well by the optimizer."""
        return {'pos_embed', 'cls_token'}

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        cls = self.cls_token.expand(x.shape[0], -1, -1) if self.cls_token is not None else None
        if self.no_embed_class:
            x = x + self.pos_embed
            return torch.cat((cls, x), dim=1) if cls is not None else x
        if cls is not None:
            x = torch.cat((cls, x), dim=1)
        return x + self.pos_embed

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W) -> (B, N, C)``: patches, class token, position embedding, pre-norm."""
        return self.norm_pre(self.pos_drop(self._pos_embed(self.patch_embed(images))))

    def forward_features(self, images: torch.Tensor, pooled_rows_only: bool = False) -> torch.Tensor:
        """``(B, 3, H, W) -> (B, N, C)`` tokens after the final norm (appended prompt tokens, if any, at the end).

        ``pooled_rows_only``: under class-token pooling, compute the last block for the class token alone and return
        ``(B, 1, C)`` (same numbers as the full computation's first row; what :meth:`forward` uses).
        """
        class_token_only = pooled_rows_only and self.global_pool == 'token'
        if self.bypass:
            return forward_bypass(self, images, [self], class_token_only)[0]
        return self.forward_blocks(self.embed(images), class_token_only)

    def forward_intermediates(self, images: torch.Tensor, layers: Sequence[int]):
        """``(B, 3, H, W)`` -> (final tokens ``(B, N, C)``, [tokens after block ``l``, final norm applied, for l in
        ``layers``]) in one pass (timm's name; dense heads read several depths)."""
        if self.bypass:
            return forward_bypass(self, images, [self], layers=list(layers))[0]
        return self.forward_blocks(self.embed(images), layers=list(layers))

    def forward_blocks(self, x: torch.Tensor, class_token_only: bool = False,
                       layers: Optional[Sequence[int]] = None):
        """Standard mode: embedded tokens ``(B, N, C)`` through the blocks in order, then the final norm.

        Each block's ``tokens`` point runs first (VPT-deep prompts). Rows whose outputs nothing reads are not computed
        (they still serve as keys / values, so the kept rows are the same numbers): under ``class_token_only`` the
        last block finishes only the class token (``(B, 1, C)`` out), and a block skips the rows that the next
        block's ``tokens`` point will discard. ``layers``: block indices whose outputs are also wanted; then the
        result is ``(final, [tokens after block l, final norm applied, for l in layers])`` from the same pass."""
        state = TokenState()
        wanted = set(layers or ())
        collected = {}
        last = len(self.blocks) - 1
        for i, blk in enumerate(self.blocks):
            x = blk.edit_tokens(x, state)
            n_out: Optional[int] = None
            if i == last:
                n_out = 1 if class_token_only else None
            else:
                drop = self.blocks[i + 1].rows_dropped(state)
                if drop:
                    n_out = x.shape[1] - drop
                    state.appended -= drop  # those rows are gone already
            x = blk(x, n_out)
            if i in wanted and i != last:
                collected[i] = self.norm(x)
        out = self.norm(x)
        if layers is None:
            return out
        collected[last] = out
        return out, [collected[i] for i in layers]

    def set_drop_path_rate(self, rate: float) -> None:
        """Stochastic depth rising linearly with depth, timm's rule: block i drops its branches with probability
        ``rate * i / (depth - 1)`` in training (the first block never, the last with ``rate``). Standard mode only:
        the bypass path runs the frozen blocks whole (:meth:`Block.forward_frozen`)."""
        self.drop_path_rate = float(rate)
        last = max(len(self.blocks) - 1, 1)
        for i, block in enumerate(self.blocks):
            block.set_drop_path(self.drop_path_rate * i / last)

    def frozen_path_is_random(self, training: Optional[bool] = None) -> bool:
        """Whether the frozen forward draws random numbers (dropout) in training mode (``training=True``), in
        evaluation mode (False) or in the mode it is in now (None): then its features cannot be cached."""
        mode = self.training if training is None else training
        return mode and self.pos_drop.p > 0 or any(b.frozen_path_is_random(mode) for b in self.blocks)

    def frozen_named_parameters(self):
        """``(name, parameter)`` of what the frozen forward of bypass mode reads: the embedding and the blocks,
        without the attached tuners (the final norm and the heads come after it)."""
        for name, p in self.named_parameters():
            parts = name.split('.')
            if parts[0] == 'blocks':
                if parts[2] not in self.blocks[int(parts[1])].hooks.names:
                    yield name, p
            elif parts[0] in ('patch_embed', 'cls_token', 'pos_embed', 'norm_pre'):
                yield name, p

    def frozen_parameters(self):
        return (p for _, p in self.frozen_named_parameters())

    def patch_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens ``(B, N, C)`` -> the patch tokens as a map ``(B, C, H/p, W/p)`` (prefix tokens before the patches
        and appended prompt tokens after them left out)."""
        h, w = self.patch_embed.grid_size
        start = self.num_prefix_tokens
        patches = tokens[:, start:start + h * w]
        return patches.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """``global_pool``: tokens ``(B, N, C)`` -> ``(B, C)``: the class token ('token'), the mean of the patch
        tokens ('avg'), or the tokens unchanged ('')."""
        if self.global_pool == 'avg':
            return tokens[:, self.num_prefix_tokens:].mean(dim=1)
        if self.global_pool == 'token':
            return tokens[:, 0]
        return tokens

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool tokens ``(B, N, C)`` to ``(B, C)``, then fc_norm (and the legacy head unless ``pre_logits``)."""
        x = self.fc_norm(self.pool(x))
        return x if pre_logits else self.head(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W) -> (B, out_dim)`` = ``forward_head(forward_features(images))`` (only the rows the pooling
        reads are finished)."""
        return self.forward_head(self.forward_features(images, pooled_rows_only=True))

    def load_pos_embed(self, pos_embed: torch.Tensor) -> torch.Tensor:
        """Resample a checkpoint's position embedding to this model's grid (no-op when it already fits)."""
        if pos_embed.shape == self.pos_embed.shape:
            return pos_embed
        n_prefix = 0 if self.no_embed_class else self.num_prefix_tokens
        return resample_abs_pos_embed(pos_embed, self.patch_embed.grid_size, n_prefix)
