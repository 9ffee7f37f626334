"""Cached frozen features for bypass training (issue 22, item 2): backbone/feature_cache.py, training/feature_cache.py,
data/views.py.

What must hold: a cached step is exactly the frozen pass it replaces; the cache never returns another image's
features, never outlives a change of the frozen weights and never grows past its bound; a trainer run with the cache
ends at the weights of the same run without it (bitwise when the batches repeat; within the uncached run's own
batch-composition rounding when they are shuffled); and every setting that cannot work is refused when the trainer is
built."""
import os

import pytest
import torch
from modelscope.metainfo import Trainers
from modelscope.trainers import build_trainer

from modelscope_utuning.backbone.bypass import fields_needed, live_steps
from modelscope_utuning.backbone.feature_cache import FrozenFeatureCache, image_key
from modelscope_utuning.data.views import fixed_view
from modelscope_utuning.network import VisionEfficientTuning
from modelscope_utuning.training.feature_cache import plan, read_settings

from test_trainer import FIXTURES, TRI_TUNER, rows, seed_cfg_modify_fn  # noqa: F401  (rows: a fixture)

SMALL = dict(img_size=56, patch_size=14, embed_dim=64, depth=3, num_heads=4)
BYPASS_TUNERS = [dict(type='adapter', op='mha', form='parallel', dim=4),
                 dict(type='adapter', op='ffn', form='parallel', dim=4),
                 dict(type='prefix', op='block', form='parallel', length=3)]


def bypass_net(global_pool='token', **extra):
    torch.manual_seed(0)
    net = VisionEfficientTuning(dict(SMALL, bypass=True, tuners=BYPASS_TUNERS, global_pool=global_pool, **extra),
                                dict(type='ClassifierHead', dim=64, num_classes=4))
    for p in net.parameters():
        if p.requires_grad:  # tuners start silent; give them a voice so that their gradients depend on the features
            torch.nn.init.normal_(p, std=0.05)
    return net


def grads(net, images):
    net.zero_grad()
    out = net(images)
    out.pow(2).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


@pytest.mark.parametrize('pool', ['token', 'avg'])
def test_a_cached_batch_gives_the_outputs_and_gradients_of_the_frozen_pass(pool):
    net = bypass_net(pool)
    images = torch.randn(5, 3, 56, 56)
    ref_out, ref_grads = grads(net, images)
    cache = FrozenFeatureCache(2 ** 30)
    net.backbone.feature_cache = cache
    first = grads(net, images)    # computed and stored
    second = grads(net, images)   # read back
    assert cache.summary()['misses'] == 5 and cache.summary()['hits'] == 5 and len(cache) == 5
    for out, g in (first, second):
        assert torch.equal(out, ref_out)
        assert g.keys() == ref_grads.keys() and all(torch.equal(g[n], ref_grads[n]) for n in g)


def test_only_what_the_tuners_read_is_kept():
    net = bypass_net('token')
    vit = net.backbone
    needs = fields_needed(vit, [vit], None)
    assert needs[-1] == ('h1', 'h2', 'out', 'q', 'x', 'y')  # mha + ffn + block tuners, and the last output
    assert all('out' not in n for n in needs[:-1])  # the next block's input is not kept: nothing reads it
    cache = FrozenFeatureCache(2 ** 30)
    vit.feature_cache = cache
    net(torch.randn(2, 3, 56, 56))
    # class-token pooling: one row per field and block
    per_image = (3 * 5 + 1) * 64 * 4  # fields x rows(1) x C floats (q is H x 1 x d = C) + the final class row
    assert cache.bytes == 2 * per_image


def test_a_batch_with_new_images_computes_only_those():
    net = bypass_net()
    vit = net.backbone
    cache = FrozenFeatureCache(2 ** 30)
    vit.feature_cache = cache
    a, b = torch.randn(3, 3, 56, 56), torch.randn(2, 3, 56, 56)
    net(a)
    sizes = []
    orig = type(vit.blocks[0]).forward_frozen

    def counting(self, x, *args, **kw):
        sizes.append(x.shape[0])
        return orig(self, x, *args, **kw)
    type(vit.blocks[0]).forward_frozen = counting
    try:
        net(a)
        assert not sizes  # all held
        mixed = torch.cat([b[:1], a[:2], b[1:], b[:1]])  # two new images, one of them twice, between held ones
        out, g = grads(net, mixed)
        assert sizes == [2] * len(vit.blocks)  # the two new images alone ran the frozen pass
    finally:
        type(vit.blocks[0]).forward_frozen = orig
    assert len(cache) == 5
    vit.feature_cache = None
    ref, ref_g = grads(net, mixed)
    assert torch.allclose(out, ref, atol=1e-5, rtol=0)  # the same numbers up to batch-composition rounding
    assert all(torch.allclose(g[n], ref_g[n], atol=1e-5, rtol=1e-4) for n in ref_g)
    assert torch.equal(out[0], out[4])  # the same image twice: the same row


