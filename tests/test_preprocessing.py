"""Image loading, transforms and the preprocessor: torchvision's numbers without torchvision, every input kind,
configuration mapping, clear refusals of bad input, and any image shape in bounded memory."""
import hashlib
import http.server
import io
import json
import os
import pathlib
import pickle
import struct
import subprocess
import sys
import textwrap
import threading
import zlib

import numpy as np
import PIL
import pytest
import torch
from PIL import Image

from modelscope_utuning.preprocessing import transforms as T
from modelscope_utuning.preprocessing.image_io import ImageInputError, load_image
from modelscope_utuning.preprocessing.preprocessor import VisionEfficientTuningPreprocessor
from modelscope.utils.constant import ModeKeys

from colour_runs import trained  # noqa: F401  (a fixture)

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures')
BUILTIN = os.path.join(FIXTURES, 'builtin')
IMAGES = os.path.join(BUILTIN, 'images')
PILLOW_MAJOR = int(PIL.__version__.split('.')[0])
# torchvision's outputs as made with this Pillow major (its resampling changes between majors; torchvision uses it)
REFERENCE = os.path.join(FIXTURES, 'transforms_reference.npz' if PILLOW_MAJOR == 13 else
                         f'transforms_reference_pillow{PILLOW_MAJOR}.npz')
RGB_PNG = os.path.join(IMAGES, 'rgb.png')
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
# The eval cases of tests/fixtures/make_transform_fixtures.py: name -> (resize, crop, interpolation)
EVAL_CASES = {
    'r20c16_bilinear': (20, 16, 'bilinear'),
    'r20c16_bicubic': (20, 16, 'bicubic'),
    'r20c16_nearest': (20, 16, 'nearest'),
    'r15c15_bilinear': (15, 15, 'bilinear'),
    'r11c14_bilinear': (11, 14, 'bilinear'),
    'r12x18c10x7_bilinear': ([12, 18], [10, 7], 'bilinear'),
}


@pytest.fixture(scope='module')
def reference():
    if not os.path.isfile(REFERENCE):
        pytest.fail(f'no torchvision reference for Pillow {PIL.__version__}: make {os.path.basename(REFERENCE)} '
                    'with tests/fixtures/make_transform_fixtures.py')
    with np.load(REFERENCE) as data:
        ref = {k: data[k] for k in data.files}
    made_with = str(ref.pop('pillow_version', '13.0.0'))
    assert int(made_with.split('.')[0]) == PILLOW_MAJOR, (made_with, PIL.__version__)
    return ref


def sources(reference):
    return sorted(int(k.split('_')[1]) for k in reference if k.startswith('src_'))


def png_header(width, height):
    """A tiny PNG whose header claims width x height (a decompression bomb as far as the header goes)."""
    def chunk(kind, data):
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data) & 0xffffffff)
    ihdr = struct.pack('>IIBBBBB', width, height, 8, 0, 0, 0, 0)
    return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr) + chunk(b'IDAT', zlib.compress(b'\x00' * 16))
            + chunk(b'IEND', b''))


def write(path, data):
    with open(path, 'wb') as f:
        f.write(data)
    return str(path)


