"""pipeline('vision-efficient-tuning', ...): the built-in's answers on hub-layout fixtures, every input form, batched
lists, top-k, devices, no network for local folders, clear refusals, a model cast to bf16."""
import json
import os
import pathlib
import socket

import numpy as np
import pytest
import torch
from PIL import Image

import modelscope_utuning  # noqa: F401  (registers our classes)
from modelscope.pipelines import pipeline
from modelscope_utuning import VisionEfficientTuningModel
from modelscope_utuning.pipeline import VisionEfficientTuningPipeline
from modelscope_utuning.preprocessing.image_io import ImageInputError
from modelscope_utuning.preprocessing.preprocessor import VisionEfficientTuningPreprocessor

from colour_runs import trained  # noqa: F401  (a fixture)

TASK = 'vision-efficient-tuning'
BUILTIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'builtin')
IMAGES = os.path.join(BUILTIN, 'images')
IMAGE_FILES = ['gray.png', 'photo.jpg', 'rgb.png', 'rgba.png']
RGB_PNG = os.path.join(IMAGES, 'rgb.png')
CASES = sorted(c for c in (os.listdir(BUILTIN) if os.path.isdir(BUILTIN) else [])
               if os.path.isfile(os.path.join(BUILTIN, c, 'expected.json')))
CLASSES = ['ant', 'bee', 'cat', 'dog', 'eel']


def make_model_dir(folder, img_size=32, classes=CLASSES, preprocessor=None, framework=True, seed=0):
    """A tiny hub-layout model folder (ViT: embed 32, depth 2, 4 heads; adapter; 5 classes)."""
    os.makedirs(folder, exist_ok=True)
    backbone = dict(img_size=img_size, patch_size=16, embed_dim=32, depth=2, num_heads=4, num_classes=0,
                    tuners=[{'type': 'adapter', 'dim': 8}])
    cfg = {'task': TASK, 'pipeline': {'type': TASK},
           'model': {'type': TASK, 'backbone': backbone, 'head': {'num_classes': 5}}}
    if framework:
        cfg['framework'] = 'pytorch'
    if preprocessor is not None:
        cfg['preprocessor'] = preprocessor
    with open(os.path.join(folder, 'configuration.json'), 'w') as f:
        json.dump(cfg, f)
    torch.manual_seed(seed)
    model = VisionEfficientTuningModel(model_dir=None, backbone=backbone, head={'num_classes': 5}, CLASSES=classes)
    with torch.no_grad():  # a trained-looking head whose logits are spread, so that the top-k order is not a tie
        model.head.fc.weight.normal_(0, 4, generator=torch.Generator().manual_seed(seed))
    model.save_hub_checkpoint(str(folder))
    return str(folder)


@pytest.fixture(scope='module')
def tiny_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp('tiny'),
                          preprocessor={'type': 'vision-efficient-tuning-preprocessor', 'resize': 40})


@pytest.fixture(scope='module')
def tiny(tiny_dir):
    return pipeline(TASK, tiny_dir, device='cpu')


class ForwardCounter:
    """Counts forwards of the real network and the batch size of each."""

    def __init__(self, pipe):
        self.sizes = []
        self.handle = pipe.model.model.register_forward_hook(lambda m, args, out: self.sizes.append(len(args[0])))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def close(a, b, tol=1e-6):
    return a['labels'] == b['labels'] and np.allclose(a['scores'], b['scores'], atol=tol, rtol=0)


# -- parity with ModelScope's built-in pipeline ------------------------------------------------------------------------
@pytest.mark.skipif(not CASES, reason='tests/fixtures/builtin has not been generated')
@pytest.mark.parametrize('case', CASES)
def test_matches_builtin_pipeline(case):
    folder = os.path.join(BUILTIN, case)
    with open(os.path.join(folder, 'expected.json')) as f:
        expected = json.load(f)
    pipe = pipeline(TASK, folder, device='cpu')
    assert isinstance(pipe, VisionEfficientTuningPipeline)
    assert isinstance(pipe.preprocessor, VisionEfficientTuningPreprocessor)
    results = pipe([os.path.join(IMAGES, f) for f in IMAGE_FILES])
    for fname, got in zip(IMAGE_FILES, results):
        want = expected['pipeline'][fname]
        assert got['labels'] == want['labels'], (case, fname)
        assert np.abs(np.array(got['scores']) - np.array(want['scores'])).max() < 1e-4, (case, fname)
    bgr = np.ascontiguousarray(np.asarray(Image.open(RGB_PNG))[:, :, ::-1])
    got = pipe(bgr)
    assert close(got, results[IMAGE_FILES.index('rgb.png')])
    builtin_bgr = expected.get('pipeline_bgr_array', {})
    if 'scores' in builtin_bgr:  # the built-in only takes arrays without a preprocessor section
        assert got['labels'] == builtin_bgr['labels']
        assert np.abs(np.array(got['scores']) - np.array(builtin_bgr['scores'])).max() < 1e-4
    if 'pipeline_other_arrays' in expected:
        # The built-in fails on HxW arrays and reverses all 4 channels of BGRA (giving A, R, G): we read them as
        # the gray / RGBA images they are.
        gray = np.asarray(Image.open(os.path.join(IMAGES, 'gray.png')))
        assert close(pipe(gray), results[IMAGE_FILES.index('gray.png')])
        bgra = np.asarray(Image.open(os.path.join(IMAGES, 'rgba.png')))[:, :, [2, 1, 0, 3]]
        assert close(pipe(bgra), results[IMAGE_FILES.index('rgba.png')])