def test_one_changed_pixel_is_another_image():
    x = torch.randn(3, 8, 8)
    y = x.clone()
    y[1, 4, 4] = torch.nextafter(y[1, 4, 4], torch.tensor(1e9))
    assert image_key(x) != image_key(y)
    assert image_key(x) == image_key(x.clone())
    assert image_key(x) != image_key(x.double())


def test_a_change_of_the_frozen_weights_empties_the_cache():
    net = bypass_net()
    vit = net.backbone
    cache = FrozenFeatureCache(2 ** 30)
    vit.feature_cache = cache
    images = torch.randn(2, 3, 56, 56)
    net(images)
    with torch.no_grad():
        vit.blocks[1].mlp.fc1.weight.mul_(1.5)
    out = net(images)
    assert cache.hits == 0 and cache.clears == 1 and len(cache) == 2
    vit.feature_cache = None
    assert torch.equal(out, net(images))  # the new weights' features, not the stale ones
    vit.feature_cache = cache
    tuner = next(iter(net.tuner_parameters().values()))
    with torch.no_grad():
        tuner.add_(1.0)  # a tuner step is not a frozen-weight change
    net(images)
    assert cache.hits == 2


def test_the_bound_is_kept_and_reported():
    net = bypass_net()
    images = torch.randn(6, 3, 56, 56)
    per_image = (3 * 5 + 1) * 64 * 4
    cache = FrozenFeatureCache(4 * per_image)
    net.backbone.feature_cache = cache
    net(images)
    net(images)
    s = cache.summary()
    assert len(cache) == 4 and cache.bytes <= 4 * per_image
    assert s['hits'] == 4 and s['not_stored'] == 4  # the second pass reads four back; two never find room
    net(images[:4])
    assert cache.summary()['hits'] == 8


def test_dropout_in_the_frozen_backbone_is_refused():
    net = bypass_net(drop_rate=0.1)
    net.backbone.feature_cache = FrozenFeatureCache(2 ** 30)
    net.train()
    with pytest.raises(RuntimeError, match='dropout'):
        net(torch.randn(1, 3, 56, 56))
    net.eval()
    net(torch.randn(1, 3, 56, 56))  # no dropout at evaluation: cacheable


def test_live_steps_leave_grad_mode_on_for_their_reader():
    net = bypass_net()
    for step in live_steps(net.backbone, torch.randn(1, 3, 56, 56), None):
        assert torch.is_grad_enabled() and not step.out.requires_grad


def test_fixed_views():
    """One of K fixed outputs per image: the same (image, view) gives the same draws; K views appear; the caller's
    random stream is untouched by what the transform drew."""
    def draw(index, views):
        with fixed_view(views, index):
            return torch.rand(3)
    torch.manual_seed(1)
    seen = {i: {tuple(draw(i, (3, 7)).tolist()) for _ in range(60)} for i in range(4)}
    assert all(len(s) == 3 for s in seen.values())
    assert len(set().union(*seen.values())) == 12
    torch.manual_seed(5)
    with fixed_view((1, 7), 0):
        torch.rand(100)
    after = torch.rand(1)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(1))  # K = 1 draws nothing from the caller's stream


@pytest.mark.parametrize('value, key', [
    ({'max_mb': -1}, 'train.feature_cache.max_mb'), ({'views': 1.5}, 'train.feature_cache.views'),
    ({'enabled': 'yes'}, 'train.feature_cache.enabled'), ({'enabled': 1}, 'train.feature_cache.enabled'),
    ({'size': 3}, "unknown key(s) ['size']"), ('on', 'train.feature_cache')])
def test_bad_settings_are_named(value, key):
    with pytest.raises(ValueError) as e:
        read_settings(value)
    assert key in str(e.value)


def test_plan():
    net = bypass_net()
    vit = net.backbone
    assert plan(None, vit, False).on
    assert not plan(None, vit, True).on and 'views' in plan(None, vit, True).reason
    assert plan({'views': 2}, vit, True).on and plan({'views': 2}, vit, True).views == 2
    assert not plan(False, vit, False).on
    assert not plan(None, vit, None).on and plan(True, vit, None).on  # asked for: the user vouches for the transform
    with pytest.raises(ValueError, match='views'):
        plan(True, vit, True)
    vit.bypass = False
    assert not plan(None, vit, False).on
    with pytest.raises(ValueError, match='bypass'):
        plan(True, vit, False)
    assert plan({'enabled': False, 'views': 3}, vit, True).views == 3  # views are a data policy: kept without cache
    dropped = bypass_net(drop_rate=0.1).backbone.eval()  # asked in evaluation mode: training's dropout counts
    assert not plan(None, dropped, False).on and 'dropout' in plan(None, dropped, False).reason
    assert not dropped.training and not any(m.training for m in dropped.modules())  # the mode is left as it was


