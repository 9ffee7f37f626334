"""A model argument is a local path or a hub id by one rule (``modelscope_utuning.location.locate_model_source``):
a missing local path (a typo in a relative folder, ``./x``, ``../x``, an absolute path ...) is named at once, in
the pipeline (one model or several), ``Model.from_pretrained`` through our class, ``build_trainer(model=...)`` and
the command line, instead of going to the hub and failing 15 s later with a connection error; ``owner/name`` with
no local ``owner`` folder stays a hub id. Every test here runs with the network refused (any attempt is recorded)."""
from __future__ import annotations

import os
import pathlib
import socket
import time

import pytest

import modelscope_utuning  # noqa: F401  (registers the plugin)
from modelscope_utuning.location import HUB, LOCAL, ModelLocationError, locate_model_source
from test_pipeline import RGB_PNG, TASK, make_model_dir

pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture
def no_network(monkeypatch):
    """Every attempt to resolve or reach a host is recorded and fails at once."""
    attempts = []

    def refuse_lookup(host, *args, **kwargs):
        attempts.append(host)
        raise socket.gaierror(f'network disabled in this test ({host})')

    def refuse_connect(sock, address, *args):
        attempts.append(address)
        raise OSError(f'network disabled in this test ({address})')

    monkeypatch.setattr(socket, 'getaddrinfo', refuse_lookup)
    monkeypatch.setattr(socket.socket, 'connect', refuse_connect)
    return attempts


@pytest.fixture(scope='module')
def models(tmp_path_factory):
    """A folder ``a`` holding a model folder ``a/output`` (the cwd of each test is the folder above)."""
    root = tmp_path_factory.mktemp('location')
    make_model_dir(root / 'a' / 'output')
    (root / 'a' / 'notes.txt').write_text('a file, not a model')
    (root / 'plainfile').write_text('x')
    return root


@pytest.fixture
def here(models, monkeypatch):
    monkeypatch.chdir(models)
    return models


# (argument, expected kind or None for an error, what the error must say)
TABLE = [
    ('a/output', LOCAL, None),                      # an existing folder, relative
    ('a/output/', LOCAL, None),
    ('owner/name', HUB, None),                      # no local 'owner': a hub id, left to ModelScope
    ('damo/cv_vit-base_image-classification', HUB, None),
    ('plainfile/name', HUB, None),                  # 'plainfile' is a file, not a folder: no path reading
    ('a/outptu', None, "did you mean 'output'"),    # a typo in a relative folder whose first part exists
    ('a/outptu', None, "'a' is a folder here"),
    ('./output', None, 'relative path (it starts with ./)'),
    ('../nope', None, 'relative path (it starts with ../)'),
    ('/no/such/model', None, 'an absolute path'),
    ('nope/', None, 'ends with a path separator'),
    ('x/y/z', None, 'a hub id is owner/name'),
    ('a/./output2', None, "holds '.' or '..'"),
    ('a//outptu', None, 'empty part'),
    ('a\\output', None, 'backslash'),
    ('~/no-such-utuning-model', None, 'not expanded'),
    ('mymodel', None, 'not a hub id'),
    ('', None, 'empty name'),
]


@pytest.mark.parametrize('spec, kind, message', TABLE)
def test_the_rule(here, no_network, spec, kind, message):
    if kind is not None:
        assert locate_model_source(spec) == (kind, spec)
    else:
        with pytest.raises(ModelLocationError) as info:
            locate_model_source(spec)
        assert f'{spec!r}' in str(info.value) and message in str(info.value)
        assert isinstance(info.value, ValueError)
    assert no_network == []  # classified from the local file system alone


def test_a_path_object_is_always_a_path(here):
    assert locate_model_source(pathlib.Path('a/output')) == (LOCAL, 'a/output')
    with pytest.raises(ModelLocationError, match='a path object'):
        locate_model_source(pathlib.Path('owner/name'))
    with pytest.raises(TypeError, match='expected a folder path or a hub id'):
        locate_model_source(3)


def test_the_same_id_is_a_path_once_its_first_part_exists(here, no_network):
    assert locate_model_source('owner/name')[0] == HUB
    os.makedirs('owner')
    try:
        with pytest.raises(ModelLocationError, match="'owner' is a folder here"):
            locate_model_source('owner/name')
    finally:
        os.rmdir('owner')


