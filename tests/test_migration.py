"""Saved formats keep their meaning: every reader of every saved format migrates tuner entries through one function
(modelscope_utuning.checkpoint.migrate), and writers store resolved entries with their version.

tests/fixtures/v01/ was written by version 0.1's own code (tests/fixtures/make_v01_fixture.py, commit bf060b7):
a tuner-only folder (``save_tuners``: adapter_config.json format 1, entries as the user wrote them, no version
marker), the trainer's output folder (configuration.json with ``utuning.version`` 0.1.0), the frozen base weights
and 0.1's own scores on fixed inputs. Its parallel tuners computed what is now ``join: absolute``; today's default
is ``residual``. Every reader must give 0.1's predictions."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import modelscope_utuning  # noqa: F401  (registers the plugin)
from modelscope.models import Model
from modelscope.pipelines import pipeline
from modelscope_utuning import load_model, load_tuners, model_from_tuners, save_tuners
from modelscope_utuning.checkpoint import migrate as migration
from modelscope_utuning.checkpoint.tuner_only import CONFIG_FILE, WEIGHTS_FILE, read_tuner_config
from modelscope_utuning.cli import main
from modelscope_utuning.model import VisionEfficientTuningModel
from modelscope_utuning.network import VisionEfficientTuning
from modelscope_utuning.training.export import export_output
from modelscope_utuning.tuners import parallel
from modelscope_utuning.tuners.base import tuner_kinds

V01 = os.path.join(os.path.dirname(__file__), 'fixtures', 'v01')
BASE = os.path.join(V01, 'base.pth')
VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4)
# what the fixture's 0.1 model was configured with (tests/fixtures/make_v01_fixture.py)
TUNERS_V01 = [{'type': 'adapter', 'op': 'mha', 'form': 'parallel', 'dim': 4},
              {'type': 'prefix', 'op': 'block', 'form': 'parallel', 'length': 3},
              {'type': 'prompt', 'op': 'ffn', 'form': 'parallel', 'length': 2},
              {'type': 'adapter', 'op': 'ffn', 'form': 'sequential', 'dim': 4},
              {'type': 'lora', 'op': 'mha', 'rank': 2}]
CLASSES = ['bird', 'cat', 'dog', 'eel']
TOL = 1e-5

pytestmark = pytest.mark.usefixtures('one_thread')


def _absolute(entries):
    return [dict(e, join='absolute') if e.get('form', 'parallel') == 'parallel' and e['type'] != 'lora' else dict(e)
            for e in entries]


def _scores(model, x):
    model = model.eval()
    with torch.no_grad():
        return model({'imgs': x})['scores'].numpy()


@pytest.fixture(scope='module')
def expected():
    data = np.load(os.path.join(V01, 'expected.npz'))
    return torch.from_numpy(data['inputs']), data['scores']


@pytest.fixture(scope='module')
def reference():
    """The fixture's weights built by today's code with join='absolute' written out, loaded without any reader
    under test (plain load_state_dict of the safetensors file)."""
    from safetensors.torch import load_file
    net = VisionEfficientTuning(dict(VIT, num_classes=0, tuners=_absolute(TUNERS_V01), pretrained_weights=BASE),
                                {'num_classes': len(CLASSES)}, classes=CLASSES)
    state = load_file(os.path.join(V01, 'tuners', WEIGHTS_FILE))
    missing, unexpected = net.load_state_dict(state, strict=False)
    assert not unexpected and not [k for k in missing if k in net.tuner_state_dict()]
    return VisionEfficientTuningModel.from_network(net).eval()


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
    """bare: 0.1's save_tuners folder; bare_config: the same with a hand-written configuration.json (no version
    marker); tuners_cfg: 0.1's output folder without pytorch_model.pt; output: 0.1's whole output folder."""
    root = tmp_path_factory.mktemp('v01')
    out = {'bare': str(root / 'bare'), 'bare_config': str(root / 'bare_config'),
           'tuners_cfg': str(root / 'tuners_cfg'), 'output': str(root / 'output')}
    shutil.copytree(os.path.join(V01, 'tuners'), out['bare'])
    shutil.copytree(os.path.join(V01, 'tuners'), out['bare_config'])
    with open(os.path.join(out['bare_config'], 'configuration.json'), 'w') as f:
        json.dump({'framework': 'pytorch', 'task': 'vision-efficient-tuning',
                   'pipeline': {'type': 'vision-efficient-tuning'},
                   'model': {'type': 'vision-efficient-tuning', 'backbone': VIT, 'head': {'num_classes': 4}},
                   'preprocessor': {'type': 'vision-efficient-tuning-preprocessor', 'img_size': 32}}, f)
    shutil.copytree(os.path.join(V01, 'output'), out['output'])
    shutil.copytree(os.path.join(V01, 'output'), out['tuners_cfg'])
    os.remove(os.path.join(out['tuners_cfg'], 'pytorch_model.pt'))
    return out


@pytest.fixture(scope='module')
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp('images')
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        p = str(root / f'img{i}.png')
        Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def _reference_rows(model, images):
    """Rows as the pipeline gives them, computed by ``model`` on our preprocessor's tensors (img_size 32, as the
    fixture's configuration says)."""
    from modelscope_utuning.preprocessing.preprocessor import VisionEfficientTuningPreprocessor
    pre = VisionEfficientTuningPreprocessor(img_size=32)
    x = torch.stack([pre(p)['imgs'] for p in images])
    rows = []
    for s in _scores(model, x):
        order = np.argsort(-s, kind='stable')
        rows.append({'labels': [CLASSES[i] for i in order], 'scores': [float(s[i]) for i in order]})
    return rows


