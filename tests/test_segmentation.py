"""Semantic segmentation on the same frozen backbone and tuners (issue 21), end to end through ModelScope.

Scenes composed from the Fashion-MNIST items shipped with the package (exact masks): the trainer learns them,
``evaluate()`` equals the metric computed from ``pipeline()``'s masks on the same images, the pipeline answers at
each input's own size through ``pipeline('semantic-segmentation', dir)``, every tuner kind / form / OP and bypass
mode trains a segmentation head, the saved folder reloads to the same predictions, and bad masks are named.
"""
from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

import modelscope_utuning  # noqa: F401
from modelscope.outputs import OutputKeys
from modelscope.pipelines import pipeline
from modelscope.trainers import build_trainer
from modelscope_utuning.registration import SEG_METRIC, SEG_TASK, SEG_TYPE
from modelscope_utuning.segmentation.data import collate, load_segmentation_dataset
from modelscope_utuning.segmentation.metrics import confusion_matrix, scores
from modelscope_utuning.segmentation.network import SegmentationNetwork
from modelscope_utuning.segmentation.preprocessor import MASK_KEY, SegmentationPreprocessor
from modelscope_utuning.segmentation.scenes import shipped_items, write_scenes
from modelscope_utuning.training.defaults import model_configuration

SIZE = 64
VIT = dict(img_size=SIZE, patch_size=8, embed_dim=48, depth=3, num_heads=4)
TRI = [{'type': 'adapter', 'op': 'mha', 'form': 'parallel', 'dim': 8},
       {'type': 'adapter', 'op': 'ffn', 'form': 'parallel', 'dim': 8},
       {'type': 'prefix', 'op': 'block', 'form': 'parallel', 'length': 4}]
K = 4  # background + 3 item classes

pytestmark = pytest.mark.usefixtures('one_thread')


def seg_model_dir(root, tuners=TRI, head=None, bypass=False, **backbone):
    os.makedirs(root, exist_ok=True)
    cfg = model_configuration({**VIT, **backbone, 'tuners': tuners, **({'bypass': True} if bypass else {})},
                              head or {'type': 'linear', 'num_classes': K},
                              preprocessor={'type': 'vision-efficient-tuning-segmentation-preprocessor',
                                            'img_size': SIZE})
    cfg.update(task=SEG_TASK, pipeline={'type': SEG_TYPE})
    cfg['model']['type'] = SEG_TYPE
    with open(os.path.join(root, 'configuration.json'), 'w') as f:
        json.dump(cfg, f)
    return str(root)


def trainer_for(model, work_dir, train, evaluation=None, epochs=12, lr=1e-2, extra=None, **kwargs):
    def cfg_modify_fn(cfg):
        cfg.model.head.num_classes = K
        cfg.train.max_epochs = epochs
        cfg.train.lr_scheduler.T_max = epochs
        cfg.train.optimizer.lr = lr
        cfg.train.amp = 'fp32'
        cfg.train.dataloader.batch_size_per_gpu = 8
        if extra:
            extra(cfg)
        return cfg
    return build_trainer(name=SEG_TYPE, default_args=dict(model=model, work_dir=str(work_dir), train_dataset=train,
                                                          eval_dataset=evaluation, cfg_modify_fn=cfg_modify_fn, seed=0,
                                                          **kwargs))


@pytest.fixture(scope='module')
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp('scenes')
    items, labels, names = shipped_items([0, 1, 7])
    train = write_scenes(str(root / 'train'), items, labels, names, 24, seed=0, size=SIZE)
    evaluation = write_scenes(str(root / 'eval'), items, labels, names, 8, seed=1, size=SIZE)
    return train, evaluation


@pytest.fixture(scope='module')
def trained(scenes, tmp_path_factory):
    """A tri-tuner segmentation model trained on the scenes, its trainer and output folder."""
    root = tmp_path_factory.mktemp('seg')
    train, evaluation = scenes
    # a tiny random backbone learns little frozen: here it trains whole (the real-backbone test keeps it frozen)
    trainer = trainer_for(seg_model_dir(root / 'model'), root / 'work', train, evaluation, epochs=40, lr=2e-3,
                          extra=lambda cfg: setattr(cfg.model, 'freeze_cfg', {'train_part': {'backbone': ['']}}))
    before = trainer.evaluate()
    trainer.train()
    return trainer, str(root / 'work' / 'output'), before


