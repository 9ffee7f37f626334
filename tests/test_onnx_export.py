"""ONNX export (modelscope_utuning.deploy.onnx_export, ``modelscope-utuning export --onnx``): onnxruntime gives the
torch model's scores and logits to 1e-4 at batch 1 and 3 (one graph, dynamic batch axis) for the paper's tri-tuner,
LoRA, RepAdapter and SSF (merged first; left unmerged where merging would change the outputs), the original
sequential forms with VPT-deep prompts, side-tuning with BitFit, and bypass mode; the folder runs images like
pipeline(); a missing onnxruntime is one clear line."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

import modelscope_utuning  # noqa: F401  (registers the plugin)
from modelscope.pipelines import pipeline
from modelscope_utuning.cli import main
from modelscope_utuning.deploy.onnx_export import (CONFIG_FILE, ONNX_FILE, PREPROCESSING_FILE, OnnxClassifier,
                                                   export_onnx, max_abs_difference)
from modelscope_utuning.model import VisionEfficientTuningModel
from modelscope_utuning.training.export import export_output

VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4)
TRI_TUNER = [{'type': 'adapter', 'op': 'mha', 'form': 'parallel', 'dim': 4},
             {'type': 'adapter', 'op': 'ffn', 'form': 'parallel', 'dim': 4},
             {'type': 'prefix', 'op': 'block', 'form': 'parallel', 'length': 3, 'scale': 'channel', 'layers': 'all'}]
LORA_TRI = TRI_TUNER + [{'type': 'lora', 'op': 'ffn', 'rank': 2}]
CLASSES = ['bird', 'cat', 'dog']
TOL = 1e-4

CASES = {  # name -> (model.backbone additions, kinds merged before export)
    'tri_tuner': ({'tuners': TRI_TUNER}, []),
    'lora': ({'tuners': [{'type': 'lora', 'op': 'mha', 'rank': 2}, {'type': 'lora', 'op': 'ffn', 'rank': 2}]},
             ['lora']),
    'lora_with_tri_tuner': ({'tuners': LORA_TRI}, ['lora']),
    # a parallel prompt computes W_k P, W_v P itself: merging LoRA into qkv would change it, so LoRA stays
    'lora_unmergeable': ({'tuners': [{'type': 'prompt', 'op': 'mha', 'form': 'parallel', 'length': 3}],
                          'lora_length': 2}, []),
    # every kind whose class says mergeable folds in first (here RepAdapter and SSF)
    'repadapter_ssf': ({'tuners': [{'type': 'repadapter', 'op': 'mha', 'dim': 4}, {'type': 'ssf', 'op': 'block'},
                                   {'type': 'adapter', 'op': 'ffn', 'form': 'parallel', 'dim': 4}]},
                       ['repadapter', 'ssf']),
    'sequential_vpt_deep': ({'adapter_length': 4, 'prefix_length': 3, 'prompt_length': 3}, []),
    'sequential_per_layer_prompts': ({'prompt_length': [2, 3], 'adapter_length': [4, 0]}, []),
    'side_bitfit': ({'tuners': [{'type': 'side', 'dim': 32}, {'type': 'bitfit'}]}, []),
    'bypass': ({'tuners': TRI_TUNER, 'bypass': True}, []),
}

pytestmark = pytest.mark.usefixtures('one_thread')


def build(extra, seed=0):
    """A tiny model whose every trainable weight (tuners, biases, head) is moved away from its silent start."""
    torch.manual_seed(seed)
    model = VisionEfficientTuningModel(model_dir=None, backbone=dict(VIT, **extra), head={'num_classes': 3},
                                       CLASSES=list(CLASSES))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.2 if p.requires_grad else 0.05))
    return model.eval()


@pytest.mark.parametrize('case', sorted(CASES))
def test_onnxruntime_matches_torch_at_batch_1_and_3(case, tmp_path):
    extra, merged = CASES[case]
    model = build(extra)
    tuners_before = [name for name, _, _ in model.model.tuners()]
    result = export_onnx(model, str(tmp_path))
    assert sorted(result['merged']) == merged
    assert [name for name, _, _ in model.model.tuners()] == tuners_before  # the caller's model is not merged
    if case == 'lora_unmergeable':
        assert result['notes'] and 'not merged' in result['notes'][0]

    graph = onnx.load(os.path.join(tmp_path, ONNX_FILE)).graph
    (inp,) = graph.input
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param == 'batch' and [d.dim_value for d in dims[1:]] == [3, 32, 32]
    assert [o.name for o in graph.output] == ['scores', 'logits']
    assert not any(n.domain not in ('', 'ai.onnx', 'ai.onnx.ml') for n in graph.node)  # standard ops only
    for kind in merged:  # folded into the frozen weights: no tuner weights of that kind left in the graph
        assert not any(f'_{kind}.' in i.name for i in graph.initializer), kind
    if case == 'repadapter_ssf':  # the parallel adapter is no mergeable kind: it stays, as ordinary ops
        assert any('ffn_adapter.' in i.name for i in graph.initializer)

    clf = OnnxClassifier(str(tmp_path))
    for batch in (1, 3):
        x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            scores = model({'imgs': x})['scores']
            logits = model.model(x)
        got = clf.run(x)
        assert got['scores'].shape == (batch, 3)
        assert np.abs(got['scores'] - scores.numpy()).max() <= TOL
        assert np.abs(got['logits'] - logits.numpy()).max() <= TOL
    assert max(max_abs_difference(model, str(tmp_path)).values()) <= TOL


def test_cli_export_onnx_folder_runs_images_like_the_pipeline(tmp_path, capsys):
    cfg = {'framework': 'pytorch', 'task': 'vision-efficient-tuning', 'pipeline': {'type': 'vision-efficient-tuning'},
           'model': {'type': 'vision-efficient-tuning', 'backbone': dict(VIT, tuners=LORA_TRI),
                     'head': {'num_classes': 3}},
           'preprocessor': {'type': 'vision-efficient-tuning-preprocessor', 'img_size': 32, 'resize': 40,
                            'interpolation': 'bicubic', 'mean': [0.5, 0.4, 0.3], 'std': [0.2, 0.25, 0.3]}}
    model_dir = export_output(build({'tuners': LORA_TRI}), cfg,
                              str(tmp_path / 'model'))
    out = str(tmp_path / 'onnx')
    assert main(['export', model_dir, out, '--onnx']) == 0
    printed = capsys.readouterr().out
    assert 'merged into the frozen weights first: lora' in printed and 'batch 3:' in printed
    assert sorted(os.listdir(out)) == sorted([ONNX_FILE, CONFIG_FILE, PREPROCESSING_FILE])

    with open(os.path.join(out, PREPROCESSING_FILE)) as f:
        steps = json.load(f)['steps']
    assert any(s['op'] == 'resize_center_crop' and s['resize'] == {'shorter_side': 40}
               and s['crop'] == {'height': 32, 'width': 32} and s['interpolation'] == 'bicubic' for s in steps)
    assert any(s['op'] == 'normalize' and np.allclose(s['mean'], [0.5, 0.4, 0.3]) for s in steps)

    rng = np.random.default_rng(0)
    image = str(tmp_path / 'img.png')
    Image.fromarray(rng.integers(0, 256, (50, 60, 3), dtype=np.uint8)).save(image)
    expected = pipeline('vision-efficient-tuning', model_dir, device='cpu')(image, topk=3)
    got = OnnxClassifier(out)(image, topk=3)
    assert got['labels'] == expected['labels']
    np.testing.assert_allclose(got['scores'], expected['scores'], atol=TOL, rtol=0)

    # the ONNX folder is not a torch model folder: pipeline() refuses it instead of building random weights
    with pytest.raises(ValueError, match='is an ONNX export .*OnnxClassifier'):
        pipeline('vision-efficient-tuning', out, device='cpu')


def test_missing_onnxruntime_is_one_clear_line(tmp_path):
    """With onnxruntime unimportable (Python's own ``sys.modules[name] = None``), the command says what to
    install and exits 2 before loading anything."""
    code = ('import sys; sys.modules["onnxruntime"] = None\n'
            'from modelscope_utuning.cli import main\n'
            f'sys.exit(main(["export", "no-such-model-dir", {str(tmp_path / "out")!r}, "--onnx"]))')
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert 'onnxruntime' in lines[0] and "pip install 'modelscope-utuning[onnx]'" in lines[0]
    assert not os.path.exists(tmp_path / 'out')
