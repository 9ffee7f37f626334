"""What a run writes is right, or it is not there (issue 11): one test per class of problem.

Labels always mean the model's classes; datasets are checked when the trainer is built; a run without evaluation
data finishes; ``output/`` holds only what a model needs and no path of the machine; epoch files load as models;
bounded memory for any image shape; one run per work_dir; CLI values checked with the key named; a model in
bf16 predicts; a folder of ours loaded without the plugin says which package it needs. (The kill-at-any-moment
guarantees are in test_fault_injection.py.)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

import modelscope_utuning  # noqa: F401
from modelscope.metainfo import Trainers
from modelscope.pipelines import pipeline
from modelscope.trainers import build_trainer
from modelscope_utuning import load_model
from modelscope_utuning.training.defaults import model_configuration

COLORS = {'a': (230, 20, 20), 'b': (20, 230, 20), 'c': (20, 20, 230), 'd': (230, 230, 230)}
VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4,
           tuners=[{'type': 'adapter', 'op': 'ffn', 'dim': 4}])

pytestmark = pytest.mark.usefixtures('one_thread')


def write_folder(root, classes, n=6, seed=0):
    """Solid-colour images, a little noise: a class per colour, trivially learnt."""
    rng = np.random.default_rng(seed)
    for c in classes:
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(n):
            img = np.clip(np.array(COLORS[c]) + rng.normal(0, 8, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(os.path.join(root, c, f'{i}.png'))
    return str(root)


def model_dir(root, num_classes=4, **extra):
    os.makedirs(root, exist_ok=True)
    cfg = model_configuration(dict(VIT), {'num_classes': num_classes},
                              preprocessor={'type': 'vision-efficient-tuning-preprocessor', 'resize': 32}, **extra)
    with open(os.path.join(root, 'configuration.json'), 'w') as f:
        json.dump(cfg, f)
    return str(root)


def train(model, work_dir, train_data, eval_data=None, epochs=12, extra=None, **kw):
    def cfg_modify_fn(cfg):
        cfg.train.max_epochs = epochs
        cfg.train.lr_scheduler.T_max = epochs
        cfg.train.optimizer.lr = 1e-2
        cfg.train.amp = 'fp32'
        cfg.train.dataloader.batch_size_per_gpu = 8
        cfg.train.logging = {'interval': 1}  # a loss row per step: the run has a curve to draw
        if extra:
            extra(cfg)
        return cfg
    return build_trainer(name=Trainers.vision_efficient_tuning, default_args=dict(
        model=model, work_dir=str(work_dir), train_dataset=train_data, eval_dataset=eval_data,
        cfg_modify_fn=cfg_modify_fn, seed=0, **kw))


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A model trained on four colour classes until it is always right, and its work_dir."""
    root = tmp_path_factory.mktemp('rel')
    data = write_folder(root / 'train', 'abcd')
    trainer = train(model_dir(root / 'model'), root / 'work', data)
    trainer.train()
    out = str(root / 'work' / 'output')
    p = pipeline('vision-efficient-tuning', out, device='cpu')
    for c in 'abcd':
        assert p(os.path.join(data, c, '0.png'))['labels'][0] == c  # always right
    return root, out


# -- 1. labels mean the model's classes ---------------------------------------------------------------------------
def test_evaluation_on_a_folder_without_a_class_scores_the_model_right(trained, tmp_path):
    root, out = trained
    eval_bcd = write_folder(tmp_path / 'eval', 'bcd', seed=1)  # 'a' missing: the reader's own numbering is shifted
    trainer = train(out, tmp_path / 'work', write_folder(tmp_path / 'tr', 'abcd', seed=2), eval_bcd, epochs=1,
                    extra=lambda cfg: setattr(cfg.train.optimizer, 'lr', 1e-9))
    assert trainer.evaluate()['accuracy'] == 1.0
    # the same with a manifest whose class list (and numbering) differs from the model's
    manifest = tmp_path / 'eval.csv'
    with open(manifest, 'w') as f:
        f.write('image,label\n' + ''.join(f'{eval_bcd}/{c}/{i}.png,{c}\n' for c in 'dcb' for i in range(3)))
    trainer = train(out, tmp_path / 'work2', write_folder(tmp_path / 'tr2', 'abcd', seed=2), str(manifest), epochs=1)
    assert trainer.evaluate()['accuracy'] == 1.0