def pipeline_scores(out, folder, n):
    p = pipeline(SEG_TASK, out, device='cpu')
    confusion = torch.zeros(K, K, dtype=torch.long)
    for k in range(n):
        result = p(os.path.join(folder, 'images', f'{k:04d}.png'))
        truth = np.asarray(Image.open(os.path.join(folder, 'masks', f'{k:04d}.png')), dtype=np.int64)
        assert result[OutputKeys.MASKS].shape == truth.shape
        confusion += confusion_matrix(torch.from_numpy(truth), torch.from_numpy(result[OutputKeys.MASKS]), K)
    return scores(confusion, result[OutputKeys.LABELS])


def test_trained_model_learns_the_scenes_and_evaluate_equals_the_pipeline(trained, scenes):
    trainer, out, before = trained
    train, evaluation = scenes
    after = trainer.evaluate()
    assert set(after) >= {'mIoU', 'pixel_accuracy', 'IoU/background'}
    assert after['mIoU'] > before['mIoU'] + 0.05, (before, after)
    on_training = pipeline_scores(out, train, 24)
    background = np.mean([np.mean(np.asarray(Image.open(os.path.join(train, 'masks', f'{k:04d}.png'))) == 0)
                          for k in range(24)])
    assert on_training['pixel_accuracy'] > background + 0.01, (on_training, background)  # beats 'all background'
    assert on_training['IoU/T-shirt/top'] > 0.1, on_training
    from_pipeline = pipeline_scores(out, evaluation, 8)
    for key, value in after.items():
        assert from_pipeline[key] == pytest.approx(value, abs=1e-6), key
    cfg = json.load(open(os.path.join(out, 'configuration.json')))
    assert cfg['task'] == SEG_TASK and cfg['model']['type'] == SEG_TYPE and cfg['pipeline']['type'] == SEG_TYPE
    assert cfg['model']['head']['type'] == 'linear' and cfg['evaluation']['metrics'] == [SEG_METRIC]
    assert trainer.model_unwrapped.CLASSES == ['background', 'T-shirt/top', 'Trouser', 'Sneaker']
    assert cfg['model']['CLASSES'] == trainer.model_unwrapped.CLASSES  # the class names in configuration.json


def test_pipeline_answers_at_each_input_size_single_and_list(trained, tmp_path):
    trainer, out, _ = trained
    p = pipeline(SEG_TYPE, out, device='cpu')  # the plugin's name, as well as the task
    wide = Image.fromarray(np.random.default_rng(0).integers(0, 255, (37, 90, 3), dtype=np.uint8))
    path = str(tmp_path / 'wide.png')
    wide.save(path)
    one = p(path)
    assert one[OutputKeys.MASKS].shape == (37, 90) and one[OutputKeys.MASKS].dtype == np.int64
    assert one[OutputKeys.LABELS] == ['background', 'T-shirt/top', 'Trouser', 'Sneaker']
    many = p([path, wide, np.asarray(wide)[:, :, ::-1]], batch_size=2)  # path, PIL, BGR array
    assert len(many) == 3 and all(r[OutputKeys.MASKS].shape == (37, 90) for r in many)
    assert all(np.array_equal(r[OutputKeys.MASKS], one[OutputKeys.MASKS]) for r in many[:2])


def test_saved_folder_reloads_to_the_same_predictions(trained, scenes, tmp_path):
    trainer, out, _ = trained
    from modelscope_utuning import load_model
    model = load_model(out).eval()
    pre = SegmentationPreprocessor(mode='eval', img_size=SIZE)
    row = {'img_path:FILE': os.path.join(scenes[1], 'images', '0000.png'),
           MASK_KEY: os.path.join(scenes[1], 'masks', '0000.png')}
    x = pre(row)['imgs'][None]
    ours = trainer.model_unwrapped.eval()
    assert torch.allclose(model({'imgs': x})['logits'], ours({'imgs': x})['logits'], atol=1e-6)
    # the tuner-only files of output/ record the head with its layers (enough to build it again)
    cfg = json.load(open(os.path.join(out, 'adapter_config.json')))
    assert cfg['head'] == {'type': 'linear', 'num_classes': K, 'layers': [VIT['depth'] - 1]}


