"""The tuner matrix: every kind x OP x form (x scale), one row each, through the same property checks.

A row is a configuration entry and the closed form of the trainable parameters it adds on the test backbone
(depth 2, width C = 32, MLP width F = 128, 4 heads), computed here independently of the package. Everything else
follows from the kind's declaration: which parameters must train, whether it starts silent, merges, runs on the
bypass path. A new tuner kind is one new file under ``modelscope_utuning/tuners/`` plus one row in ``ROWS``.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import pytest
import torch

from modelscope_utuning import VisionEfficientTuningModel
from modelscope_utuning.checkpoint.hub_layout import CHECKPOINT_FILE
from modelscope_utuning.tuners import Dims, parse_tuner, tuner_class

VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_ratio=4.0, num_classes=0)
C, D, F_MLP = 32, 2, 128
K = 3  # classes
HEAD_PARAMS = C * K + K
SCALE_PARAMS = {'none': 0, 'scalar': 1, 'channel': C, 'input': C + 1}
R = 4  # tuner size

pytestmark = pytest.mark.usefixtures('one_thread')


@dataclass
class Row:
    entry: Dict[str, Any]
    params: int                      # closed form, every layer of the depth-2 backbone, head excluded
    silent: bool = True              # the tuned model starts exactly at the frozen one
    backbone: Dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        e = self.entry
        return '-'.join(str(e[k]) for k in ('type', 'op', 'form', 'scale') if k in e)


def parallel(kind: str, op: str, scale: str) -> Row:
    size_key = 'dim' if kind == 'adapter' else 'length'
    per_layer = {'adapter': 2 * C * R + R + C,      # W_down, b_down, W_up, b_up
                 'prefix': 2 * R * C,               # K_pre, V_pre
                 'prompt': R * C}[kind]              # prompt tokens
    # A prompt branch is silent through its scale (zero at the start); without a scale it is not.
    return Row({'type': kind, 'op': op, 'form': 'parallel', size_key: R, 'scale': scale},
               D * (per_layer + SCALE_PARAMS[scale]), silent=not (kind == 'prompt' and scale == 'none'))


FCN4 = 9 * (3 * 16 + 16 * 16 + 16 * 32 + 32 * 64) + 2 * (16 + 16 + 32 + 64) + 64 * C + C
BIASES = C + C + D * (C + 3 * C + C + C + F_MLP + C)  # patch_embed, norm; per block norm1 qkv proj norm2 fc1 fc2

ROWS = ([parallel(k, op, s) for k in ('adapter', 'prefix', 'prompt') for op in ('mha', 'ffn', 'block')
         for s in ('none', 'scalar', 'channel', 'input')]
        + [Row({'type': 'adapter', 'op': op, 'form': 'sequential', 'dim': R}, D * (2 * C * R + R + C), silent=False)
           for op in ('mha', 'ffn', 'block')]
        + [Row({'type': 'prefix', 'op': 'mha', 'form': 'sequential', 'length': R}, D * 2 * R * C, silent=False),
           Row({'type': 'prompt', 'op': 'block', 'form': 'sequential', 'length': R}, D * R * C, silent=False),
           Row({'type': 'lora', 'op': 'mha', 'rank': R}, D * (R * C + R * 3 * C)),
           Row({'type': 'lora', 'op': 'ffn', 'rank': R}, D * 2 * (R * C + R * F_MLP)),
           Row({'type': 'bitfit'}, BIASES),
           Row({'type': 'side'}, FCN4 + 1, silent=False),
           Row({'type': 'vertical', 'dim': R}, (D - 1) * (2 * C * R + R + C + C),
               backbone={'bypass': True, 'tuners_before': [{'type': 'adapter', 'op': 'ffn', 'dim': R}]}),
           Row({'type': 'ssf', 'op': 'block'}, D * 2 * (C + 2 * C + C + F_MLP + C)),  # scale + shift: q kv proj fc1 fc2
           Row({'type': 'repadapter', 'op': 'mha', 'dim': R}, D * (C * R + R + C * R // 2 + C)),  # 2 groups in W_up
           ])


def build(row: Row, seed: int = 0) -> VisionEfficientTuningModel:
    torch.manual_seed(seed)
    extra = dict(row.backbone)
    before = extra.pop('tuners_before', [])
    backbone = dict(VIT, tuners=copy.deepcopy(before) + [copy.deepcopy(row.entry)], **extra)
    return VisionEfficientTuningModel(model_dir=None, backbone=backbone, head={'num_classes': K})


def row_params(model, row: Row) -> set:
    """Names of the parameters the row's tuners own, found by module type and slot, not by the package's policy."""
    kind = tuner_class(row.entry['type'])
    net = model.model
    if row.entry['type'] == 'bitfit':
        return {n for n, _ in net.named_parameters() if n.startswith('backbone.') and n.endswith('.bias')}
    if kind.level == 'network':
        return {n for n, _ in net.named_parameters() if n.startswith(f'{kind.kind}.')}
    op = row.entry.get('op', kind.default_op)
    return {n for n, _ in net.named_parameters() if f'.{op}_{kind.kind}.' in n}


def images(b=2, seed=0):
    return torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def randomize_trainable_(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


@torch.no_grad()
def scores(model, x):
    return model.eval()({'imgs': x})['scores']


ALL = [pytest.param(r, id=r.id) for r in ROWS]


@pytest.mark.parametrize('row', ALL)
def test_builds_trains_only_its_parameters_and_counts(row):
    model = build(row)
    named = dict(model.model.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    extra = set()
    if row.backbone.get('tuners_before'):
        first = build(Row(row.backbone['tuners_before'][0], 0), 0)
        extra = {n for n, p in first.model.named_parameters() if p.requires_grad and not n.startswith('head.')}
    assert trainable == row_params(model, row) | {f'head.{n}' for n, _ in model.head.named_parameters()} | extra
    spec = model.specs[-1]
    assert sum(named[n].numel() for n in row_params(model, row)) == row.params
    parsed = parse_tuner(row.entry, Dims(C, 4, F_MLP, D))  # the kind's closed form, from the entry alone
    assert parsed.kind.count_trainable(parsed, model.backbone) == row.params
    assert spec.kind.count_trainable(spec, model.backbone) == row.params
    assert model.trainable_parameters() == (sum(named[n].numel() for n in trainable),
                                            sum(p.numel() for p in named.values()))

    # forward + backward from the kind's own initialisation: every trainable tensor gets a grad, frozen ones none
    model.train()
    out = model({'imgs': images(), 'labels': torch.tensor([0, 2])})
    assert set(out) == {'loss'} and torch.isfinite(out['loss'])
    out['loss'].backward()
    for n, p in named.items():
        if n in trainable:
            assert p.grad is not None and torch.isfinite(p.grad).all(), f'{n} got no finite gradient'
        else:
            assert not p.requires_grad and p.grad is None, f'frozen {n} got a gradient'
    # moved off a (possibly zero) initialisation, every trainable tensor gets a non-zero gradient
    model.zero_grad(set_to_none=True)
    randomize_trainable_(model)
    model({'imgs': images(), 'labels': torch.tensor([0, 2])})['loss'].backward()
    for n in trainable:
        assert named[n].grad is not None and named[n].grad.abs().sum() > 0, f'{n}: zero gradient'
    model.eval()
    with torch.no_grad():
        assert model({'imgs': images()})['scores'].shape == (2, K)


@pytest.mark.parametrize('row', [p for p in ALL if p.values[0].silent and not p.values[0].backbone])
def test_starts_at_the_frozen_model(row):
    """A silent tuner (the default initialisation) leaves every output of the frozen backbone unchanged."""
    tuned = build(row)
    plain = VisionEfficientTuningModel(model_dir=None, backbone=dict(VIT), head={'num_classes': K})
    own = plain.model.state_dict()
    plain.model.load_state_dict({k: v for k, v in tuned.model.state_dict().items() if k in own})
    plain.model.requires_grad_(False)
    tuned.model.requires_grad_(False)  # the same kernels on both sides: bitwise equality
    x = images(3)
    with torch.no_grad():
        assert torch.equal(tuned.model.forward_features(x), plain.model.forward_features(x))
        assert torch.equal(tuned.model(x), plain.model(x))


@pytest.mark.parametrize('row', ALL)
def test_hub_checkpoint_and_tuner_only_roundtrip(row, tmp_path):
    model = build(row)
    randomize_trainable_(model)
    x = images(3)
    want = scores(model, x)
    model.save_hub_checkpoint(str(tmp_path))
    again = VisionEfficientTuningModel(model_dir=str(tmp_path), backbone=copy.deepcopy(model.backbone_config),
                                       head={'num_classes': K})
    torch.testing.assert_close(scores(again, x), want, atol=1e-6, rtol=0)
    # tuner-only: a model with fresh tuners and head on the same frozen weights gets them from the files
    other = build(row, seed=5)
    trained = model.model.tuner_state_dict()
    other.model.load_state_dict({k: v for k, v in model.model.state_dict().items() if k not in trained},
                                strict=False)
    model.model.save_tuners(str(tmp_path / 'tuners'))
    other.model.load_tuners(str(tmp_path / 'tuners'))
    torch.testing.assert_close(scores(other, x), want, atol=1e-6, rtol=0)


@pytest.mark.parametrize('row', [p for p in ALL if tuner_class(p.values[0].entry['type']).mergeable])
def test_mergeable_kinds_merge_exactly(row):
    model = build(row)
    randomize_trainable_(model)
    x = images(3)
    want = scores(model, x)
    kind = row.entry['type']
    assert model.merge((kind,)) == [kind]
    assert not any(t.kind == kind for _, t, _ in model.model.tuners())
    assert all(s.type != kind for s in model.specs)
    torch.testing.assert_close(scores(model, x), want, atol=2e-6, rtol=0)


@pytest.mark.parametrize('row', [p for p in ALL if p.values[0].entry.get('form', 'parallel')
                                 in tuner_class(p.values[0].entry['type']).bypass_forms
                                 and not p.values[0].backbone])
def test_bypass_capable_kinds_train_beside_a_frozen_backbone(row):
    """In bypass mode nothing of the backbone is in the autograd graph (no activation of a frozen MLP, (B, N, F),
    is held for the backward pass, where standard U-Tuning of the same row holds some); the tuners and the head
    get gradients."""
    def step(model):
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        mlp_activations = []

        def pack(t):
            if t.untyped_storage().data_ptr() not in weights and t.dim() >= 2 and t.shape[-1] == F_MLP:
                mlp_activations.append(tuple(t.shape))
            return t
        randomize_trainable_(model)
        model.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model({'imgs': images(), 'labels': torch.tensor([0, 2])})['loss']
        loss.backward()
        return mlp_activations

    assert step(build(row)), 'standard U-Tuning holds frozen MLP activations: the probe below can see them'
    model = build(Row(row.entry, row.params, backbone={'bypass': True}))
    assert step(model) == []
    for n, p in model.model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n


def test_every_registered_kind_has_a_row():
    from modelscope_utuning.tuners import tuner_kinds
    assert set(tuner_kinds()) == {r.entry['type'] for r in ROWS}
