"""Tuner specifications: the ``model.backbone.tuners`` list of configuration.json, and ModelScope's legacy keys.

One entry per tuner kind and OP::

    {"type": "adapter", "op": "mha",   "form": "parallel", "dim": 10}
    {"type": "prefix",  "op": "block", "form": "parallel", "length": 10, "scale": "channel", "layers": "all"}
    {"type": "lora",    "op": "mha",   "rank": 8, "alpha": 8}
    {"type": "bitfit"}
    {"type": "side",    "dim": 768, "net": "fcn4"}

``layers`` is ``"all"``, one index or a list of indices; the size (dim / length / rank) may be a per-layer
list, where 0 means "no tuner on that layer". The legacy hub keys (``adapter_length``, ``prefix_length``,
``prompt_length``, ``lora_length``, ``sidetune_length`` / ``sidetune_type``; ``*_type`` are informational) mean
exactly the built-in's tuners: sequential adapter on the FFN output, sequential prefix in the MHA, sequential
(VPT-deep) prompt before the block, LoRA on qkv, side-tuning.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union

from ..backbone.vit import ACTIVATIONS, OPS
from .scale import SCALES

TYPES = ('adapter', 'prefix', 'prompt', 'lora', 'bitfit', 'side')
FORMS = ('sequential', 'parallel')
DEFAULT_OP = {'adapter': 'ffn', 'prefix': 'mha', 'prompt': 'block', 'lora': 'mha'}
SIZE_KEYS = {'adapter': ('dim', 'length'), 'prefix': ('length', 'dim'), 'prompt': ('length', 'dim'),
             'lora': ('rank', 'length', 'dim'), 'side': ('dim', 'length')}
ALLOWED_KEYS = {
    'adapter': {'type', 'op', 'form', 'dim', 'length', 'scale', 'scale_init', 'layers', 'act'},
    'prefix': {'type', 'op', 'form', 'length', 'dim', 'scale', 'scale_init', 'layers'},
    'prompt': {'type', 'op', 'form', 'length', 'dim', 'scale', 'scale_init', 'layers'},
    'lora': {'type', 'op', 'form', 'rank', 'length', 'dim', 'alpha', 'layers'},
    'bitfit': {'type', 'layers'},
    'side': {'type', 'dim', 'length', 'net'},
}
LEGACY_KEYS = ('adapter_length', 'prefix_length', 'prompt_length', 'lora_length', 'sidetune_length')
LEGACY_INFO_KEYS = ('adapter_type', 'prefix_type', 'prompt_type', 'lora_type', 'sidetune_type')


@dataclass
class TunerSpec:
    """One validated tuner entry; ``sizes[i]`` is its size on layer i (0: absent there)."""
    type: str
    op: Optional[str] = None
    form: Optional[str] = None
    sizes: List[int] = field(default_factory=list)
    scale: str = 'channel'
    scale_init: Optional[float] = None
    act: Optional[str] = None
    alpha: Optional[float] = None
    net: str = 'fcn4'
    source: Dict[str, Any] = field(default_factory=dict)

    def to_config(self) -> Dict[str, Any]:
        """The entry as it reads in configuration.json (the original entry, as the user wrote it)."""
        return dict(self.source)


def _fail(entry: Any, msg: str) -> None:
    raise ValueError(f'tuner entry {entry!r}: {msg}')


def _layer_sizes(entry: Dict[str, Any], size: Union[int, Sequence[int]], depth: int) -> List[int]:
    if isinstance(size, (list, tuple)):
        if len(size) != depth:
            _fail(entry, f'a per-layer size list needs {depth} values (one per layer), got {len(size)}')
        sizes = list(size)
    else:
        sizes = [size] * depth
    for s in sizes:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            _fail(entry, f'sizes must be non-negative integers, got {s!r}')
    layers = entry.get('layers', 'all')
    if layers != 'all':
        wanted = [layers] if isinstance(layers, int) and not isinstance(layers, bool) else layers
        if not isinstance(wanted, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                            for i in wanted):
            _fail(entry, f"layers must be 'all', an index or a list of indices, got {layers!r}")
        bad = [i for i in wanted if not -depth <= i < depth]
        if bad:
            _fail(entry, f'layer index {bad[0]} is out of range for a backbone of depth {depth}')
        keep = {i % depth for i in wanted}
        sizes = [s if i in keep else 0 for i, s in enumerate(sizes)]
    if not any(sizes):
        _fail(entry, 'it attaches to no layer (every size is 0 or no layer selected)')
    return sizes


def parse_tuner(entry: Dict[str, Any], depth: int, embed_dim: int) -> TunerSpec:
    """Validate one configuration entry; raise ValueError naming the entry on anything wrong."""
    if not isinstance(entry, dict):
        _fail(entry, 'expected a mapping with a "type" key')
    kind = entry.get('type')
    if kind not in TYPES:
        _fail(entry, f'unknown type {kind!r}; expected one of {TYPES}')
    unknown = set(entry) - ALLOWED_KEYS[kind]
    if unknown:
        _fail(entry, f'unknown key(s) {sorted(unknown)} for a {kind} tuner; allowed: {sorted(ALLOWED_KEYS[kind])}')
    spec = TunerSpec(type=kind, source=dict(entry))
    if kind == 'bitfit':
        spec.sizes = _layer_sizes(entry, 1, depth)
        return spec
    size_key = next((k for k in SIZE_KEYS[kind] if k in entry), None)
    if kind == 'side':
        spec.sizes = [entry.get(size_key, embed_dim) if size_key else embed_dim]
        spec.net = entry.get('net', 'fcn4')
        if spec.sizes[0] != embed_dim:
            _fail(entry, f'the side network output must equal the backbone width {embed_dim}, got {spec.sizes[0]}')
        if str(spec.net).lower() != 'fcn4':
            _fail(entry, f"net={spec.net!r} is not supported offline; expected 'fcn4'")
        return spec
    if size_key is None:
        _fail(entry, f'a {kind} tuner needs a size: one of {SIZE_KEYS[kind]}')
    size = entry[size_key]
    if isinstance(size, (int, float)) and not isinstance(size, bool) and size <= 0:
        _fail(entry, f'{size_key} must be > 0, got {size}')
    spec.sizes = _layer_sizes(entry, size, depth)
    spec.op = entry.get('op', DEFAULT_OP[kind])
    if spec.op not in OPS:
        _fail(entry, f'unknown op {spec.op!r}; expected one of {OPS}')
    if kind == 'lora':
        spec.form = entry.get('form', 'parallel')
        if spec.form != 'parallel':
            _fail(entry, "LoRA has a single form; leave 'form' out (or 'parallel')")
        if spec.op == 'block':
            _fail(entry, "LoRA adapts weight matrices: op must be 'mha' (qkv) or 'ffn' (fc1, fc2)")
        spec.alpha = entry.get('alpha')
        return spec
    spec.form = entry.get('form', 'parallel')
    if spec.form not in FORMS:
        _fail(entry, f'unknown form {spec.form!r}; expected one of {FORMS}')
    if spec.form == 'sequential' and kind == 'prefix' and spec.op != 'mha':
        _fail(entry, "a sequential prefix extends the MHA's keys and values: op must be 'mha' "
                     "(use form 'parallel' for the ffn / block OPs)")
    if spec.form == 'sequential' and kind == 'prompt' and spec.op != 'block':
        _fail(entry, "a sequential prompt adds tokens to the block input: op must be 'block' "
                     "(use form 'parallel' for the mha / ffn OPs)")
    spec.scale = entry.get('scale', 'channel' if spec.form == 'parallel' else 'none')
    if spec.scale not in SCALES:
        _fail(entry, f'unknown scale {spec.scale!r}; expected one of {SCALES}')
    if spec.form == 'sequential' and spec.scale != 'none':
        _fail(entry, 'the sequential (original) form has no learned scale; use form "parallel"')
    spec.scale_init = entry.get('scale_init')
    if kind == 'adapter':
        spec.act = entry.get('act')
        if spec.act is not None and spec.act not in ACTIVATIONS:
            _fail(entry, f'unknown act {spec.act!r}; expected one of {sorted(ACTIVATIONS)}')
    return spec


def legacy_entries(backbone_cfg: Dict[str, Any]) -> List[Dict[str, Any]]:
    """ModelScope's legacy ``*_length`` keys as tuner entries meaning what the built-in computes."""
    entries = []
    for key, entry in (('prompt_length', {'type': 'prompt', 'op': 'block', 'form': 'sequential'}),
                       ('prefix_length', {'type': 'prefix', 'op': 'mha', 'form': 'sequential'}),
                       ('adapter_length', {'type': 'adapter', 'op': 'ffn', 'form': 'sequential'}),
                       ('lora_length', {'type': 'lora', 'op': 'mha'})):
        size = backbone_cfg.get(key)
        if size is None:
            continue
        sizes = list(size) if isinstance(size, (list, tuple)) else size
        if (isinstance(sizes, list) and not any(sizes)) or sizes == 0:
            continue
        entry = dict(entry)
        entry['rank' if entry['type'] == 'lora' else ('dim' if entry['type'] == 'adapter' else 'length')] = sizes
        entries.append(entry)
    if backbone_cfg.get('sidetune_type') is not None:
        entries.append({'type': 'side', 'net': backbone_cfg['sidetune_type'],
                        **({'dim': backbone_cfg['sidetune_length']}
                           if backbone_cfg.get('sidetune_length') is not None else {})})
    return entries


def parse_tuners(entries: Optional[Sequence[Dict[str, Any]]], depth: int, embed_dim: int) -> List[TunerSpec]:
    """Validate a whole list: every entry, and that no (type, op) pair is configured twice."""
    if entries is None:
        return []
    if not isinstance(entries, (list, tuple)):
        raise ValueError(f'model.backbone.tuners must be a list of tuner entries, got {entries!r}')
    specs = [parse_tuner(e, depth, embed_dim) for e in entries]
    seen: Dict[tuple, List[TunerSpec]] = {}
    for spec in specs:
        key = (spec.type, spec.op)
        for earlier in seen.get(key, []):  # every earlier entry of the same (type, op), not only the last
            for i, (a, b) in enumerate(zip(earlier.sizes, spec.sizes)):
                if a and b:
                    _fail(spec.source, f'layer {i} already has a {spec.type} tuner on op {spec.op!r} '
                                       f'(from {earlier.source!r})')
        seen.setdefault(key, []).append(spec)
    return specs
