"""The ``modelscope-utuning`` command line: predict (table / JSON), eval, train with overrides, export (tuner-only,
merged LoRA), push (argument checks only, never the network), and clear one-line errors with exit status 2."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import modelscope_utuning  # noqa: F401  (registers the plugin)
from modelscope.models import Model
from modelscope.utils.config import Config
from modelscope_utuning import cli
from modelscope_utuning.cli import CLIError, apply_overrides, main, parse_override
from modelscope_utuning.model import VisionEfficientTuningModel
from modelscope_utuning.training.export import export_output

from colour_runs import model_dir, write_folder

VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4)
TRI_TUNER = [{'type': 'adapter', 'op': 'mha', 'form': 'parallel', 'dim': 4},
             {'type': 'adapter', 'op': 'ffn', 'form': 'parallel', 'dim': 4},
             {'type': 'prefix', 'op': 'block', 'form': 'parallel', 'length': 3}]
LORA = [{'type': 'adapter', 'op': 'ffn', 'form': 'parallel', 'dim': 4}, {'type': 'lora', 'op': 'mha', 'rank': 2}]
CLASSES = ['bird', 'cat', 'dog']
PREPROCESSOR = {'type': 'vision-efficient-tuning-preprocessor', 'img_size': 32, 'crop_pct': 1.0}


pytestmark = pytest.mark.usefixtures('one_thread')


def configuration(tuners, base=None):
    backbone = dict(VIT, tuners=copy.deepcopy(tuners))
    if base:
        backbone['pretrained_weights'] = base
    return {'framework': 'pytorch', 'task': 'vision-efficient-tuning',
            'pipeline': {'type': 'vision-efficient-tuning'},
            'model': {'type': 'vision-efficient-tuning', 'backbone': backbone, 'head': {'num_classes': 3}},
            'preprocessor': dict(PREPROCESSOR),
            'train': {'max_epochs': 1, 'dataloader': {'batch_size_per_gpu': 4, 'workers_per_gpu': 0},
                      'optimizer': {'type': 'AdamW', 'lr': 1e-3},
                      'lr_scheduler': {'type': 'CosineAnnealingLR', 'T_max': 1, 'options': {'by_epoch': True}}},
            'evaluation': {'dataloader': {'batch_size_per_gpu': 8, 'workers_per_gpu': 0}, 'metrics': ['accuracy']}}


def make_model_dir(folder, tuners, base=None, seed=0):
    """A trained-looking model folder (the trainer's output layout) with every trainable weight moved."""
    cfg = configuration(tuners, base)
    torch.manual_seed(seed)
    model = VisionEfficientTuningModel(model_dir=None, backbone=cfg['model']['backbone'], head={'num_classes': 3},
                                       CLASSES=list(CLASSES))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    export_output(model, cfg, str(folder))
    return str(folder)


def write_images(folder, classes=CLASSES, per_class=3, seed=0):
    rng = np.random.default_rng(seed)
    for i, name in enumerate(classes):
        os.makedirs(os.path.join(folder, name), exist_ok=True)
        for j in range(per_class):
            arr = rng.integers(0, 256, (24 + 4 * j, 28, 3), dtype=np.uint8)
            arr[..., i % 3] = 255 - 40 * j  # a class colour, so training has something to find
            Image.fromarray(arr).save(os.path.join(folder, name, f'{j}.png'))
    return str(folder)


@pytest.fixture(scope='module')
def base_weights(tmp_path_factory):
    """A frozen 'pre-trained' backbone file (timm layout), as a user would start from."""
    from safetensors.torch import save_file
    from modelscope_utuning.backbone.vit import VisionTransformer
    torch.manual_seed(5)
    vit = VisionTransformer(**VIT)
    path = str(tmp_path_factory.mktemp('base') / 'vit_tiny.safetensors')
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, path)
    return path


