"""The seed's fine-tuning flow, offline: ModelScope's own test (tests/trainers/test_finetune_vision_efficient_tuning.py
in the modelscope repository) on tiny hub-layout models made by the built-in, through ``build_trainer``. Also: a run
without evaluation data but with an EvaluationHook finishes; a second run on a busy work_dir is refused."""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

import modelscope_utuning  # noqa: F401  (registers the plugin)
from modelscope.metainfo import Trainers
from modelscope.models import Model
from modelscope.msdatasets import MsDataset
from modelscope.pipelines import pipeline
from modelscope.trainers import build_trainer

from modelscope_utuning import load_model
from modelscope_utuning.checkpoint.hub_layout import from_builtin_names, read_checkpoint
from modelscope_utuning.training.optim import param_groups
from modelscope_utuning.training.trainer import VisionEfficientTuningTrainer

from colour_runs import model_dir, train, write_folder

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, 'fixtures', 'builtin')
CLASS_NAMES = ['dark', 'mid', 'bright']
NUM_CLASSES = 3
TUNE_LENGTH = 10  # as ModelScope's test sets it
TRI_TUNER = [{'type': 'adapter', 'op': 'mha', 'form': 'parallel', 'dim': 4},
             {'type': 'adapter', 'op': 'ffn', 'form': 'parallel', 'dim': 4},
             {'type': 'prefix', 'op': 'block', 'form': 'parallel', 'length': 4, 'scale': 'channel', 'layers': 'all'}]


def write_images(folder, n=12):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        label = i % NUM_CLASSES
        arr = (rng.random((40, 48, 3)) * 60 + label * 90).astype('uint8')
        path = os.path.join(folder, f'{i}.png')
        Image.fromarray(arr).save(path)
        rows.append({'img_path:FILE': path, 'label': label})
    return rows


@pytest.fixture(scope='module')
def rows(tmp_path_factory):
    return write_images(str(tmp_path_factory.mktemp('images')))


def ms_dataset(rows):
    """An MsDataset over a local HF dataset with the FME benchmark's columns and class names."""
    import datasets
    features = datasets.Features({'img_path:FILE': datasets.Value('string'),
                                  'label': datasets.ClassLabel(names=CLASS_NAMES)})
    return MsDataset.to_ms_dataset(datasets.Dataset.from_list(rows, features=features))


def seed_cfg_modify_fn(extra=None, epochs=1):
    def cfg_modify_fn(cfg):
        cfg.model.head.num_classes = NUM_CLASSES
        cfg.model.finetune = True
        cfg.train.max_epochs = epochs
        cfg.train.lr_scheduler.T_max = epochs
        cfg.train.dataloader.batch_size_per_gpu = 4
        cfg.evaluation.dataloader.batch_size_per_gpu = 4
        if extra:
            extra(cfg)
        return cfg
    return cfg_modify_fn


def set_legacy(key):
    def extra(cfg):
        cfg.model.backbone[key] = TUNE_LENGTH
    return extra


def set_tri_tuner(cfg):
    cfg.model.backbone.tuners = TRI_TUNER


CASES = {  # (fixture dir, cfg edit) as ModelScope's per-method tests do, plus the paper's tri-tuner
    'adapter': ('adapter', set_legacy('adapter_length')),
    'lora': ('lora', set_legacy('lora_length')),
    'prefix': ('prefix', set_legacy('prefix_length')),
    'prompt': ('prompt', set_legacy('prompt_length')),
    'utuning': ('utuning', None),
    'bitfit': ('bitfit', None),
    'tri_tuner': ('plain', set_tri_tuner),
}


def fixture_backbone(case_dir):
    return from_builtin_names(read_checkpoint(os.path.join(case_dir, 'pytorch_model.pt'))['backbone_weight'])