# -- every entry point, through ModelScope's own factories ---------------------------------------------------------
def _fails_fast_naming(call, name):
    start = time.monotonic()
    with pytest.raises(ValueError) as info:
        call()
    elapsed = time.monotonic() - start
    assert repr(name) in str(info.value), str(info.value)
    assert elapsed < 5, f'{elapsed:.1f} s: the failure was not immediate'  # the hub route took 15 s
    return str(info.value)


def test_pipeline_with_a_typo_fails_at_once(here, no_network):
    from modelscope.pipelines import pipeline
    message = _fails_fast_naming(lambda: pipeline(TASK, ['a/output', 'a/outptu'], device='cpu'), 'a/outptu')
    assert "did you mean 'output'" in message
    _fails_fast_naming(lambda: pipeline(TASK, 'a/outptu', device='cpu'), 'a/outptu')
    _fails_fast_naming(lambda: pipeline(TASK, ['a/outptu', 'a/output'], device='cpu'), 'a/outptu')
    for missing in ('./nope', '../nope', '/abs/nope', 'a/output/nope'):
        _fails_fast_naming(lambda: pipeline(TASK, missing, device='cpu'), missing)
    assert no_network == []
    # the correct folder still loads (relative, one slash: reads like a hub id), offline
    assert len(pipeline(TASK, ['a/output', 'a/output'], device='cpu')(RGB_PNG)) == 2


class NetworkAttempt(BaseException):
    """Raised by the first name lookup: not an Exception, so no retry loop of the hub client swallows it."""


def test_other_tasks_are_left_to_modelscope(here, monkeypatch):
    """The guard in ModelScope's pipeline() acts for our task only: another task's typo goes the hub route as
    before (stopped here at its first network attempt)."""
    from modelscope.pipelines import pipeline

    def first_attempt(host, *args, **kwargs):
        raise NetworkAttempt(host)
    monkeypatch.setattr(socket, 'getaddrinfo', first_attempt)
    for task in ('image-classification', 'semantic-segmentation'):
        with pytest.raises(NetworkAttempt):
            pipeline(task, 'a/outptu', device='cpu')
    with pytest.raises(ModelLocationError):  # a list holding one of our folders is ours, whatever the task
        pipeline('image-classification', ['a/output', 'a/outptu'], device='cpu')


def test_our_classes_name_the_path(here, no_network, tmp_path):
    from modelscope.metainfo import Trainers
    from modelscope.models import Model
    from modelscope.trainers import build_trainer
    from modelscope_utuning.model import VisionEfficientTuningModel
    from modelscope_utuning.multitask import TaskGroup
    from modelscope_utuning.pipeline import VisionEfficientTuningPipeline
    _fails_fast_naming(lambda: VisionEfficientTuningPipeline(['a/output', 'a/outptu'], device='cpu'), 'a/outptu')
    _fails_fast_naming(lambda: VisionEfficientTuningPipeline('a/outptu', device='cpu'), 'a/outptu')
    _fails_fast_naming(lambda: VisionEfficientTuningModel.from_pretrained('a/outptu'), 'a/outptu')
    _fails_fast_naming(lambda: VisionEfficientTuningModel.from_pretrained('./outptu'), './outptu')
    _fails_fast_naming(lambda: TaskGroup(['a/output', 'a/outptu']), 'a/outptu')
    with pytest.raises(ValueError, match="'owner/name' is a hub id"):
        TaskGroup(['owner/name'])
    work = tmp_path / 'work'
    _fails_fast_naming(lambda: build_trainer(name=Trainers.vision_efficient_tuning,
                                             default_args=dict(model='a/outptu', work_dir=str(work))), 'a/outptu')
    from modelscope_utuning.training.trainer import VisionEfficientTuningTrainer
    _fails_fast_naming(lambda: VisionEfficientTuningTrainer(model='../outptu', work_dir=str(work)), '../outptu')
    assert no_network == []
    assert isinstance(Model.from_pretrained('a/output'), VisionEfficientTuningModel)


def test_the_command_line_names_the_path(here, no_network, capsys):
    from modelscope_utuning.cli import main
    assert main(['predict', 'a/outptu', RGB_PNG]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'a/outptu'" in err and "did you mean 'output'" in err
    assert len(err.strip().splitlines()) == 1
    assert main(['train', './outptu', '--train-data', 'a', '--work-dir', 'w']) == 2
    assert "unknown model './outptu'" in capsys.readouterr().err
    assert not os.path.exists('w')
    assert no_network == []
