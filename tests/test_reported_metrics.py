"""The numbers a run reports are the model's numbers (issue 19, section 1).

Invariant, over every way of giving the same evaluation rows (image folder, CSV of class names, CSV of class
indices, row dicts, a Hugging Face dataset with a ClassLabel, an MsDataset over it) x 1 and 2 ranks x with and
without an unreadable file: ``evaluate()`` = the accuracy of ``pipeline()`` over the readable rows, and for a
training run the logged evaluation and the model card say the same. The class names are digit strings that are
not their own indices ('1'..'4'), so a source whose labels read as names and as indices must be read as names.

Also: the caller's dataset objects are never changed; an image listed twice with two labels is named; skipped
files are reported.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import datasets
import numpy as np
import pytest
from PIL import Image

import modelscope_utuning  # noqa: F401
from modelscope.msdatasets import MsDataset
from modelscope.pipelines import pipeline
from modelscope_utuning.data import load_dataset_any
from modelscope_utuning.training.defaults import model_configuration

from colour_runs import train as colour_train

HERE = os.path.dirname(os.path.abspath(__file__))
CLASSES = ['1', '2', '3', '4']  # names that read as integers, none its own index
COLOURS = {'1': (230, 20, 20), '2': (20, 230, 20), '3': (20, 20, 230), '4': (230, 230, 230)}
VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4,
           tuners=[{'type': 'adapter', 'op': 'ffn', 'dim': 4}])
# Evaluation rows: (colour shown, label written). Three are labelled with another class than they show, so a
# model that learnt the colours scores 6/9, and 9 rows do not split evenly over 2 ranks.
EVAL = [('1', '1'), ('2', '2'), ('3', '3'), ('4', '4'), ('1', '1'), ('2', '3'), ('3', '4'), ('4', '1'), ('2', '2')]
SOURCES = ('folder', 'csv_names', 'csv_ids', 'rows', 'hf', 'msdataset')

pytestmark = pytest.mark.usefixtures('one_thread')


def image(colour, path, seed):
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(COLOURS[colour]) + rng.normal(0, 8, (32, 32, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)


def write_eval(root, bad: bool):
    """The evaluation rows as files -> [(path, label name)], with a truncated PNG among them when ``bad``."""
    rows = []
    for i, (colour, label) in enumerate(EVAL):
        folder = os.path.join(root, 'images', label)
        os.makedirs(folder, exist_ok=True)
        rows.append((image(colour, os.path.join(folder, f'{i}.png'), seed=100 + i), label))
    if bad:
        path = os.path.join(root, 'images', '2', 'broken.png')
        data = open(rows[1][0], 'rb').read()
        with open(path, 'wb') as f:
            f.write(data[:len(data) // 2])  # truncated: the pipeline cannot read it
        rows.insert(3, (path, '2'))
    return rows


def source(kind, rows, root):
    """The same rows given as ``kind``."""
    if kind == 'folder':
        return os.path.dirname(os.path.dirname(rows[0][0]))  # images/<label>/<file>
    if kind in ('csv_names', 'csv_ids'):
        path = os.path.join(root, f'{kind}.csv')
        with open(path, 'w') as f:
            f.write('image,label\n')
            for p, label in rows:
                f.write(f'{p},{label if kind == "csv_names" else CLASSES.index(label)}\n')
        return path
    if kind == 'rows':
        return [{'img_path:FILE': p, 'label': CLASSES.index(label)} for p, label in rows]
    features = datasets.Features({'image': datasets.Image(), 'label': datasets.ClassLabel(names=CLASSES)})
    hf = datasets.Dataset.from_dict({'image': [p for p, _ in rows], 'label': [CLASSES.index(l) for _, l in rows]},
                                    features=features)
    return hf if kind == 'hf' else MsDataset.to_ms_dataset(hf)


def trainer_for(model, work_dir, train_data, eval_data, epochs=1, lr=1e-2, **kw):
    """The shared colour run (``colour_runs.train``) with unreadable rows skipped, the head at the tuners' lr and
    several evaluation batches per rank."""
    def settings(cfg):
        cfg.train.optimizer.lr = lr
        cfg.train.optimizer.head_lr = lr
        cfg.train.on_bad_image = 'skip'
        cfg.evaluation.dataloader.batch_size_per_gpu = 2  # several batches per rank
    return colour_train(model, work_dir, train_data, eval_data, epochs=epochs, extra=settings, **kw)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A model that learnt the four colours (a training folder named '1'..'4'), and its output folder."""
    root = tmp_path_factory.mktemp('metrics')
    for c in CLASSES:
        os.makedirs(root / 'train' / c)
        for i in range(6):
            image(c, root / 'train' / c / f'{i}.png', seed=i + 10 * int(c))
    os.makedirs(root / 'model')
    cfg = model_configuration(dict(VIT), {'num_classes': 4},
                              preprocessor={'type': 'vision-efficient-tuning-preprocessor', 'resize': 32})
    with open(root / 'model' / 'configuration.json', 'w') as f:
        json.dump(cfg, f)
    trainer_for(str(root / 'model'), root / 'work', str(root / 'train'), None, epochs=12).train()
    out = str(root / 'work' / 'output')
    p = pipeline('vision-efficient-tuning', out, device='cpu')
    assert [p(image(c, root / f'probe{c}.png', seed=7))['labels'][0] for c in CLASSES] == CLASSES
    return root, out


