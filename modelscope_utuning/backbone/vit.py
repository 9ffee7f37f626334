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

from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .linear import FrozenFastLinear, QKVLinear, linear
from .pos_embed import resample_abs_pos_embed

OPS = ('mha', 'ffn', 'block')


class QuickGELU(nn.Module):
    """CLIP's activation: ``x * sigmoid(1.702 x)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {'gelu': nn.GELU, 'quick_gelu': QuickGELU, 'relu': nn.ReLU, 'silu': nn.SiLU}


def make_activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f'act={name!r} is not supported; expected one of {sorted(ACTIVATIONS)}')
    return ACTIVATIONS[name]()


class PatchEmbed(nn.Module):
    """``(B, 3, H, W) -> (B, H/p * W/p, C)`` by a stride-p convolution."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, bias: bool = True):
        super().__init__()
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f'images of shape (B, 3, {self.img_size[0]}, {self.img_size[1]}) expected, '
                             f'got {tuple(x.shape)}')
        return self.proj(x).flatten(2).transpose(1, 2)


class LayerScale(nn.Module):
    """Per-channel scale ``x * gamma`` (CaiT / DINOv2)."""

    def __init__(self, dim: int, init_values: float):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: zero a sample's residual branch with probability p, rescale the rest by 1/(1-p)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)


class Attention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention``.

    ``q, k, v = split(W_qkv h + b)`` per head (B, H, N, d); ``Attn = softmax(q k^T / sqrt(d)) v``;
    output ``W_o concat_h(Attn) + b_o``. Tuners may add a low-rank delta to ``q, k, v`` (LoRA) or extra keys
    and values (sequential prefix); :meth:`project` lets parallel tuners borrow the frozen projections.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'embed_dim={dim} must be divisible by num_heads={num_heads}')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = QKVLinear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = FrozenFastLinear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def split_heads(self, t: torch.Tensor) -> torch.Tensor:
        """``(B, N, C) -> (B, H, N, d)``."""
        B, N, _ = t.shape
        return t.view(B, N, self.num_heads, self.head_dim).transpose(1, 2)

    def project(self, h: torch.Tensor, which: str) -> torch.Tensor:
        """Frozen projection ``W_which h + b_which`` for which in q / k / v, split into heads."""
        i = 'qkv'.index(which)
        C = self.num_heads * self.head_dim
        w = self.qkv.weight[i * C:(i + 1) * C]
        b = None if self.qkv.bias is None else self.qkv.bias[i * C:(i + 1) * C]
        return self.split_heads(linear(h, w, b))

    def forward(self, h: torch.Tensor, qkv_delta: Optional[torch.Tensor] = None,
                extra_kv: Optional[Sequence[torch.Tensor]] = None, n_query: Optional[int] = None):
        """Returns ``(out (B, n, C), q (B, H, n, d))`` for the first ``n = n_query`` tokens (all by default).

        Every token of ``h`` (B, N, C) is a key / value; only the first n are queries, so tokens whose outputs
        are discarded (the last layer's non-class tokens under class-token pooling, VPT prompts about to be
        replaced) cost just their key / value projection. q is reused by parallel tuners on the same OP.
        """
        B, N, C = h.shape
        n = N if n_query is None else n_query
        q, kv = self.qkv(h, n_query=n)
        if qkv_delta is not None:
            q = q + qkv_delta[:, :n, :C]
            kv = kv + qkv_delta[..., C:]
        q = self.split_heads(q)
        k, v = kv.view(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if extra_kv is not None:
            k = torch.cat((k, extra_kv[0]), dim=2)
            v = torch.cat((v, extra_kv[1]), dim=2)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        out = out.transpose(1, 2).reshape(B, n, C)
        return self.proj_drop(self.proj(out)), q


class Mlp(nn.Module):
    """``fc2(act(fc1 h))``; an optional ``lora`` hook adds low-rank deltas to fc1 / fc2 outputs."""

    def __init__(self, dim: int, hidden: int, act: str, drop: float = 0.0):
        super().__init__()
        self.fc1 = FrozenFastLinear(dim, hidden)
        self.act = make_activation(act)
        self.drop1 = nn.Dropout(drop)
        self.fc2 = FrozenFastLinear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, h: torch.Tensor, lora: Optional[nn.Module] = None) -> torch.Tensor:
        z = self.fc1(h)
        if lora is not None:
            z = z + lora.delta_fc1(h)
        z = self.drop1(self.act(z))
        y = self.fc2(z)
        if lora is not None:
            y = y + lora.delta_fc2(z)
        return self.drop2(y)