KINDS = [
    ('adapter parallel mha', [{'type': 'adapter', 'op': 'mha', 'form': 'parallel', 'dim': 4}], False),
    ('adapter sequential', [{'type': 'adapter', 'op': 'ffn', 'form': 'sequential', 'dim': 4}], False),
    ('prefix parallel block', [{'type': 'prefix', 'op': 'block', 'form': 'parallel', 'length': 3}], False),
    ('prefix sequential', [{'type': 'prefix', 'op': 'mha', 'form': 'sequential', 'length': 3}], False),
    ('prompt parallel', [{'type': 'prompt', 'op': 'block', 'form': 'parallel', 'length': 3}], False),
    ('prompt VPT-deep', [{'type': 'prompt', 'op': 'block', 'form': 'sequential', 'length': 3}], False),
    ('lora', [{'type': 'lora', 'op': 'mha', 'rank': 4}], False),
    ('bitfit', [{'type': 'bitfit'}], False),
    ('ssf', [{'type': 'ssf'}], False),
    ('repadapter', [{'type': 'repadapter', 'op': 'ffn', 'dim': 4}], False),
    ('bypass + vertical', TRI[:2] + [{'type': 'vertical', 'dim': 4}], True),
]


@pytest.mark.parametrize('tuners,bypass', [k[1:] for k in KINDS], ids=[k[0] for k in KINDS])
@pytest.mark.parametrize('head', ['linear', 'multilevel'])
def test_every_tuner_kind_trains_a_segmentation_head(tuners, bypass, head):
    """Each kind, form, OP and bypass: a step moves the tuners and the head, never the frozen backbone, and the
    dense output has the patch grid's shape."""
    torch.manual_seed(0)
    net = SegmentationNetwork({**VIT, 'tuners': tuners, **({'bypass': True} if bypass else {})},
                              {'type': head, 'num_classes': K})
    frozen = {n: p.detach().clone() for n, p in net.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}
    assert any(not n.startswith('head.') for n in trainable), 'the tuners train'
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    images, masks = torch.randn(2, 3, SIZE, SIZE), torch.randint(0, K, (2, SIZE, SIZE))
    masks[0, :4] = 255
    from modelscope_utuning.segmentation.network import segmentation_loss
    for _ in range(2):
        logits = net(images)
        assert logits.shape == (2, K, SIZE // 8, SIZE // 8)
        loss = segmentation_loss(logits, masks)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)
    moved = [n for n, p in net.named_parameters() if p.requires_grad and not torch.equal(p, trainable[n])]
    assert any(n.startswith('head.') for n in moved) and any(not n.startswith('head.') for n in moved), moved
    assert all(torch.equal(p, frozen[n]) for n, p in net.named_parameters() if n in frozen)


def test_multilevel_head_reads_four_layers_of_one_pass():
    net = SegmentationNetwork({**VIT, 'depth': 6, 'tuners': TRI}, {'type': 'multilevel', 'num_classes': K})
    assert net.head_layers == [2, 3, 4, 5] and net.head.dim == 4 * VIT['embed_dim']
    x = torch.randn(1, 3, SIZE, SIZE)
    final, levels = net.backbone.forward_intermediates(x, net.head_layers)
    assert torch.allclose(levels[-1], net.backbone.forward_features(x), atol=1e-6)
    with pytest.raises(ValueError, match=r'model\.head\.layers=\[9\]'):
        SegmentationNetwork({**VIT, 'tuners': TRI}, {'type': 'multilevel', 'num_classes': K, 'layers': [9]})
    with pytest.raises(ValueError, match=r"model\.head\.type='conv'"):
        SegmentationNetwork({**VIT, 'tuners': TRI}, {'type': 'conv', 'num_classes': K})
    with pytest.raises(ValueError, match=r'pooled classification feature'):
        SegmentationNetwork({**VIT, 'tuners': [{'type': 'side'}]}, {'type': 'linear', 'num_classes': K})