def pipeline_accuracy(out, rows):
    """Accuracy of pipeline() over the rows it can read -> (accuracy, unreadable paths)."""
    p = pipeline('vision-efficient-tuning', out, device='cpu')
    hits, count, bad = 0, 0, []
    for path, label in rows:
        try:
            predicted = p(path)['labels'][0]
        except Exception:  # noqa: BLE001  (the pipeline refuses it: that file is not the model's to count)
            bad.append(path)
            continue
        hits += predicted == label
        count += 1
    return hits / count, bad


@pytest.mark.parametrize('bad', [False, True], ids=['all-readable', 'one-unreadable'])
def test_evaluate_equals_pipeline_on_one_rank_for_every_source(trained, tmp_path, bad):
    root, out = trained
    rows = write_eval(str(tmp_path), bad)
    expected, unreadable = pipeline_accuracy(out, rows)
    assert expected == pytest.approx(6 / 9) and len(unreadable) == int(bad)
    for kind in SOURCES:
        trainer = trainer_for(out, tmp_path / f'work-{kind}', str(root / 'train'), source(kind, rows, str(tmp_path)))
        assert trainer.evaluate()['accuracy'] == pytest.approx(expected), kind
        assert trainer.skipped_images.get('evaluation', []) == unreadable, kind


def test_log_card_and_evaluate_agree_with_pipeline_after_training(trained, tmp_path):
    """A training run with an unreadable evaluation file: the logged evaluation, the card and evaluate() all
    equal pipeline() of the written output over the readable rows, and the card names what was left out."""
    root, out = trained
    rows = write_eval(str(tmp_path), bad=True)
    trainer = trainer_for(out, tmp_path / 'work', str(root / 'train'), source('csv_names', rows, str(tmp_path)),
                          lr=1e-9)
    trainer.train()
    result = trainer.evaluate()['accuracy']
    new_out = str(tmp_path / 'work' / 'output')
    expected, _ = pipeline_accuracy(new_out, rows)
    assert result == pytest.approx(expected)
    logged = [json.loads(line) for name in os.listdir(tmp_path / 'work') if name.endswith('.log.json')
              for line in open(tmp_path / 'work' / name) if '"eval' in line or 'evaluation/' in line]
    values = [v for row in logged for k, v in row.items() if k.endswith('accuracy') and 'top' not in k]
    assert values and values[-1] == pytest.approx(expected, abs=1e-4)
    card = open(os.path.join(new_out, 'README.md')).read()
    shown = re.search(r'\| accuracy \| ([0-9.]+) \|', card)
    assert shown and float(shown.group(1)) == pytest.approx(expected, abs=1e-4)
    assert '9 images, 1 unreadable left out' in card


DDP_SCRIPT = '''
import json, os, sys
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
from test_reported_metrics import trainer_for, source, SOURCES
rank = os.environ['RANK']
results = {{}}
for bad in (False, True):
    rows = [tuple(r) for r in json.load(open(os.path.join({root!r}, f'rows-{{bad}}.json')))]
    mine = os.path.join({root!r}, f'rank{{rank}}-{{bad}}')  # each rank writes its own manifests
    os.makedirs(mine, exist_ok=True)
    for kind in SOURCES:
        trainer = trainer_for({out!r}, os.path.join({root!r}, f'work-{{kind}}-{{bad}}'), {train!r},
                              source(kind, rows, mine), launcher='pytorch')
        results[f'{{kind}}-{{bad}}'] = [trainer.evaluate()['accuracy'], trainer.skipped_images.get('evaluation', []),
                                       len(trainer.get_eval_data_loader().sampler)]
with open(os.path.join({root!r}, f'rank{{rank}}.json'), 'w') as f:
    json.dump(results, f)
'''


