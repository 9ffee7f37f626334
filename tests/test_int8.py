"""int8 inference of the frozen backbone (``pipeline(..., precision='int8', calibration=...)``, backbone/int8.py).

The int8 product is checked against its definition (smoothing from calibrated ranges, per-channel int8 weights,
per-token int8 inputs, int32 sums, fp32 out; or, where this machine's kernel test chose it, the per-tensor 7-bit
fallback) computed here in plain torch; the pipeline against its own fp32 answers on ModelScope-made fixtures;
training, exports and unmarked models are untouched.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import modelscope_utuning  # noqa: F401
from modelscope.pipelines import pipeline
from modelscope_utuning.backbone import int8
from modelscope_utuning.backbone.linear import FrozenFastLinear, QKVLinear, quantize_frozen_linears
from modelscope_utuning.backbone.vit import VisionTransformer

HERE = os.path.dirname(os.path.abspath(__file__))
BUILTIN = os.path.join(HERE, 'fixtures', 'builtin')

pytestmark = pytest.mark.usefixtures('one_thread')


def reference_int8(x, weight, bias, input_absmax=None, full_weight=None):
    """The definition (backbone/int8.py), in float64. Smoothing: s_j = sqrt(a_j / max_i |W_ij|) over the whole
    weight (``full_weight``: a fused qkv's rows share it), ranges floored at 1e-3 of the largest; x' = x / s,
    W' = W diag(s). W'_i ~ sw_i q_i (q in [-127, 127], sw_i = max|W'_i| / 127). Then per token,
    x'_t ~ sx_t p_t (p in [-127, 127], sx_t = max|x'_t| / 127), or on the per-tensor fallback x' ~ s_x (p - z)
    with 7-bit unsigned p over [min(x', 0), max(x', 0)]. y = x~ W~^T + b."""
    x, weight = x.double(), weight.double()
    if input_absmax is not None:
        full = (weight if full_weight is None else full_weight).double().abs().amax(0)
        a = input_absmax.double()
        a = a.clamp_min(float(a.max()) * 1e-3)
        s = (a / full.clamp_min(float(full.max()) * 1e-3)).sqrt()
        x, weight = x / s, weight * s
    s_w = (weight.abs().amax(1) / 127).clamp_min(1e-12)
    w = torch.clamp(torch.round(weight / s_w[:, None]), -127, 127) * s_w[:, None]
    if int8.kernel() == 'per-token':
        s_x = (x.abs().amax(1, keepdim=True) / 127).clamp_min(1e-12)
        xq = torch.round(x / s_x) * s_x
    else:
        lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
        s_x = (hi - lo) / 127
        z = round(-lo / s_x)
        xq = (torch.clamp(torch.round(x / s_x) + z, 0, 127) - z) * s_x
    return torch.nn.functional.linear(xq, w, None if bias is None else bias.double()).float()


def outlier_input(*shape, channel=3, factor=30.0):
    """A ViT-like input: one channel carries most of the range."""
    x = torch.randn(*shape)
    x[..., channel] *= factor
    return x


def kernels_here():
    """The products this machine takes (int8.kernel()) and the per-tensor fallback, which every x86 build has."""
    return sorted({int8.kernel(), 'per-tensor-7bit'} - {'none'})


@pytest.fixture(params=kernels_here())
def kernel(request, monkeypatch):
    monkeypatch.setattr(int8, '_KERNEL', request.param)
    return request.param


def test_int8_product_is_its_definition(kernel):
    torch.manual_seed(0)
    layer = FrozenFastLinear(48, 40).requires_grad_(False)
    x = torch.randn(2, 7, 48)
    assert quantize_frozen_linears(layer) == 1
    with torch.no_grad():
        got = layer(x)
    want = reference_int8(x.reshape(-1, 48), layer.weight, layer.bias).reshape(2, 7, 40)
    exact = torch.nn.functional.linear(x, layer.weight, layer.bias)
    assert (got - want).abs().max() < 0.02 * (got - exact).abs().max() + 1e-5  # the definition, not fp32
    assert (got - exact).abs().max() > 1e-4
    quantize_frozen_linears(layer, enable=False)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), exact, atol=1e-5, rtol=1e-5)


def test_calibration_smooths_outlier_channels_and_is_the_definition(kernel):
    """Inside int8.calibrating() the layer computes fp32 and records max |x_j|; afterwards its products are the
    smoothed definition, and on an input with an outlier channel they are closer to fp32 by a factor of at least 2."""
    torch.manual_seed(3)
    layer = FrozenFastLinear(64, 32).requires_grad_(False)
    quantize_frozen_linears(layer)
    calib, x = outlier_input(4, 16, 64), outlier_input(2, 9, 64)
    exact = torch.nn.functional.linear(x, layer.weight, layer.bias)
    with torch.no_grad():
        plain = layer(x)
        with int8.calibrating(layer):
            torch.testing.assert_close(layer(calib), torch.nn.functional.linear(calib, layer.weight, layer.bias),
                                       atol=1e-5, rtol=1e-5)  # fp32 while recording
        assert int8.calibrated(layer) == [True]
        smoothed = layer(x)
    absmax = calib.abs().reshape(-1, 64).amax(0)
    want = reference_int8(x.reshape(-1, 64), layer.weight, layer.bias, absmax).reshape(x.shape[:-1] + (32,))
    assert (smoothed - want).abs().max() < 0.02 * (smoothed - exact).abs().max() + 1e-5
    assert (smoothed - exact).abs().max() * 2 < (plain - exact).abs().max()  # measured: 2.9x closer


def test_calibration_errors_are_named():
    layer, other = (FrozenFastLinear(8, 4).requires_grad_(False) for _ in range(2))
    quantize_frozen_linears(layer)
    quantize_frozen_linears(other)
    both = torch.nn.ModuleList([layer, other])
    with pytest.raises(ValueError, match=r'1 of the 2 int8 layers saw no input'):
        with torch.no_grad(), int8.calibrating(both):
            layer(torch.randn(3, 8))
    assert int8.calibrated(both) == [False, False]  # nothing half-applied
    with pytest.raises(RuntimeError, match='already running'):
        with int8.calibrating(layer), int8.calibrating(other):
            pass
    assert not int8.recording()


def test_fused_qkv_rows_and_changed_weights_are_requantized(kernel):
    torch.manual_seed(1)
    qkv = QKVLinear(16, 48).requires_grad_(False)
    quantize_frozen_linears(qkv)
    h = torch.randn(1, 5, 16)
    with torch.no_grad():
        q, kv = qkv.split(h)
        torch.testing.assert_close(q, reference_int8(h[0], qkv.weight[:16], qkv.bias[:16])[None], atol=2e-3, rtol=0)
        torch.testing.assert_close(kv, reference_int8(h[0], qkv.weight[16:], qkv.bias[16:])[None], atol=2e-3,
                                   rtol=0)
        qkv.weight.mul_(2)  # a merge or a load changes the weight in place: the int8 copy follows
        q2, _ = qkv.split(h)
        torch.testing.assert_close(q2, reference_int8(h[0], qkv.weight[:16], qkv.bias[:16])[None], atol=4e-3,
                                   rtol=0)


def test_fused_qkv_parts_share_one_smoothing(kernel):
    """q and k / v read the same input: one s for the fused weight, from all its rows."""
    torch.manual_seed(4)
    qkv = QKVLinear(16, 48).requires_grad_(False)
    quantize_frozen_linears(qkv)
    h = outlier_input(1, 6, 16, channel=5)
    with torch.no_grad():
        with int8.calibrating(qkv):
            qkv.split(h)
        q, kv = qkv.split(h)
    absmax = h[0].abs().amax(0)
    torch.testing.assert_close(q, reference_int8(h[0], qkv.weight[:16], qkv.bias[:16], absmax, qkv.weight)[None],
                               atol=2e-3, rtol=0)
    torch.testing.assert_close(kv, reference_int8(h[0], qkv.weight[16:], qkv.bias[16:], absmax, qkv.weight)[None],
                               atol=2e-3, rtol=0)


def test_training_and_trainable_weights_stay_fp32():
    torch.manual_seed(2)
    vit = VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=4, num_classes=0)
    vit.blocks[0].mlp.fc1.weight.requires_grad_(True)  # a weight that trains is not quantized
    for name, p in vit.named_parameters():
        if name != 'blocks.0.mlp.fc1.weight':
            p.requires_grad_(False)
    n = quantize_frozen_linears(vit)
    assert n == 3  # qkv, proj, fc2
    x = torch.randn(2, 3, 16, 16)
    with torch.enable_grad():  # with gradients the products are the fp32 ones
        trained = vit(x)
    quantize_frozen_linears(vit, enable=False)
    with torch.enable_grad():
        torch.testing.assert_close(trained, vit(x), atol=0, rtol=0)


@pytest.mark.parametrize('case', ['utuning', 'adapter', 'lora', 'prefix'])
def test_int8_pipeline_agrees_with_fp32(case):
    """ModelScope-made fixtures (tiny random ViTs): same top-1 on the fixture images, scores within 0.05."""
    images = [os.path.join(BUILTIN, 'images', f) for f in sorted(os.listdir(os.path.join(BUILTIN, 'images')))]
    fp32 = pipeline('vision-efficient-tuning', os.path.join(BUILTIN, case), device='cpu')(images)
    int8 = pipeline('vision-efficient-tuning', os.path.join(BUILTIN, case), device='cpu', precision='int8')(images)
    for a, b in zip(fp32, int8):
        assert a['labels'][0] == b['labels'][0]
        assert np.abs(np.array(a['scores']) - np.array(b['scores'])).max() < 0.05
    # the fp32 pipeline built after it is fp32 again
    again = pipeline('vision-efficient-tuning', os.path.join(BUILTIN, case), device='cpu')(images)
    assert again == fp32


def test_calibrated_pipeline_agrees_with_fp32(tmp_path):
    """calibration= (a folder, or a list): the fixture images run once in fp32 when the pipeline is built; a folder
    and the same list give the same model, whose answers agree with fp32. (These tiny random ViTs have no outlier
    channels to smooth; that calibration brings a real one closer to fp32 is tests/test_real_training.py's.)"""
    folder = os.path.join(BUILTIN, 'images')
    images = [os.path.join(folder, f) for f in sorted(os.listdir(folder))]
    model_dir = os.path.join(BUILTIN, 'utuning')
    fp32 = pipeline('vision-efficient-tuning', model_dir, device='cpu')(images, topk=1000)
    plain = pipeline('vision-efficient-tuning', model_dir, device='cpu', precision='int8')(images, topk=1000)
    by_folder = pipeline('vision-efficient-tuning', model_dir, device='cpu', precision='int8',
                         calibration=folder)(images, topk=1000)
    by_list = pipeline('vision-efficient-tuning', model_dir, device='cpu', precision='int8',
                       calibration=images)(images, topk=1000)
    assert by_folder == by_list

    def error(results):
        return max(abs(dict(zip(r['labels'], r['scores']))[k] - v) for a, r in zip(fp32, results)
                   for k, v in zip(a['labels'], a['scores']))
    assert [a['labels'][0] for a in by_folder] == [a['labels'][0] for a in fp32]
    assert error(by_folder) < 0.05 and error(plain) < 0.05
    assert by_folder != plain  # the calibration changed the products


def test_calibration_inputs_are_checked(tmp_path):
    model_dir = os.path.join(BUILTIN, 'utuning')
    with pytest.raises(ValueError, match=r"calibration= goes with precision='int8' \(precision='fp32'\)"):
        pipeline('vision-efficient-tuning', model_dir, device='cpu', calibration=[os.path.join(BUILTIN, 'images')])
    with pytest.raises(ValueError, match=r'the folder holds no images'):
        pipeline('vision-efficient-tuning', model_dir, device='cpu', precision='int8', calibration=str(tmp_path))
    with pytest.raises(ValueError, match=r'expected a folder of images or a list of images'):
        pipeline('vision-efficient-tuning', model_dir, device='cpu', precision='int8',
                 calibration=str(tmp_path / 'missing'))
    with pytest.raises(ValueError, match=r'expected a folder of images or a non-empty list'):
        pipeline('vision-efficient-tuning', model_dir, device='cpu', precision='int8', calibration=[])


def test_precision_is_checked():
    with pytest.raises(ValueError, match=r"precision='int4': expected one of \('fp32', 'int8'\)"):
        pipeline('vision-efficient-tuning', os.path.join(BUILTIN, 'utuning'), device='cpu', precision='int4')


def test_onnx_int8_export_answers_like_the_fp32_pipeline(tmp_path, capsys):
    """export --onnx --int8: the matrix products run as int8 in onnxruntime (head fp32), configuration.json says
    so, and the answers agree with the torch fp32 pipeline on the fixture images."""
    import onnx
    from modelscope_utuning.cli import main
    from modelscope_utuning.deploy.onnx_export import CONFIG_FILE, ONNX_FILE, OnnxClassifier
    model_dir = os.path.join(BUILTIN, 'utuning')
    out = str(tmp_path / 'int8')
    assert main(['export', model_dir, out, '--onnx', '--int8']) == 0
    printed = capsys.readouterr().out
    assert 'int8:' in printed and 'matrix products quantized' in printed
    ops = {n.op_type for n in onnx.load(os.path.join(out, ONNX_FILE)).graph.node}
    assert ops & {'MatMulInteger', 'DynamicQuantizeMatMul'}
    import json
    assert json.load(open(os.path.join(out, CONFIG_FILE)))['onnx']['precision'] == 'int8'
    images = [os.path.join(BUILTIN, 'images', f) for f in sorted(os.listdir(os.path.join(BUILTIN, 'images')))]
    fp32 = pipeline('vision-efficient-tuning', model_dir, device='cpu')
    clf = OnnxClassifier(out)
    for image in images:
        a, b = fp32(image), clf(image)
        assert a['labels'][0] == b['labels'][0]
        assert np.abs(np.array(a['scores']) - np.array(b['scores'])).max() < 0.05


def test_int8_flag_needs_onnx(tmp_path, capsys):
    from modelscope_utuning.cli import main
    assert main(['export', os.path.join(BUILTIN, 'utuning'), str(tmp_path / 'x'), '--tuner-only', '--int8']) == 2
    assert '--int8 goes with --onnx' in capsys.readouterr().err


def test_segmentation_pipeline_takes_int8(tmp_path):
    from modelscope.outputs import OutputKeys
    from modelscope_utuning.registration import SEG_TASK
    from modelscope_utuning.segmentation.scenes import shipped_items, write_scenes
    from test_segmentation import seg_model_dir
    model_dir = seg_model_dir(tmp_path / 'model')
    items, labels, names = shipped_items([0, 1, 7])
    scenes = write_scenes(str(tmp_path / 'scenes'), items, labels, names, 3, seed=0, size=64)
    images = [os.path.join(scenes, 'images', f) for f in sorted(os.listdir(os.path.join(scenes, 'images')))]
    fp32 = pipeline(SEG_TASK, model_dir, device='cpu')(images)
    int8 = pipeline(SEG_TASK, model_dir, device='cpu', precision='int8')(images)
    calibrated = pipeline(SEG_TASK, model_dir, device='cpu', precision='int8', calibration=images)(images)
    for a, b, c in zip(fp32, int8, calibrated):
        assert np.mean(a[OutputKeys.MASKS] == b[OutputKeys.MASKS]) > 0.9
        assert np.mean(a[OutputKeys.MASKS] == c[OutputKeys.MASKS]) > 0.9
    with pytest.raises(ValueError, match=r"precision='fp16'"):
        pipeline(SEG_TASK, model_dir, device='cpu', precision='fp16')