def _pipeline_rows(pipe, images):
    return [pipe(p, topk=len(CLASSES)) for p in images]


def _assert_rows_equal(got, want, what):
    for g, w in zip(got, want):
        assert g['labels'][0] == w['labels'][0], what
        gs, ws = dict(zip(g['labels'], g['scores'])), dict(zip(w['labels'], w['scores']))
        assert max(abs(gs[c] - ws[c]) for c in CLASSES) <= TOL, what


# -- the fixture is 0.1's computation, which is join='absolute' today -------------------------------------------
def test_fixture_format_is_what_0_1_wrote():
    with open(os.path.join(V01, 'tuners', CONFIG_FILE)) as f:
        cfg = json.load(f)
    assert cfg['format_version'] == 1 and 'written_by' not in cfg and 'backbone_fingerprint' not in cfg
    assert cfg['tuners'] == TUNERS_V01  # as written: no join
    with open(os.path.join(V01, 'output', 'configuration.json')) as f:
        assert json.load(f)['utuning']['version'] == '0.1.0'


def test_join_absolute_is_0_1s_computation(reference, expected):
    x, scores = expected
    assert np.abs(_scores(reference, x) - scores).max() <= TOL
    today = VisionEfficientTuning(dict(VIT, num_classes=0, tuners=TUNERS_V01, pretrained_weights=BASE),
                                  {'num_classes': 4}, classes=CLASSES)
    today.load_state_dict(reference.model.state_dict())
    assert np.abs(_scores(VisionEfficientTuningModel.from_network(today), x) - scores).max() > 1e-2  # it matters


# -- every reader -----------------------------------------------------------------------------------------------
def test_model_readers_give_0_1s_predictions(folders, expected):
    x, scores = expected
    loaded = {
        'model_from_tuners(bare 0.1 folder)': model_from_tuners(folders['bare'], BASE),
        'Model.from_pretrained(0.1 output)': Model.from_pretrained(folders['output']),
        'load_model(0.1 output)': load_model(folders['output']),
        'model_from_tuners(0.1 output)': model_from_tuners(folders['tuners_cfg'], BASE),
    }
    for what, model in loaded.items():
        assert np.abs(_scores(model, x) - scores).max() <= TOL, what
        assert {t.join for _, t, _ in model.model.tuners() if t.form == 'parallel' and hasattr(t, 'join')} \
            == {'absolute'}, what


