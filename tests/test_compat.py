"""modelscope_utuning.compat: each workaround for a difference between ModelScope releases, tested on the
capability it works around (present or simulated), so that the suite checks both sides on any release."""
import importlib.util
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

import modelscope_utuning  # noqa: F401  (registers the plugin, installs the guard)
from modelscope.utils import automodel_utils
from modelscope_utuning import compat

TASK = 'vision-efficient-tuning'


def write_config(folder, cfg):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, 'configuration.json'), 'w') as f:
        json.dump(cfg, f) if isinstance(cfg, dict) else f.write(cfg)
    return str(folder)


# -- 1. the trusted-source hub lookup ----------------------------------------------------------------------------------
def test_our_local_model_is_recognised_by_its_configuration(tmp_path):
    ours = write_config(tmp_path / 'ours', {'task': TASK, 'model': {'type': TASK}})
    assert compat.is_our_local_model(ours)
    assert compat.is_our_local_model(os.path.join(ours, 'configuration.json'))
    assert compat.is_our_local_model(write_config(tmp_path / 'legacy', {'model': {'model_type': TASK}}))
    assert compat.is_our_local_model(write_config(tmp_path / 'task_only', {'task': TASK, 'model': {}}))
    other = write_config(tmp_path / 'other', {'task': 'image-classification', 'model': {'type': 'resnet'}})
    assert not compat.is_our_local_model(other)
    assert not compat.is_our_local_model(write_config(tmp_path / 'broken', '{not json'))
    assert not compat.is_our_local_model(write_config(tmp_path / 'list', '[1, 2]'))
    (tmp_path / 'empty').mkdir()
    for not_ours in (str(tmp_path / 'empty'), str(tmp_path / 'missing'), 'damo/cv_vitb16_classification',
                     None, 3, ['a/b']):
        assert not compat.is_our_local_model(not_ours)


@pytest.fixture
def fake_lookup(monkeypatch):
    """ModelScope's trusted-source function replaced by one that records its calls and answers True."""
    calls = []

    def is_model_from_trusted_source(model_id, revision=None, trusted_owners=None):
        calls.append((model_id, revision, trusted_owners))
        return True

    monkeypatch.setattr(automodel_utils, compat.TRUSTED_SOURCE_FUNCTION, is_model_from_trusted_source,
                        raising=False)
    import modelscope.pipelines.builder as pipelines_builder
    monkeypatch.setattr(pipelines_builder, compat.TRUSTED_SOURCE_FUNCTION, is_model_from_trusted_source,
                        raising=False)
    return calls


def test_guard_answers_only_for_our_local_folders(fake_lookup, tmp_path, monkeypatch):
    assert compat.guard_trusted_source_lookup() is True
    guarded = automodel_utils.is_model_from_trusted_source
    import modelscope.pipelines.builder as pipelines_builder
    assert pipelines_builder.is_model_from_trusted_source is guarded  # a module that imported it before
    assert compat.guard_trusted_source_lookup() is True and automodel_utils.is_model_from_trusted_source is guarded

    monkeypatch.chdir(tmp_path)
    write_config(tmp_path / 'work' / 'output', {'task': TASK, 'model': {'type': TASK}})
    write_config(tmp_path / 'damo' / 'resnet', {'task': 'image-classification', 'model': {'type': 'resnet'}})
    assert guarded('work/output') is False and guarded(str(tmp_path / 'work' / 'output'), 'v1') is False
    assert fake_lookup == []  # ours: no lookup
    # everything else reaches ModelScope's function with the same arguments, and its answer comes back
    assert guarded('damo/resnet', 'master') is True
    assert guarded('damo/some-hub-model', trusted_owners=['x']) is True
    assert fake_lookup == [('damo/resnet', 'master', None), ('damo/some-hub-model', None, ['x'])]


def test_guard_is_not_applied_where_modelscope_has_no_lookup(monkeypatch):
    monkeypatch.delattr(automodel_utils, compat.TRUSTED_SOURCE_FUNCTION, raising=False)
    assert compat.guard_trusted_source_lookup() is False
    assert not hasattr(automodel_utils, compat.TRUSTED_SOURCE_FUNCTION)


def test_guard_state_follows_this_modelscope():
    original = getattr(automodel_utils, compat.TRUSTED_SOURCE_FUNCTION, None)
    if original is None:
        pytest.skip('this ModelScope release makes no trusted-source lookup')
    assert getattr(original, compat._GUARD_MARK, None) is not None  # installed by the import


@pytest.fixture
def no_network(monkeypatch):
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


