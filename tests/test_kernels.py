"""Kernel choices for the machine at hand (backbone/kernels.py): the candidates agree, the faster one is chosen,
the choice is remembered per machine and shared between processes, and anything odd falls back safely."""
import json
import time

import pytest
import torch

from modelscope_utuning.backbone import kernels


@pytest.fixture
def chooser(monkeypatch, tmp_path):
    for var in ('UTUNING_ATTENTION', 'UTUNING_LINEAR', 'UTUNING_KERNELS'):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv('UTUNING_KERNEL_CACHE', str(tmp_path / 'kernels.json'))
    c = kernels.KernelChooser()
    monkeypatch.setattr(kernels, 'CHOOSER', c)
    return c


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('shape', [(2, 4, 9, 9, 8), (3, 2, 1, 17, 16), (1, 3, 5, 12, 8)])
def test_math_attention_equals_sdpa_forward_and_backward(dtype, shape):
    B, H, n, N, d = shape
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(s, generator=g).to(dtype).requires_grad_() for s in
               ((B, H, n, d), (B, H, N, d), (B, H, N, d)))
    a = kernels.math_attention(q, k, v)
    b = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(a, b, **tol)
    w = torch.randn(a.shape, generator=g).to(dtype)
    ga = torch.autograd.grad(a, (q, k, v), w)
    gb = torch.autograd.grad(b, (q, k, v), w)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, **tol)


def test_the_faster_candidate_is_chosen_and_remembered(chooser, tmp_path):
    calls = []

    def slow():
        calls.append('sdpa')
        time.sleep(0.004)

    def quick():
        calls.append('math')
    assert chooser.choose('attention', 'k1', lambda: {'sdpa': slow, 'math': quick}) == 'math'
    assert len(calls) == 2 * (kernels._WARMUP + kernels._REPS)
    assert chooser.choose('attention', 'k1', lambda: {'sdpa': slow, 'math': quick}) == 'math'
    assert len(calls) == 2 * (kernels._WARMUP + kernels._REPS)  # not timed again
    saved = json.load(open(tmp_path / 'kernels.json'))
    assert saved == {'machine': kernels.machine_id(), 'choices': {'attention|k1': 'math'}}
    other = kernels.KernelChooser()  # another process on this machine reads the same choice, times nothing
    assert other.choose('attention', 'k1', lambda: {'sdpa': lambda: calls.append('x'), 'math': quick}) == 'math'
    assert calls.count('x') == 0


def test_a_cache_of_another_machine_is_ignored(chooser, tmp_path):
    (tmp_path / 'kernels.json').write_text(json.dumps({'machine': 'another cpu', 'choices': {'attention|k2': 'math'}}))

    def quick():
        pass

    def slow():
        time.sleep(0.004)
    assert chooser.choose('attention', 'k2', lambda: {'sdpa': quick, 'math': slow}) == 'sdpa'


def test_forced_default_and_failing_candidates(chooser, monkeypatch):
    def boom():
        raise RuntimeError('no such kernel here')
    assert chooser.choose('linear', 'k3', lambda: {'onednn': lambda: None, 'addmm': boom}) == 'onednn'  # falls back
    monkeypatch.setenv('UTUNING_LINEAR', 'addmm')
    assert chooser.choose('linear', 'k3', lambda: {}) == 'addmm'
    monkeypatch.delenv('UTUNING_LINEAR')
    monkeypatch.setenv('UTUNING_KERNELS', 'default')
    assert chooser.choose('attention', 'k4', lambda: {}) == 'sdpa'


def test_model_attention_uses_the_choice(chooser, monkeypatch):
    seen = []
    monkeypatch.setattr(kernels, 'math_attention', lambda q, k, v: seen.append(q.shape) or
                        torch.nn.functional.scaled_dot_product_attention(q, k, v))
    monkeypatch.setenv('UTUNING_ATTENTION', 'math')
    from modelscope_utuning.backbone.vit import VisionTransformer
    vit = VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=4)
    with torch.no_grad():
        vit(torch.randn(1, 3, 32, 32))
    assert len(seen) == 2


def test_a_candidate_must_win_clearly_to_replace_the_default(chooser):
    """Within the timing noise (10 %) the default (version 0.1's kernel) stays."""
    def default():
        time.sleep(0.010)

    def barely():
        time.sleep(0.0097)
    assert chooser.choose('attention', 'k5', lambda: {'sdpa': default, 'math': barely}) == 'sdpa'


def test_a_remembered_choice_builds_no_synthetic_inputs(chooser, monkeypatch):
    """The candidates' synthetic inputs are made only to time them: a forward whose kernels are already chosen
    makes none (making them on every call once cost a third of a ViT-B forward)."""
    from modelscope_utuning.backbone import linear
    from modelscope_utuning.backbone.vit import VisionTransformer
    built = []
    for module, name in ((kernels, '_attention_runners'), (linear, '_fp32_runners')):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, real=real, name=name: built.append(name) or real(*a))
    vit = VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=4).requires_grad_(False)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        first = vit(x)
    assert '_attention_runners' in built and '_fp32_runners' in built  # the first forward timed its kernels
    built.clear()
    with torch.no_grad():
        again = vit(x)
    assert built == []
    torch.testing.assert_close(first, again)


def test_timing_a_kernel_leaves_the_global_random_state_alone(chooser):
    """A run times its kernels at its first forward; its resume, which reads the cached choice, times nothing. Both
    must draw the same random numbers afterwards, or the resume ends with other weights."""
    x = torch.randn(3, 2, 5, 8, requires_grad=True)
    before = torch.get_rng_state()
    with torch.enable_grad():
        kernels.attention(x, x, x)  # timed here: synthetic inputs drawn
    assert 'attention|' + kernels._attention_key(x, x, True) in chooser.choices()
    assert torch.equal(torch.get_rng_state(), before)