@pytest.mark.parametrize('case', sorted(CASES))
def test_finetune_like_modelscope(case, rows, tmp_path):
    fixture, extra = CASES[case]
    model_dir = os.path.join(FIXTURES, fixture)
    work_dir = str(tmp_path / 'work')
    trainer = build_trainer(name=Trainers.vision_efficient_tuning, default_args=dict(
        model=model_dir, work_dir=work_dir, train_dataset=ms_dataset(rows), eval_dataset=ms_dataset(rows[:6]),
        cfg_modify_fn=seed_cfg_modify_fn(extra)))
    assert isinstance(trainer, VisionEfficientTuningTrainer)
    trainer.train()
    result_accuracy = trainer.evaluate()['accuracy']

    files = os.listdir(work_dir)
    assert f'{trainer.timestamp}.log.json' in files
    assert 'epoch_1.pth' in files
    with open(os.path.join(work_dir, f'{trainer.timestamp}.log.json')) as f:
        logged = [json.loads(line) for line in f if line.strip()]
    assert any(r.get('mode') == 'train' and np.isfinite(r['loss']) for r in logged)

    # Frozen backbone weights did not move; tuners (or BitFit biases) did.
    model = trainer.model_unwrapped
    before = fixture_backbone(model_dir)
    trained = dict(model.backbone.named_parameters())
    frozen = [n for n, p in trained.items() if not p.requires_grad]
    moving = [n for n, p in trained.items() if p.requires_grad]
    assert frozen and moving
    for name in frozen:
        assert torch.equal(trained[name].detach(), before[name]), name
    if case == 'bitfit':
        assert all(n.endswith('bias') for n in moving)
        assert any(not torch.equal(trained[n].detach(), before[n]) for n in moving)

    # work_dir/output reloads, in Model.from_pretrained and pipeline(), with the trained model's predictions.
    output = os.path.join(work_dir, 'output')
    for name in ('configuration.json', 'pytorch_model.pt', 'adapter_model.safetensors', 'adapter_config.json',
                 'README.md', 'training_curve.png'):
        assert os.path.isfile(os.path.join(output, name)), name
    assert not [f for f in os.listdir(output) if f.startswith('.tmp-')]
    imgs = torch.randn(2, 3, 224, 224)
    model.eval()
    with torch.no_grad():
        expected = model({'imgs': imgs})['scores']
    reloaded = Model.from_pretrained(output)
    reloaded.eval()
    with torch.no_grad():
        got = reloaded({'imgs': imgs})['scores']
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert reloaded.CLASSES == CLASS_NAMES  # class names travelled from the dataset
    p = pipeline('vision-efficient-tuning', output)
    result = p(rows[1]['img_path:FILE'])
    assert set(result['labels']) == set(CLASS_NAMES) and len(result['scores']) == NUM_CLASSES
    # the reported accuracy is the pipeline's over the same evaluation rows, and the card shows it
    top1 = [p(r['img_path:FILE'])['labels'][0] for r in rows[:6]]
    expected = np.mean([label == CLASS_NAMES[r['label']] for label, r in zip(top1, rows[:6])])
    assert result_accuracy == pytest.approx(expected)
    with open(os.path.join(output, 'README.md')) as f:
        assert f'| accuracy | {expected:.4f} |' in f.read()


def test_evaluate_only_like_modelscope(rows, tmp_path):
    """ModelScope's *_eval tests: no train dataset, the hub model's own head."""
    trainer = build_trainer(name=Trainers.vision_efficient_tuning, default_args=dict(
        model=os.path.join(FIXTURES, 'adapter'), work_dir=str(tmp_path), train_dataset=None,
        eval_dataset=[dict(r, label=r['label'] % 5) for r in rows]))
    result = trainer.evaluate()
    assert set(result) == {'accuracy'}
    # the hub model's own head and class ids: the accuracy is its pipeline's over the same rows
    p = pipeline('vision-efficient-tuning', os.path.join(FIXTURES, 'adapter'))
    classes = trainer.model_unwrapped.CLASSES
    top1 = [p(r['img_path:FILE'])['labels'][0] for r in rows]
    assert result['accuracy'] == pytest.approx(np.mean([classes.index(t) == r['label'] % 5
                                                        for t, r in zip(top1, rows)]))