def test_metric_counts_ignore_pixels_out_and_averages_present_classes():
    truth = torch.tensor([[0, 0, 1, 255], [2, 2, 1, 255]])
    predicted = torch.tensor([[0, 1, 1, 2], [2, 0, 1, 0]])
    confusion = confusion_matrix(truth, predicted, 4)
    assert int(confusion.sum()) == 6  # the two 255 pixels count nowhere
    out = scores(confusion, ['bg', 'a', 'b', 'c'])
    # bg: TP 1, FP 1, FN 1 -> 1/3; a: TP 2, FP 1 -> 2/3; b: TP 1, FN 1 -> 1/2; c: absent everywhere -> no IoU
    assert out['IoU/bg'] == pytest.approx(1 / 3) and out['IoU/a'] == pytest.approx(2 / 3)
    assert out['IoU/b'] == pytest.approx(1 / 2) and 'IoU/c' not in out
    assert out['mIoU'] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert out['pixel_accuracy'] == pytest.approx(4 / 6)


def test_joint_augmentation_keeps_image_and_mask_together(tmp_path):
    """An image whose colour encodes the class: after random scale, crop and flip, every valid mask pixel still
    sits on its class's colour (nearest-neighbour mask, same geometry), and padding is 255."""
    colours = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]], dtype=np.uint8)
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 4, (6, 5))
    mask = np.kron(blocks, np.ones((20, 20), dtype=np.int64)).astype(np.uint8)  # 120 x 100, blocks of 20 px
    Image.fromarray(colours[mask]).save(tmp_path / 'img.png')
    Image.fromarray(mask, mode='L').save(tmp_path / 'mask.png')
    pre = SegmentationPreprocessor(mode='train', img_size=64, mean=(0, 0, 0), std=(1, 1, 1))
    torch.manual_seed(0)
    for _ in range(12):
        out = pre({'img_path:FILE': str(tmp_path / 'img.png'), MASK_KEY: str(tmp_path / 'mask.png')})
        imgs, m = out['imgs'], out['masks']
        assert imgs.shape == (3, 64, 64) and m.shape == (64, 64)
        assert set(m.unique().tolist()) <= {0, 1, 2, 3, 255}
        valid = m != 255
        # the nearest of the four colours to each image pixel is the class its mask pixel says
        pixels = imgs.permute(1, 2, 0).reshape(-1, 1, 3) * 255
        nearest = ((pixels - torch.from_numpy(colours).float()) ** 2).sum(-1).argmin(-1).reshape(64, 64)
        agree = (nearest == m)[valid].float().mean()
        assert agree > 0.85, agree  # only block borders blend under bilinear resampling
        assert bool((imgs[:, ~valid] == 0).all())  # padding: zeros after normalising


def test_sources_and_bad_masks_are_named(scenes, tmp_path):
    train, _ = scenes
    folder = load_segmentation_dataset(train)
    assert len(folder) == 24 and folder.classes[0] == 'background'
    csv = tmp_path / 'rows.csv'
    csv.write_text('image,mask\n' + ''.join(f'{train}/images/{k:04d}.png,{train}/masks/{k:04d}.png\n'
                                            for k in range(3)))
    assert load_segmentation_dataset(str(csv)).rows == folder.rows[:3]
    rows = [{'img_path:FILE': r['img_path:FILE'], 'mask_path:FILE': r[MASK_KEY]} for r in folder.rows[:2]]
    assert load_segmentation_dataset(rows).rows == folder.rows[:2]
    batch = collate([SegmentationPreprocessor(mode='eval', img_size=SIZE)(r) for r in rows])
    assert batch['imgs'].shape == (2, 3, SIZE, SIZE) and batch['masks'].shape == (2, SIZE, SIZE)
    # a mask with an id the head does not have, of another size, or in RGB: named when the trainer is built
    bad = tmp_path / 'bad'
    os.makedirs(bad / 'images')
    os.makedirs(bad / 'masks')
    Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(bad / 'images' / 'a.png')
    for mask, pattern in ((np.full((SIZE, SIZE), 7, np.uint8), r"holds class id\(s\) \[7\]"),
                          (np.zeros((10, 10), np.uint8), r'is 10x10 but its image is 64x64'),
                          (np.zeros((SIZE, SIZE, 3), np.uint8), r'is a RGB image; expected one channel')):
        Image.fromarray(mask).save(bad / 'masks' / 'a.png')
        with pytest.raises(ValueError, match=pattern):
            trainer_for(seg_model_dir(tmp_path / 'model'), tmp_path / 'work', str(bad))


