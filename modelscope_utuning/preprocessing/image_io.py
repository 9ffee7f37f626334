"""Turn whatever a user hands the pipeline into an RGB ``PIL.Image``, or refuse it with a clear message.

Accepted (see :func:`load_image`): a local path (``str`` / ``os.PathLike``), an http(s) URL, ``bytes`` or a
binary file object holding an encoded image, a ``PIL.Image`` in any mode, a numpy array, and a dict holding
one of these under ``'img_path:FILE'`` or ``'image'``.

Numpy arrays follow ModelScope's CV pipelines (OpenCV layout): ``HxW`` gray, ``HxWx1`` gray, ``HxWx3`` **BGR**,
``HxWx4`` **BGRA** (alpha dropped). dtype ``uint8``; other integer dtypes when every value lies in 0..255;
floats in ``[0, 1]`` (when the array's maximum is <= 1) or else in ``[0, 255]``, rounded to the nearest level.

Pixel modes: alpha is dropped as ModelScope's built-in does (``.convert('RGB')``, no compositing); 16-bit
(``I;16*``) images are scaled by 1/257 to 8 bits (PIL's own conversion would saturate them); ``F`` images use
the float rule above; every other mode goes through ``.convert('RGB')``. Files, URLs and bytes are EXIF-
transposed as ModelScope's ``LoadImage`` does, and so is a ``PIL.Image`` fresh from ``Image.open`` (its
``format`` is set), so a path and ``Image.open(path)`` give the same pixels.

Every refusal is an :class:`ImageInputError` (a ``ValueError``) that names the input and what was expected.
Images above the pixel limit (PIL's ``Image.MAX_IMAGE_PIXELS`` unless ``max_pixels`` says otherwise) are
refused before they are decoded, and PIL's ``DecompressionBombWarning`` is raised as that error.
"""
from __future__ import annotations

import io
import os
import warnings
from collections.abc import Mapping
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_KEYS = ('img_path:FILE', 'image')
URL_TIMEOUT: Tuple[float, float] = (5.0, 30.0)  # (connect, read) seconds; no retries
MAX_DOWNLOAD_BYTES = 100 * 1024 * 1024
EXPECTED = ("a local path, an http(s) URL, bytes, a PIL.Image, a numpy array (HxW gray, HxWx3 BGR or "
            "HxWx4 BGRA) or a dict with 'img_path:FILE' / 'image'")

ImageLike = Union[str, os.PathLike, bytes, Image.Image, np.ndarray, Mapping]