def rgb_image(w=40, h=30, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


# -- transforms against torchvision's outputs (precomputed) ------------------------------------------------------------
def test_eval_resize_and_crop_match_torchvision_exactly(reference):
    for i in sources(reference):
        img = Image.fromarray(reference[f'src_{i}'])
        for name, (size, crop, interp) in EVAL_CASES.items():
            got = np.asarray(T.center_crop(T.resize(img, size, interp), crop))
            want = reference[f'eval_{i}_{name}']
            assert got.shape == want.shape and np.array_equal(got, want), (i, name)


def test_eval_transform_floats_match_torchvision_exactly(reference):
    for i in sources(reference):
        got = T.eval_transform(16, resize_to=20)(Image.fromarray(reference[f'src_{i}']))
        assert got.dtype == torch.float32
        assert np.array_equal(got.numpy(), reference[f'norm_{i}']), i


def test_default_eval_on_fixture_images_matches_torchvision_resize256_crop224(reference):
    expected = json.loads(str(reference['builtin_sha256']))
    assert sorted(expected) == ['gray.png', 'photo.jpg', 'rgb.png', 'rgba.png']
    for fname, digest in expected.items():
        img = load_image(os.path.join(IMAGES, fname))
        crop = np.ascontiguousarray(np.asarray(T.center_crop(T.resize(img, 256), 224)))
        assert crop.shape == (224, 224, 3)
        assert hashlib.sha256(crop.tobytes()).hexdigest() == digest, fname


def test_random_resized_crop_params_follow_torchvision_sampling(reference):
    rows = reference['rrc_params']
    for seed in sorted(set(rows[:, 6].tolist())):
        torch.manual_seed(seed)
        for w, h, top, left, ch, cw, _ in rows[rows[:, 6] == seed].tolist():
            assert T.random_resized_crop_params(w, h) == (top, left, ch, cw), (w, h, seed)


def test_random_resized_crop_flip_and_color_jitter_match_torchvision(reference):
    for i in sources(reference):
        img = Image.fromarray(reference[f'src_{i}'])
        torch.manual_seed(7 + i)
        got = T.RandomHorizontalFlip()(T.RandomResizedCrop(12)(img))
        assert np.array_equal(np.asarray(got), reference[f'rrc_{i}']), i
        torch.manual_seed(11 + i)
        assert np.array_equal(np.asarray(T.ColorJitter(0.4, 0.4, 0.4, 0.1)(img)), reference[f'jitter_{i}']), i


@pytest.mark.parametrize('img_size, resize', [(224, 256), (112, 128), (384, 438), (32, 36)])
def test_model_img_size_drives_eval_sizes(tmp_path, img_size, resize):
    assert T.resize_for(img_size) == resize
    with open(tmp_path / 'configuration.json', 'w') as f:
        json.dump({'model': {'backbone': {'img_size': img_size}}}, f)
    pre = VisionEfficientTuningPreprocessor.from_model_dir(str(tmp_path))
    assert pre.output_size == (img_size, img_size)
    assert pre.eval_transform.transforms[0].size == resize
    assert pre(rgb_image(50, 40))['imgs'].shape == (3, img_size, img_size)
    pre.mode = ModeKeys.TRAIN
    assert pre(rgb_image(50, 40))['imgs'].shape == (3, img_size, img_size)


def test_train_transform_is_seeded_random_and_differs_from_eval():
    pre = VisionEfficientTuningPreprocessor(mode=ModeKeys.TRAIN, img_size=32)
    img = rgb_image(64, 48)
    torch.manual_seed(3)
    a = pre(img)['imgs']
    torch.manual_seed(3)
    assert torch.equal(a, pre(img)['imgs'])
    assert not torch.equal(a, pre(img)['imgs'])
    pre.mode = ModeKeys.EVAL
    assert torch.equal(pre(img)['imgs'], pre(img)['imgs'])


# -- configuration ---------------------------------------------------------------------------------------------------
def builtin_config(case):
    with open(os.path.join(BUILTIN, case, 'configuration.json')) as f:
        return json.load(f)


def test_modelscope_classification_lists_give_the_default_numbers():
    cfg = builtin_config('adapter')
    assert cfg['preprocessor']['type'] == 'image-classification-preprocessor'
    listed = VisionEfficientTuningPreprocessor.from_model_dir(os.path.join(BUILTIN, 'adapter'))
    default = VisionEfficientTuningPreprocessor(img_size=224)
    for fname in ('rgb.png', 'photo.jpg', 'gray.png', 'rgba.png'):
        path = os.path.join(IMAGES, fname)
        out = listed({'img_path:FILE': path, 'label': 2})
        assert torch.equal(out['imgs'], default(path)['imgs']), fname
        assert out['labels'].dtype == torch.int64 and out['labels'].shape == () and int(out['labels']) == 2
    train = VisionEfficientTuningPreprocessor.from_model_dir(os.path.join(BUILTIN, 'adapter'), cfg=cfg,
                                                            mode=ModeKeys.TRAIN)
    out = train({'image': Image.open(RGB_PNG), 'label': 1})
    assert out['imgs'].shape == (3, 224, 224) and int(out['labels']) == 1


def test_our_preprocessor_section_sets_sizes_interpolation_and_normalisation(tmp_path):
    section = {'type': 'vision-efficient-tuning-preprocessor', 'img_size': 24, 'resize': 30,
               'interpolation': 'bicubic', 'mean': [0.5, 0.5, 0.5], 'std': [0.25, 0.25, 0.25],
               'train': {'scale': [0.5, 1.0], 'hflip': 0.0, 'color_jitter': [0.2, 0.2, 0.2, 0.05]}}
    pre = VisionEfficientTuningPreprocessor.from_model_dir(cfg={'preprocessor': section})
    img = rgb_image(50, 40)
    want = T.normalize(T.to_tensor(T.center_crop(T.resize(img, 30, 'bicubic'), 24)), [.5] * 3, [.25] * 3)
    assert torch.equal(pre(img)['imgs'], want)
    kinds = [type(t).__name__ for t in pre.train_transform.transforms]
    assert kinds == ['RandomResizedCrop', 'ColorJitter', 'ToTensor', 'Normalize']
    # crop_pct instead of resize; the model's img_size wins over the section's
    pre = VisionEfficientTuningPreprocessor.from_model_dir(
        cfg={'preprocessor': {'crop_pct': 0.8}, 'model': {'backbone': {'img_size': 40}}})
    assert pre.eval_transform.transforms[0].size == 50 and pre.output_size == (40, 40)
    pre = VisionEfficientTuningPreprocessor.from_model_dir(cfg={'preprocessor': {'img_size': 24}}, img_size=32)
    assert pre.output_size == (32, 32)


def test_per_mode_sections_and_modelscope_registry(tmp_path):
    cfg = {'task': 'vision-efficient-tuning', 'model': {'type': 'vision-efficient-tuning'},
           'preprocessor': {'train': {'type': 'vision-efficient-tuning-preprocessor', 'img_size': 16},
                            'val': {'type': 'vision-efficient-tuning-preprocessor', 'img_size': 24}}}
    assert VisionEfficientTuningPreprocessor.from_model_dir(cfg=cfg, mode=ModeKeys.TRAIN).img_size == 16
    assert VisionEfficientTuningPreprocessor.from_model_dir(cfg=cfg, mode=ModeKeys.EVAL).img_size == 24
    # ModelScope's own builder finds our class by its registered name
    from modelscope.preprocessors import Preprocessor
    with open(tmp_path / 'configuration.json', 'w') as f:
        json.dump({**cfg, 'preprocessor': {'type': 'vision-efficient-tuning-preprocessor'},
                   'model': {'type': 'vision-efficient-tuning', 'backbone': {'img_size': 48}}}, f)
    pre = Preprocessor.from_pretrained(str(tmp_path))
    assert isinstance(pre, VisionEfficientTuningPreprocessor) and pre.output_size == (48, 48)


@pytest.mark.parametrize('section, message', [
    ({'type': 'image-classification-preprocessor', 'val': [{'type': 'Sharpen'}]}, "unknown transform type 'Sharpen'"),
    ({'type': 'image-classification-preprocessor', 'val': [{'type': 'Resize', 'size': 8, 'antialias': 1}]},
     "unknown argument(s) ['antialias']"),
    ({'type': 'image-classification-preprocessor', 'val': [{'type': 'Resize'}]}, "missing argument(s) ['size']"),
    ({'type': 'some-other-preprocessor'}, "preprocessor.type='some-other-preprocessor' is not supported"),
    ({'resize_to': 3}, "unknown key(s) ['resize_to']"),
    ({'train': {'flip': 0.5}}, "preprocessor.train: unknown key(s) ['flip']"),
    ({'interpolation': 'cubic'}, "interpolation='cubic'"),
    ({'std': [0.2, 0, 0.2]}, 'must not contain 0'),
])
def test_bad_configuration_is_refused_by_name(section, message):
    with pytest.raises(ValueError) as err:
        VisionEfficientTuningPreprocessor.from_model_dir(cfg={'preprocessor': section})
    assert message in str(err.value)


def test_list_without_a_tensor_output_is_refused():
    pre = VisionEfficientTuningPreprocessor.from_model_dir(cfg={'preprocessor': {
        'type': 'image-classification-preprocessor',
        'val': [{'type': 'Rename', 'input_keys': ['img_path:FILE'], 'output_keys': ['filename']},
                {'type': 'load-image'}, {'type': 'CenterCrop', 'size': 8}]}})
    with pytest.raises(ValueError, match=r"must produce 'imgs' \(or 'img'\) as a float \(3, H, W\) tensor"):
        pre(RGB_PNG)


def test_preprocessor_pickles_for_dataloader_workers():
    pre = VisionEfficientTuningPreprocessor.from_model_dir(os.path.join(BUILTIN, 'adapter'))
    again = pickle.loads(pickle.dumps(pre))
    assert torch.equal(again(RGB_PNG)['imgs'], pre(RGB_PNG)['imgs'])


# -- rows and labels -------------------------------------------------------------------------------------------------
def test_rows_labels_and_bare_images():
    pre = VisionEfficientTuningPreprocessor(img_size=16)
    base = pre(RGB_PNG)
    assert set(base) == {'imgs'} and base['imgs'].shape == (3, 16, 16)
    for label in (3, np.int64(3), torch.tensor(3), torch.tensor([3]), np.array([3])):
        out = pre({'img_path:FILE': RGB_PNG, 'label': label})
        assert torch.equal(out['imgs'], base['imgs'])
        assert out['labels'].dtype == torch.int64 and out['labels'].shape == () and int(out['labels']) == 3
    assert int(pre({'image': Image.open(RGB_PNG), 'labels': 4})['labels']) == 4
    assert set(pre({'image': RGB_PNG, 'label': None})) == {'imgs'}
    for bad in (1.5, -1, True, 'rose', [1, 2]):
        with pytest.raises(ValueError, match=r"row\['label'\]=.*expected a non-negative integer class index"):
            pre({'img_path:FILE': RGB_PNG, 'label': bad})


@pytest.mark.parametrize('case', ['plain', 'adapter'])  # our transforms / a ModelScope list
def test_unreadable_row_image_names_the_path(tmp_path, case):
    pre = VisionEfficientTuningPreprocessor.from_model_dir(os.path.join(BUILTIN, case))
    missing = str(tmp_path / 'nope.jpg')
    with pytest.raises(ImageInputError, match='nope.jpg.*does not exist'):
        pre({'img_path:FILE': missing, 'label': 0})
    broken = write(tmp_path / 'broken.png', open(RGB_PNG, 'rb').read()[:3000])
    with pytest.raises(ImageInputError, match='broken.png.*truncated or corrupt'):
        pre({'image': broken, 'label': 0})
    with pytest.raises(ImageInputError, match=r"no image key; expected one of \['img_path:FILE', 'image'\]"):
        pre({'path': RGB_PNG, 'label': 0})


# -- load_image: every accepted input ----------------------------------------------------------------------------------
def test_path_pathlike_bytes_fileobj_and_dict_agree():
    want = np.asarray(Image.open(RGB_PNG).convert('RGB'))
    data = open(RGB_PNG, 'rb').read()
    for obj in (RGB_PNG, pathlib.Path(RGB_PNG), data, bytearray(data), io.BytesIO(data), Image.open(RGB_PNG),
                {'img_path:FILE': RGB_PNG}, {'image': Image.open(RGB_PNG)}, {'image': RGB_PNG, 'label': 1}):
        img = load_image(obj)
        assert img.mode == 'RGB' and np.array_equal(np.asarray(img), want), type(obj)


def test_arrays_are_bgr_and_bgra_in_opencv_layout():
    rgb = np.asarray(Image.open(RGB_PNG).convert('RGB'))
    assert np.array_equal(np.asarray(load_image(rgb[:, :, ::-1])), rgb)  # BGR (a non-contiguous view)
    rgba = Image.open(os.path.join(IMAGES, 'rgba.png'))
    bgra = np.asarray(rgba)[:, :, [2, 1, 0, 3]]
    assert np.array_equal(np.asarray(load_image(bgra)), np.asarray(rgba.convert('RGB')))
    gray = np.asarray(Image.open(os.path.join(IMAGES, 'gray.png')))
    want = np.asarray(Image.open(os.path.join(IMAGES, 'gray.png')).convert('RGB'))
    for arr in (gray, gray[:, :, None], gray.astype(np.int64), gray.astype(np.float32),
                gray.astype(np.float64) / 255.0):
        assert np.array_equal(np.asarray(load_image(arr)), want), (arr.dtype, arr.shape)


def test_pil_modes_become_rgb():
    base = rgb_image(20, 10)
    for mode in ('L', 'LA', 'P', 'PA', 'RGBA', 'RGBa', 'La', 'CMYK', 'YCbCr', 'HSV', 'LAB', '1', 'I', 'F'):
        img = base.convert(mode) if mode not in ('PA',) else base.convert('P').convert('PA')
        out = load_image(img)
        assert out.mode == 'RGB' and out.size == (20, 10), mode
    rgba = Image.open(os.path.join(IMAGES, 'rgba.png'))
    assert np.array_equal(np.asarray(load_image(rgba)), np.asarray(rgba.convert('RGB')))  # as the built-in
    sixteen = Image.fromarray(np.array([[0, 257 * 128, 65535]], dtype=np.uint16))
    assert sixteen.mode == 'I;16'
    assert np.asarray(load_image(sixteen))[0, :, 0].tolist() == [0, 128, 255]  # scaled, not saturated
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert np.asarray(load_image(floats))[0, :, 0].tolist() == [0, 128, 255]


def test_exif_orientation_applies_to_files_and_freshly_opened_images(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    rgb_image(40, 20).save(buf, 'JPEG', exif=exif)
    path = write(tmp_path / 'rotated.jpg', buf.getvalue())
    assert load_image(path).size == (20, 40)
    assert load_image(buf.getvalue()).size == (20, 40)
    assert load_image(Image.open(path)).size == (20, 40)


@pytest.fixture
def image_server(tmp_path):
    write(tmp_path / 'ok.png', open(RGB_PNG, 'rb').read())

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(tmp_path), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={'poll_interval': 0.05}, daemon=True).start()
    yield f'http://127.0.0.1:{server.server_address[1]}'
    server.shutdown()
    server.server_close()


def test_http_urls_load_and_failures_name_the_url(image_server, monkeypatch):
    for var in ('http_proxy', 'HTTP_PROXY', 'https_proxy', 'HTTPS_PROXY', 'all_proxy', 'ALL_PROXY'):
        monkeypatch.delenv(var, raising=False)
    img = load_image(f'{image_server}/ok.png')
    assert np.array_equal(np.asarray(img), np.asarray(Image.open(RGB_PNG).convert('RGB')))
    with pytest.raises(ImageInputError, match=r"image URL 'http://127\.0\.0\.1:\d+/missing\.png': HTTP status 404"):
        load_image(f'{image_server}/missing.png')


# -- load_image: refusals ----------------------------------------------------------------------------------------------
@pytest.fixture
def bad_files(tmp_path):
    png = open(RGB_PNG, 'rb').read()
    jpg = open(os.path.join(IMAGES, 'photo.jpg'), 'rb').read()
    return {
        'missing': str(tmp_path / 'missing.png'),
        'empty': write(tmp_path / 'empty.png', b''),
        'truncated_png': write(tmp_path / 'truncated.png', png[:len(png) // 2]),
        'truncated_jpg': write(tmp_path / 'truncated.jpg', jpg[:len(jpg) // 2]),
        'text': write(tmp_path / 'notes.jpg', b'this is not an image\n' * 10),
        'folder': str(tmp_path),
    }


@pytest.mark.parametrize('kind, message', [
    ('missing', "image file '{path}' does not exist"),
    ('empty', "image file '{path}' is empty (0 bytes)"),
    ('truncated_png', "image file '{path}': truncated or corrupt image data"),
    ('truncated_jpg', "image file '{path}': truncated or corrupt image data"),
    ('text', "image file '{path}' is not an image file PIL can read"),
    ('folder', "image path '{path}' is a directory, not an image file"),
])
def test_bad_files_are_refused_naming_the_path(bad_files, kind, message):
    path = bad_files[kind]
    for obj in (path, {'img_path:FILE': path}):
        with pytest.raises(ImageInputError) as err:
            load_image(obj)
        assert isinstance(err.value, ValueError)
        assert message.format(path=path) in str(err.value)


@pytest.mark.parametrize('obj, message', [
    (None, 'image input is None; expected a local path, an http(s) URL, bytes, a PIL.Image, a numpy array'),
    ('', 'empty string given as an image path'),
    (b'', 'empty bytes given as an image'),
    (b'GIF89a-not-really', 'bytes of length 17 is not an image file PIL can read'),
    (42, 'unsupported image input builtins.int 42; expected a local path'),
    ([RGB_PNG], "unsupported image input builtins.list ["),
    (torch.zeros(3, 8, 8), 'for a tensor, pass tensor.numpy()'),
    ({'label': 1}, "dict with keys ['label']: no image key; expected one of ['img_path:FILE', 'image']"),
    ({'image': None}, "'image' is None"),
    (np.zeros(5, np.uint8), 'unsupported image array: numpy array of shape (5,) and dtype uint8; expected HxW'),
    (np.zeros((2, 4, 4, 3), np.uint8), 'numpy array of shape (2, 4, 4, 3)'),
    (np.zeros((3, 16, 16), np.uint8), 'it looks channel-first: transpose it to HxWxC'),
    (np.zeros((8, 8, 2), np.uint8), 'numpy array of shape (8, 8, 2) and dtype uint8; expected HxW gray'),
    (np.zeros((0, 8, 3), np.uint8), 'empty image array: numpy array of shape (0, 8, 3)'),
    (np.zeros((4, 4), np.complex64), 'unsupported image array dtype: numpy array of shape (4, 4) and dtype complex64'),
    (np.zeros((4, 4), bool), 'unsupported image array dtype: numpy array of shape (4, 4) and dtype bool'),
    (np.full((4, 4), 'a'), 'unsupported image array dtype'),
    (np.full((4, 4, 3), 300.0), 'float values span [300, 300]; expected [0, 1] or [0, 255]'),
    (np.full((4, 4, 3), np.nan, np.float32), 'contains NaN or infinite values'),
    (np.full((4, 4), 1000, np.uint16), 'has values in [1000, 1000]; integer arrays must hold 0..255'),
    (np.full((4, 4), -1, np.int32), 'has values in [-1, -1]'),
])
def test_bad_objects_are_refused_naming_the_input(obj, message):
    with pytest.raises(ImageInputError) as err:
        load_image(obj)
    assert isinstance(err.value, ValueError)
    assert message in str(err.value)


def test_decompression_bombs_are_refused(tmp_path):
    # just above PIL's warning threshold (PIL only warns here), and far above its error threshold
    limit = Image.MAX_IMAGE_PIXELS
    for w, h in ((limit // 1000 + 1, 1000), (30000, 30000)):
        path = write(tmp_path / f'bomb_{w}x{h}.png', png_header(w, h))
        for obj in (path, open(path, 'rb').read()):
            with pytest.raises(ImageInputError, match='decompression bomb'):
                load_image(obj)
    # our own limit, also for PIL images handed over lazily
    small = write(tmp_path / 'small.png', png_header(100, 100))
    with pytest.raises(ImageInputError, match=r'100x100 = 10000 pixels exceeds the limit of 9999'):
        load_image(small, max_pixels=9999)
    with pytest.raises(ImageInputError, match=r'10000 pixels exceeds the limit of 9999'):
        load_image(Image.open(small), max_pixels=9999)
    for pre in (VisionEfficientTuningPreprocessor(img_size=16, max_pixels=9999),
                VisionEfficientTuningPreprocessor.from_model_dir(os.path.join(BUILTIN, 'adapter'), max_pixels=9999)):
        with pytest.raises(ImageInputError, match='small.png.*exceeds the limit'):
            pre({'img_path:FILE': small})


# -- any image shape in bounded memory (issue 11) ----------------------------------------------------------------------
@pytest.mark.usefixtures('one_thread')
def test_an_image_of_extreme_aspect_ratio_costs_little_memory(trained, tmp_path):
    root, out = trained
    path = tmp_path / 'thin.png'
    Image.fromarray(np.full((40000, 2, 3), 200, np.uint8)).save(path)  # 2 x 40000: a few kB on disk
    script = textwrap.dedent(f'''
        import resource, modelscope_utuning
        from modelscope.pipelines import pipeline
        p = pipeline('vision-efficient-tuning', {out!r}, device='cpu')
        p({str(path)!r})
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(p({str(path)!r})['labels'][0])
        for _ in range(3):
            p({str(path)!r})
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
    ''')
    res = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    label, grown_mb = res.stdout.split()[-2:]
    assert label in 'abcd' and int(grown_mb) < 50  # a shorter side of 256 would have made 1.3 gigapixels
    from modelscope_utuning.preprocessing.transforms import eval_transform
    img = Image.open(path).convert('RGB')
    assert eval_transform(32, resize_to=36)(img).shape == (3, 32, 32)
