"""preprocessing.json is enough to run an ONNX export without this package: a reader written here from the file's
documented schema alone (numpy + Pillow; nothing of modelscope_utuning's preprocessing imported) prepares, for
every kind of image the pipeline accepts, the tensor the pipeline's preprocessor prepares, and onnxruntime fed with
it gives the pipeline's top-1 and scores. Three exports: our preprocessor section (bicubic, own mean / std), a
hub-layout model folder (ModelScope transform lists, built-in keys) and a ModelScope list whose resize and crop are
separate steps with a crop larger than the resized image (zero padding)."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import modelscope_utuning  # noqa: F401  (registers the plugin)
from modelscope.pipelines import pipeline
from modelscope_utuning.cli import main
from modelscope_utuning.model import VisionEfficientTuningModel
from modelscope_utuning.training.export import export_output

ort = pytest.importorskip('onnxruntime')
pytest.importorskip('onnxscript')

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures', 'builtin')
VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4)
TUNERS = [{'type': 'adapter', 'op': 'mha', 'form': 'parallel', 'dim': 4},
          {'type': 'prefix', 'op': 'block', 'form': 'parallel', 'length': 3}]
CLASSES = ['bird', 'cat', 'dog', 'eel', 'fox']
TENSOR_TOL = 1e-6
SCORE_TOL = 1e-4

pytestmark = pytest.mark.usefixtures('one_thread')


# -- the independent reader: numpy + Pillow, following preprocessing.json ----------------------------------------
def _gray3(g: np.ndarray) -> np.ndarray:
    return np.repeat(g[..., None], 3, axis=2)


def _float_rule(a: np.ndarray, rule: dict) -> np.ndarray:
    a = a.astype(np.float64)
    assert np.isfinite(a).all() and a.min() >= 0 and a.max() <= 255, 'refused by the float rule'
    scale = rule['multiply_by']['max <= 1'] if a.max() <= 1 else rule['multiply_by']['otherwise']
    return np.clip(np.rint(a * scale), *rule['clip']).astype(np.uint8)


def _mode_to_rgb(img: Image.Image, load: dict) -> np.ndarray:
    rule = load['modes'].get(img.mode, load['other_modes'])
    kind = rule['rule']
    if kind == 'channels':
        a = np.asarray(img)
        a = a[..., None] if a.ndim == 2 else a
        return np.ascontiguousarray(a[..., rule['take']]).astype(np.uint8)
    if kind == 'bilevel':
        return _gray3(np.where(np.asarray(img), rule['set'], rule['unset']).astype(np.uint8))
    if kind == 'palette':
        idx = np.asarray(img)
        idx = idx[..., 0] if idx.ndim == 3 else idx  # PA: band 0 is the index, band 1 the (dropped) alpha
        pal = np.asarray(img.getpalette('RGB') or [], dtype=np.uint8).reshape(-1, 3)
        table = np.zeros((256, 3), np.uint8)
        table[:] = rule['missing_entries']
        table[:len(pal)] = pal[:256]
        return table[idx]
    if kind == 'scale':
        a = np.asarray(img).astype(np.float64)
        return _gray3(np.clip(np.rint(a / rule['divide_by']), *rule['clip']).astype(np.uint8))
    if kind == 'clip':
        return _gray3(np.clip(np.asarray(img).astype(np.int64), *rule['clip']).astype(np.uint8))
    if kind == 'float':
        return _gray3(_float_rule(np.asarray(img), load['float_rule']))
    if kind == 'cmyk':
        a = np.asarray(img).astype(np.int64)
        nk = 255 - a[..., 3:4]
        t = a[..., :3] * nk + 128
        return np.clip(nk - (((t >> 8) + t) >> 8), 0, 255).astype(np.uint8)
    assert kind == 'pillow_convert', kind
    if rule.get('via'):
        img = img.convert(rule['via'])
    return np.asarray(img.convert('RGB'))


def reference_rgb(obj, spec: dict) -> np.ndarray:
    """Any accepted input -> uint8 (H, W, 3), as spec['load'] says."""
    load = spec['load']
    if isinstance(obj, np.ndarray):
        arrays = load['arrays']
        a = obj[:, :, 0] if obj.ndim == 3 and obj.shape[2] == 1 else obj
        if a.dtype != np.uint8:
            if a.dtype.kind == 'f':
                a = _float_rule(a, load['float_rule'])
            else:
                assert a.dtype.kind in 'iu' and a.min() >= 0 and a.max() <= 255
                a = a.astype(np.uint8)
        key = 'HxW' if a.ndim == 2 else f'HxWx{a.shape[2]}'
        take = arrays['rgb_from_channels'][key]
        return np.ascontiguousarray((a[..., None] if a.ndim == 2 else a)[..., take])
    if isinstance(obj, (str, os.PathLike)):
        img = Image.open(obj)
        img.load()
        orient = True
    else:
        img, orient = obj, obj.format is not None  # a PIL.Image: oriented when straight from Image.open
    if orient:
        o = img.getexif().get(load['exif_orientation']['tag'], 1)
        name = load['exif_orientation']['transpose'].get(str(o))
        if name:
            img = img.transpose(Image.Transpose[name])
    return _mode_to_rgb(img, load)


def _resized_size(w: int, h: int, resize: dict):
    if 'height' in resize:
        return resize['width'], resize['height']
    s = resize['shorter_side']
    return (s, s * h // w) if w <= h else (s * w // h, s)


def _center_crop(img: Image.Image, ch: int, cw: int) -> Image.Image:
    w, h = img.size
    top = -((ch - h) // 2) if ch > h else round((h - ch) / 2)  # Python's round: half to even
    left = -((cw - w) // 2) if cw > w else round((w - cw) / 2)
    return img.crop((left, top, left + cw, top + ch))


def _resize(img: Image.Image, size, flt: int) -> Image.Image:
    return img if size == img.size else img.resize(size, flt)


def reference_tensor(obj, spec: dict) -> np.ndarray:
    """Any accepted input -> float32 (3, H, W), following preprocessing.json."""
    img = Image.fromarray(reference_rgb(obj, spec), 'RGB')
    x = None
    for step in spec['steps']:
        op = step['op']
        if op == 'resize_center_crop':
            w, h = img.size
            nw, nh = _resized_size(w, h, step['resize'])
            ch, cw = step['crop']['height'], step['crop']['width']
            flt = Image.Resampling[step['interpolation'].upper()]
            assert int(flt) == step['pillow_filter']
            if nw * nh <= step['region_above'] * cw * ch or cw > nw or ch > nh:
                img = _center_crop(_resize(img, (nw, nh), flt), ch, cw)
            else:
                top, left = round((nh - ch) / 2), round((nw - cw) / 2)
                sx, sy = w / nw, h / nh
                img = img.resize((cw, ch), flt, box=(left * sx, top * sy, (left + cw) * sx, (top + ch) * sy))
        elif op == 'resize':
            flt = Image.Resampling[step['interpolation'].upper()]
            img = _resize(img, _resized_size(*img.size, step['resize']), flt)
        elif op == 'center_crop':
            img = _center_crop(img, step['height'], step['width'])
        elif op == 'to_float':
            x = (np.asarray(img).astype(np.float32) / np.float32(step['divide_by'])).transpose(2, 0, 1)
        elif op == 'normalize':
            mean = np.asarray(step['mean'], np.float32)[:, None, None]
            std = np.asarray(step['std'], np.float32)[:, None, None]
            x = (x - mean) / std
        else:
            raise AssertionError(f'unknown step {op!r}')
    assert list(x.shape) == spec['input']['shape'][1:]
    return np.ascontiguousarray(x, dtype=np.float32)


# -- every kind of image the pipeline accepts ----------------------------------------------------------------------
def _rgb(h, w, seed):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    base[..., 0] = (xx * 255 // max(w - 1, 1)).astype(np.uint8)  # structure, so orientation and crops matter
    return base


def image_inputs(folder) -> dict:
    """name -> input (a path, a PIL.Image or a numpy array)."""
    os.makedirs(folder, exist_ok=True)
    p = lambda name: os.path.join(folder, name)  # noqa: E731
    rgb = _rgb(50, 60, 0)
    rng = np.random.default_rng(1)
    out = {}
    Image.fromarray(rgb).save(p('rgb.png'))
    out['rgb_png'] = p('rgb.png')
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: the pipeline turns it upright
    Image.fromarray(_rgb(40, 70, 2)).save(p('exif6.jpg'), exif=exif.tobytes(), quality=95)
    out['jpeg_exif_orientation_6'] = p('exif6.jpg')
    out['pil_from_image_open_exif'] = Image.open(p('exif6.jpg'))
    out['pil_in_memory_rgb'] = Image.fromarray(rgb)
    Image.fromarray(rgb[..., 1]).save(p('l.png'))
    out['l_png'] = p('l.png')
    Image.fromarray(np.dstack([rgb[..., 2], rgb[..., 0]]), 'LA').save(p('la.png'))
    out['la_png'] = p('la.png')
    Image.fromarray(np.dstack([rgb, rng.integers(0, 256, (50, 60), dtype=np.uint8)]), 'RGBA').save(p('rgba.png'))
    out['rgba_png'] = p('rgba.png')
    pal = Image.fromarray(rgb).quantize(colors=64)
    pal.save(p('p.png'))
    out['p_png'] = p('p.png')
    pal.save(p('p_trns.png'), transparency=3)
    out['p_with_transparency_png'] = p('p_trns.png')
    assert 'transparency' in Image.open(p('p_trns.png')).info
    short = Image.fromarray(rng.integers(0, 20, (50, 60), dtype=np.uint8), 'P')
    short.putpalette(list(rng.integers(0, 256, 30, dtype=np.uint8)))  # 10 entries: indices 10..19 have none
    out['pil_p_short_palette'] = short
    out['pil_pa'] = Image.fromarray(np.dstack([np.asarray(pal), rgb[..., 0]]), 'PA')
    out['pil_pa'].putpalette(pal.getpalette())
    g16 = (rng.integers(0, 65536, (50, 60))).astype(np.uint16)
    g16[:, :8] = np.arange(8) * 9000 + 100  # levels where saturating and scaling differ
    Image.fromarray(g16).save(p('g16.png'))
    assert Image.open(p('g16.png')).mode == 'I;16'
    out['i16_gray_png'] = p('g16.png')
    out['pil_i16b'] = Image.fromarray(g16.astype('>u2'))
    i32 = rng.integers(-500, 3000, (50, 60)).astype(np.int32)
    Image.fromarray(i32).save(p('i32.tif'))
    assert Image.open(p('i32.tif')).mode == 'I'
    out['i_mode_tiff'] = p('i32.tif')
    Image.fromarray(rng.random((50, 60)).astype(np.float32)).save(p('f01.tif'))
    out['f_mode_tiff_0_1'] = p('f01.tif')
    Image.fromarray((rng.random((50, 60)) * 255).astype(np.float32)).save(p('f255.tif'))
    out['f_mode_tiff_0_255'] = p('f255.tif')
    Image.fromarray(rgb[..., 0] > 127).save(p('bilevel.png'))
    assert Image.open(p('bilevel.png')).mode == '1'
    out['bilevel_png'] = p('bilevel.png')
    Image.fromarray(rgb).convert('CMYK').save(p('cmyk.jpg'), quality=95)
    assert Image.open(p('cmyk.jpg')).mode == 'CMYK'
    out['cmyk_jpeg'] = p('cmyk.jpg')
    out['pil_rgba_premultiplied'] = Image.open(p('rgba.png')).convert('RGBa')
    out['pil_ycbcr'] = Image.fromarray(rgb).convert('YCbCr')
    out['array_hw_uint8'] = rgb[..., 0].copy()
    out['array_hwx1_uint8'] = rgb[..., 1:2].copy()
    out['array_hwx3_bgr'] = rgb[..., ::-1].copy()
    out['array_hwx4_bgra'] = np.dstack([rgb[..., ::-1], rng.integers(0, 256, (50, 60), dtype=np.uint8)])
    out['array_float_0_1'] = rng.random((50, 60, 3)).astype(np.float32)
    out['array_float_0_255_gray'] = rng.random((50, 60)) * 255
    out['array_int16'] = rgb.astype(np.int16)
    Image.fromarray(_rgb(16, 200, 3)).save(p('wide.png'))  # 12.5:1: only the cropped region is resampled
    out['very_wide_png'] = p('wide.png')
    Image.fromarray(_rgb(9, 7, 4)).save(p('tiny.png'))
    out['tiny_png'] = p('tiny.png')
    return out


# -- the exports ---------------------------------------------------------------------------------------------------
def _tiny_model(seed=0):
    torch.manual_seed(seed)
    model = VisionEfficientTuningModel(model_dir=None, backbone=dict(VIT, tuners=TUNERS),
                                       head={'num_classes': len(CLASSES)}, CLASSES=list(CLASSES))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.3 if p.requires_grad else 0.05))
    return model.eval()


def _config(preprocessor):
    return {'framework': 'pytorch', 'task': 'vision-efficient-tuning', 'pipeline': {'type': 'vision-efficient-tuning'},
            'model': {'type': 'vision-efficient-tuning', 'backbone': dict(VIT, tuners=TUNERS),
                      'head': {'num_classes': len(CLASSES)}},
            'preprocessor': preprocessor}


def _ms_list(*middle):
    return ([{'type': 'Rename', 'input_keys': ['img_path:FILE'], 'output_keys': ['filename']},
             {'type': 'load-image', 'mode': 'rgb'}] + list(middle)
            + [{'type': 'ImageToTensor'}, {'type': 'Normalize', 'mean': [0.5, 0.45, 0.4], 'std': [0.25, 0.2, 0.3]}])


MODELS = {
    'ours': _config({'type': 'vision-efficient-tuning-preprocessor', 'img_size': 32, 'resize': 40,
                     'interpolation': 'bicubic', 'mean': [0.5, 0.4, 0.3], 'std': [0.2, 0.25, 0.3]}),
    # separate resize and crop (Identity between them), the crop larger than the resized image: zero padding
    'modelscope_list_padded': _config({'type': 'image-classification-preprocessor',
                                       'val': _ms_list({'type': 'Resize', 'size': 28, 'interpolation': 'bilinear'},
                                                       {'type': 'Identity'}, {'type': 'CenterCrop', 'size': 32})}),
    'hub_layout': None,  # tests/fixtures/builtin/adapter: ModelScope's own configuration.json and keys
}


@pytest.fixture(scope='module')
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp('preprocessing_json')
    out = {}
    for name, cfg in MODELS.items():
        if cfg is None:
            model_dir = str(root / name)
            shutil.copytree(os.path.join(FIXTURES, 'adapter'), model_dir)
        else:
            model_dir = export_output(_tiny_model(), cfg, str(root / name))
        onnx_dir = str(root / f'{name}_onnx')
        assert main(['export', model_dir, onnx_dir, '--onnx']) == 0
        out[name] = (model_dir, onnx_dir)
    return out


@pytest.fixture(scope='module')
def images(tmp_path_factory):
    return image_inputs(str(tmp_path_factory.mktemp('images')))


def _spec(onnx_dir):
    with open(os.path.join(onnx_dir, 'preprocessing.json')) as f:
        return json.load(f)


@pytest.mark.parametrize('name', sorted(MODELS))
def test_every_export_writes_a_complete_preprocessing_json(name, exports):
    spec = _spec(exports[name][1])
    assert spec['schema'] == 'modelscope-utuning/preprocessing' and spec['schema_version'] == 2
    for mode in ('RGB', 'RGBA', 'L', 'LA', '1', 'P', 'PA', 'I;16', 'I;16B', 'I', 'F', 'CMYK'):
        assert mode in spec['load']['modes'], mode
    assert spec['load']['exif_orientation']['transpose']['6'] == 'ROTATE_270'
    assert spec['left_out'] and spec['classes'] is not None
    ops = [s['op'] for s in spec['steps']]
    assert ops[-2:] == ['to_float', 'normalize']


@pytest.mark.parametrize('name', sorted(MODELS))
def test_independent_reader_gives_the_pipeline_tensor_and_scores(name, exports, images):
    model_dir, onnx_dir = exports[name]
    spec = _spec(onnx_dir)
    session = ort.InferenceSession(os.path.join(onnx_dir, 'model.onnx'), providers=['CPUExecutionProvider'])
    pipe = pipeline('vision-efficient-tuning', model_dir, device='cpu')
    classes = spec['classes']
    checked = []
    for kind, image in images.items():
        expected_tensor = pipe.preprocessor(image)['imgs'].numpy()
        got = reference_tensor(image, spec)
        assert got.shape == expected_tensor.shape, kind
        diff = float(np.abs(got - expected_tensor).max())
        assert diff <= TENSOR_TOL, f'{name} / {kind}: reader differs from the pipeline by {diff}'

        expected = pipe(image, topk=len(classes))
        scores = session.run(['scores'], {spec['input']['name']: got[None]})[0][0]
        order = np.argsort(-scores, kind='stable')
        assert classes[order[0]] == expected['labels'][0], f'{name} / {kind}: top-1 differs'
        by_label = dict(zip(expected['labels'], expected['scores']))
        worst = max(abs(float(scores[i]) - by_label[c]) for i, c in enumerate(classes))
        assert worst <= SCORE_TOL, f'{name} / {kind}: scores differ by {worst}'
        checked.append(kind)
    assert len(checked) == len(images)


def test_the_rules_matter(images, exports):
    """The cases the old description got wrong: a literal 'convert to RGB' saturates a 16-bit PNG, and EXIF
    orientation turns the picture; the reader follows the file, not Pillow's convert."""
    spec = _spec(exports['ours'][1])
    g16 = Image.open(images['i16_gray_png'])
    naive = np.asarray(g16.convert('RGB'))
    assert not np.array_equal(naive, reference_rgb(images['i16_gray_png'], spec))
    upright = reference_rgb(images['jpeg_exif_orientation_6'], spec)
    assert upright.shape[:2] == (70, 40)  # saved 70 wide and 40 high, tagged as turned


def test_a_random_eval_step_is_refused_by_name(tmp_path):
    from modelscope_utuning.deploy.onnx_export import export_onnx
    cfg = _config({'type': 'image-classification-preprocessor',
                   'val': _ms_list({'type': 'RandomResizedCrop', 'size': 32})})
    with pytest.raises(ValueError, match='RandomResizedCrop.*cannot be written to preprocessing.json'):
        export_onnx(_tiny_model(), str(tmp_path / 'onnx'), cfg=cfg)
    assert not os.path.exists(tmp_path / 'onnx' / 'model.onnx')