# -- what happens to each pixel mode: the one table the conversion below dispatches on and preprocessing.json
# (:mod:`.description`) writes out. Rules (uint8 values throughout unless said):
#   channels      output R, G, B = input channels ``take`` (L / LA: [0, 0, 0]: gray replicated; alpha dropped)
#   bilevel       a '1' pixel that is set -> 255, else 0; then replicated as gray
#   palette       index -> the (R, G, B) entry of Image.getpalette('RGB'), entries past its end are (0, 0, 0);
#                 transparency (info['transparency'] / the PA alpha band) is ignored
#   scale         16-bit gray: round_half_even(v / 257) clipped to 0..255; then replicated as gray
#   clip          32-bit integer gray: v clipped to 0..255; then replicated as gray
#   float         32-bit float gray: the float rule (see FLOAT_RULE); then replicated as gray
#   cmyk          Pillow's formula, integers: nk = 255 - K; t = X * nk + 128; out = nk - (((t >> 8) + t) >> 8)
#                 for X in C, M, Y (no colour management)
#   pillow_convert  Image.convert('RGB') (through ``via`` first when given): the rare modes no file format in
#                 common use decodes to (premultiplied alpha, YCbCr, LAB, HSV) and any mode not listed here
GRAY = [0, 0, 0]
MODE_RULES: Dict[str, Dict[str, Any]] = {
    'RGB': {'rule': 'channels', 'take': [0, 1, 2]},
    'RGBA': {'rule': 'channels', 'take': [0, 1, 2], 'alpha': 'dropped (no compositing)'},
    'RGBX': {'rule': 'channels', 'take': [0, 1, 2]},
    'L': {'rule': 'channels', 'take': GRAY},
    'LA': {'rule': 'channels', 'take': GRAY, 'alpha': 'dropped (no compositing)'},
    '1': {'rule': 'bilevel', 'set': 255, 'unset': 0},
    'P': {'rule': 'palette', 'palette': "Image.getpalette('RGB')", 'missing_entries': [0, 0, 0],
          'transparency': 'ignored'},
    'PA': {'rule': 'palette', 'palette': "Image.getpalette('RGB')", 'missing_entries': [0, 0, 0],
           'transparency': 'ignored', 'alpha': 'dropped (no compositing)'},
    'I;16': {'rule': 'scale', 'divide_by': 257, 'rounding': 'half_to_even', 'clip': [0, 255]},
    'I;16L': {'rule': 'scale', 'divide_by': 257, 'rounding': 'half_to_even', 'clip': [0, 255]},
    'I;16B': {'rule': 'scale', 'divide_by': 257, 'rounding': 'half_to_even', 'clip': [0, 255]},
    'I;16N': {'rule': 'scale', 'divide_by': 257, 'rounding': 'half_to_even', 'clip': [0, 255]},
    'I': {'rule': 'clip', 'clip': [0, 255]},
    'F': {'rule': 'float'},
    'CMYK': {'rule': 'cmyk', 'formula': 'nk = 255 - K; t = X * nk + 128; out = nk - (((t >> 8) + t) >> 8), '
                                        'X in (C, M, Y), integer arithmetic'},
    'RGBa': {'rule': 'pillow_convert', 'note': 'premultiplied alpha: Pillow un-premultiplies, then drops it'},
    'La': {'rule': 'pillow_convert', 'via': 'LA', 'note': 'premultiplied alpha: Pillow un-premultiplies, then '
                                                          'drops it'},
    'YCbCr': {'rule': 'pillow_convert'},
    'LAB': {'rule': 'pillow_convert'},
    'HSV': {'rule': 'pillow_convert'},
}
OTHER_MODES: Dict[str, Any] = {'rule': 'pillow_convert'}
# floats (F images and float arrays): refused when not finite or outside [0, 255]; x 255 when the maximum is <= 1,
# else as they are; rounded half to even, clipped to 0..255
FLOAT_RULE: Dict[str, Any] = {'refuse': 'any NaN / infinity, or a value outside [0, 255]',
                              'multiply_by': {'max <= 1': 255, 'otherwise': 1}, 'rounding': 'half_to_even',
                              'clip': [0, 255]}
# numpy arrays (OpenCV's layout): output R, G, B = these channels; other integer dtypes must hold 0..255
ARRAY_CHANNELS = {2: GRAY, 3: [2, 1, 0], 4: [2, 1, 0]}  # by ndim 2 (HxW) or channel count (HxWx3 BGR, HxWx4 BGRA)
# EXIF orientation (tag 0x0112 as Image.getexif() reports it) -> the transpose ImageOps.exif_transpose applies
EXIF_ORIENTATION_TAG = 0x0112
EXIF_TRANSPOSE = {2: 'FLIP_LEFT_RIGHT', 3: 'ROTATE_180', 4: 'FLIP_TOP_BOTTOM', 5: 'TRANSPOSE', 6: 'ROTATE_270',
                  7: 'TRANSVERSE', 8: 'ROTATE_90'}


def mode_rule(mode: str) -> Dict[str, Any]:
    """How :func:`load_image` turns a PIL image of ``mode`` into RGB (an entry of :data:`MODE_RULES`)."""
    return MODE_RULES.get(mode, OTHER_MODES)


class ImageInputError(ValueError):
    """An input that cannot be turned into an RGB image; the message names the input."""


