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

from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from . import kernels
from .hooks import CHANGES_QUERY, HookTable, OpContext, TokenState
from .linear import FrozenFastLinear, QKVLinear, linear
from .pos_embed import resample_abs_pos_embed

class QuickGELU(nn.Module):
    """CLIP's activation: ``x * sigmoid(1.702 x)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {'gelu': nn.GELU, 'quick_gelu': QuickGELU, 'relu': nn.ReLU, 'silu': nn.SiLU}


def make_activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f'act={name!r} is not supported; expected one of {sorted(ACTIVATIONS)}')
    return ACTIVATIONS[name]()


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

    ``q, k, v = split(W_qkv h + b)`` per head (B, H, N, d); ``Attn = softmax(q k^T / sqrt(d)) v``; output
    ``W_o concat_h(Attn) + b_o``. The block drives it step by step (:meth:`Block.attention`) so that tuners can
    act between the steps; :meth:`project` lets parallel tuners borrow the frozen projections.
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

    def project_qkv(self, h: torch.Tensor, n_query: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(q (B, n, C), kv (B, N, 2C))`` for the first ``n_query`` rows as queries (all by default).

        ``self.qkv`` is our :class:`QKVLinear` (two products, see there) unless another library replaced it with a
        wrapper of its own (ms-swift's LoRA ``MergedLinear``, a peft LoRA layer), which computes the fused
        ``(B, N, 3C)`` as any linear does; that output is split here.
        """
        if isinstance(self.qkv, QKVLinear):
            return self.qkv.split(h, n_query)
        fused = self.qkv(h)
        C = self.num_heads * self.head_dim
        n = h.shape[1] if n_query is None else n_query
        return fused[:, :n, :C], fused[:, :, C:]

    def project(self, h: torch.Tensor, which: str) -> torch.Tensor:
        """Frozen projection ``W_which h + b_which`` for which in q / k / v, split into heads."""
        i = 'qkv'.index(which)
        C = self.num_heads * self.head_dim
        return self.split_heads(linear(h, self.qkv.weight, self.qkv.bias, rows=slice(i * C, (i + 1) * C)))

    def attend(self, q: torch.Tensor, kv: torch.Tensor,
               extra_kv: Sequence[Tuple[torch.Tensor, torch.Tensor]] = ()) -> Tuple[torch.Tensor, torch.Tensor]:
        """``q`` (B, n, C), ``kv`` (B, N, 2C) -> (attention output (B, n, C) before ``proj``, q (B, H, n, d)).
        ``extra_kv``: further (k, v) pairs of shape (B, H, L, d) appended to the keys and values."""
        B, n, C = q.shape
        q = self.split_heads(q)
        k, v = kv.view(B, kv.shape[1], 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if extra_kv:
            k = torch.cat([k] + [e[0] for e in extra_kv], dim=2)
            v = torch.cat([v] + [e[1] for e in extra_kv], dim=2)
        out = kernels.attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return out.transpose(1, 2).reshape(B, n, C), q

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """The plain frozen attention, ``(B, N, C) -> (B, N, C)``."""
        q, kv = self.project_qkv(h)
        return self.proj_drop(self.proj(self.attend(q, kv)[0]))


class Mlp(nn.Module):
    """``fc2(act(fc1 h))``."""

    def __init__(self, dim: int, hidden: int, act: str, drop: float = 0.0):
        super().__init__()
        self.fc1 = FrozenFastLinear(dim, hidden)
        self.act = make_activation(act)
        self.drop1 = nn.Dropout(drop)
        self.fc2 = FrozenFastLinear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(h)))))