@pytest.fixture(scope='module')
def tri_dir(tmp_path_factory, base_weights):
    return make_model_dir(tmp_path_factory.mktemp('tri') / 'model', TRI_TUNER, base=base_weights)


@pytest.fixture(scope='module')
def images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp('imgs') / 'val')


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@torch.no_grad()
def scores_of(model, paths):
    from modelscope_utuning.preprocessing.preprocessor import VisionEfficientTuningPreprocessor
    pre = VisionEfficientTuningPreprocessor.from_model_dir(model.model_dir) if model.model_dir else \
        VisionEfficientTuningPreprocessor(img_size=32, crop_pct=1.0)
    x = torch.stack([pre(p)['imgs'] for p in paths])
    return model.eval()({'imgs': x})['scores']


# -- predict ------------------------------------------------------------------------------------------------------
def test_predict_table_and_json(tri_dir, images, capsys):
    code, out, err = run(['predict', tri_dir, images], capsys)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].split() == ['image', 'label', 'score']
    assert len(lines) == 1 + 9
    table = {line.split()[0]: (line.split()[1], float(line.split()[2])) for line in lines[1:]}

    code, out, err = run(['predict', tri_dir, images, '--json', '--topk', '2', '--batch-size', '4'], capsys)
    assert code == 0, err
    rows = json.loads(out)
    assert len(rows) == 9 and all(len(r['labels']) == 2 and r['scores'][0] >= r['scores'][1] for r in rows)
    assert all(set(r['labels']) <= set(CLASSES) for r in rows)
    for r in rows:  # the table and the JSON agree, and both are the model's own answer
        assert table[r['input']][0] == r['labels'][0]
        assert table[r['input']][1] == pytest.approx(r['scores'][0], abs=1e-4)
    model = Model.from_pretrained(tri_dir)
    expected = scores_of(model, [r['input'] for r in rows])
    for r, s in zip(rows, expected):
        assert r['labels'][0] == CLASSES[int(s.argmax())]
        assert r['scores'][0] == pytest.approx(float(s.max()), abs=1e-5)


def test_predict_single_file_and_output_file(tri_dir, images, tmp_path, capsys):
    one = os.path.join(images, 'cat', '0.png')
    target = tmp_path / 'pred.json'
    code, out, err = run(['predict', tri_dir, one, '--json', '-o', target], capsys)
    assert code == 0, err
    rows = json.loads(target.read_text())
    assert [r['input'] for r in rows] == [one]


# -- bad arguments: exit 2, one line, no traceback ---------------------------------------------------------------
@pytest.mark.parametrize('argv, message', [
    (['predict', '{model}', '/no/such/folder'], "'/no/such/folder': no such file or folder"),
    (['predict', '/no/such/model', '{images}'], "unknown model '/no/such/model'"),
    (['predict', '{model}', '{images}', '--topk', '0'], '--topk 0'),
    (['train', 'no_such_preset', '--train-data', '{images}'], "unknown model 'no_such_preset'"),
    (['train', '{model}', '--train-data', '/no/such/data'], "--train-data '/no/such/data': no such file or folder"),
    (['train', '{model}', 'train.max_epochs', '--train-data', '{images}'], "bad override 'train.max_epochs'"),
    (['train', '{model}', '--train-data', '{images}', 'a..b=1'], "bad override 'a..b=1'"),
    (['train', '{model}', '--train-data', '{images}', 'trian.max_epochs=3'], "unknown top-level section 'trian'"),
    (['train', '{model}', '--train-data', '{images}', 'train.max_epochs.x=3'], 'train.max_epochs is 1'),
    (['eval', '{model}', '--data', '/no/such/data'], "--data '/no/such/data': no such file or folder"),
    (['export', '{model}', '{model}', '--tuner-only'], 'must differ from the model folder'),
    (['export', '{model}', '{tmp}/out'], 'one of the arguments --tuner-only --merge-lora --onnx is required'),
    (['export', '{model}', '{tmp}/out', '--tuner-only', '--opset', '17'], '--opset goes with --onnx'),
    (['push', '/no/such/folder', 'me/model'], "'/no/such/folder': no such folder"),
    (['push', '{model}', 'not-a-repo-id'], "repository id 'not-a-repo-id': expected owner/name"),
    (['frobnicate'], "invalid choice: 'frobnicate'"),
])
def test_bad_arguments_exit_2_with_one_line(argv, message, tri_dir, images, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv('MODELSCOPE_API_TOKEN', 'not-used')
    argv = [a.format(model=tri_dir, images=images, tmp=tmp_path) for a in argv]
    work = tmp_path / 'work'
    if argv[0] == 'train':
        argv += ['--work-dir', str(work)]
    code, out, err = run(argv, capsys)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1, err
    assert 'Traceback' not in err and out == ''
    assert not (work / 'output').exists()


def test_console_script_reports_bad_arguments_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, '-m', 'modelscope_utuning.cli', 'predict', str(tmp_path / 'missing'),
                           'x.png'], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith('modelscope-utuning predict: error: unknown model')
    assert 'Traceback' not in proc.stderr