def describe(obj: Any) -> str:
    """A short description of ``obj`` for error messages (never the whole value)."""
    if isinstance(obj, (str, os.PathLike)):
        text = os.fspath(obj)
        text = text if len(text) <= 300 else text[:300] + '...'
        return repr(text)
    if isinstance(obj, Image.Image):
        return f'PIL.Image(mode={obj.mode!r}, size={obj.size[0]}x{obj.size[1]})'
    if isinstance(obj, np.ndarray):
        return f'numpy array of shape {tuple(obj.shape)} and dtype {obj.dtype}'
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return f'{type(obj).__name__} of length {len(obj)}'
    if isinstance(obj, Mapping):
        return f'dict with keys {sorted(map(str, obj.keys()))}'
    text = repr(obj)
    return f'{type(obj).__module__}.{type(obj).__qualname__} ' + (text if len(text) <= 80 else text[:80] + '...')


def load_image(obj: ImageLike, max_pixels: Optional[int] = None) -> Image.Image:
    """Load ``obj`` (see the module docstring) as an RGB ``PIL.Image``.

    Args:
        obj: the image or where to find it.
        max_pixels: refuse larger images (width * height); ``None`` follows PIL's ``Image.MAX_IMAGE_PIXELS``.
    Raises:
        ImageInputError: ``obj`` is None, missing, empty, truncated, not an image, too large, of an unsupported
            type, shape or dtype; the message names it.
    """
    if obj is None:
        raise ImageInputError(f'image input is None; expected {EXPECTED}')
    if isinstance(obj, Mapping):
        return _load_from_dict(obj, max_pixels)
    if isinstance(obj, (str, os.PathLike)):
        source = os.fspath(obj)
        if isinstance(source, bytes):
            source = os.fsdecode(source)
        if source.startswith(('http://', 'https://')):
            return _decode(_download(source), f'image URL {source!r}', max_pixels)
        return _load_path(source, max_pixels)
    if isinstance(obj, (bytes, bytearray, memoryview)):
        if len(obj) == 0:
            raise ImageInputError(f'empty {type(obj).__name__} given as an image; expected encoded image bytes')
        return _decode(bytes(obj), f'{describe(obj)}', max_pixels)
    if isinstance(obj, Image.Image):
        return _from_pil(obj, max_pixels)
    if isinstance(obj, np.ndarray):
        return _from_array(obj)
    if hasattr(obj, 'read') and callable(obj.read):
        try:
            data = obj.read()
        except (OSError, ValueError) as e:  # e.g. a closed file
            raise ImageInputError(f'{describe(obj)}: cannot read it ({type(e).__name__}: {e})') from e
        if not isinstance(data, (bytes, bytearray)):
            raise ImageInputError(f'{describe(obj)}: a file object must be opened in binary mode')
        if not data:
            raise ImageInputError(f'{describe(obj)}: the file object is empty; expected encoded image bytes')
        return _decode(bytes(data), describe(obj), max_pixels)
    hint = ''
    if type(obj).__module__.startswith('torch'):
        hint = ' (for a tensor, pass tensor.numpy() as HxWxC BGR uint8, or a PIL.Image)'
    raise ImageInputError(f'unsupported image input {describe(obj)}; expected {EXPECTED}{hint}')


def _load_from_dict(row: Mapping, max_pixels: Optional[int]) -> Image.Image:
    present = [k for k in IMAGE_KEYS if k in row]
    if not present:
        raise ImageInputError(f'{describe(row)}: no image key; expected one of {list(IMAGE_KEYS)}')
    key = next((k for k in present if row[k] is not None), None)
    if key is None:
        raise ImageInputError(f'{describe(row)}: {present[0]!r} is None; expected {EXPECTED}')
    value = row[key]
    if isinstance(value, Mapping):
        raise ImageInputError(f'{describe(row)}: {key!r} holds another dict; expected an image')
    try:
        return load_image(value, max_pixels)
    except ImageInputError as e:
        raise ImageInputError(f'row[{key!r}]: {e}') from e