def _eval_copy_with_broken_files(evaluation, root, n=7):
    """The first n evaluation scenes copied to root, image 2 truncated and mask 4 truncated (in that order)."""
    import shutil
    for sub in ('images', 'masks'):
        os.makedirs(os.path.join(root, sub))
        for k in range(n):
            shutil.copy(os.path.join(evaluation, sub, f'{k:04d}.png'), os.path.join(root, sub, f'{k:04d}.png'))
    shutil.copy(os.path.join(evaluation, 'classes.txt'), root) if os.path.isfile(
        os.path.join(evaluation, 'classes.txt')) else None
    for sub, k in (('images', 2), ('masks', 4)):
        path = os.path.join(root, sub, f'{k:04d}.png')
        data = open(path, 'rb').read()
        open(path, 'wb').write(data[:len(data) // 2])
    return [k for k in range(n) if k not in (2, 4)]


def test_unreadable_images_and_masks_are_left_out_or_named(trained, scenes, tmp_path):
    """train.on_bad_image=skip: an unreadable image or mask is left out of numerator and denominator alike
    (evaluate() == the metric over pipeline() on the readable rows) and named; 'raise' names it at build time."""
    _, out, _ = trained
    _, evaluation = scenes
    root = str(tmp_path / 'eval')
    readable = _eval_copy_with_broken_files(evaluation, root)
    with pytest.raises(ValueError, match=r"evaluation image .*0002\.png.* cannot be read"):
        trainer_for(out, tmp_path / "w1", evaluation, root)
    trainer = trainer_for(out, tmp_path / 'w2', evaluation, root,
                          extra=lambda cfg: setattr(cfg.train, 'on_bad_image', 'skip'))
    skipped = trainer.skipped_images['evaluation']
    assert [os.path.relpath(p, root) for p in skipped] == ['images/0002.png', 'masks/0004.png']
    assert len(trainer.eval_dataset) == len(readable)
    result = trainer.evaluate()
    p = pipeline(SEG_TASK, out, device='cpu')
    confusion = torch.zeros(K, K, dtype=torch.long)
    for k in readable:
        mask = p(os.path.join(root, 'images', f'{k:04d}.png'))[OutputKeys.MASKS]
        truth = np.asarray(Image.open(os.path.join(root, 'masks', f'{k:04d}.png')), dtype=np.int64)
        confusion += confusion_matrix(torch.from_numpy(truth), torch.from_numpy(mask), K)
    expected = scores(confusion, trainer.model_unwrapped.CLASSES)
    for key, value in result.items():
        assert expected[key] == pytest.approx(value, abs=1e-6), key


DDP_SCRIPT = """
import json, os, sys
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
from test_segmentation import trainer_for
trainer = trainer_for({out!r}, {work!r}, {train!r}, {evaluation!r}, launcher='pytorch',
                      extra=lambda cfg: setattr(cfg.train, 'on_bad_image', 'skip'))
result = trainer.evaluate()
with open(os.path.join({work!r}, 'rank%s.json' % os.environ['RANK']), 'w') as f:
    json.dump([result, len(trainer.get_eval_data_loader().sampler)], f)
"""


def test_evaluate_on_two_ranks_counts_each_image_once(trained, scenes, tmp_path):
    """torchrun, 2 CPU processes (gloo), 5 readable evaluation scenes: each rank reports the mIoU of one process
    over the same rows (no scene padded in twice, the unreadable ones left out on both)."""
    import subprocess
    import sys
    trainer, out, _ = trained
    _, evaluation = scenes
    root = str(tmp_path / 'eval')
    _eval_copy_with_broken_files(evaluation, root)
    single = trainer_for(out, tmp_path / 'single', evaluation, root,
                         extra=lambda cfg: setattr(cfg.train, 'on_bad_image', 'skip')).evaluate()
    work = str(tmp_path / 'ddp')
    os.makedirs(work)
    script = tmp_path / 'ddp_eval.py'
    script.write_text(DDP_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)), out=out, work=work,
                                        train=evaluation, evaluation=root))
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2',
                           '--master_port', '29547', str(script)], capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    ranks = [json.load(open(os.path.join(work, f'rank{r}.json'))) for r in (0, 1)]
    assert ranks[0][1] + ranks[1][1] == 5  # every readable scene once over the two ranks
    for result, _ in ranks:
        assert set(result) == set(single)
        for key, value in single.items():
            assert result[key] == pytest.approx(value, abs=1e-6), key


