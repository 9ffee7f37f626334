"""Parity with ModelScope's built-in vision-efficient-tuning model (issue 2).

Fixtures under ``tests/fixtures/builtin`` were produced by the built-in code in a separate venv
(``tests/fixtures/make_builtin_fixtures.py``): per case a hub-layout model folder and ``expected.json`` with the
built-in's eval scores on ``inputs.npz``. Our model, built through ModelScope's ``Model.from_pretrained`` after
``import modelscope_utuning``, must give the same scores (1e-5), labels and trainable parameter set, and what we
save must use the built-in's parameter names.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

import modelscope_utuning  # noqa: F401  (registration)
from modelscope.models import Model
from modelscope_utuning import VisionEfficientTuningModel
from modelscope_utuning.checkpoint.hub_layout import CHECKPOINT_FILE, network_state_from_hub

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'builtin')
EXPECTED_CASES = ('plain', 'adapter', 'lora', 'prefix', 'prompt', 'utuning', 'bitfit', 'sidetune',
                  'adapter_per_layer', 'layerscale_avgpool', 'backbone_head')
# every fixture case uses only the built-in's own (original-form) tuners
ORIGINAL_FORM = set(EXPECTED_CASES)
TOL = 1e-5


def _present_cases():
    if not os.path.isdir(ROOT):
        return []
    return sorted(d for d in os.listdir(ROOT) if os.path.isfile(os.path.join(ROOT, d, 'expected.json')))


# The expected cases always take part (so a missing one FAILS instead of being skipped), plus any newer case.
CASES = sorted(set(EXPECTED_CASES) | set(_present_cases()))


pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def inputs():
    path = os.path.join(ROOT, 'inputs.npz')
    assert os.path.isfile(path), f'fixture inputs missing: {path} (run tests/fixtures/make_builtin_fixtures.py)'
    imgs = np.load(path)['imgs']
    assert imgs.shape == (2, 3, 224, 224) and imgs.dtype == np.float32
    return torch.from_numpy(imgs)


_loaded = {}


def load_case(case):
    """(our model in eval mode, expected.json) for a fixture folder; cached per case."""
    folder = os.path.join(ROOT, case)
    assert os.path.isdir(folder), f'fixture folder missing: {folder}'
    for f in ('configuration.json', CHECKPOINT_FILE, 'expected.json'):
        assert os.path.isfile(os.path.join(folder, f)), f'fixture file missing: {folder}/{f}'
    if case not in _loaded:
        with open(os.path.join(folder, 'expected.json')) as f:
            expected = json.load(f)
        _loaded[case] = (Model.from_pretrained(folder), expected)
    model, expected = _loaded[case]
    model.eval()
    return model, expected


def test_fixture_folder_is_complete():
    assert os.path.isdir(ROOT), f'{ROOT} is missing: generate it with tests/fixtures/make_builtin_fixtures.py'
    assert os.path.isfile(os.path.join(ROOT, 'inputs.npz'))
    missing = [c for c in EXPECTED_CASES if c not in _present_cases()]
    assert not missing, f'fixture cases missing: {missing}'


@pytest.mark.parametrize('case', CASES)
def test_scores_match_builtin(case, inputs):
    model, expected = load_case(case)
    assert type(model) is VisionEfficientTuningModel, type(model)
    with torch.no_grad():
        out = model({'imgs': inputs})
    want = np.asarray(expected['scores'], dtype=np.float64)
    got = out['scores'].double().numpy()
    assert got.shape == want.shape
    diff = float(np.abs(got - want).max())
    print(f'{case}: max abs diff {diff:.3g}')
    assert diff <= TOL, f'{case}: max abs score difference {diff} > {TOL}'
    assert out['labels'].tolist() == expected['labels']
    assert model.CLASSES == ['daisy', 'rose', 'tulip', 'sunflower', 'iris']


def _builtin_to_ours(name: str) -> str:
    part, rest = name.split('.', 1)
    assert part in ('backbone', 'head'), name
    if part == 'backbone':  # the network holds the side network beside its backbone
        return next(iter(network_state_from_hub({'backbone_weight': {rest: None}})[0]))
    return f'{part}.{rest}'


@pytest.mark.parametrize('case', CASES)
def test_trainable_set_matches_builtin(case):
    model, expected = load_case(case)
    want = expected.get('trainable')
    ours = {n for n, p in model.model.named_parameters() if p.requires_grad}
    if want is None:
        # no freeze_cfg: the built-in trainer trains everything; ours follows the default policy
        tuner_like = ('_adapter.', '_prefix.', '_prompt.', '_lora.')
        assert ours == {n for n, _ in model.model.named_parameters()
                        if n.startswith(('head.', 'side.')) or any(t in n for t in tuner_like)}
        return
    assert ours == {_builtin_to_ours(n) for n in want}


@pytest.mark.parametrize('case', CASES)
def test_resaved_checkpoint_uses_builtin_names(case, tmp_path, inputs):
    model, expected = load_case(case)
    folder = str(tmp_path / case)
    shutil.copytree(os.path.join(ROOT, case), folder, ignore=shutil.ignore_patterns(CHECKPOINT_FILE))
    model.save_hub_checkpoint(folder)
    original = torch.load(os.path.join(ROOT, case, CHECKPOINT_FILE), map_location='cpu', weights_only=True)
    ours = torch.load(os.path.join(folder, CHECKPOINT_FILE), map_location='cpu', weights_only=True)
    if case in ORIGINAL_FORM:
        assert set(ours['backbone_weight']) == set(original['backbone_weight'])
        for k, v in original['backbone_weight'].items():
            assert torch.equal(ours['backbone_weight'][k], v), k
    assert set(ours['head_weight']) == set(original['head_weight'])
    assert ours['CLASSES'] == original['CLASSES']
    # and what we wrote reads back to the same scores
    again = Model.from_pretrained(folder)
    again.eval()
    with torch.no_grad():
        got = again({'imgs': inputs})['scores'].double().numpy()
    assert float(np.abs(got - np.asarray(expected['scores'])).max()) <= TOL