def test_unknown_evaluation_class_is_named_when_the_trainer_is_built(trained, tmp_path):
    root, out = trained
    bad = write_folder(tmp_path / 'eval', 'ab', seed=1)
    os.rename(os.path.join(bad, 'b'), os.path.join(bad, 'zebra'))
    with pytest.raises(ValueError, match=r"\['zebra'\] are not classes of the model"):
        train(out, tmp_path / 'work', write_folder(tmp_path / 'tr', 'abcd'), bad, epochs=1)


def test_class_names_of_a_checkpoint_head_are_kept_unknown_training_classes_refused(trained, tmp_path):
    """A 3-class folder on a 4-class checkpoint without finetune: its classes must be the model's."""
    root, out = trained
    odd = write_folder(tmp_path / 'odd', 'ab')
    os.rename(os.path.join(odd, 'b'), os.path.join(odd, 'daisy'))
    with pytest.raises(ValueError, match=r"training class\(es\) \['daisy'\]"):
        train(out, tmp_path / 'work', odd, epochs=1)
    # a subset of the model's classes trains on the model's numbering
    trainer = train(out, tmp_path / 'work2', write_folder(tmp_path / 'cd', 'cd'), epochs=1)
    assert trainer.model_unwrapped.CLASSES == ['a', 'b', 'c', 'd']
    assert sorted(set(trainer.train_dataset.labels)) == [2, 3]
    # a new head (finetune, 2 classes) takes the data's names
    def new_head(cfg):
        cfg.model.finetune = True
        cfg.model.head.num_classes = 2
    trainer = train(out, tmp_path / 'work3', odd, epochs=1, extra=new_head)
    trainer.train()
    assert load_model(str(tmp_path / 'work3' / 'output')).CLASSES == ['a', 'daisy']


# -- 2. a run without evaluation data --------------------------------------------------------------------------------
def test_a_run_without_eval_data_but_an_evaluation_hook_finishes(tmp_path):
    def hook(cfg):
        cfg.train.hooks = [{'type': 'EvaluationHook', 'interval': 1}]
        cfg.train.checkpoint = {'period': {'interval': 1}}
    trainer = train(model_dir(tmp_path / 'model'), tmp_path / 'work', write_folder(tmp_path / 'd', 'abcd'),
                    epochs=2, extra=hook)
    trainer.train()
    assert os.path.isfile(tmp_path / 'work' / 'epoch_2.pth')
    assert load_model(str(tmp_path / 'work' / 'output')).CLASSES == list('abcd')


# -- 4. labels out of range ------------------------------------------------------------------------------------------
def test_out_of_range_labels_fail_when_the_trainer_is_built(tmp_path):
    data = write_folder(tmp_path / 'd', 'abc')
    rows = [{'img_path:FILE': os.path.join(data, 'a', f'{i}.png'), 'label': i % 3} for i in range(6)]
    rows[4]['label'] = 7
    with pytest.raises(ValueError, match=r'row 4 .*label 7.*3 classes'):
        train(model_dir(tmp_path / 'model', num_classes=3), tmp_path / 'work', rows, epochs=1)
    with pytest.raises(ValueError, match='the training data has 4 classes .*num_classes is 3'):
        train(model_dir(tmp_path / 'm2', num_classes=3), tmp_path / 'w2', write_folder(tmp_path / 'd4', 'abcd'))
    rows[4]['label'] = 1
    eval_rows = [dict(r) for r in rows]
    eval_rows[2]['label'] = 3
    with pytest.raises(ValueError, match=r'evaluation row 2 .*label 3'):
        train(model_dir(tmp_path / 'm3', num_classes=3), tmp_path / 'w3', rows, eval_rows, epochs=1)


# -- 6. link loops in an image folder ---------------------------------------------------------------------------------
def test_a_link_loop_in_an_image_folder_reads_each_image_once_with_its_class(tmp_path):
    from modelscope_utuning.data import load_dataset_any
    data = write_folder(tmp_path / 'd', 'ab', n=3)
    os.symlink(data, os.path.join(data, 'a', 'loop'))  # back to the root: b's images would become a's
    os.symlink(os.path.join(data, 'a'), os.path.join(data, 'a', 'self'))
    ds = load_dataset_any(data)
    assert len(ds) == 6 and ds.labels == [0, 0, 0, 1, 1, 1]
    from modelscope_utuning.cli import expand_inputs
    assert len(expand_inputs([data])) == 6