def test_training_options(rows, tmp_path):
    """bf16 autocast, gradient accumulation and clipping, label smoothing, a separate head learning rate."""
    def extra(cfg):
        cfg.model.backbone.tuners = TRI_TUNER
        cfg.model.loss = {'label_smoothing': 0.1}
        cfg.train.optimizer.head_lr = 5e-3
        cfg.train.optimizer.options = {'cumulative_iters': 2, 'grad_clip': {'max_norm': 1.0}}
    trainer = build_trainer(name=Trainers.vision_efficient_tuning, default_args=dict(
        model=os.path.join(FIXTURES, 'plain'), work_dir=str(tmp_path), train_dataset=rows, eval_dataset=rows[:4],
        cfg_modify_fn=seed_cfg_modify_fn(extra), amp='bf16'))
    assert trainer.precision == 'bf16'
    assert trainer.model_unwrapped.model.label_smoothing == 0.1
    trainer.train()
    lrs = sorted({g['initial_lr'] for g in trainer.optimizer.param_groups})
    assert lrs == [5e-3, 1e-2]  # head_lr beside the configuration's lr (0.01 in the fixture)
    with open(os.path.join(str(tmp_path), f'{trainer.timestamp}.log.json')) as f:
        losses = [json.loads(line)['loss'] for line in f if '"train"' in line]
    assert losses and all(np.isfinite(losses))


def test_no_weight_decay_on_tokens_norms_biases():
    model = Model.from_pretrained(os.path.join(FIXTURES, 'utuning'))
    groups = param_groups(model, lr=1e-3, weight_decay=0.05, head_lr=1e-2)
    decay = {n for g in groups if g['weight_decay'] > 0 for n in g['names']}
    no_decay = {n for g in groups if g['weight_decay'] == 0 for n in g['names']}
    assert any('prompt' in n for n in no_decay) and any('prefix' in n for n in no_decay)
    assert not any(n.endswith('bias') or 'prompt' in n or 'prefix' in n for n in decay)
    assert {g['lr'] for g in groups if any('head' in n for n in g['names'])} == {1e-2}


def test_unreadable_image_is_named_or_skipped(rows, tmp_path):
    bad = tmp_path / 'broken.png'
    bad.write_bytes(b'not an image at all')
    data = rows[:7] + [{'img_path:FILE': str(bad), 'label': 0}]

    def build(**kw):
        return build_trainer(name=Trainers.vision_efficient_tuning, default_args=dict(
            model=os.path.join(FIXTURES, 'adapter'), work_dir=str(tmp_path / 'w'), train_dataset=data,
            eval_dataset=rows[:4], cfg_modify_fn=seed_cfg_modify_fn(), **kw))
    with pytest.raises(ValueError, match='broken.png'):
        build().train()
    build(on_bad_image='skip').train()


RESUME_SCRIPT = textwrap.dedent('''
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from test_trainer import resume_trainer
    from modelscope.trainers.hooks import Hook
    from modelscope.trainers.hooks.priority import Priority

    class KillAfterFirstEpoch(Hook):
        PRIORITY = Priority.LOWEST  # after the epoch's checkpoint is written

        def after_train_epoch(self, trainer):
            os.kill(os.getpid(), signal.SIGKILL)

    resume_trainer({work!r}, {images!r}, callbacks=[KillAfterFirstEpoch()]).train()
''')


def resume_trainer(work_dir, image_dir, callbacks=None):
    rows = [{'img_path:FILE': os.path.join(image_dir, f'{i}.png'), 'label': i % NUM_CLASSES} for i in range(12)]
    return build_trainer(name=Trainers.vision_efficient_tuning, default_args=dict(
        model=os.path.join(FIXTURES, 'adapter'), work_dir=work_dir, train_dataset=rows, eval_dataset=rows[:6],
        cfg_modify_fn=seed_cfg_modify_fn(epochs=2), callbacks=callbacks))


def test_kill_and_resume_ends_like_an_uninterrupted_run(rows, tmp_path):
    image_dir = os.path.dirname(rows[0]['img_path:FILE'])
    straight = resume_trainer(str(tmp_path / 'straight'), image_dir)
    straight.train()
    expected = {k: v.clone() for k, v in straight.model_unwrapped.state_dict().items()}

    work = str(tmp_path / 'killed')
    script = tmp_path / 'killed_run.py'
    script.write_text(RESUME_SCRIPT.format(tests=HERE, work=work, images=image_dir))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert 'epoch_1.pth' in os.listdir(work) and 'epoch_2.pth' not in os.listdir(work)

    resumed = resume_trainer(work, image_dir)
    resumed.train(checkpoint_path=os.path.join(work, 'epoch_1.pth'))
    got = resumed.model_unwrapped.state_dict()
    for k, v in expected.items():
        assert torch.equal(got[k], v), k
    assert 'epoch_2.pth' in os.listdir(work)