def test_evaluate_equals_pipeline_on_two_ranks_for_every_source(trained, tmp_path):
    """torchrun, 2 CPU processes (gloo): 9 (or 10 with the unreadable one) rows are scored once each, not
    padded to 10 with a repeat, for every source."""
    root, out = trained
    rows = {}
    for bad in (False, True):  # made once here, so the two ranks do not race to write the same files
        rows[bad] = write_eval(str(tmp_path / ('bad' if bad else 'good')), bad)
        with open(tmp_path / f'rows-{bad}.json', 'w') as f:
            json.dump(rows[bad], f)
    script = tmp_path / 'ddp_eval.py'
    script.write_text(DDP_SCRIPT.format(tests=HERE, root=str(tmp_path), out=out, train=str(root / 'train')))
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2',
                           '--master_port', '29541', str(script)], capture_output=True, timeout=900)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    ranks = [json.load(open(tmp_path / f'rank{r}.json')) for r in (0, 1)]
    for bad in (False, True):
        expected, unreadable = pipeline_accuracy(out, rows[bad])
        for kind in SOURCES:
            (acc0, skipped0, n0), (acc1, skipped1, n1) = ranks[0][f'{kind}-{bad}'], ranks[1][f'{kind}-{bad}']
            assert acc0 == acc1 == pytest.approx(expected), (kind, bad)
            assert skipped0 == skipped1 == unreadable, (kind, bad)
            assert n0 + n1 == 9, (kind, bad)  # every readable row once over the two ranks, no padding


def test_datasets_given_by_the_caller_are_not_changed(trained, tmp_path):
    """One dataset object as both training and evaluation data: training keeps the training transform, and the
    caller's object keeps its own transform and policy."""
    root, out = trained
    ds = load_dataset_any(str(root / 'train'))
    before = (ds.transform, ds.on_error, ds.label_map, ds.classes)
    trainer = trainer_for(out, tmp_path / 'work', ds, ds)
    assert (ds.transform, ds.on_error, ds.label_map, ds.classes) == before
    assert trainer.train_dataset.transform is not trainer.eval_dataset.transform
    assert trainer.train_dataset.transform.mode == 'train' and trainer.eval_dataset.transform.mode == 'eval'


def test_an_image_listed_twice_with_two_labels_is_named(trained, tmp_path):
    root, out = trained
    rows = write_eval(str(tmp_path), bad=False)
    twice = rows + [(rows[0][0], '3')]
    with pytest.raises(ValueError, match=re.escape(rows[0][0]) + r".*label '1'.*label '3'"):
        trainer_for(out, tmp_path / 'work', str(root / 'train'), source('csv_names', twice, str(tmp_path)))


def test_bad_on_bad_image_value_is_refused(trained, tmp_path):
    root, out = trained
    with pytest.raises(ValueError, match=r"on_bad_image='skipp'"):
        trainer_for(out, tmp_path / 'work', str(root / 'train'), None, on_bad_image='skipp')
    ds = load_dataset_any(str(root / 'train'))
    with pytest.raises(ValueError, match=r"got 'ignore'"):
        ds.on_error = 'ignore'


def test_digit_labels_read_against_the_model_classes(tmp_path):
    """A CSV whose labels are both class names and indices is read by name; one that cannot be read one way is
    refused with the row named."""
    from modelscope_utuning.data.readers import labels_by_classes
    classes = ['1', '2', '3', '4']
    assert labels_by_classes([('r0', '1'), ('r1', '4')], classes) == [0, 3]       # names
    assert labels_by_classes([('r0', '0'), ('r1', 3)], classes) == [0, 3]         # '0' is no name: indices
    assert labels_by_classes([('r0', '0'), ('r1', '2')], classes) == [0, 2]      # one reading per source
    with pytest.raises(ValueError, match=r"r0: unknown class name 'x'"):
        labels_by_classes([('r0', 'x')], classes)
