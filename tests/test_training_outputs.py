"""What a finished training run leaves in its work_dir (issue 11): ``output/`` (training/export.py) holds only what a
model needs and no path of the machine; an epoch file (training/checkpointing.py) loads as the model, and a broken
one is named, by ``load_model`` and by a resume. (That they are right or absent when the run is killed at any moment
is tests/test_fault_injection.py.) Tiny colour runs (tests/colour_runs.py)."""
from __future__ import annotations

import os

import pytest
import torch

from modelscope_utuning import load_model

from colour_runs import train, trained, write_folder  # noqa: F401  (trained: a fixture)


pytestmark = pytest.mark.usefixtures('one_thread')


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
