"""``modelscope-utuning train --resume`` continues what the command started, and a refused run touches nothing.

- a CLI training run killed after its first epoch (SIGKILL from the fault hook, ``UTUNING_FAULT``, in a process of
  its own), whose newest epoch file is then unreadable (half-written), resumes with ``--resume`` from the epoch
  before, says so, and ends with exactly the weights of an uninterrupted run;
- the same command without ``--resume`` on that work_dir is refused, naming the epoch files and ``--resume``;
- ``--resume`` on a work_dir without epoch files says so and starts at epoch 1; without ``--work-dir`` it is refused;
- a run refused by the work_dir lock (held by another process) creates or modifies no file in the work_dir: the
  command line (with and without ``--resume``) and ``build_trainer`` alike.

A tiny ViT (32 px, depth 2) on 18 generated images, fp32, one thread.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.usefixtures('one_thread')

EPOCHS = 3


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    from PIL import Image
    from modelscope_utuning.training.defaults import model_configuration
    root = tmp_path_factory.mktemp('resume')
    rng = np.random.default_rng(0)
    for c in ('cat', 'dog', 'fox'):
        os.makedirs(root / 'data' / c)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / 'data' / c / f'{i}.png')
    os.makedirs(root / 'model')
    cfg = model_configuration(
        dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4,
             tuners=[{'type': 'adapter', 'op': 'mha', 'dim': 4}, {'type': 'prefix', 'op': 'block', 'length': 3}]),
        {'num_classes': 3}, preprocessor={'type': 'vision-efficient-tuning-preprocessor', 'resize': 32})
    with open(root / 'model' / 'configuration.json', 'w') as f:
        json.dump(cfg, f)
    return root


def argv(root, work_dir, *extra, epochs=EPOCHS):
    return ['train', str(root / 'model'), '--train-data', str(root / 'data'), '--work-dir', str(work_dir),
            '--epochs', str(epochs), '--batch-size', '4', 'train.amp=fp32',
            'train.checkpoint={"period": {"interval": 1}}', *extra]


def run(args, capsys):
    from modelscope_utuning.cli import main
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def weights(folder):
    from modelscope_utuning import load_model
    return {k: v.clone() for k, v in load_model(str(folder)).state_dict().items()}


def test_a_killed_run_resumes_to_the_uninterrupted_weights(setup, tmp_path, capsys):
    root = setup
    code, _, err = run(argv(root, tmp_path / 'reference'), capsys)
    assert code == 0, err
    reference = weights(tmp_path / 'reference' / 'output')

    work = tmp_path / 'work'
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1',
               UTUNING_FAULT='between_state_and_model:2')  # killed writing epoch 2: its state is there, not its model
    with open(tmp_path / 'killed.log', 'w') as log:
        killed = subprocess.run([sys.executable, '-m', 'modelscope_utuning.cli', *argv(root, work)], stdout=log,
                                stderr=subprocess.STDOUT, env=env, timeout=600)
    assert killed.returncode == -signal.SIGKILL, (tmp_path / 'killed.log').read_text()[-3000:]
    assert (work / 'epoch_1.pth').is_file() and not (work / 'output').exists()
    # the newest epoch file half-written (as a writer without our atomic rename would leave it)
    (work / 'epoch_2.pth').write_bytes((work / 'epoch_1.pth').read_bytes()[:1000])

    code, _, err = run(argv(root, work), capsys)  # the same command again, without --resume
    assert code == 2
    assert 'holds the checkpoints of an earlier run (epoch_1.pth, epoch_2.pth)' in err and '--resume' in err
    assert not (work / 'output').exists()

    code, out, err = run(argv(root, work, '--resume'), capsys)
    assert code == 0, err
    assert 'epoch_2.pth cannot be read (half-written or damaged): falling back to the epoch before' in err
    assert f'continuing from {work / "epoch_1.pth"} (epoch 1 done)' in err
    got = weights(work / 'output')
    assert got.keys() == reference.keys()
    assert all(torch.equal(got[k], reference[k]) for k in reference), 'the resumed run ended elsewhere'
    assert 'model saved to' in out


def test_resume_without_epoch_files_starts_at_epoch_one(setup, tmp_path, capsys):
    root = setup
    code, _, err = run(argv(root, tmp_path / 'fresh', '--resume', epochs=1), capsys)
    assert code == 0, err
    assert 'nothing to resume' in err and 'starting at epoch 1' in err
    assert (tmp_path / 'fresh' / 'output' / 'pytorch_model.pt').is_file()

    code, _, err = run(argv(root, tmp_path / 'x')[:4] + ['--resume'], capsys)  # no --work-dir
    assert code == 2 and '--resume needs --work-dir' in err


def snapshot(folder):
    """Every file and folder under ``folder``: name -> (mtime_ns, size, sha256 of the contents)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.stat(path)
            digest = hashlib.sha256(open(path, 'rb').read()).hexdigest() if os.path.isfile(path) else None
            out[os.path.relpath(path, folder)] = (st.st_mtime_ns, st.st_size, digest)
    st = os.stat(folder)
    out['.'] = (st.st_mtime_ns, None, None)
    return out


def test_a_run_refused_by_the_lock_touches_nothing(setup, tmp_path, capsys):
    from modelscope.metainfo import Trainers
    from modelscope.trainers import build_trainer
    from modelscope_utuning.training.workdir import WorkDirBusyError
    root = setup
    work = tmp_path / 'busy'
    os.makedirs(work / 'model')  # what an earlier run of another configuration left
    (work / 'model' / 'configuration.json').write_text('{"earlier": "run"}')
    (work / 'earlier.log').write_text('epoch 1 ...')
    (work / 'epoch_1.pth').write_bytes(b'not really a checkpoint')
    holder = subprocess.Popen([sys.executable, '-c', textwrap.dedent(f'''
        import time
        from modelscope_utuning.training.workdir import WorkDirLock
        WorkDirLock({str(work)!r}).acquire(); print('locked', flush=True); time.sleep(120)''')],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'locked'
        before = snapshot(work)
        busy = f'in use by another training run (pid {holder.pid})'
        # a configuration file as MODEL: the command writes work_dir/model/configuration.json when it runs
        for extra in ([], ['--resume']):
            code, out, err = run(argv(root, work, *extra)[:1] + [str(root / 'model' / 'configuration.json')]
                                 + argv(root, work, *extra)[2:], capsys)
            assert code == 2 and busy in err, err
            assert len(err.strip().splitlines()) == 1
        with pytest.raises(WorkDirBusyError, match=busy.replace('(', '\\(').replace(')', '\\)')):
            build_trainer(name=Trainers.vision_efficient_tuning, default_args=dict(
                model=str(root / 'model'), work_dir=str(work), train_dataset=str(root / 'data')))
        assert snapshot(work) == before
    finally:
        holder.kill()
        holder.wait()