def test_help_and_version(capsys):
    assert run(['--help'], capsys)[0] == 0
    code, out, _ = run(['--version'], capsys)
    assert code == 0 and modelscope_utuning.__version__ in out
    code, _, err = run([], capsys)
    assert code == 2 and 'train' in err


# -- overrides ----------------------------------------------------------------------------------------------------
def test_parse_override_values():
    assert parse_override('train.max_epochs=5') == ('train.max_epochs', 5)
    assert parse_override('train.optimizer.lr=1e-3') == ('train.optimizer.lr', 1e-3)
    assert parse_override('model.finetune=true') == ('model.finetune', True)
    assert parse_override('model.freeze_cfg=null') == ('model.freeze_cfg', None)
    assert parse_override('train.optimizer.type=SGD') == ('train.optimizer.type', 'SGD')
    assert parse_override('model.backbone.tuners.0.dim=16') == ('model.backbone.tuners.0.dim', 16)
    assert parse_override('a.b=[1, 2]') == ('a.b', [1, 2])
    assert parse_override('a.b={"c": 1}') == ('a.b', {'c': 1})
    assert parse_override('a.b="3"') == ('a.b', '3')
    assert parse_override('a.b=x=y') == ('a.b', 'x=y')
    for bad in ('novalue', '=3', '.a=1', 'a b=1', 'a..b=1'):
        with pytest.raises(CLIError, match='bad override'):
            parse_override(bad)


def test_apply_overrides_merge_semantics():
    cfg = Config(configuration(TRI_TUNER))
    apply_overrides(cfg, [parse_override(t) for t in (
        'train.max_epochs=7', 'model.backbone.tuners.0.dim=16', 'train.optimizer={"lr": 0.01}',
        'evaluation.metrics=["accuracy"]', 'train.new_section.x=1', 'model.head.dropout_rate=0.1')])
    d = cfg.to_dict()
    assert d['train']['max_epochs'] == 7
    assert d['model']['backbone']['tuners'][0] == {'type': 'adapter', 'op': 'mha', 'form': 'parallel', 'dim': 16}
    assert d['model']['backbone']['tuners'][1:] == TRI_TUNER[1:]
    assert d['train']['optimizer'] == {'type': 'AdamW', 'lr': 0.01}  # dicts merge
    assert d['train']['new_section'] == {'x': 1}
    assert d['model']['head'] == {'num_classes': 3, 'dropout_rate': 0.1}
    # a list replaces the list (ModelScope would merge typed entries by type, mixing the OPs)
    new = [{'type': 'adapter', 'op': 'ffn', 'form': 'parallel', 'dim': 8}]
    apply_overrides(cfg, [('model.backbone.tuners', new)])
    assert cfg.to_dict()['model']['backbone']['tuners'] == new
    for bad, match in ((('model.backbone.tuners.5.dim', 1), 'out of range'),
                       (('model.backbone.tuners.x.dim', 1), 'index it with a number'),
                       (('train.max_epochs.x', 1), 'not a section'),
                       (('trian.max_epochs', 1), 'unknown top-level section')):
        with pytest.raises(CLIError, match=match):
            apply_overrides(cfg, [bad])