class Block(nn.Module):
    """Pre-norm Transformer block whose steps are hook points for tuners (see :mod:`.hooks`).

    Tuners are child modules (named by whoever attaches them, e.g. ``mha_adapter``) registered at the hook points
    they declare in ``tuner.points``; the block calls them there, in attachment order, and knows nothing else
    about them. The three OPs::

        mha(h)   = ls1(Attn(h))            with h = norm1(x)
        ffn(h)   = ls2(MLP(h))             with h = norm2(y)
        block(x) = the whole residual block
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
        self.hooks = HookTable()

    # -- tuners ---------------------------------------------------------------------------------------------------
    def attach(self, name: str, tuner: nn.Module) -> None:
        """Add ``tuner`` as child ``name`` and register it at the hook points it declares."""
        if name in self._modules:
            raise ValueError(f'layer {self.index}: a tuner named {name!r} is already attached')
        self.add_module(name, tuner)
        self.hooks.add(name, tuner.points)

    def detach(self, name: str) -> nn.Module:
        """Remove the tuner ``name`` (e.g. after merging it into the frozen weights); returns it."""
        tuner = self._modules.pop(name)
        self.hooks.remove(name)
        return tuner

    def tuner(self, op: str, kind: str) -> Optional[nn.Module]:
        """The tuner attached as ``{op}_{kind}``, or None (a lookup for callers; the block never uses it)."""
        return self._modules.get(f'{op}_{kind}')

    def tuners(self):
        """``(name, tuner)`` of every attached tuner, in attachment order."""
        return [(n, self._modules[n]) for n in self.hooks.names]

    def tuners_at(self, point: str) -> list:
        """The tuners registered at ``point``, in attachment order."""
        return [self._modules[n] for n in self.hooks.at(point)]

    def _edit_linear(self, point: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for t in self.tuners_at(point):
            y = t.edit_linear(point, x, y)
        return y

    def _combine(self, ctx: OpContext, y: torch.Tensor) -> torch.Tensor:
        for t in self.tuners_at(ctx.op):
            y = t.combine(ctx, y)
        return y

    def edit_tokens(self, x: torch.Tensor, state: TokenState) -> torch.Tensor:
        """The ``tokens`` point, before the block: may change the number of tokens."""
        for t in self.tuners_at('tokens'):
            x = t.edit_tokens(x, state)
        return x

    def rows_dropped(self, state: TokenState) -> int:
        """How many trailing rows the ``tokens`` point of this block will discard from its input."""
        return max((t.drops_rows(state) for t in self.tuners_at('tokens')), default=0)

    # -- the computation --------------------------------------------------------------------------------------------
    def attention(self, h: torch.Tensor, n: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """``Attn(h)`` through the ``q``, ``kv``, ``extra_kv`` and ``proj`` points, for the first n rows as queries
        (every row is a key / value) -> (output (B, n, C), the query (B, H, n, d))."""
        N = h.shape[1]
        n = N if n is None else n
        q, kv = self.attn.project_qkv(h, n)
        if self.hooks.at('q'):
            q = self._edit_linear('q', h if n == N else h[:, :n].contiguous(), q)
        if self.hooks.at('kv'):
            kv = self._edit_linear('kv', h, kv)
        extra = [t.extra_kv(h.shape[0]) for t in self.tuners_at('extra_kv')]
        out, q = self.attn.attend(q, kv, extra)
        o = self.attn.proj(out)
        if self.hooks.at('proj'):
            o = self._edit_linear('proj', out, o)
        return self.attn.proj_drop(o), q

    def mlp_out(self, h: torch.Tensor) -> torch.Tensor:
        """``MLP(h)`` through the ``fc1`` and ``fc2`` points."""
        mlp = self.mlp
        z = mlp.fc1(h)
        if self.hooks.at('fc1'):
            z = self._edit_linear('fc1', h, z)
        a = mlp.drop1(mlp.act(z))
        f = mlp.fc2(a)
        if self.hooks.at('fc2'):
            f = self._edit_linear('fc2', a, f)
        return mlp.drop2(f)

    def _input(self, point: str, h: torch.Tensor) -> torch.Tensor:
        for t in self.tuners_at(point):
            h = t.edit_input(point, h)
        return h

    def mha(self, h: torch.Tensor) -> torch.Tensor:
        """``mha(h) = ls1(Attn(h))`` with the tuners attached to it, alone (no residual stream: tuners that
        measure their output in units of the residual use 1)."""
        out, q = self.attention(self._input('mha.in', h))
        y = self.ls1(out)
        return self._combine(OpContext('mha', h, self, None, q), y)

    def ffn(self, h: torch.Tensor) -> torch.Tensor:
        """``ffn(h) = ls2(MLP(h))`` with the tuners attached to it, alone (see :meth:`mha`)."""
        y = self.ls2(self.mlp_out(self._input('ffn.in', h)))
        return self._combine(OpContext('ffn', h, self, None), y)

    def _frozen_q(self, q: torch.Tensor) -> Optional[torch.Tensor]:
        return None if self.hooks.any(CHANGES_QUERY) else q

    def forward(self, x: torch.Tensor, n_out: Optional[int] = None) -> torch.Tensor:
        """``(B, N, C) -> (B, n_out, C)``: the outputs of the first ``n_out`` tokens (all by default).

        Every token still serves as key / value, so the kept rows equal the full block's rows; the others skip
        the query, attention output, projection, FFN and tuners.
        """
        h1 = self.norm1(x)
        out, q = self.attention(self._input('mha.in', h1), n_out)
        x_n = x if n_out is None else x[:, :n_out].contiguous()
        m = self.ls1(out)
        if self.hooks.at('mha'):  # tuners on the mha OP read the OP's own query, whatever computed it
            h1_n = h1 if n_out is None else h1[:, :n_out].contiguous()
            m = self._combine(OpContext('mha', h1_n, self, x_n, q), m)
        q = self._frozen_q(q)
        y = x_n + self.drop_path1(m)
        h2 = self.norm2(y)
        f = self.ls2(self.mlp_out(self._input('ffn.in', h2)))
        if self.hooks.at('ffn'):
            f = self._combine(OpContext('ffn', h2, self, y), f)
        out = y + self.drop_path2(f)
        if self.hooks.at('block'):
            out = self._combine(OpContext('block', x_n, self, x_n, q), out)
        return out

    def forward_frozen(self, x: torch.Tensor, n_out: Optional[int] = None
                       ) -> Tuple[torch.Tensor, Dict[str, OpContext]]:
        """The frozen block alone (no hook is called) -> (output for the first n_out tokens, {op: OpContext}),
        the contexts holding each OP's input for tuners that run beside the backbone (bypass mode)."""
        h1 = self.norm1(x)
        q, kv = self.attn.project_qkv(h1, n_out)
        out, q = self.attn.attend(q, kv)
        x_n = x if n_out is None else x[:, :n_out].contiguous()
        y = x_n + self.ls1(self.attn.proj(out))
        h2 = self.norm2(y)
        out = y + self.ls2(self.mlp(h2))
        h1_n = h1 if n_out is None else h1[:, :n_out].contiguous()
        return out, {'mha': OpContext('mha', h1_n, self, x_n, q), 'ffn': OpContext('ffn', h2, self, y),
                     'block': OpContext('block', x_n, self, x_n, q)}