# -- 7. output/ ------------------------------------------------------------------------------------------------------
def test_output_holds_only_the_model_and_no_path_of_the_machine(trained):
    root, out = trained
    assert sorted(os.listdir(out)) == sorted(['README.md', 'adapter_config.json', 'adapter_model.safetensors',
                                              'configuration.json', 'pytorch_model.pt', 'training_curve.png']
                                             + [f for f in os.listdir(out) if f in ('app.py', 'requirements.txt')])
    text = open(os.path.join(out, 'configuration.json')).read()
    assert str(root) not in text and '/tmp' not in text and '"work_dir"' not in text
    card = open(os.path.join(out, 'README.md')).read()
    assert 'pip install modelscope-utuning' in card and 'import modelscope_utuning' in card
    assert 'license: apache-2.0' in card and '## License' in card
    assert 'training data: train (24 images)' in card
    assert not os.path.exists(os.path.join(os.path.dirname(out), 'output', 'pytorch_model.bin'))


# -- 8. epoch files -------------------------------------------------------------------------------------------------------
def test_an_epoch_file_loads_as_the_model_a_broken_one_is_named(trained, tmp_path):
    root, out = trained
    epoch = root / 'work' / 'epoch_12.pth'
    from_epoch, from_output = load_model(str(epoch)), load_model(out)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(from_epoch.eval()({'imgs': x})['scores'], from_output.eval()({'imgs': x})['scores'])
    assert from_epoch.CLASSES == list('abcd')
    half = tmp_path / 'epoch_3.pth'
    half.write_bytes(epoch.read_bytes()[:5000])
    with pytest.raises(ValueError, match=f'{half}.*cannot be read'):
        load_model(str(half))
    (tmp_path / 'epoch_3_trainer_state.pth').write_bytes(b'')
    trainer = train(out, tmp_path / 'work', write_folder(tmp_path / 'd', 'abcd'), epochs=1)
    with pytest.raises(ValueError, match=f'{half}.*cannot be read'):
        trainer.train(checkpoint_path=str(half))


# -- 9. tuner-only files without their base --------------------------------------------------------------------------------
def test_tuners_without_base_weights_refuse_to_build_a_random_backbone(trained, tmp_path):
    from modelscope_utuning import model_from_tuners
    root, out = trained
    with pytest.raises(ValueError, match='pass pretrained_weights='):
        model_from_tuners(out)


# -- 10. any image shape in bounded memory ------------------------------------------------------------------------------
def test_an_image_of_extreme_aspect_ratio_costs_little_memory(trained, tmp_path):
    root, out = trained
    path = tmp_path / 'thin.png'
    Image.fromarray(np.full((40000, 2, 3), 200, np.uint8)).save(path)  # 2 x 40000: a few kB on disk
    script = textwrap.dedent(f'''
        import resource, modelscope_utuning
        from modelscope.pipelines import pipeline
        p = pipeline('vision-efficient-tuning', {out!r}, device='cpu')
        p({str(path)!r})
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(p({str(path)!r})['labels'][0])
        for _ in range(3):
            p({str(path)!r})
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
    ''')
    res = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    label, grown_mb = res.stdout.split()[-2:]
    assert label in 'abcd' and int(grown_mb) < 50  # a shorter side of 256 would have made 1.3 gigapixels
    from modelscope_utuning.preprocessing.transforms import eval_transform
    img = Image.open(path).convert('RGB')
    assert eval_transform(32, resize_to=36)(img).shape == (3, 32, 32)


# -- 11. CLI values ------------------------------------------------------------------------------------------------------
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


# -- 12. one run per work_dir; bf16 models; a folder without the plugin ---------------------------------------------
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


def test_pipeline_runs_a_bf16_model(trained):
    root, out = trained
    p = pipeline('vision-efficient-tuning', out, device='cpu')
    want = p(os.path.join(root, 'train', 'c', '1.png'))
    p.model.to(torch.bfloat16)
    got = p(os.path.join(root, 'train', 'c', '1.png'))
    assert got['labels'][0] == want['labels'][0] == 'c'


def test_a_folder_of_ours_without_the_plugin_names_the_package(trained):
    root, out = trained
    cfg = json.load(open(os.path.join(out, 'configuration.json')))
    assert cfg['model']['type'] == cfg['pipeline']['type'] == 'vision-efficient-tuning@modelscope-utuning'
    script = textwrap.dedent(f'''
        from modelscope.pipelines import pipeline
        try:
            pipeline('vision-efficient-tuning', {out!r}, device='cpu')
        except Exception as e:
            print('ERROR', e)
    ''')
    res = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=300)
    assert 'ERROR' in res.stdout and 'modelscope-utuning' in res.stdout, res.stdout + res.stderr[-2000:]