def test_pipeline_and_cli_with_backbone_give_0_1s_predictions(folders, images, reference, capsys):
    want = _reference_rows(reference, images)
    for name in ('bare_config', 'tuners_cfg'):
        pipe = pipeline('vision-efficient-tuning', folders[name], backbone=BASE, device='cpu')
        _assert_rows_equal(_pipeline_rows(pipe, images), want, f'pipeline({name}, backbone=)')
        capsys.readouterr()
        assert main(['predict', folders[name], *images, '--backbone', BASE, '--json',
                     '--topk', str(len(CLASSES))]) == 0
        rows = json.loads(capsys.readouterr().out)
        _assert_rows_equal(rows, want, f'modelscope-utuning predict {name} --backbone')
    pipe = pipeline('vision-efficient-tuning', folders['output'], device='cpu')
    _assert_rows_equal(_pipeline_rows(pipe, images), want, 'pipeline(0.1 output)')


def test_loading_0_1_tuners_into_a_model_of_todays_defaults_is_refused(folders):
    today = VisionEfficientTuningModel(backbone=dict(VIT, num_classes=0, tuners=TUNERS_V01, pretrained_weights=BASE),
                                       head={'num_classes': 4})
    with pytest.raises(ValueError, match=r"tuners: file .*'join': 'absolute'"):
        load_tuners(today, folders['bare'])


@pytest.mark.parametrize('marker, join', [({'package': 'modelscope-utuning', 'version': '0.1.0'}, 'absolute'),
                                          (None, 'residual')])
def test_epoch_files_migrate_by_their_marker(reference, tmp_path, marker, join):
    """An epoch file dated 0.1 keeps join=absolute; one without a marker was written by 0.2.0 (the first version
    that wrote model_cfg) and means 0.2's default."""
    ckpt = {'state_dict': reference.state_dict(), 'CLASSES': CLASSES,
            'model_cfg': {'type': 'vision-efficient-tuning', 'backbone': dict(VIT, num_classes=0, tuners=TUNERS_V01),
                          'head': {'num_classes': 4}}}
    if marker:
        ckpt['utuning'] = marker
    path = str(tmp_path / 'epoch_1.pth')
    torch.save(ckpt, path)
    model = load_model(path)
    assert {t.join for _, t, _ in model.model.tuners() if hasattr(t, 'join') and t.form == 'parallel'} == {join}


# -- the dating rule -------------------------------------------------------------------------------------------------
def test_writer_rules(tmp_path):
    assert migration.writer_of_tuner_config({'format_version': 1}) == '0.1.0'
    assert migration.writer_of_tuner_config({}) == '0.1.0'
    assert migration.writer_of_tuner_config({'format_version': 2}) == '0.2.0'
    assert migration.writer_of_tuner_config({'format_version': 2, 'written_by': {'version': '9.1.0'}}) == '9.1.0'
    with open(tmp_path / 'configuration.json', 'w') as f:
        json.dump({'utuning': {'version': '0.1.0'}}, f)
    assert migration.writer_of_tuner_config({'format_version': 2}, str(tmp_path)) == '0.1.0'
    assert migration.writer_of_configuration({'model': {}}) is None  # hand-written / ModelScope: today's defaults
    assert migration.writer_of_checkpoint({}) == '0.2.0'
    entries = [{'type': 'adapter', 'op': 'mha', 'dim': 4}, {'type': 'adapter', 'op': 'ffn', 'form': 'sequential',
                                                            'dim': 4}, {'type': 'lora', 'rank': 2}]
    out = migration.migrate(entries, '0.1.0')
    assert out[0]['join'] == 'absolute' and 'join' not in out[1] and 'join' not in out[2]
    assert entries[0] == {'type': 'adapter', 'op': 'mha', 'dim': 4}  # never changed in place
    assert migration.migrate(entries, None) == entries
    assert migration.migrate(entries, None, format_version=1)[0]['join'] == 'absolute'
    with pytest.raises(ValueError, match='x.json.*must be a list'):
        migration.migrate({'type': 'adapter'}, '0.1.0', source='x.json')


