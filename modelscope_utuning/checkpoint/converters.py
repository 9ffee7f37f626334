"""Pre-trained backbone weights from other code bases, converted to our (timm) parameter names.

``model.backbone.pretrained_weights`` names a file; :func:`load_pretrained_backbone` reads it, detects its layout
from the keys, converts it, resamples the position embedding to the model's patch grid and loads the backbone.
Tuners and heads start fresh. Files (read by :mod:`.weights_file`): ``.safetensors``, ``.bin`` / ``.pth`` / ``.pt``
(read with ``weights_only=True``; containers ``state_dict`` / ``model`` / ``module`` / ``backbone_weight`` ...
unwrapped), ``.npz`` (``allow_pickle=False``).

Layouts (:func:`detect_layout`):

========== ==================================================================================================
timm       ours: ``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``blocks.N.{norm1, attn.qkv, attn.proj,
           ls1.gamma, norm2, mlp.fc1, mlp.fc2, ls2.gamma}``, ``norm``; also the original DINOv2 release
           (``mask_token`` dropped). A ``backbone.`` / ``module.`` ... prefix is stripped.
hub        ModelScope's ``pytorch_model.pt`` (``backbone_weight``): timm names plus the built-in's tuner names;
           the tuner weights are not used (tuners start fresh).
hf_vit     transformers ``ViTModel`` (also ``vit.``-prefixed, e.g. ``ViTForImageClassification``): 4.x names
           ``encoder.layer.N.{layernorm_before, attention.attention.{query,key,value}, attention.output.dense,
           layernorm_after, intermediate.dense, output.dense}`` and 5.x names ``layers.N.{layernorm_before,
           attention.{q,k,v}_proj, attention.o_proj, layernorm_after, mlp.fc1, mlp.fc2}``; ``pooler`` dropped.
hf_dinov2  transformers ``Dinov2Model``: ``encoder.layer.N.{norm1, attention.attention.query ... | attention.q_proj
           ..., attention.output.dense | attention.o_proj, layer_scale1.lambda1, norm2, mlp.fc1, mlp.fc2,
           layer_scale2.lambda1}``; ``mask_token`` dropped. The SwiGLU FFN (ViT-g) is not supported.
google_npz The original ``ViT-B_16.npz`` / big_vision names: ``embedding/kernel`` (HWIO), ``cls``,
           ``Transformer/posembed_input/pos_embedding``, ``Transformer/encoderblock_N/{LayerNorm_0,
           MultiHeadDotProductAttention_1/{query,key,value}/kernel (D, H, d), out/kernel (H, d, D), LayerNorm_2,
           MlpBlock_3/Dense_{0,1}}``, ``Transformer/encoder_norm``; ``head`` and ``pre_logits`` dropped.
========== ==================================================================================================

Which :class:`~modelscope_utuning.backbone.vit.VisionTransformer` arguments (``model.backbone`` keys) a family
needs — :func:`suggested_backbone_config` infers them from a file; ``num_heads`` cannot be read from the weights
except in the Google layout:

=================== ========== ======== =========== ========================= ===================================
family              patch_size norm_eps init_values num_heads                 notes
=================== ========== ======== =========== ========================= ===================================
HF ViT (in21k)      16 (/32)   1e-12    (none)      S 6, B 12, L 16, H 16     qkv_bias true, act gelu
HF DINOv2           14         1e-6     1.0         S 6, B 12, L 16           native 518 px (37x37 grid);
                                                                              img_size 224 resamples to 16x16
Google ViT-*.npz    16 / 32    1e-6     (none)      read from the weights     head and pre_logits dropped
timm / DINOv2 orig. as file    1e-6     if ls1.gamma as the model             names load as they are
hub (ModelScope)    16         1e-6     (none)      12 (ViT-B/16)             tuner weights not used
=================== ========== ======== =========== ========================= ===================================

``init_values`` only has to be non-empty so that the layer-scale parameters exist; their trained values are
loaded. All families use ``global_pool: token``, ``class_token: true`` and ``qkv_bias: true`` by default.
The LayerNorm eps cannot be read from the weights: a wrong one changes the features slightly, silently.
"""
from __future__ import annotations