class Block(nn.Module):
    """Pre-norm Transformer block with tuner slots.

    Tuners live as child modules named ``{op}_{type}`` (``mha_adapter``, ``ffn_lora``, ``block_prefix`` ...),
    so checkpoints have stable, readable names. Evaluation order: sequential prompt (handled by the backbone,
    it changes the sequence length) -> block OP { mha OP -> ffn OP } -> tuners on the block OP.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 init_values: Optional[float] = None, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0, act: str = 'gelu', norm_eps: float = 1e-6, index: int = 0):
        super().__init__()
        self.index = index
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, drop)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act, drop)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.op_tuners: Dict[str, List[str]] = {op: [] for op in OPS}  # names of output-combining tuners

    # -- tuner management -------------------------------------------------------------------------------
    def attach(self, op: str, kind: str, tuner: nn.Module) -> None:
        name = f'{op}_{kind}'
        if hasattr(self, name):
            raise ValueError(f'layer {self.index}: a {kind!r} tuner is already attached to op {op!r}')
        self.add_module(name, tuner)
        if getattr(tuner, 'combines_output', True):
            self.op_tuners[op].append(name)

    def tuner(self, op: str, kind: str) -> Optional[nn.Module]:
        return self._modules.get(f'{op}_{kind}')

    def _combine(self, op: str, h: torch.Tensor, y: torch.Tensor, q: Optional[torch.Tensor] = None):
        for name in self.op_tuners[op]:
            y = self._modules[name](h, y, block=self, q=q)
        return y

    # -- the three OPs ------------------------------------------------------------------------------------
    def mha(self, h: torch.Tensor) -> torch.Tensor:
        """``mha(h) = ls1(Attn(h))`` plus the tuners attached to it."""
        return self._mha(h)[0]

    def _mha(self, h: torch.Tensor, n: Optional[int] = None):
        """-> (mha OP output for the first n tokens, the attention's query (B, H, n, d) when it is the frozen
        ``W_q h``, else None). All N tokens of h serve as keys and values."""
        lora = self.tuner('mha', 'lora')
        prefix = self.tuner('mha', 'prefix')
        qkv_delta = lora.delta_qkv(h) if lora is not None else None
        extra_kv = prefix.extra_kv(h.shape[0]) if prefix is not None and prefix.form == 'sequential' else None
        out, q = self.attn(h, qkv_delta=qkv_delta, extra_kv=extra_kv, n_query=n)
        h_n = h if n is None else h[:, :n].contiguous()
        return self._combine('mha', h_n, self.ls1(out), q=q), (q if lora is None else None)

    def ffn(self, h: torch.Tensor) -> torch.Tensor:
        """``ffn(h) = ls2(MLP(h))`` plus the tuners attached to it."""
        return self._combine('ffn', h, self.ls2(self.mlp(h, lora=self.tuner('ffn', 'lora'))))

    def forward(self, x: torch.Tensor, n_out: Optional[int] = None) -> torch.Tensor:
        """``(B, N, C) -> (B, n_out, C)``: the outputs of the first ``n_out`` tokens (all by default).

        Every token still serves as key / value, so the kept rows equal the full block's rows; the others skip
        the query, attention output, projection, FFN and tuners.
        """
        out, q = self._mha(self.norm1(x), n_out)
        x_n = x if n_out is None else x[:, :n_out].contiguous()
        y = x_n + self.drop_path1(out)
        y = y + self.drop_path2(self.ffn(self.norm2(y)))
        # Tuners on the block OP query with W_q norm1(x): the attention's own q, reused.
        return self._combine('block', x_n, y, q=q) if self.op_tuners['block'] else y

    def forward_frozen(self, x: torch.Tensor, n_out: Optional[int] = None):
        """The frozen block alone, ``-> (output, {op: OP input})`` for the first n_out tokens (bypass path)."""
        h_mha = self.norm1(x)
        out, q = self.attn(h_mha, n_query=n_out)
        x_n = x if n_out is None else x[:, :n_out].contiguous()
        y = x_n + self.ls1(out)
        h_ffn = self.norm2(y)
        y = y + self.ls2(self.mlp(h_ffn))
        h_mha = h_mha if n_out is None else h_mha[:, :n_out].contiguous()
        return y, {'mha': h_mha, 'ffn': h_ffn, 'block': x_n, 'q': q}

    def bypass_delta(self, inputs: Dict[str, torch.Tensor]):
        """``sum over this block's tuners of s * U(h_op)`` on the frozen OP inputs (None without tuners)."""
        delta = None
        for op in OPS:
            for name in self.op_tuners[op]:
                h = inputs[op]
                q = inputs['q'] if op in ('mha', 'block') else None  # W_q norm1(x), computed by the attention
                u = self._modules[name](h, torch.zeros((), dtype=h.dtype, device=h.device), block=self, q=q)
                delta = u if delta is None else delta + u
        return delta