# -- train / eval -------------------------------------------------------------------------------------------------
def test_train_with_overrides_then_eval(tmp_path, images, capsys):
    model_dir = tmp_path / 'base'
    os.makedirs(model_dir)
    cfg = configuration([{'type': 'adapter', 'op': 'ffn', 'form': 'parallel', 'dim': 4}])
    cfg['model']['head']['num_classes'] = 7  # the dataset's 3 classes win
    (model_dir / 'configuration.json').write_text(json.dumps(cfg))
    train_dir = write_images(tmp_path / 'train', per_class=4, seed=1)
    work = tmp_path / 'work'
    code, out, err = run(['train', model_dir, '--train-data', train_dir, '--eval-data', images, '--work-dir', work,
                          '--epochs', '2', 'model.backbone.tuners.0.dim=6', 'train.optimizer.lr=0.005',
                          '--json'], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert 0.0 <= result['metrics']['accuracy'] <= 1.0
    output = result['output_dir']
    saved = json.loads(open(os.path.join(output, 'configuration.json')).read())
    assert saved['model']['backbone']['tuners'][0]['dim'] == 6
    assert saved['model']['head']['num_classes'] == 3
    assert saved['train']['max_epochs'] == 2 and saved['train']['lr_scheduler']['T_max'] == 2
    assert saved['train']['optimizer']['lr'] == 0.005
    assert os.path.isfile(os.path.join(work, 'epoch_2.pth'))

    code, out, err = run(['eval', output, '--data', images, '--json'], capsys)
    assert code == 0, err
    metrics = json.loads(out)
    assert metrics['accuracy'] == pytest.approx(result['metrics']['accuracy'])


def test_eval_matches_folder_classes_by_name(tri_dir, tmp_path, capsys):
    # A folder with only two of the model's classes: labels follow the model's class names, not folder order.
    folder = write_images(tmp_path / 'two', classes=['dog', 'cat'], per_class=2)
    code, out, err = run(['eval', tri_dir, '--data', folder, '--json'], capsys)
    assert code == 0, err
    model = Model.from_pretrained(tri_dir)
    paths = sorted(os.path.join(folder, c, f) for c in ('cat', 'dog') for f in os.listdir(os.path.join(folder, c)))
    predicted = [CLASSES[int(i)] for i in scores_of(model, paths).argmax(1)]
    truth = [os.path.basename(os.path.dirname(p)) for p in paths]
    expected = sum(p == t for p, t in zip(predicted, truth)) / len(paths)
    assert json.loads(out)['accuracy'] == pytest.approx(expected)

    other = write_images(tmp_path / 'other', classes=['fish'], per_class=1)
    code, out, err = run(['eval', tri_dir, '--data', other], capsys)
    assert code == 2 and 'fish' in err


def test_train_from_a_configuration_file(tmp_path, images, capsys):
    path = tmp_path / 'my_config.json'
    path.write_text(json.dumps(configuration(TRI_TUNER)))
    work = tmp_path / 'work'
    code, out, err = run(['train', path, '--train-data', images, '--work-dir', work, 'train.max_epochs=1'], capsys)
    assert code == 0, err
    assert 'model saved to' in out
    assert os.path.isfile(work / 'model' / 'configuration.json')
    assert os.path.isfile(work / 'output' / 'pytorch_model.pt')


def test_presets_are_listed_and_resolved(tmp_path, capsys):
    presets = cli.list_presets()
    if not presets:
        pytest.skip('no presets installed')
    code, out, _ = run(['presets'], capsys)
    assert code == 0 and all(name in out for name in presets)
    name = 'utuning_tri' if 'utuning_tri' in presets else next(iter(presets))
    model_dir = cli.resolve_model(name, str(tmp_path))
    assert json.loads(open(os.path.join(model_dir, 'configuration.json')).read()) == \
        json.loads(open(presets[name]).read())


def test_train_a_preset_shrunk_by_overrides(tmp_path, images, capsys):
    presets = cli.list_presets()
    if 'utuning_tri' not in presets:
        pytest.skip('the utuning_tri preset is not installed')
    work = tmp_path / 'work'
    code, out, err = run(['train', 'utuning_tri', '--train-data', images, '--work-dir', work, '--epochs', '1',
                          'model.backbone.img_size=32', 'model.backbone.patch_size=16', 'model.backbone.embed_dim=32',
                          'model.backbone.depth=2', 'model.backbone.num_heads=4', 'model.head.dim=32',
                          'preprocessor.img_size=32', 'preprocessor.resize=36', 'train.dataloader.workers_per_gpu=0',
                          'train.hooks=[]'], capsys)
    assert code == 0, err
    assert 'random initialisation' in err  # no weights: said, not hidden
    saved = json.loads((work / 'output' / 'configuration.json').read_text())
    preset_tuners = json.loads(open(presets['utuning_tri']).read())['model']['backbone']['tuners']
    saved_tuners = saved['model']['backbone']['tuners']
    # the preset's entries, each completed by the options it was built with, so later defaults cannot change it
    assert [{k: e[k] for k in p} for e, p in zip(saved_tuners, preset_tuners)] == preset_tuners
    assert all(e['join'] == 'residual' and e['scale'] == 'channel' for e in saved_tuners)
    assert saved['model']['head']['num_classes'] == 3 and saved['model']['backbone']['embed_dim'] == 32


# -- export -------------------------------------------------------------------------------------------------------
def test_export_tuner_only_reloads_with_same_predictions(tri_dir, images, base_weights, tmp_path, capsys):
    from modelscope_utuning.model import model_from_tuners
    out_dir = tmp_path / 'tuners'
    code, out, err = run(['export', tri_dir, out_dir, '--tuner-only', '--base-weights', base_weights], capsys)
    assert code == 0, err
    files = set(os.listdir(out_dir))  # a model folder without the backbone: tuners, head, configuration, card
    assert {'adapter_config.json', 'adapter_model.safetensors', 'configuration.json', 'README.md'} <= files
    assert 'pytorch_model.pt' not in files
    assert os.path.getsize(out_dir / 'adapter_model.safetensors') < os.path.getsize(
        os.path.join(tri_dir, 'pytorch_model.pt'))
    reloaded = model_from_tuners(str(out_dir))  # the base weights recorded by --base-weights
    assert reloaded.CLASSES == CLASSES
    paths = [os.path.join(images, c, '0.png') for c in CLASSES]
    torch.testing.assert_close(scores_of(reloaded, paths), scores_of(Model.from_pretrained(tri_dir), paths))
    # A second export into the same, now non-empty, folder needs --force.
    code, _, err = run(['export', tri_dir, out_dir, '--tuner-only'], capsys)
    assert code == 2 and '--force' in err


def test_export_merged_lora_reloads_with_same_predictions(images, tmp_path, capsys):
    from modelscope_utuning.model import has_lora
    src = make_model_dir(tmp_path / 'lora', LORA, seed=3)
    out_dir = tmp_path / 'merged'
    code, out, err = run(['export', src, out_dir, '--merge-lora'], capsys)
    assert code == 0, err
    merged = Model.from_pretrained(str(out_dir))
    assert not has_lora(merged)
    saved = json.loads((out_dir / 'configuration.json').read_text())
    assert [t['type'] for t in saved['model']['backbone']['tuners']] == ['adapter']
    paths = [os.path.join(images, c, f'{j}.png') for c in CLASSES for j in range(2)]
    torch.testing.assert_close(scores_of(merged, paths), scores_of(Model.from_pretrained(src), paths),
                               atol=1e-5, rtol=1e-4)
    code, out, err = run(['predict', out_dir, images, '--json'], capsys)
    assert code == 0, err
    # A model without LoRA has nothing to merge.
    code, _, err = run(['export', str(out_dir), tmp_path / 'again', '--merge-lora'], capsys)
    assert code == 2 and 'no LoRA' in err


# -- push ---------------------------------------------------------------------------------------------------------
def test_push_without_token_fails_clearly(tri_dir, capsys, monkeypatch):
    monkeypatch.delenv('MODELSCOPE_API_TOKEN', raising=False)
    code, out, err = run(['push', tri_dir, 'me/tiny-utuning'], capsys)
    assert code == 2
    assert 'MODELSCOPE_API_TOKEN' in err and len(err.strip().splitlines()) == 1


def test_push_calls_hub_api(tri_dir, capsys, monkeypatch):
    calls = []

    class FakeHubApi:
        def __init__(self, token=None, **kwargs):
            calls.append(('init', token))

        def create_repo(self, repo_id, **kwargs):
            calls.append(('create_repo', repo_id, kwargs))

        def upload_folder(self, **kwargs):
            calls.append(('upload_folder', kwargs))

        def get_model_url(self, repo_id):
            return f'https://hub.example/{repo_id}'

    import importlib
    monkeypatch.setattr(importlib.import_module('modelscope.hub.api'), 'HubApi', FakeHubApi)
    monkeypatch.setenv('MODELSCOPE_API_TOKEN', 'secret-token')
    code, out, err = run(['push', tri_dir, 'me/tiny-utuning', '-m', 'first upload'], capsys)
    assert code == 0, err
    assert calls[0] == ('init', 'secret-token')
    assert calls[1][1] == 'me/tiny-utuning' and calls[1][2]['exist_ok'] and calls[1][2]['token'] == 'secret-token'
    upload = calls[2][1]
    assert upload['repo_id'] == 'me/tiny-utuning' and upload['folder_path'] == os.path.abspath(tri_dir)
    assert upload['commit_message'] == 'first upload' and upload['token'] == 'secret-token'
    assert 'secret-token' not in out + err


# -- train: bad values name the key and write nothing; a work_dir that is a file (issue 11) ----------------------------
@pytest.mark.parametrize('override,message', [
    ('train.max_epochs=abc', "train.max_epochs='abc': expected an integer >= 1"),
    ('train.max_epochs=1.5', 'train.max_epochs=1.5: expected an integer >= 1'),
    ('train.max_epochs=0', 'train.max_epochs=0: expected an integer >= 1'),
    ('train.optimizer.lr=-1', 'train.optimizer.lr=-1: expected a number > 0'),
    ('model.head.num_classes=zero', "model.head.num_classes='zero'"),
])
def test_cli_bad_values_name_the_key_and_write_nothing(tmp_path, capsys, override, message):
    from modelscope_utuning.cli import main
    data = write_folder(tmp_path / 'd', 'ab', n=2)
    code = main(['train', model_dir(tmp_path / 'model', 2), '--train-data', data, '--work-dir',
                 str(tmp_path / 'work'), override])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert not os.path.exists(tmp_path / 'work' / 'output')


def test_cli_work_dir_that_is_a_file(tmp_path, capsys):
    from modelscope_utuning.cli import main
    (tmp_path / 'f').write_text('x')
    code = main(['train', model_dir(tmp_path / 'model', 2), '--train-data', write_folder(tmp_path / 'd', 'ab', n=2),
                 '--work-dir', str(tmp_path / 'f')])
    assert code == 2 and 'is a file' in capsys.readouterr().err
