"""The frozen linear layers' fast CPU path (backbone/linear.py): same numbers and gradients as F.linear."""
import pytest
import torch
import torch.nn.functional as F

from modelscope_utuning.backbone import linear as fast


def frozen(out_f=24, in_f=16, bias=True):
    torch.manual_seed(0)
    lin = fast.FrozenFastLinear(in_f, out_f, bias=bias)
    lin.weight.requires_grad_(False)
    return lin


def test_the_onednn_op_is_present_in_this_torch():
    # CI's torch (2.13.0+cpu) ships it; without it the fast path would silently never run
    assert fast._ONEDNN_LINEAR is not None


@pytest.mark.parametrize('bias', [True, False])
def test_forward_and_input_gradient_match_f_linear(bias):
    lin = frozen(bias=bias).requires_grad_(False)
    x = torch.randn(3, 7, 16, requires_grad=True)
    assert fast._onednn_applies(x, lin.weight, lin.bias)
    y = lin(x)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = F.linear(x_ref, lin.weight, lin.bias)
    (gx_ref,) = torch.autograd.grad(y_ref, x_ref, g)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, gx_ref, atol=1e-5, rtol=1e-5)


def test_bitfit_bias_gets_its_gradient_and_the_weight_none():
    lin = frozen()
    assert lin.bias.requires_grad and not lin.weight.requires_grad
    x = torch.randn(2, 5, 16)
    y = lin(x)
    assert y.grad_fn is not None and 'FrozenLinear' in type(y.grad_fn).__name__
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(lin.bias.grad, g.sum((0, 1)))
    assert lin.weight.grad is None


def test_only_the_weight_is_saved_for_backward():
    lin = frozen()
    x = torch.randn(4, 9, 16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        lin(x)
    assert len(saved) == 1 and saved[0].data_ptr() == lin.weight.data_ptr()


def test_other_cases_take_f_linear():
    lin = frozen()
    x = torch.randn(2, 16)
    assert not fast._onednn_applies(x.double(), lin.weight.double(), lin.bias.double())
    trainable = fast.FrozenFastLinear(16, 24)
    assert not fast._onednn_applies(x, trainable.weight, trainable.bias)
    out = trainable(x)  # weight trains: autograd's own addmm, weight gradient included
    out.sum().backward()
    assert trainable.weight.grad is not None
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert not fast._onednn_applies(x, lin.weight, lin.bias)
        assert lin(x).dtype == torch.bfloat16


def test_qkv_split_equals_the_fused_projection():
    torch.manual_seed(0)
    qkv = fast.QKVLinear(16, 48).requires_grad_(False)
    h = torch.randn(2, 6, 16)
    fused = F.linear(h, qkv.weight, qkv.bias)
    q, kv = qkv(h)
    torch.testing.assert_close(torch.cat((q, kv), -1), fused, atol=1e-5, rtol=1e-5)
    q2, kv2 = qkv(h, n_query=2)
    assert q2.shape == (2, 2, 16) and kv2.shape == (2, 6, 32)
    torch.testing.assert_close(q2, fused[:, :2, :16], atol=1e-5, rtol=1e-5)