def _load_path(path: str, max_pixels: Optional[int]) -> Image.Image:
    if not path:
        raise ImageInputError(f"empty string given as an image path; expected {EXPECTED}")
    full = os.path.expanduser(path)
    if not os.path.exists(full):
        raise ImageInputError(f'image file {path!r} does not exist')
    if os.path.isdir(full):
        raise ImageInputError(f'image path {path!r} is a directory, not an image file')
    try:
        with open(full, 'rb') as f:
            data = f.read()
    except OSError as e:
        raise ImageInputError(f'image file {path!r} cannot be read: {e.strerror or e}') from e
    if not data:
        raise ImageInputError(f'image file {path!r} is empty (0 bytes)')
    return _decode(data, f'image file {path!r}', max_pixels)


def _download(url: str) -> bytes:
    import requests  # only URLs need it

    try:
        with requests.get(url, timeout=URL_TIMEOUT, stream=True) as r:
            if r.status_code != 200:
                raise ImageInputError(f'image URL {url!r}: HTTP status {r.status_code} ({r.reason})')
            chunks, size = [], 0
            for chunk in r.iter_content(1 << 16):
                size += len(chunk)
                if size > MAX_DOWNLOAD_BYTES:
                    raise ImageInputError(f'image URL {url!r}: more than {MAX_DOWNLOAD_BYTES} bytes, refused')
                chunks.append(chunk)
    except requests.RequestException as e:
        raise ImageInputError(f'image URL {url!r} could not be downloaded: {e}') from e
    data = b''.join(chunks)
    if not data:
        raise ImageInputError(f'image URL {url!r} returned an empty body')
    return data


def _pixel_limit(max_pixels: Optional[int]) -> Optional[int]:
    return Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels


def _check_pixels(img: Image.Image, source: str, max_pixels: Optional[int]) -> None:
    limit = _pixel_limit(max_pixels)
    w, h = img.size
    if limit is not None and w * h > limit:
        raise ImageInputError(f'{source}: {w}x{h} = {w * h} pixels exceeds the limit of {limit} '
                              '(possible decompression bomb); refused')
    if w == 0 or h == 0:
        raise ImageInputError(f'{source}: the image is empty ({w}x{h})')


