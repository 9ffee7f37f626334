"""int8 inference of the frozen backbone (``pipeline(..., precision='int8')``, backbone/linear.py).

The int8 product is checked against its definition (per-channel int8 weights, per-call 7-bit input, fp32 out)
computed here in plain torch; the pipeline against its own fp32 answers on ModelScope-made fixtures; training,
exports and unmarked models are untouched.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import modelscope_utuning  # noqa: F401
from modelscope.pipelines import pipeline
from modelscope_utuning.backbone.linear import FrozenFastLinear, QKVLinear, quantize_frozen_linears
from modelscope_utuning.backbone.vit import VisionTransformer

HERE = os.path.dirname(os.path.abspath(__file__))
BUILTIN = os.path.join(HERE, 'fixtures', 'builtin')

pytestmark = pytest.mark.usefixtures('one_thread')


def reference_int8(x, weight, bias):
    """The definition: W_j ~ s_j q_j (q in [-127, 127], s_j = max|W_j| / 127); x ~ s_x (q_x - z) with 7-bit
    unsigned q_x over [min(x, 0), max(x, 0)]; y = x~ W~^T + b in fp32."""
    s_w = (weight.abs().amax(1) / 127).clamp_min(1e-12)
    w = torch.clamp(torch.round(weight / s_w[:, None]), -127, 127) * s_w[:, None]
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    s_x = (hi - lo) / 127
    z = round(-lo / s_x)
    xq = (torch.clamp(torch.round(x / s_x) + z, 0, 127) - z) * s_x
    return torch.nn.functional.linear(xq, w, bias)


def test_int8_product_is_its_definition():
    torch.manual_seed(0)
    layer = FrozenFastLinear(48, 40).requires_grad_(False)
    x = torch.randn(2, 7, 48)
    assert quantize_frozen_linears(layer) == 1
    with torch.no_grad():
        got = layer(x)
    want = reference_int8(x.reshape(-1, 48), layer.weight, layer.bias).reshape(2, 7, 40)
    exact = torch.nn.functional.linear(x, layer.weight, layer.bias)
    assert (got - want).abs().max() < 0.05 * (got - exact).abs().max() + 1e-4  # the definition, not fp32
    assert (got - exact).abs().max() > 1e-4
    quantize_frozen_linears(layer, enable=False)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), exact, atol=1e-5, rtol=1e-5)


def test_fused_qkv_rows_and_changed_weights_are_requantized():
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
    for a, b in zip(fp32, int8):
        assert np.mean(a[OutputKeys.MASKS] == b[OutputKeys.MASKS]) > 0.9
    with pytest.raises(ValueError, match=r"precision='fp16'"):
        pipeline(SEG_TASK, model_dir, device='cpu', precision='fp16')