def test_caller_dataset_is_not_changed(scenes, tmp_path):
    train, evaluation = scenes
    ds = load_segmentation_dataset(train)
    trainer = trainer_for(seg_model_dir(tmp_path / 'model'), tmp_path / 'work', ds, ds, epochs=1)
    assert ds.transform is None
    assert trainer.train_dataset.transform.mode == 'train' and trainer.eval_dataset.transform.mode == 'eval'


def test_classifier_and_segmenter_on_one_backbone_share_it(scenes, tmp_path):
    """A classification and a segmentation model tuned in bypass mode from the same backbone file load together:
    one frozen backbone in memory, one frozen forward per batch when their inputs coincide, and each answers as
    its own pipeline does."""
    from modelscope_utuning.training.defaults import model_configuration as cls_configuration
    from safetensors.torch import save_file
    torch.manual_seed(0)
    base = SegmentationNetwork({**VIT, 'tuners': []}, {'type': 'linear', 'num_classes': K})
    weights = str(tmp_path / 'base.safetensors')
    save_file({k: v.contiguous() for k, v in base.backbone.state_dict().items()}, weights)
    train, evaluation = scenes
    bypass = [{'type': 'adapter', 'op': 'ffn', 'form': 'parallel', 'dim': 4}]
    seg_dir = seg_model_dir(tmp_path / 'seg', tuners=bypass, bypass=True, pretrained_weights=weights)
    trainer_for(seg_dir, tmp_path / 'seg-work', train, epochs=1).train()
    cls_dir = tmp_path / 'cls'
    os.makedirs(cls_dir)
    # the classifier preprocesses as the segmenter does (the whole image resized), so their inputs coincide
    cfg = cls_configuration({**VIT, 'tuners': bypass, 'bypass': True, 'pretrained_weights': weights},
                            {'num_classes': 3}, preprocessor={'type': 'vision-efficient-tuning-preprocessor',
                                                              'resize': SIZE, 'crop_pct': 1.0})
    json.dump(cfg, open(cls_dir / 'configuration.json', 'w'))
    rows = [{'img_path:FILE': os.path.join(train, 'images', f'{k:04d}.png'), 'label': k % 3} for k in range(12)]
    from modelscope.metainfo import Trainers
    build_trainer(name=Trainers.vision_efficient_tuning, default_args=dict(
        model=str(cls_dir), work_dir=str(tmp_path / 'cls-work'), train_dataset=rows,
        cfg_modify_fn=lambda c: (setattr(c.train, 'max_epochs', 1) or setattr(c.train.lr_scheduler, 'T_max', 1)
                                 or c))).train()
    outs = [str(tmp_path / 'cls-work' / 'output'), str(tmp_path / 'seg-work' / 'output')]
    both = pipeline('vision-efficient-tuning', outs, device='cpu')
    cls_model, seg_model = both.models
    assert seg_model.shared_backbone is cls_model.shared_backbone
    assert seg_model.backbone.blocks[0].mlp.fc1.weight is cls_model.backbone.blocks[0].mlp.fc1.weight
    image = os.path.join(evaluation, 'images', '0000.png')
    calls = []
    handles = [m.backbone.patch_embed.register_forward_hook(lambda *a: calls.append(1)) for m in both.models]
    answer = both(image)
    for handle in handles:
        handle.remove()
    assert len(calls) == 1  # one frozen forward (one embedding of the batch) for both tasks
    alone_cls = pipeline('vision-efficient-tuning', outs[0], device='cpu')(image)
    alone_seg = pipeline(SEG_TASK, outs[1], device='cpu')(image)
    assert answer[0]['labels'] == alone_cls['labels']
    assert answer[0]['scores'] == pytest.approx(alone_cls['scores'], abs=1e-5)
    assert np.array_equal(answer[1][OutputKeys.MASKS], alone_seg[OutputKeys.MASKS])
    assert answer[1][OutputKeys.LABELS] == alone_seg[OutputKeys.LABELS]


