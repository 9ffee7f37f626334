"""One label space for the model and every dataset it sees (training/labels.py, issue 11): labels always mean the
model's classes, whatever numbering each reader gives its source; a class the model does not know, or a label out of
the head's range, is named when the trainer is built. Tiny colour runs (tests/colour_runs.py)."""
from __future__ import annotations

import os

import pytest

from modelscope_utuning import load_model

from colour_runs import model_dir, train, trained, write_folder  # noqa: F401  (trained: a fixture)


pytestmark = pytest.mark.usefixtures('one_thread')


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