def test_the_running_versions_row_is_the_live_default():
    """A change of a default must come with a row for the version that changes it."""
    assert migration.WRITER_DEFAULTS[migration._minor(modelscope_utuning.__version__)] == \
        {'join': parallel.DEFAULT_JOIN}


# -- writers: resolved entries and the writer's version; immune to a later change of a default -----------------
TUNERS_NOW = [{'type': 'adapter', 'op': 'mha', 'dim': 4},
              {'type': 'prefix', 'op': 'block', 'length': 3, 'layers': [1]},
              {'type': 'prompt', 'op': 'block', 'form': 'sequential', 'length': 2},
              {'type': 'lora', 'op': 'ffn', 'rank': 2},
              {'type': 'ssf', 'op': 'block'}]


def _assert_resolved(entries):
    kinds = tuner_kinds()
    assert len(entries) == len(TUNERS_NOW)
    for e in entries:
        cls = kinds[e['type']]
        for f in dataclasses.fields(cls.Config):
            assert f.name in e, (e, f.name)
        if cls.level == 'block':
            assert 'op' in e and 'form' in e, e
        if e.get('form') == 'parallel' and 'join' in {f.name for f in dataclasses.fields(cls.Config)}:
            assert e['join'] == 'residual', e


def test_fresh_save_is_resolved_and_survives_a_changed_default(tmp_path, monkeypatch, images):
    torch.manual_seed(0)
    model = VisionEfficientTuningModel(backbone=dict(VIT, tuners=TUNERS_NOW), head={'num_classes': 4},
                                       CLASSES=CLASSES)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    base = str(tmp_path / 'base.pth')
    torch.save({k: v for k, v in model.backbone.state_dict().items()
                if f'backbone.{k}' not in model.model.tuner_state_dict()}, base)
    model.backbone_config = dict(model.backbone_config, pretrained_weights=base)
    tuners_dir = str(tmp_path / 'tuners')
    save_tuners(model, tuners_dir)
    cfg = {'framework': 'pytorch', 'task': 'vision-efficient-tuning', 'pipeline': {'type': 'vision-efficient-tuning'},
           'model': {'type': 'vision-efficient-tuning', 'backbone': dict(VIT, tuners=TUNERS_NOW),
                     'head': {'num_classes': 4}},
           'preprocessor': {'type': 'vision-efficient-tuning-preprocessor', 'img_size': 32}}
    out = export_output(model, cfg, str(tmp_path / 'output'))

    with open(os.path.join(tuners_dir, CONFIG_FILE)) as f:
        adapter_cfg = json.load(f)
    assert adapter_cfg['written_by'] == {'package': 'modelscope-utuning', 'version': modelscope_utuning.__version__}
    _assert_resolved(adapter_cfg['tuners'])
    with open(os.path.join(out, 'configuration.json')) as f:
        out_cfg = json.load(f)
    assert out_cfg['utuning']['version'] == modelscope_utuning.__version__
    _assert_resolved(out_cfg['model']['backbone']['tuners'])

    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    before = _scores(model, x)
    want = _pipeline_rows(pipeline('vision-efficient-tuning', out, device='cpu'), images)

    monkeypatch.setattr(parallel, 'DEFAULT_JOIN', 'absolute')  # a later version changes the default
    changed = VisionEfficientTuningModel(backbone=dict(VIT, tuners=TUNERS_NOW), head={'num_classes': 4})
    assert {t.join for _, t, _ in changed.model.tuners() if hasattr(t, 'join') and t.form == 'parallel'} \
        == {'absolute'}  # the patch is in force for entries that leave join out
    for what, loaded in (('model_from_tuners', model_from_tuners(tuners_dir, base)),
                         ('Model.from_pretrained', Model.from_pretrained(out)), ('load_model', load_model(out))):
        assert np.abs(_scores(loaded, x) - before).max() <= TOL, what
    _assert_rows_equal(_pipeline_rows(pipeline('vision-efficient-tuning', out, device='cpu'), images), want,
                       'pipeline after the default changed')
    assert read_tuner_config(tuners_dir)['tuners'] == adapter_cfg['tuners']  # nothing to migrate