DDP_SCRIPT = textwrap.dedent('''
    import json, os, sys
    import torch, torch.distributed as dist
    sys.path.insert(0, {tests!r})
    import modelscope_utuning
    from modelscope.metainfo import Trainers
    from modelscope.trainers import build_trainer
    from test_trainer import FIXTURES, NUM_CLASSES, seed_cfg_modify_fn
    rows = [{{'img_path:FILE': os.path.join({images!r}, f'{{i}}.png'), 'label': i % NUM_CLASSES}} for i in range(12)]
    trainer = build_trainer(name=Trainers.vision_efficient_tuning, default_args=dict(
        model=os.path.join(FIXTURES, 'adapter'), work_dir={work!r}, train_dataset=rows, eval_dataset=rows[:6],
        cfg_modify_fn=seed_cfg_modify_fn(), launcher='pytorch'))
    trainer.train()
    result = trainer.evaluate()
    model = trainer.unwrap_module(trainer.model)
    tuned = torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])
    with open(os.path.join({work!r}, f'rank{{dist.get_rank()}}.json'), 'w') as f:
        json.dump({{'world': dist.get_world_size(), 'batches': len(trainer.train_dataloader), 'result': result,
                   'tuned': tuned.tolist()}}, f)
''')


def test_two_process_gloo_data_parallel(rows, tmp_path):
    work = str(tmp_path / 'ddp')
    os.makedirs(work)
    script = tmp_path / 'ddp_run.py'
    script.write_text(DDP_SCRIPT.format(tests=HERE, images=os.path.dirname(rows[0]['img_path:FILE']), work=work))
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2',
                           '--master_port', '29533', str(script)], capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    ranks = [json.load(open(os.path.join(work, f'rank{r}.json'))) for r in (0, 1)]
    assert all(r['world'] == 2 for r in ranks)
    assert all(r['batches'] == 2 for r in ranks)  # 12 rows / 2 ranks / batch 4 -> each rank sees half
    assert ranks[0]['result'] == ranks[1]['result'] and 'accuracy' in ranks[0]['result']
    assert ranks[0]['tuned'] == ranks[1]['tuned']  # gradients were all-reduced: replicas stay identical
    assert os.path.isfile(os.path.join(work, 'output', 'pytorch_model.pt'))


# -- a run without evaluation data; one run per work_dir (issue 11) ----------------------------------------------------
@pytest.mark.usefixtures('one_thread')
def test_a_run_without_eval_data_but_an_evaluation_hook_finishes(tmp_path):
    def hook(cfg):
        cfg.train.hooks = [{'type': 'EvaluationHook', 'interval': 1}]
        cfg.train.checkpoint = {'period': {'interval': 1}}
    trainer = train(model_dir(tmp_path / 'model'), tmp_path / 'work', write_folder(tmp_path / 'd', 'abcd'),
                    epochs=2, extra=hook)
    trainer.train()
    assert os.path.isfile(tmp_path / 'work' / 'epoch_2.pth')
    assert load_model(str(tmp_path / 'work' / 'output')).CLASSES == list('abcd')


@pytest.mark.usefixtures('one_thread')
def test_a_second_run_on_a_busy_work_dir_is_refused(tmp_path):
    from modelscope_utuning.training.workdir import WorkDirBusyError, WorkDirLock
    work = tmp_path / 'work'
    holder = subprocess.Popen([sys.executable, '-c', textwrap.dedent(f'''
        import sys, time
        from modelscope_utuning.training.workdir import WorkDirLock
        WorkDirLock({str(work)!r}).acquire(); print('locked', flush=True); time.sleep(60)''')],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'locked'
        with pytest.raises(WorkDirBusyError, match=f'in use by another training run \\(pid {holder.pid}\\)'):
            train(model_dir(tmp_path / 'model'), work, write_folder(tmp_path / 'd', 'abcd'), epochs=1)
    finally:
        holder.kill()
        holder.wait()
    WorkDirLock(str(work)).acquire().release()  # the kill released it