import math
import os
import re
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from ..tuners.base import slot_names, tuner_state_keys
from .hub_layout import from_builtin_names, has_builtin_tuner_name
from .load_report import LoadReport, shape_mismatches
from .weights_file import (CONTAINER_KEYS, EXTENSIONS, TORCH_EXTENSIONS,  # noqa: F401  (re-exported)
                           WeightsFileNotFoundError, _few, _read, read_state_dict)

LAYOUTS = ('timm', 'hub', 'hf_vit', 'hf_dinov2', 'google_npz')
DEFAULT_NORM_EPS = {'timm': 1e-6, 'hub': 1e-6, 'hf_vit': 1e-12, 'hf_dinov2': 1e-6, 'google_npz': 1e-6}

_HF_ANCHOR = 'embeddings.patch_embeddings.projection.weight'
_TIMM_ANCHOR = 'patch_embed.proj.weight'
_GOOGLE_ANCHOR = 'embedding/kernel'


# ---------------------------------------------------------------------------------------------------------------
# layout detection
# ---------------------------------------------------------------------------------------------------------------
def _prefix(state: Mapping[str, Any], anchor: str) -> Optional[str]:
    """The prefix before ``anchor`` of the shortest key that ends with it (None when no key does)."""
    hits = [k[:-len(anchor)] for k in state if k.endswith(anchor) and (len(k) == len(anchor)
                                                                        or k[-len(anchor) - 1] in './')]
    return min(hits, key=len) if hits else None


def detect_layout(state: Mapping[str, Any]) -> str:
    """One of :data:`LAYOUTS`, from the names of ``state``; ValueError listing a few keys when unknown."""
    p = _prefix(state, _GOOGLE_ANCHOR)
    if p is not None and any(k.startswith(p + 'Transformer/') for k in state):
        return 'google_npz'
    p = _prefix(state, _HF_ANCHOR)
    if p is not None:
        inner = [k[len(p):] for k in state if k.startswith(p)]
        if any('.layer_scale1.' in k or re.search(r'layers?\.\d+\.norm1\.', k) for k in inner):
            return 'hf_dinov2'
        if any('.layernorm_before.' in k for k in inner):
            return 'hf_vit'
        return 'hf_vit' if any(re.match(r'(encoder\.)?layers?\.\d+\.', k) for k in inner) else _unknown(state)
    p = _prefix(state, _TIMM_ANCHOR)
    if p is not None:
        inner = [k[len(p):] for k in state if k.startswith(p)]
        if any(has_builtin_tuner_name(k) for k in inner):
            return 'hub'
        if any(k.startswith('blocks.') for k in inner):
            return 'timm'
    return _unknown(state)


def _unknown(state: Mapping[str, Any]) -> str:
    raise ValueError(f'unknown checkpoint layout: keys {_few(sorted(state))}; expected one of {LAYOUTS} '
                     f"(e.g. timm 'patch_embed.proj.weight', Hugging Face '{_HF_ANCHOR}', Google "
                     f"'{_GOOGLE_ANCHOR}')")


# ---------------------------------------------------------------------------------------------------------------
# conversion
# ---------------------------------------------------------------------------------------------------------------
def _strip(state: Mapping[str, torch.Tensor], prefix: Optional[str]) -> Dict[str, torch.Tensor]:
    """Keep the keys under ``prefix`` (others, e.g. a classifier beside ``vit.``, belong to other modules)."""
    if not prefix:
        return dict(state)
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _drop_heads(out: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: v for k, v in out.items()
            if not k.startswith(('head.', 'head_dist.', 'pre_logits.', 'mask_token'))}


def _from_timm(state: Mapping[str, torch.Tensor], hub: bool) -> Dict[str, torch.Tensor]:
    state = _strip(state, _prefix(state, _TIMM_ANCHOR))
    if hub:
        state = from_builtin_names(state)
    return _drop_heads({k: v for k, v in state.items() if not _is_tuner_key(k)})