class VisionTransformer(nn.Module):
    """ViT backbone with timm's contract: ``forward_features(x)`` gives the tokens ``(B, N, C)`` after the final
    norm, ``forward_head(tokens)`` pools them (and applies the legacy head), ``forward(x) =
    forward_head(forward_features(x))``.

    ``num_classes > 0`` keeps a backbone-level ``head`` Linear (as the built-in ModelScope backbone does when its
    config leaves ``num_classes`` at 1000); the classifier proper is the network's separate head. The order in
    which blocks run, which rows they compute and the bypass mode live in :mod:`.runner`.
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
        dpr = torch.linspace(0, drop_path_rate, depth, device='cpu').tolist()
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, init_values, drop_rate, attn_drop_rate, dpr[i],
                  act, norm_eps, index=i) for i in range(depth)])
        use_fc_norm = global_pool == 'avg' if fc_norm is None else fc_norm
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps) if not use_fc_norm else nn.Identity()
        self.fc_norm = nn.LayerNorm(embed_dim, eps=norm_eps) if use_fc_norm else nn.Identity()
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.act = act
        self.bypass = False  # see runner.forward_bypass
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
        from .runner import forward_tokens
        return forward_tokens(self, self.embed(images), class_token_only=pooled_rows_only
                              and self.global_pool == 'token')

    def forward_intermediates(self, images: torch.Tensor, layers: Sequence[int]):
        """``(B, 3, H, W)`` -> (final tokens ``(B, N, C)``, [tokens after block ``l``, final norm applied, for l in
        ``layers``]) in one pass (timm's name; dense heads read several depths)."""
        from .runner import forward_tokens
        return forward_tokens(self, self.embed(images), layers=list(layers))

    def patch_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens ``(B, N, C)`` -> the patch tokens as a map ``(B, C, H/p, W/p)`` (prefix tokens before the patches
        and appended prompt tokens after them left out)."""
        h, w = self.patch_embed.grid_size
        start = self.num_prefix_tokens
        patches = tokens[:, start:start + h * w]
        return patches.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool tokens ``(B, N, C)`` to ``(B, C)``, then fc_norm (and the legacy head unless ``pre_logits``)."""
        if self.global_pool == 'avg':
            x = x[:, self.num_prefix_tokens:].mean(dim=1)
        elif self.global_pool == 'token':
            x = x[:, 0]
        x = self.fc_norm(x)
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