# -- inputs --------------------------------------------------------------------------------------------------------
def test_every_input_form_of_one_image_gives_the_same_result(tiny):
    want = tiny(RGB_PNG)
    rgb = np.asarray(Image.open(RGB_PNG).convert('RGB'))
    for obj in (pathlib.Path(RGB_PNG), Image.open(RGB_PNG), Image.open(RGB_PNG).convert('RGBA'),
                np.ascontiguousarray(rgb[:, :, ::-1]), rgb[:, :, ::-1].astype(np.float32) / 255,
                open(RGB_PNG, 'rb').read(), {'img_path:FILE': RGB_PNG}, {'image': RGB_PNG},
                {'image': Image.open(RGB_PNG), 'label': 3}):
        assert close(tiny(obj), want), type(obj)


def test_a_list_runs_in_batches_and_matches_single_calls(tiny):
    inputs = [RGB_PNG, Image.open(os.path.join(IMAGES, 'photo.jpg')),
              np.asarray(Image.open(os.path.join(IMAGES, 'gray.png')))]
    singles = [tiny(x) for x in inputs]
    with ForwardCounter(tiny) as counter:
        results = tiny(inputs)
    assert counter.sizes == [3]
    assert len(results) == 3 and all(close(r, s, 1e-5) for r, s in zip(results, singles))
    with ForwardCounter(tiny) as counter:
        assert len(tiny(inputs, batch_size=2)) == 3
    assert counter.sizes == [2, 1]
    assert tiny([]) == []


def test_pipeline_batch_size_argument(tiny_dir):
    pipe = VisionEfficientTuningPipeline(tiny_dir, device='cpu', batch_size=2)
    with ForwardCounter(pipe) as counter:
        pipe([RGB_PNG] * 5)
    assert counter.sizes == [2, 2, 1]
    with pytest.raises(ValueError, match='batch_size=0: expected a positive integer'):
        pipe([RGB_PNG], batch_size=0)


def test_topk_and_labels(tiny, tmp_path):
    out = tiny(RGB_PNG)
    assert len(out['scores']) == 5 and sorted(out['labels']) == sorted(CLASSES)
    assert out['scores'] == sorted(out['scores'], reverse=True) and abs(sum(out['scores']) - 1) < 1e-5
    top2 = tiny(RGB_PNG, topk=2)
    assert top2['labels'] == out['labels'][:2] and top2['scores'] == out['scores'][:2]
    assert len(tiny(RGB_PNG, topk=50)['scores']) == 5  # never more than the class count
    assert [len(r['labels']) for r in tiny([RGB_PNG, RGB_PNG], topk=1)] == [1, 1]
    for bad in (0, -1, 2.5, 'three'):
        with pytest.raises(ValueError, match='topk=.*expected a positive integer'):
            tiny(RGB_PNG, topk=bad)
    with pytest.raises(ValueError, match=r"unknown pipeline argument\(s\) \['top_k'\]"):
        tiny(RGB_PNG, top_k=2)
    unnamed = pipeline(TASK, make_model_dir(tmp_path / 'unnamed', classes=None, framework=False), device='cpu',
                       topk=3)
    out = unnamed(RGB_PNG)
    assert len(out['labels']) == 3 and all(label in {'0', '1', '2', '3', '4'} for label in out['labels'])


def test_bad_inputs_are_refused_naming_them(tiny, tmp_path):
    missing = str(tmp_path / 'missing.jpg')
    empty = tmp_path / 'empty.png'
    empty.write_bytes(b'')
    for obj, message in ((None, 'image input is None'),
                         (missing, f"image file '{missing}' does not exist"),
                         (str(empty), 'is empty (0 bytes)'),
                         (np.zeros((4, 4, 2), np.uint8), 'numpy array of shape (4, 4, 2)'),
                         (np.zeros((4, 4), np.complex64), 'dtype complex64'),
                         ({'img': RGB_PNG}, 'no image key'),
                         (3.5, 'unsupported image input builtins.float 3.5')):
        with pytest.raises(ImageInputError) as err:
            tiny(obj)
        assert isinstance(err.value, ValueError) and message in str(err.value), message
    with pytest.raises(ImageInputError, match=r"input \[1\] of the list: image file '.*missing.jpg' does not exist"):
        tiny([RGB_PNG, missing, RGB_PNG])