_HF_LAYER = re.compile(r'^(?:encoder\.)?layers?\.(\d+)\.(.+)$')
_HF_QKV = {'attention.attention.query': 'q', 'attention.attention.key': 'k', 'attention.attention.value': 'v',
           'attention.q_proj': 'q', 'attention.k_proj': 'k', 'attention.v_proj': 'v',
           'attention.query': 'q', 'attention.key': 'k', 'attention.value': 'v'}
_HF_RENAME = {'layernorm_before': 'norm1', 'layernorm_after': 'norm2', 'norm1': 'norm1', 'norm2': 'norm2',
              'attention.output.dense': 'attn.proj', 'attention.o_proj': 'attn.proj',
              'intermediate.dense': 'mlp.fc1', 'output.dense': 'mlp.fc2', 'mlp.fc1': 'mlp.fc1', 'mlp.fc2': 'mlp.fc2'}
_HF_SWIGLU = ('mlp.weights_in', 'mlp.weights_out', 'mlp.gate_proj', 'mlp.up_proj', 'mlp.down_proj')


def _from_hf(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    state = _strip(state, _prefix(state, _HF_ANCHOR))
    out: Dict[str, torch.Tensor] = OrderedDict()
    qkv: Dict[Tuple[int, str], Dict[str, torch.Tensor]] = {}
    for k, v in state.items():
        if k.startswith(('pooler.', 'classifier.', 'embeddings.mask_token')):
            continue
        if k == 'embeddings.cls_token':
            out['cls_token'] = v
        elif k == 'embeddings.position_embeddings':
            out['pos_embed'] = v
        elif k.startswith('embeddings.patch_embeddings.projection.'):
            out['patch_embed.proj.' + k.rsplit('.', 1)[1]] = v
        elif k.startswith('layernorm.'):
            out['norm.' + k.rsplit('.', 1)[1]] = v
        elif _HF_LAYER.match(k):
            i, rest = _HF_LAYER.match(k).groups()
            if rest.startswith(_HF_SWIGLU):
                raise ValueError(f'{k!r}: the SwiGLU feed-forward (DINOv2 ViT-g) is not supported by our ViT '
                                 '(fc1 -> act -> fc2 only)')
            m = re.match(r'^layer_scale([12])\.lambda1$', rest)
            if m:
                out[f'blocks.{i}.ls{m.group(1)}.gamma'] = v
                continue
            module, _, param = rest.rpartition('.')
            if module in _HF_QKV:
                qkv.setdefault((int(i), param), {})[_HF_QKV[module]] = v
            elif module in _HF_RENAME:
                out[f'blocks.{i}.{_HF_RENAME[module]}.{param}'] = v
            else:
                out[k] = v  # unknown: left under its own name, reported as unexpected on load
        else:
            out[k] = v
    for (i, param), parts in sorted(qkv.items()):
        if set(parts) != {'q', 'k', 'v'}:
            raise ValueError(f'layer {i}: attention {param} has only {sorted(parts)} of query / key / value')
        out[f'blocks.{i}.attn.qkv.{param}'] = torch.cat([parts['q'], parts['k'], parts['v']], dim=0)
    return out


def _google_blocks(state: Mapping[str, torch.Tensor]) -> Dict[int, Dict[str, torch.Tensor]]:
    """``Transformer/encoderblock_N/...`` -> {N: {'LayerNorm_0/scale': ...}}; the big_vision ``scan`` layout
    (``Transformer/encoderblock/...`` stacked over layers) is unstacked."""
    blocks: Dict[int, Dict[str, torch.Tensor]] = {}
    for k, v in state.items():
        m = re.match(r'^Transformer/encoderblock_(\d+)/(.+)$', k)
        if m:
            blocks.setdefault(int(m.group(1)), {})[m.group(2)] = v
            continue
        m = re.match(r'^Transformer/encoderblock/(.+)$', k)
        if m:
            for i in range(v.shape[0]):
                blocks.setdefault(i, {})[m.group(1)] = v[i]
    return blocks


def _from_google(state: Mapping[str, torch.Tensor], num_heads: Optional[int] = None) -> Dict[str, torch.Tensor]:
    state = _strip(state, _prefix(state, _GOOGLE_ANCHOR))
    out: Dict[str, torch.Tensor] = OrderedDict()
    for k, v in state.items():
        if k == 'embedding/kernel':
            out['patch_embed.proj.weight'] = v.permute(3, 2, 0, 1).contiguous()  # HWIO -> OIHW
        elif k == 'embedding/bias':
            out['patch_embed.proj.bias'] = v
        elif k == 'cls':
            out['cls_token'] = v.reshape(1, 1, -1)
        elif k == 'Transformer/posembed_input/pos_embedding':
            out['pos_embed'] = v.reshape(1, -1, v.shape[-1])
        elif k.startswith('Transformer/encoder_norm/'):
            out['norm.' + ('weight' if k.endswith('/scale') else 'bias')] = v
        elif k.startswith(('head/', 'pre_logits/', 'Transformer/encoderblock')):
            continue
        else:
            out[k] = v  # unknown: reported as unexpected on load
    for i, b in sorted(_google_blocks(state).items()):
        p = f'blocks.{i}.'
        norms = sorted({n.split('/')[0] for n in b if n.startswith('LayerNorm_')}, key=lambda n: int(n[10:]))
        mha = next((n.split('/')[0] for n in b if n.startswith('MultiHeadDotProductAttention')), None)
        mlp = next((n.split('/')[0] for n in b if n.startswith('MlpBlock')), None)
        if len(norms) != 2 or mha is None or mlp is None:
            raise ValueError(f'Google layout, encoderblock_{i}: expected two LayerNorm_*, one '
                             f'MultiHeadDotProductAttention_* and one MlpBlock_*, found {_few(sorted(b))}')
        for name, ours in zip(norms, ('norm1', 'norm2')):
            out[p + ours + '.weight'], out[p + ours + '.bias'] = b[f'{name}/scale'], b[f'{name}/bias']
        q = b[f'{mha}/query/kernel']
        if q.ndim != 3:
            raise ValueError(f'Google layout, encoderblock_{i}: query kernel of shape (D, H, d) expected, '
                             f'got {tuple(q.shape)}')
        if num_heads is not None and q.shape[1] != num_heads:
            raise ValueError(f'Google layout: the checkpoint has {q.shape[1]} attention heads, the model '
                             f'num_heads={num_heads}; set model.backbone.num_heads={q.shape[1]}')
        D = q.shape[0]
        out[p + 'attn.qkv.weight'] = torch.cat([b[f'{mha}/{n}/kernel'].reshape(D, -1).t() for n in
                                                ('query', 'key', 'value')], dim=0).contiguous()
        if f'{mha}/query/bias' in b:
            out[p + 'attn.qkv.bias'] = torch.cat([b[f'{mha}/{n}/bias'].reshape(-1) for n in
                                                  ('query', 'key', 'value')])
        o = b[f'{mha}/out/kernel']
        out[p + 'attn.proj.weight'] = o.reshape(-1, o.shape[-1]).t().contiguous()  # (H, d, D) -> (D, H*d)
        out[p + 'attn.proj.bias'] = b[f'{mha}/out/bias']
        for r in (0, 1):
            out[p + f'mlp.fc{r + 1}.weight'] = b[f'{mlp}/Dense_{r}/kernel'].t().contiguous()
            out[p + f'mlp.fc{r + 1}.bias'] = b[f'{mlp}/Dense_{r}/bias']
    return out


def convert_to_timm(state: Mapping[str, torch.Tensor], layout: Optional[str] = None,
                    num_heads: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """``state`` in ``layout`` (detected when None) -> our names. Classifier heads, poolers, mask tokens and
    (hub layout) tuner weights are dropped; names that cannot be mapped are kept as they are (so loading
    reports them). ``num_heads`` is checked against the Google layout, which stores it."""
    layout = layout or detect_layout(state)
    if layout in ('timm', 'hub'):
        return _from_timm(state, hub=layout == 'hub')
    if layout in ('hf_vit', 'hf_dinov2'):
        return _from_hf(state)
    if layout == 'google_npz':
        return _from_google(state, num_heads)
    raise ValueError(f'unknown layout {layout!r}; expected one of {LAYOUTS}')


# ---------------------------------------------------------------------------------------------------------------
# configuration hints
# ---------------------------------------------------------------------------------------------------------------
def _google_num_heads(state: Mapping[str, torch.Tensor]) -> Optional[int]:
    for k, v in state.items():
        if re.search(r'MultiHeadDotProductAttention_?\d*/query/kernel$', k) and v.ndim >= 3:
            return int(v.shape[-2])
    return None


def suggested_backbone_config(state_or_path: Any, layout: Optional[str] = None) -> Dict[str, Any]:
    """VisionTransformer arguments that fit a checkpoint (a path or a raw state dict).

    ``embed_dim``, ``depth``, ``patch_size``, ``mlp_ratio``, ``qkv_bias``, ``class_token``, ``init_values``,
    ``fc_norm`` / ``pre_norm`` and ``img_size`` (the trained grid times the patch) are read from the weights,
    ``norm_eps`` from the family's convention; ``num_heads`` only where the layout stores it (Google), else None:
    the user must set it.
    """
    if isinstance(state_or_path, (str, os.PathLike)):
        raw, outer = _read(state_or_path)
        layout = layout or ('hub' if outer == 'backbone_weight' else None)
    else:
        raw = dict(state_or_path)
    layout = layout or detect_layout(raw)
    s = convert_to_timm(raw, layout)
    if 'patch_embed.proj.weight' not in s:
        raise ValueError(f'no patch embedding in the checkpoint (keys {_few(sorted(s))})')
    w = s['patch_embed.proj.weight']
    C, p = int(w.shape[0]), int(w.shape[-1])
    depth = 1 + max((int(k.split('.')[1]) for k in s if k.startswith('blocks.')), default=-1)
    fc1 = s.get('blocks.0.mlp.fc1.weight')
    cfg: Dict[str, Any] = {
        'embed_dim': C, 'depth': depth, 'num_heads': _google_num_heads(raw) if layout == 'google_npz' else None,
        'patch_size': p, 'mlp_ratio': (fc1.shape[0] / C) if fc1 is not None else 4.0,
        'qkv_bias': 'blocks.0.attn.qkv.bias' in s, 'class_token': 'cls_token' in s,
        'init_values': 1.0 if 'blocks.0.ls1.gamma' in s else None,
        'norm_eps': DEFAULT_NORM_EPS[layout], 'global_pool': 'token' if 'cls_token' in s else 'avg',
    }
    if 'fc_norm.weight' in s:
        cfg['fc_norm'] = True
    if 'norm_pre.weight' in s:
        cfg['pre_norm'] = True
    pos = s.get('pos_embed')
    if pos is not None:
        n = pos.shape[1] - (1 if 'cls_token' in s else 0)
        side = math.isqrt(n)
        if side * side == n:
            cfg['img_size'] = side * p
    return cfg


# ---------------------------------------------------------------------------------------------------------------
# loading into a VisionTransformer
# ---------------------------------------------------------------------------------------------------------------
def _is_tuner_key(name: str) -> bool:
    """Whether a weight of a file (under our names) belongs to a tuner: a path component is a tuner slot."""
    slots = set(slot_names())
    return any(part in slots for part in name.split('.')[:-1])


def _architecture_problems(vit, s: Mapping[str, torch.Tensor]) -> List[str]:
    problems = []
    w = s.get('patch_embed.proj.weight')
    if w is not None and w.ndim == 4:
        p, C = int(w.shape[-1]), int(w.shape[0])
        if (p, p) != tuple(vit.patch_embed.patch_size):
            problems.append(f'patch size: the checkpoint has {p}x{p} patches, the model patch_size='
                            f'{vit.patch_embed.patch_size[0]}; set model.backbone.patch_size={p}')
        if C != vit.embed_dim:
            problems.append(f'width: the checkpoint has embed_dim {C}, the model embed_dim={vit.embed_dim}; '
                            f'set model.backbone.embed_dim={C}')
    depth = 1 + max((int(k.split('.')[1]) for k in s if re.match(r'blocks\.\d+\.', k)), default=-1)
    if depth and depth != vit.depth:
        problems.append(f'depth: the checkpoint has {depth} blocks, the model depth={vit.depth}; '
                        f'set model.backbone.depth={depth}')
    has_ls = 'blocks.0.ls1.gamma' in s
    model_ls = hasattr(vit.blocks[0].ls1, 'gamma')
    if has_ls != model_ls:
        problems.append('layer scale: the checkpoint ' + ('has' if has_ls else 'has no')
                        + ' ls1.gamma / ls2.gamma (DINOv2, CaiT); set model.backbone.init_values='
                        + ('1.0' if has_ls else 'null'))
    fc1 = s.get('blocks.0.mlp.fc1.weight')
    if fc1 is not None and fc1.shape != vit.blocks[0].mlp.fc1.weight.shape and fc1.shape[1] == vit.embed_dim:
        problems.append(f'mlp: the checkpoint has an MLP width of {fc1.shape[0]}, the model '
                        f'{vit.blocks[0].mlp.fc1.out_features}; set model.backbone.mlp_ratio='
                        f'{fc1.shape[0] / vit.embed_dim:g}')
    return problems


def load_pretrained_backbone(vit, path: str, layout: Optional[str] = None) -> Dict[str, Any]:
    """Load a pre-trained backbone file into ``vit`` (tuners, side network and heads keep their fresh init).

    Reads, detects the layout (unless given), converts to our names, resamples ``pos_embed`` to the model's grid,
    checks the architecture (patch size, width, depth, layer scale, MLP width) and every shape, and loads.
    All missing / unexpected / mismatched weights are reported together in one ValueError.
    Returns ``{'layout', 'loaded' (count), 'pos_embed': (checkpoint shape, model shape)}``.
    """
    raw, outer = _read(path)
    try:
        layout = layout or ('hub' if outer == 'backbone_weight' else detect_layout(raw))
        s = convert_to_timm(raw, layout, num_heads=getattr(vit, 'num_heads', None))
    except ValueError as e:
        raise ValueError(f'pretrained weights {path!r}: {e}') from e
    report = LoadReport(f'pretrained weights {path!r} (layout {layout})')
    # Tuners and the backbone-level classifier head start fresh: they are neither expected nor loaded.
    fresh = tuner_state_keys(vit) | {k for k in vit.state_dict() if k.startswith('head.')}
    own = {k: v for k, v in vit.state_dict().items() if k not in fresh}
    report.problems += _architecture_problems(vit, s)
    pos_shapes = None
    if 'pos_embed' in s and 'pos_embed' in own and report.ok:
        before = tuple(s['pos_embed'].shape)
        try:
            s['pos_embed'] = vit.load_pos_embed(s['pos_embed'])
        except ValueError as e:
            report.problems.append(f'pos_embed {before}: {e}')
        pos_shapes = (before, tuple(s['pos_embed'].shape))
    s = {k: v for k, v in s.items() if not k.startswith('head.')}
    report.add(missing=[k for k in own if k not in s], unexpected=[k for k in s if k not in own],
               mismatched=shape_mismatches(s, own))
    if not report.ok:
        if any(k.startswith('fc_norm.') for k in report.missing) and \
                any(k.startswith('norm.') for k in report.unexpected):
            report.hints.append('the checkpoint has a final norm but the model uses fc_norm (global_pool avg): '
                                'set model.backbone.fc_norm=false')
        if any(k.endswith('attn.qkv.bias') for k in report.missing):
            report.hints.append('the checkpoint has no qkv bias: set model.backbone.qkv_bias=false')
        report.raise_if_any('tuners, the side network and heads are not expected: they start fresh')
    vit.load_state_dict(s, strict=False)
    return {'layout': layout, 'loaded': len(s), 'pos_embed': pos_shapes}