def set_train_transform(cfg, spec):
    from modelscope.utils.config import ConfigDict
    if cfg.safe_get('preprocessor') is None:
        cfg.preprocessor = ConfigDict(type='vision-efficient-tuning-preprocessor')
    cfg.preprocessor.train = spec


def deterministic(extra_cache, shuffle=True, epochs=3, more=None):
    def extra(cfg):
        cfg.model.backbone.tuners = TRI_TUNER
        cfg.model.backbone.bypass = True
        set_train_transform(cfg, {'augment': False})
        cfg.train.dataloader.shuffle = shuffle
        cfg.train.feature_cache = extra_cache
        if more:
            more(cfg)
    return seed_cfg_modify_fn(extra, epochs=epochs)


def train(rows, work_dir, modify):  # noqa: F811
    trainer = build_trainer(name=Trainers.vision_efficient_tuning, default_args=dict(
        model=os.path.join(FIXTURES, 'plain'), work_dir=str(work_dir), train_dataset=rows, eval_dataset=rows,
        cfg_modify_fn=modify))
    trainer.train()
    net = trainer.model_unwrapped.model
    return trainer, {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}


@pytest.mark.parametrize('shuffle', [False, True])
def test_cached_and_uncached_training_end_at_the_same_weights(rows, tmp_path, shuffle):  # noqa: F811
    cached, with_cache = train(rows, tmp_path / 'cached', deterministic(True, shuffle))
    plain, without = train(rows, tmp_path / 'plain', deterministic(False, shuffle))
    assert not hasattr(plain, 'feature_cache_summary')
    s = cached.feature_cache_summary
    n = len(rows)
    assert s['images'] == n and s['misses'] == n  # train and eval images are the same files, seen once
    assert s['hits'] == 3 * n + 2 * n  # 3 evaluations and 2 training epochs read back
    assert cached.model_unwrapped.model.backbone.feature_cache is None  # dropped after training
    assert with_cache.keys() == without.keys()
    if not shuffle:  # the same batches: the same numbers, bit for bit
        assert all(torch.equal(with_cache[k], without[k]) for k in without)
    else:  # the uncached run recomputes in other batch compositions (~1e-6 rounding); nothing more
        worst = max((with_cache[k] - without[k]).abs().max().item() for k in without)
        assert worst < 1e-4, worst


def test_fixed_views_train_the_same_with_and_without_the_cache(rows, tmp_path):  # noqa: F811
    def augmented(cache):
        def more(cfg):
            set_train_transform(cfg, {'hflip': 0.5})
        return deterministic({'enabled': cache, 'views': 2}, shuffle=False, epochs=3, more=more)
    cached, with_cache = train(rows, tmp_path / 'cached', augmented(True))
    _, without = train(rows, tmp_path / 'plain', augmented(False))
    s = cached.feature_cache_summary
    n = len(rows)
    assert n < s['images'] <= 3 * n  # the eval views and up to two training views per image
    assert s['hits'] > 0
    # batches mixing held and new views compute only the new ones: batch-composition rounding, nothing more
    worst = max((with_cache[k] - without[k]).abs().max().item() for k in without)
    assert worst < 1e-4, worst


@pytest.mark.parametrize('setting, more, match', [
    (True, lambda cfg: setattr(cfg.model.backbone, 'bypass', False), 'bypass'),
    (True, lambda cfg: set_train_transform(cfg, {'hflip': 0.5}), 'views'),
    (True, lambda cfg: cfg.model.backbone.__setitem__('drop_rate', 0.1), 'dropout'),
    ({'max_mb': 'lots'}, None, 'train.feature_cache.max_mb'),
    ({'view': 2}, None, "unknown key"),
])
def test_settings_that_cannot_work_are_refused_when_the_trainer_is_built(rows, tmp_path, setting, more,  # noqa: F811
                                                                         match):
    with pytest.raises(Exception, match=match):
        build_trainer(name=Trainers.vision_efficient_tuning, default_args=dict(
            model=os.path.join(FIXTURES, 'plain'), work_dir=str(tmp_path), train_dataset=rows,
            cfg_modify_fn=deterministic(setting, more=more)))