# -- model sizes, preprocessors --------------------------------------------------------------------------------------
def test_img_size_of_the_model_drives_the_default_preprocessor(tmp_path):
    for size in (48, 64):
        folder = make_model_dir(tmp_path / f'px{size}', img_size=size)
        pipe = pipeline(TASK, folder, device='cpu')
        assert pipe.preprocessor.output_size == (size, size)
        assert pipe.preprocessor.eval_transform.transforms[0].size == int(size / 0.875)
        assert len(pipe(RGB_PNG)['scores']) == 5


def test_preprocessor_that_does_not_fit_the_model_is_refused(tmp_path):
    folder = make_model_dir(tmp_path / 'mismatch', preprocessor={'img_size': 48})
    pre = VisionEfficientTuningPreprocessor(img_size=48)
    with pytest.raises(ValueError, match=r'crops \(48, 48\) images but the model takes \(32, 32\)'):
        VisionEfficientTuningPipeline(folder, device='cpu', preprocessor=pre)
    # the section's img_size yields to the model's when we build the preprocessor ourselves
    assert pipeline(TASK, folder, device='cpu').preprocessor.output_size == (32, 32)


def test_a_given_preprocessor_is_used(tiny_dir, tiny):
    pre = VisionEfficientTuningPreprocessor(img_size=32, resize=64)
    pipe = VisionEfficientTuningPipeline(tiny_dir, device='cpu', preprocessor=pre)
    assert pipe.preprocessor is pre
    assert not close(pipe(RGB_PNG), tiny(RGB_PNG), 1e-7)


# -- devices and the network -----------------------------------------------------------------------------------------
def test_devices(tiny_dir):
    for device in ('cpu', torch.device('cpu')):
        pipe = VisionEfficientTuningPipeline(tiny_dir, device=device)
        pipe(RGB_PNG)
        assert next(pipe.model.parameters()).device.type == 'cpu'
    if not torch.cuda.is_available():  # ModelScope's fallback: the CPU
        for device in ('gpu', 'cuda', 'cuda:1'):
            pipe = VisionEfficientTuningPipeline(tiny_dir, device=device)
            assert pipe.device == torch.device('cpu') and len(pipe(RGB_PNG)['scores']) == 5
    else:
        pipe = VisionEfficientTuningPipeline(tiny_dir, device='gpu')
        pipe(RGB_PNG)
        assert next(pipe.model.parameters()).device.type == 'cuda'
        n = torch.cuda.device_count()
        with pytest.raises(ValueError, match=f'only {n} CUDA device'):
            VisionEfficientTuningPipeline(tiny_dir, device=f'cuda:{n}')
    for bad in ('tpu', 'cuda:x', 'gpu:0:1', ''):
        with pytest.raises(ValueError, match='expected .cpu., .gpu., .cuda.'):
            VisionEfficientTuningPipeline(tiny_dir, device=bad)


@pytest.fixture
def no_network(monkeypatch):
    """Every attempt to resolve or reach a host is recorded and fails at once."""
    attempts = []

    def refuse_lookup(host, *args, **kwargs):
        attempts.append(host)
        raise socket.gaierror(f'network disabled in this test ({host})')

    def refuse_connect(sock, address, *args):
        attempts.append(address)
        raise OSError(f'network disabled in this test ({address})')

    monkeypatch.setattr(socket, 'getaddrinfo', refuse_lookup)
    monkeypatch.setattr(socket.socket, 'connect', refuse_connect)
    return attempts


def test_local_model_folders_never_touch_the_network(tiny_dir, no_network, monkeypatch):
    out = pipeline(TASK, tiny_dir, device='cpu')(RGB_PNG)  # an absolute path, through ModelScope's factory
    assert len(out['scores']) == 5
    parent, name = os.path.split(tiny_dir)
    monkeypatch.chdir(parent)
    assert VisionEfficientTuningPipeline(name, device='cpu')(RGB_PNG) == out  # a relative one, our class
    for missing in ('does/not/exist/here', './nope', '../nope', '/abs/nope'):
        with pytest.raises(ValueError, match=f"'{missing}': not a model folder"):
            VisionEfficientTuningPipeline(missing, device='cpu')
    empty = pathlib.Path(parent) / 'no_config'
    empty.mkdir(exist_ok=True)
    with pytest.raises(ValueError, match='has no configuration.json'):
        VisionEfficientTuningPipeline(str(empty), device='cpu')
    assert no_network == []


# -- a model in bf16 predicts (issue 11) -------------------------------------------------------------------------------
@pytest.mark.usefixtures('one_thread')
def test_pipeline_runs_a_bf16_model(trained):
    root, out = trained
    p = pipeline('vision-efficient-tuning', out, device='cpu')
    want = p(os.path.join(root, 'train', 'c', '1.png'))
    p.model.to(torch.bfloat16)
    got = p(os.path.join(root, 'train', 'c', '1.png'))
    assert got['labels'][0] == want['labels'][0] == 'c'