def test_web_demo_overlays_the_pipelines_mask(trained, scenes):
    """The Gradio page of a segmentation folder: the overlay is the image tinted by exactly the pipeline's mask,
    the table lists the classes present with their pixel shares."""
    from modelscope_utuning.deploy.app import build_app, palette  # gradio: in the [test] extra
    _, out, _ = trained
    app = build_app(out)
    path = os.path.join(scenes[1], 'images', '0001.png')
    shown, table = app.segment(path)
    masks = pipeline(SEG_TASK, out, device='cpu')(path)[OutputKeys.MASKS]
    rgb = np.asarray(Image.open(path).convert('RGB'), dtype=np.float32)
    expected = np.clip(0.5 * rgb + 0.5 * palette(K).astype(np.float32)[masks] + 0.5, 0, 255).astype(np.uint8)
    assert np.array_equal(np.asarray(shown), expected)
    present = np.unique(masks)
    assert table.count('<tr><td class="swatch"') == len(present)
    names = ['background', 'T-shirt/top', 'Trouser', 'Sneaker']
    assert all(names[i] in table for i in present)


def test_segmentation_demo_runs_end_to_end_from_the_cli(tmp_path):
    """``modelscope-utuning demo --segmentation --quick``: both stages train, the overlays are written, the output
    folder is a segmentation model."""
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, '-m', 'modelscope_utuning', 'demo', '--segmentation', '--quick',
                           '--work-dir', str(tmp_path), '--json'], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout[proc.stdout.index('{'):])
    assert set(result['results']) == {'linear head', 'U-Tuning tri-tuner'}
    assert all(0 <= r['mIoU'] <= 1 for r in result['results'].values())
    assert len(os.listdir(result['overlays'])) == 4
    assert json.load(open(os.path.join(result['output_dir'], 'configuration.json')))['task'] == SEG_TASK


def test_onnx_export_of_a_segmentation_model_answers_as_the_pipeline(trained, scenes, tmp_path):
    """``modelscope-utuning export OUT --onnx`` on a segmentation folder: onnxruntime's logits equal torch's
    (dynamic batch), and the folder run by OnnxSegmenter gives the pipeline's masks; preprocessing.json describes
    the resize and the upsampling."""
    import subprocess
    import sys
    from modelscope_utuning.segmentation.onnx_export import OnnxSegmenter
    _, out, _ = trained
    export = str(tmp_path / 'onnx')
    proc = subprocess.run([sys.executable, '-m', 'modelscope_utuning', 'export', out, export, '--onnx'],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    diffs = re.findall(r'batch (\d+): ([0-9.e+-]+)', proc.stdout)
    assert [n for n, _ in diffs] == ['1', '3'] and all(float(d) < 1e-4 for _, d in diffs), proc.stdout
    runner = OnnxSegmenter(export)
    p = pipeline(SEG_TASK, out, device='cpu')
    for k in range(3):
        path = os.path.join(scenes[1], 'images', f'{k:04d}.png')
        ours, theirs = runner(path), p(path)
        assert theirs[OutputKeys.LABELS] == ours['labels']
        assert np.mean(ours['masks'] == theirs[OutputKeys.MASKS]) > 0.999  # float summation order at ties only
    description = json.load(open(os.path.join(export, 'preprocessing.json')))
    assert [s['op'] for s in description['steps']] == ['resize', 'to_float', 'normalize']
    assert description['postprocess']['upsample']['mode'] == 'bilinear'


@pytest.mark.parametrize('setting, match', [(True, 'augments at random'), ({'views': 2}, 'not supported')])
def test_feature_cache_settings_that_cannot_work_are_refused_when_the_segmentation_trainer_is_built(
        scenes, tmp_path, setting, match):
    """Segmentation training always crops at random: the frozen features never repeat, so asking for the cache (or for
    fixed views, which its dataset does not draw yet) is named at build time, and auto leaves it off."""
    train, _ = scenes

    def extra(cfg):
        cfg.train.feature_cache = setting
    with pytest.raises(ValueError, match=match):
        trainer_for(seg_model_dir(tmp_path / 'model', bypass=True), tmp_path / 'work', train, epochs=1, extra=extra)
    trainer = trainer_for(seg_model_dir(tmp_path / 'auto', bypass=True), tmp_path / 'auto_work', train, epochs=1)
    assert not trainer.feature_cache_plan.on and 'at random' in trainer.feature_cache_plan.reason