class VisionTransformer(nn.Module):
    """ViT backbone: ``forward_features`` gives tokens ``(B, N, C)``, ``forward_head`` the pooled feature.

    ``num_classes > 0`` keeps a backbone-level ``head`` Linear (as the built-in ModelScope backbone does when
    its config leaves ``num_classes`` at 1000); the classifier proper is the model's separate head.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 init_values: Optional[float] = None, class_token: bool = True, global_pool: str = 'token',
                 fc_norm: Optional[bool] = None, pre_norm: bool = False, act: str = 'gelu',
                 norm_eps: float = 1e-6, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, num_classes: int = 0, no_embed_class: bool = False):
        super().__init__()
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
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, init_values, drop_rate, attn_drop_rate, dpr[i],
                  act, norm_eps, index=i) for i in range(depth)])
        use_fc_norm = global_pool == 'avg' if fc_norm is None else fc_norm
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps) if not use_fc_norm else nn.Identity()
        self.fc_norm = nn.LayerNorm(embed_dim, eps=norm_eps) if use_fc_norm else nn.Identity()
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.side = None  # a side-tuning network (tuners.side) when configured
        self.bypass = False  # see forward_features
        self._init_weights()

    @property
    def out_dim(self) -> int:
        return self.head.out_features if isinstance(self.head, nn.Linear) else self.embed_dim

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

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W) -> (B, N, C)`` tokens after the final norm (prompt tokens, if any, at the end).

        Bypass mode (Res-Tuning-Bypass style): the frozen backbone runs without autograd and every parallel tuner
        reads the detached OP inputs ``h_{l,op}``; their outputs form a side path added to the last residual
        stream, ``x_L + sum_l sum_t s_t U_t(h_{l,op})``, so back-propagation never enters the backbone.
        """
        return self._tokens(x, class_token_only=False)

    def _sequential_prompt(self, i: int):
        prompt = self.blocks[i].tuner('block', 'prompt') if i < len(self.blocks) else None
        return prompt if prompt is not None and prompt.form == 'sequential' else None

    def _tokens(self, x: torch.Tensor, class_token_only: bool) -> torch.Tensor:
        """Tokens after the final norm; with ``class_token_only`` just ``(B, 1, C)``, the class token.

        Rows whose outputs nothing reads are not computed (they still act as keys / values): the last block's
        non-class rows when only the class token is pooled, and a layer's VPT prompt rows when the next layer
        replaces them with its own. The kept rows are the same numbers the full computation gives.
        """
        x = self.norm_pre(self.pos_drop(self._pos_embed(self.patch_embed(x))))
        if self.bypass:
            return self._tokens_bypass(x, class_token_only)
        n_prompt = 0
        last = len(self.blocks) - 1
        for i, blk in enumerate(self.blocks):
            prompt = self._sequential_prompt(i)
            if prompt is not None:
                x, n_prompt = prompt.insert(x, n_prompt)
            n_out = None
            if i == last and class_token_only:
                n_out = 1
            elif n_prompt and self._sequential_prompt(i + 1) is not None:
                n_out, n_prompt = x.shape[1] - n_prompt, 0
            x = blk(x, n_out)
        return self.norm(x)

    def _tokens_bypass(self, x: torch.Tensor, class_token_only: bool) -> torch.Tensor:
        # Each block's tuners run right after its frozen step, so only their (small) inputs outlive it. Under
        # class-token pooling the side path only reaches the class row, so the tuners see just that row.
        n_side = 1 if class_token_only else None
        side = None
        last = len(self.blocks) - 1
        for i, blk in enumerate(self.blocks):
            with torch.no_grad():
                x, ops = blk.forward_frozen(x, n_out=n_side if i == last else None)
                if n_side is not None and i != last:
                    ops = {op: (t[:, :, :n_side] if op == 'q' else t[:, :n_side]).contiguous()
                           for op, t in ops.items()}
            delta = blk.bypass_delta(ops)
            if delta is not None:
                side = delta if side is None else side + delta
        if side is not None:
            x = x if n_side is None else x[:, :n_side]
            x = x + side
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, images: Optional[torch.Tensor] = None,
                     pre_logits: bool = False) -> torch.Tensor:
        """Pool tokens to ``(B, C)``; side-tuning mixes in its side network; then fc_norm (and legacy head)."""
        if self.global_pool == 'avg':
            x = x[:, self.num_prefix_tokens:].mean(dim=1)
        elif self.global_pool == 'token':
            x = x[:, 0]
        if self.side is not None:
            if images is None:
                raise ValueError('side-tuning needs the input images: call forward(images)')
            x = self.side(images, x)
        x = self.fc_norm(x)
        return x if pre_logits else self.head(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W) -> (B, out_dim)``. With class-token pooling only the class token's row is finished."""
        tokens = self._tokens(images, class_token_only=self.global_pool == 'token')
        return self.forward_head(tokens, images=images)

    def load_pos_embed(self, pos_embed: torch.Tensor) -> torch.Tensor:
        """Resample a checkpoint's position embedding to this model's grid (no-op when it already fits)."""
        if pos_embed.shape == self.pos_embed.shape:
            return pos_embed
        n_prefix = 0 if self.no_embed_class else self.num_prefix_tokens
        return resample_abs_pos_embed(pos_embed, self.patch_embed.grid_size, n_prefix)