def _decode(data: bytes, source: str, max_pixels: Optional[int]) -> Image.Image:
    """Decode encoded image bytes fully (so truncation is caught here), EXIF-transpose, convert to RGB."""
    with warnings.catch_warnings():
        # Image.open only reads the header; PIL's bomb check warns there, and we want it to stop us.
        warnings.simplefilter('error', Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
            raise ImageInputError(f'{source}: refused as a possible decompression bomb ({e})') from e
        except UnidentifiedImageError as e:
            raise ImageInputError(f'{source} is not an image file PIL can read '
                                  f'({len(data)} bytes starting {data[:8]!r})') from e
        except Exception as e:  # corrupt headers raise assorted errors (SyntaxError, struct.error, ...)
            raise ImageInputError(f'{source}: cannot read the image header ({type(e).__name__}: {e})') from e
    _check_pixels(img, source, max_pixels)
    try:
        img.load()
    except Exception as e:  # truncated data: OSError; other corruption: assorted types
        raise ImageInputError(f'{source}: truncated or corrupt image data ({type(e).__name__}: {e})') from e
    img = _exif_transpose(img, source)
    return _to_rgb(img, source)


def _exif_transpose(img: Image.Image, source: str) -> Image.Image:
    try:
        return ImageOps.exif_transpose(img)
    except Exception as e:  # a broken EXIF block should not lose an otherwise good image
        warnings.warn(f'{source}: EXIF orientation ignored ({type(e).__name__}: {e})')
        return img


def _from_pil(img: Image.Image, max_pixels: Optional[int]) -> Image.Image:
    source = describe(img)
    _check_pixels(img, source, max_pixels)
    try:
        img.load()  # an Image.open() result is lazy: decode now so bad data is reported here
    except Exception as e:
        raise ImageInputError(f'{source}: truncated or corrupt image data ({type(e).__name__}: {e})') from e
    if img.format is not None:  # straight from Image.open: orient it as a file path would be
        img = _exif_transpose(img, source)
    return _to_rgb(img, source)


def _to_rgb(img: Image.Image, source: str) -> Image.Image:
    """RGB by the mode's rule (:data:`MODE_RULES`); the other rules are what PIL's ``convert('RGB')`` computes."""
    mode = img.mode
    if mode == 'RGB':
        return img
    rule = mode_rule(mode)
    try:
        if rule['rule'] == 'scale':
            a = np.asarray(img).astype(np.float64)
            scaled = np.clip(np.rint(a / rule['divide_by']), *rule['clip'])
            return Image.fromarray(scaled.astype(np.uint8)).convert('RGB')
        if rule['rule'] == 'float':
            return Image.fromarray(_float_to_uint8(np.asarray(img), source)).convert('RGB')
        if rule.get('via'):
            return img.convert(rule['via']).convert('RGB')
        return _convert_rgb(img)
    except ImageInputError:
        raise
    except Exception as e:
        raise ImageInputError(f'{source}: cannot convert PIL mode {mode!r} to RGB ({type(e).__name__}: {e})') from e


def _convert_rgb(img: Image.Image) -> Image.Image:
    try:
        return img.convert('RGB')
    except ValueError:
        # PIL has no direct route for some modes (e.g. premultiplied 'La'): go through an alpha mode it has
        for via in ('RGBA', 'LA'):
            try:
                return img.convert(via).convert('RGB')
            except ValueError:
                continue
        raise


def _float_to_uint8(a: np.ndarray, source: str) -> np.ndarray:
    if not np.isfinite(a).all():
        raise ImageInputError(f'{source}: contains NaN or infinite values')
    lo, hi = float(a.min()), float(a.max())
    if lo < 0 or hi > 255:
        raise ImageInputError(f'{source}: float values span [{lo:g}, {hi:g}]; expected [0, 1] or [0, 255]')
    scale = 255.0 if hi <= 1.0 else 1.0
    return np.clip(np.rint(a.astype(np.float64) * scale), 0, 255).astype(np.uint8)


def _from_array(arr: np.ndarray) -> Image.Image:
    source = describe(arr)
    shape = arr.shape
    if arr.ndim == 3 and shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 3 and shape[2] not in (3, 4):
        hint = ' (it looks channel-first: transpose it to HxWxC)' if shape[0] in (1, 3, 4) else ''
        raise ImageInputError(f'unsupported image array: {source}; expected HxW gray, HxWx3 BGR or '
                              f'HxWx4 BGRA{hint}')
    if arr.ndim not in (2, 3):
        raise ImageInputError(f'unsupported image array: {source}; expected HxW gray, HxWx3 BGR or HxWx4 BGRA')
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageInputError(f'empty image array: {source}')
    kind = arr.dtype.kind
    if arr.dtype == np.uint8:
        out = arr
    elif kind == 'f':
        out = _float_to_uint8(arr, f'image array ({source})')
    elif kind in 'iu':
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 255:
            raise ImageInputError(f'image array ({source}) has values in [{lo}, {hi}]; integer arrays must hold '
                                  '0..255 (scale 16-bit data to uint8 first, e.g. arr // 257)')
        out = arr.astype(np.uint8)
    else:
        raise ImageInputError(f'unsupported image array dtype: {source}; expected uint8, an integer dtype '
                              'holding 0..255, or float in [0, 1] / [0, 255]')
    if out.ndim == 3:
        out = out[:, :, 2::-1]  # BGR(A) -> RGB, alpha dropped
    return Image.fromarray(np.ascontiguousarray(out)).convert('RGB')