def test_relative_local_folder_through_modelscope_factory_stays_offline(tmp_path, no_network, monkeypatch):
    from modelscope.pipelines import pipeline
    from test_pipeline import RGB_PNG, make_model_dir
    make_model_dir(tmp_path / 'work' / 'output')
    monkeypatch.chdir(tmp_path)
    out = pipeline(TASK, 'work/output', device='cpu')(RGB_PNG)  # one slash: reads like a hub id
    assert len(out['scores']) == 5
    assert no_network == []


# -- 2., 3. trust_remote_code ------------------------------------------------------------------------------------------
def test_trainer_trust_remote_code_defaults_to_false():
    class Old:  # EpochBasedTrainer up to 1.36 has no such attribute
        pass

    class New:
        trust_remote_code = True

    assert compat.trainer_trust_remote_code(Old()) is False
    assert compat.trainer_trust_remote_code(New()) is True


def test_from_pretrained_gets_trust_remote_code_only_where_it_takes_it():
    import inspect
    from modelscope.models.base import Model
    takes = 'trust_remote_code' in inspect.signature(Model.from_pretrained).parameters
    assert compat.from_pretrained_trust_kwargs(True) == ({'trust_remote_code': True} if takes else {})


# -- 4. warm-up schedulers and torch's dropped ``verbose`` ----------------------------------------------------------
def _optimizer_and_base():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=100)


def _lrs(scheduler, optimizer, steps=5):
    lrs = [optimizer.param_groups[0]['lr']]
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]['lr'])
    return lrs


def _old_style_linear_warmup():
    """ModelScope <= 1.34's LinearWarmup as it builds: BaseWarmup passes ``verbose`` to torch's scheduler."""
    from modelscope.trainers.lrscheduler.warmup.base import BaseWarmup
    from modelscope.trainers.lrscheduler.warmup.warmup import LinearWarmup

    class OldLinearWarmup(LinearWarmup):
        def __init__(self, base_scheduler, warmup_iters, warmup_ratio=0.1, last_epoch=-1):
            self.warmup_ratio = warmup_ratio
            self.base_scheduler, self.warmup_iters, self._is_init_step = base_scheduler, warmup_iters, True
            super(BaseWarmup, self).__init__(base_scheduler.optimizer, last_epoch=last_epoch, verbose=False)
    return OldLinearWarmup


def test_fixed_warmup_builds_and_schedules_like_modelscope():
    from modelscope.trainers.lrscheduler.warmup.warmup import LinearWarmup
    old = _old_style_linear_warmup()
    fixed = compat.fixed_warmup_class(old)
    assert issubclass(fixed, LinearWarmup)
    optimizer, base = _optimizer_and_base()
    got = _lrs(fixed(base, warmup_iters=3, warmup_ratio=0.1), optimizer)
    expected = [0.1, 0.4, 0.7, 1.0, 1.0, 1.0]  # linear from 10% over three steps, then the base schedule
    assert got == pytest.approx(expected)
    if compat.builtin_warmup_builds(LinearWarmup):
        optimizer, base = _optimizer_and_base()
        assert _lrs(LinearWarmup(base, warmup_iters=3, warmup_ratio=0.1), optimizer) == pytest.approx(got)


def test_warmup_options_replace_only_a_warmup_that_cannot_build():
    from modelscope.trainers.lrscheduler.builder import LR_SCHEDULER, build_lr_scheduler
    from modelscope.trainers.lrscheduler.warmup.warmup import LinearWarmup
    from modelscope.utils.config import ConfigDict
    options = ConfigDict(warmup=ConfigDict(type='LinearWarmup', warmup_iters=3, warmup_ratio=0.1))
    if compat.builtin_warmup_builds(LinearWarmup):
        assert compat.warmup_options(options) is options
    else:  # ModelScope <= 1.34 on this torch
        fixed = compat.warmup_options(options)
        assert fixed.warmup.type == 'utuning-LinearWarmup' and options.warmup.type == 'LinearWarmup'
    assert compat.warmup_options(None) is None
    assert compat.warmup_options({'warmup': None}) == {'warmup': None}
    plain = {'warmup': {'type': 'CosineAnnealingLR'}}  # not a warm-up class: left alone
    assert compat.warmup_options(plain) is plain

    old = _old_style_linear_warmup()
    optimizer, base = _optimizer_and_base()
    try:
        old(base, warmup_iters=1)
        pytest.skip('this torch still takes verbose: the old warm-up builds')
    except TypeError:
        pass
    LR_SCHEDULER.register_module(module_name='test-OldLinearWarmup', module_cls=old)
    try:
        assert not compat.builtin_warmup_builds(old)
        fixed = compat.warmup_options(ConfigDict(warmup=ConfigDict(type='test-OldLinearWarmup', warmup_iters=3)))
        assert fixed.warmup.type == 'utuning-test-OldLinearWarmup'
        optimizer, base = _optimizer_and_base()
        scheduler = build_lr_scheduler(cfg=fixed.warmup, default_args={'base_scheduler': base})
        assert _lrs(scheduler, optimizer) == pytest.approx([0.1, 0.4, 0.7, 1.0, 1.0, 1.0])
    finally:
        for name in ('test-OldLinearWarmup', 'utuning-test-OldLinearWarmup'):
            LR_SCHEDULER._modules['default'].pop(name, None)


