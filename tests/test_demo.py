"""The embedded demo, quick version: real images -> pre-training -> U-Tuning -> pipeline(), end to end."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

import modelscope_utuning  # noqa: F401  (registers the plugin)
from modelscope_utuning import demo

pytestmark = pytest.mark.usefixtures('one_thread')


def test_demo_data_is_real_and_small():
    arrays = demo.load_demo_arrays()
    assert arrays['images'].dtype == np.uint8 and arrays['images'].shape[1:] == (28, 28)
    assert list(arrays['class_names']) == ['T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal',
                                           'Shirt', 'Sneaker', 'Bag', 'Ankle boot']
    for split, classes in (('pretrain_train', demo.PRETRAIN_CLASSES), ('pretrain_val', demo.PRETRAIN_CLASSES),
                           ('fewshot_train', demo.FEWSHOT_CLASSES), ('fewshot_val', demo.FEWSHOT_CLASSES)):
        labels = arrays['labels'][arrays['split'] == split]
        counts = np.bincount(labels, minlength=10)
        assert set(np.flatnonzero(counts)) == set(classes), split  # stratified: every class, only these
        assert len(set(counts[list(classes)])) == 1, split
    assert arrays['images'].std() > 50  # real pictures, not blank
    assert os.path.getsize(demo.DATA_FILE) < 1.5e6
    assert os.path.isfile(os.path.join(os.path.dirname(demo.DATA_FILE), 'LICENSE'))


def test_quick_demo_end_to_end(tmp_path, capsys):
    # How long it takes is a benchmark's business, not a test's (it depends on the machine and its load).
    result = demo.run_demo(str(tmp_path), quick=True)
    printed = capsys.readouterr().out

    for key in ('accuracy_before', 'accuracy_after', 'linear_probe_accuracy', 'pretrain_accuracy'):
        assert 0.0 <= result[key] <= 1.0, key
    assert 0 < result['trainable_params'] < result['total_params']
    assert result['trainable_percent'] < 20
    assert result['linear_probe_trainable_params'] < result['trainable_params']
    for needle in ('before', 'after', 'linear probe', 'trainable', 'honestly', 'pipeline('):
        assert needle in printed, needle
    assert 'INFO' not in printed  # ModelScope's logs go to work_dir, not between the demo's lines

    # The images were written as an image folder, one sub-directory per class.
    few = tmp_path / 'data' / 'fewshot' / 'train'
    assert sorted(os.listdir(few)) == ['Ankle boot', 'Bag', 'Sandal', 'Shirt', 'Sneaker']
    # output/ reloads through pipeline() with the predictions the demo printed.
    from modelscope.pipelines import pipeline
    out = result['output_dir']
    assert os.path.isfile(os.path.join(out, 'pytorch_model.pt'))
    cfg = json.loads(open(os.path.join(out, 'configuration.json')).read())
    assert [t['type'] for t in cfg['model']['backbone']['tuners']] == ['adapter', 'adapter', 'prefix']
    p = pipeline('vision-efficient-tuning', out, device='cpu')
    preds = result['predictions']
    assert preds
    again = p([os.path.join(result['work_dir'], r['image']) for r in preds], topk=1)
    for r, a in zip(preds, again):
        assert a['labels'][0] == r['predicted']
        assert a['scores'][0] == pytest.approx(r['score'], abs=1e-5)
        assert r['true'] in ('Ankle boot', 'Bag', 'Sandal', 'Shirt', 'Sneaker')
