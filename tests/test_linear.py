"""The frozen linear layers' fast paths (backbone/linear.py): same numbers and gradients as F.linear, whichever
forward kernel this machine chose, nothing saved for backward but the weight, and bf16 copies kept, not re-cast."""
import pytest
import torch
import torch.nn.functional as F

from modelscope_utuning.backbone import linear as fast


def frozen(out_f=24, in_f=16, bias=True):
    torch.manual_seed(0)
    lin = fast.FrozenFastLinear(in_f, out_f, bias=bias)
    lin.weight.requires_grad_(False)
    return lin


@pytest.fixture(params=['onednn', 'addmm'])
def kernel(request, monkeypatch):
    monkeypatch.setenv('UTUNING_LINEAR', request.param)
    return request.param


def test_the_onednn_op_is_present_in_this_torch():
    # CI's torch (2.13.0+cpu) ships it; without it one candidate would silently never run
    assert fast._ONEDNN_LINEAR is not None


@pytest.mark.parametrize('bias', [True, False])
def test_forward_and_input_gradient_match_f_linear(bias, kernel):
    lin = frozen(bias=bias).requires_grad_(False)
    x = torch.randn(3, 7, 16, requires_grad=True)
    assert fast._fp32_cpu_frozen(x, lin.weight, lin.bias)
    y = lin(x)
    assert 'FrozenLinear' in type(y.grad_fn).__name__
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = F.linear(x_ref, lin.weight, lin.bias)
    (gx_ref,) = torch.autograd.grad(y_ref, x_ref, g)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, gx_ref, atol=1e-5, rtol=1e-5)


def test_bitfit_bias_gets_its_gradient_and_the_weight_none(kernel):
    lin = frozen()
    assert lin.bias.requires_grad and not lin.weight.requires_grad
    x = torch.randn(2, 5, 16)
    y = lin(x)
    assert y.grad_fn is not None and 'FrozenLinear' in type(y.grad_fn).__name__
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(lin.bias.grad, g.sum((0, 1)))
    assert lin.weight.grad is None


def test_only_the_weight_is_saved_for_backward(kernel):
    lin = frozen()
    x = torch.randn(4, 9, 16, requires_grad=True)
    lin(x)  # the kernel for this shape is chosen (and timed, unless forced) before measuring
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        lin(x)
    assert len(saved) == 1 and saved[0].data_ptr() == lin.weight.data_ptr()


def test_timing_a_kernel_leaves_the_real_gradients_alone(monkeypatch, tmp_path):
    """The candidates are timed with a backward on synthetic inputs: nothing may reach a BitFit bias."""
    monkeypatch.delenv('UTUNING_LINEAR', raising=False)
    monkeypatch.setenv('UTUNING_KERNEL_CACHE', str(tmp_path / 'k.json'))
    from modelscope_utuning.backbone import kernels
    monkeypatch.setattr(kernels, 'CHOOSER', kernels.KernelChooser())
    lin = frozen()
    x = torch.randn(5, 16, requires_grad=True)
    y = lin(x)  # times both candidates (fresh chooser, empty cache), then runs the chosen one
    assert lin.bias.grad is None
    y.sum().backward()
    torch.testing.assert_close(lin.bias.grad, torch.full((24,), 5.0))


def test_other_cases_take_f_linear():
    lin = frozen()
    x = torch.randn(2, 16)
    assert not fast._fp32_cpu_frozen(x.double(), lin.weight.double(), lin.bias.double())
    trainable = fast.FrozenFastLinear(16, 24)
    assert not fast._fp32_cpu_frozen(x, trainable.weight, trainable.bias)
    out = trainable(x)  # weight trains: autograd's own addmm, weight gradient included
    out.sum().backward()
    assert trainable.weight.grad is not None
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert not fast._fp32_cpu_frozen(x, lin.weight, lin.bias)
        assert lin(x).dtype == torch.bfloat16


def test_bf16_autocast_uses_one_cached_copy_of_a_frozen_weight():
    lin = frozen().requires_grad_(False)
    x = torch.randn(3, 7, 16)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = lin(x)
        ref = F.linear(x, lin.weight, lin.bias)  # autocast's own cast of the weight
        copy = fast._low_precision_copy(lin.weight, torch.bfloat16)
        assert fast._low_precision_copy(lin.weight, torch.bfloat16) is copy  # kept, not re-cast
    assert torch.equal(y, ref) and y.dtype == torch.bfloat16
    with torch.no_grad():
        lin.weight.mul_(2)  # an in-place change (e.g. merging a tuner): the copy is refreshed
    with torch.autocast('cpu', dtype=torch.bfloat16):
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias))
        assert fast._low_precision_copy(lin.weight, torch.bfloat16) is not copy


def test_bf16_bitfit_bias_still_trains_under_autocast():
    lin = frozen()  # bias trains
    x = torch.randn(3, 16)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = lin(x)
    y.float().sum().backward()
    assert lin.bias.grad is not None and lin.weight.grad is None


def test_qkv_split_equals_the_fused_projection(kernel):
    torch.manual_seed(0)
    qkv = fast.QKVLinear(16, 48).requires_grad_(False)
    h = torch.randn(2, 6, 16)
    fused = F.linear(h, qkv.weight, qkv.bias)
    q, kv = qkv.split(h)
    torch.testing.assert_close(torch.cat((q, kv), -1), fused, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(qkv(h), fused, atol=1e-5, rtol=1e-5)  # forward: nn.Linear's contract, for wrappers
    q2, kv2 = qkv.split(h, n_query=2)
    assert q2.shape == (2, 2, 16) and kv2.shape == (2, 6, 32)
    torch.testing.assert_close(q2, fused[:, :2, :16], atol=1e-5, rtol=1e-5)