# -- 5. ModelScope releases that import pkg_resources ----------------------------------------------------------------
def test_missing_pkg_resources_is_explained():
    explained = compat.explain_import_error(ModuleNotFoundError("No module named 'pkg_resources'",
                                                                name='pkg_resources'))
    assert isinstance(explained, ImportError) and "setuptools<82" in str(explained)
    assert compat.explain_import_error(ModuleNotFoundError('x', name='torchvision')) is None
    assert compat.explain_import_error(ValueError('x')) is None


def test_import_without_pkg_resources():
    """Where ModelScope imports pkg_resources, its absence gives our message; elsewhere the import works."""
    plugins = importlib.util.find_spec('modelscope.utils.plugins').origin
    needs_it = 'import pkg_resources' in open(plugins, encoding='utf-8').read()
    script = textwrap.dedent('''
        import sys
        sys.modules['pkg_resources'] = None  # as after setuptools 82
        try:
            import modelscope_utuning
        except ImportError as e:
            print('ImportError:', e)
        else:
            print('imported')
    ''')
    out = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    if needs_it:
        assert "ImportError: this ModelScope release imports pkg_resources" in out.stdout
    else:
        assert out.stdout.strip().splitlines()[-1] == 'imported'


# -- 6. the upload queue of a checkpoint hook that uploads nothing ----------------------------------------------------
def test_a_checkpoint_hook_that_uploads_nothing_starts_no_processes():
    import multiprocessing
    from modelscope.trainers.hooks import CheckpointHook

    class T:
        logger = None
    hook = CheckpointHook(interval=1)
    assert compat.quiet_upload_queue(hook) and isinstance(hook, CheckpointHook)
    hook.logger = __import__('logging').getLogger('t')
    before = len(multiprocessing.active_children())
    hook.after_run(T())
    assert len(multiprocessing.active_children()) == before  # ModelScope's own starts a Manager and a submitter
    uploading = CheckpointHook(interval=1, push_to_hub=True, hub_repo_id='o/n')
    assert not compat.quiet_upload_queue(uploading) and type(uploading) is CheckpointHook


# -- 7. ModelScope's default hooks, shared by reference ----------------------------------------------------------------
def test_default_hooks_are_not_wiped_by_earlier_trainers(tmp_path):
    """ModelScope's merge + update_cfg empties its global default hooks; our trainers keep their own copies."""
    script = textwrap.dedent(f'''
        import json, os
        import numpy as np
        from PIL import Image
        import modelscope_utuning
        from modelscope.metainfo import Trainers
        from modelscope.trainers import build_trainer
        from modelscope.trainers.default_config import DEFAULT_HOOKS_CONFIG, merge_cfg, update_cfg
        from modelscope.utils.config import Config
        from modelscope_utuning.training.defaults import model_configuration
        root = {str(tmp_path)!r}
        c = Config({{'train': {{}}}}); merge_cfg(c); update_cfg(c)  # what any default-hook trainer does first
        print('global after one trainer:', DEFAULT_HOOKS_CONFIG['train.hooks'][:2])
        for c in 'ab':
            os.makedirs(os.path.join(root, 'data', c), exist_ok=True)
            for i in range(2):
                Image.fromarray(np.full((16, 16, 3), 60 + 120 * (c == 'b'), np.uint8)).save(
                    os.path.join(root, 'data', c, f'{{i}}.png'))
        os.makedirs(os.path.join(root, 'm'), exist_ok=True)
        json.dump(model_configuration(dict(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2),
                                      {{'num_classes': 2}}, preprocessor={{'resize': 16}}),
                  open(os.path.join(root, 'm', 'configuration.json'), 'w'))
        for run in range(2):
            t = build_trainer(name=Trainers.vision_efficient_tuning, default_args=dict(
                model=os.path.join(root, 'm'), work_dir=os.path.join(root, f'w{{run}}'),
                train_dataset=os.path.join(root, 'data'), cfg_modify_fn=lambda cfg: cfg))
            print('hooks', run, sorted(type(h).__name__ for h in t.hooks))
    ''')
    out = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith(('global', 'hooks'))]
    assert lines[0] == 'global after one trainer: [{}, {}]'  # ModelScope's own state, untouched by us
    for line in lines[1:]:
        assert 'CheckpointHook' in line and 'TextLoggerHook' in line, line
