"""The web demo: a Gradio page where a person uploads an image and sees the model's top-5 labels with their scores
(or, for a segmentation model, the image with its predicted classes overlaid and the classes present).

``build_app(model_dir)`` returns the ``gradio.Blocks`` (the classification goes through
``pipeline('vision-efficient-tuning', model_dir)``, so the page shows exactly what the pipeline returns);
:func:`launch` serves it; ``modelscope-utuning serve MODEL`` does both, and the ``app.py`` that a training run
writes into ``output/`` calls them on its own folder, so that folder runs as a ModelScope Studio app as it stands.

The page works offline: Gradio's usage analytics and version check are off (``GRADIO_ANALYTICS_ENABLED=False``
unless the environment says otherwise), there is no share link, server-side rendering (which needs Node) is off,
and the theme uses the browser's system fonts instead of downloading web fonts. Needs the extra ``[gradio]``.
"""
from __future__ import annotations

import html
import os
from typing import Any, Callable, Dict, Optional, Tuple

from .. import __version__
from ..checkpoint.hub_layout import read_configuration
from ..extras import require
from ..preprocessing.image_io import load_image
from ..registration import SEG_TASK, SEG_TYPE

EXTRA = 'gradio'
DEFAULT_TOPK = 5
DEFAULT_HOST = '127.0.0.1'
DEFAULT_PORT = 7860
TABLE_ID = 'utuning-scores'  # the HTML table of labels and scores (what the browser test reads)
CLASSES_ID = 'utuning-classes'  # segmentation: the table of the classes present
OVERLAY_ID = 'utuning-overlay'  # segmentation: the image with the classes overlaid
SYSTEM_FONTS = ('ui-sans-serif', 'system-ui', 'sans-serif')
MONO_FONTS = ('ui-monospace', 'monospace')


def require_gradio():
    """``gradio``, imported with its analytics off, or MissingExtraError with the install line."""
    os.environ.setdefault('GRADIO_ANALYTICS_ENABLED', 'False')
    return require('gradio', EXTRA, 'the web demo')


def make_classifier(model_dir: str, topk: int = DEFAULT_TOPK, device: Optional[str] = None
                    ) -> Callable[[Any], Tuple[Dict[str, float], str]]:
    """The function behind the page: an image (a path, as Gradio hands uploads over, or anything the pipeline
    takes) -> (``{label: score}`` for Gradio's Label, an HTML table of the same labels and scores).
    ``None`` (the image was cleared) gives empty outputs."""
    import modelscope_utuning  # noqa: F401  (registers the plugin, also when this module is imported alone)
    from modelscope.pipelines import pipeline
    classifier = pipeline('vision-efficient-tuning', model_dir, **({'device': device} if device else {}))

    def classify(image) -> Tuple[Dict[str, float], str]:
        if image is None:
            return {}, ''
        result = classifier(image, topk=topk)
        return dict(zip(result['labels'], result['scores'])), scores_table(result['labels'], result['scores'])

    return classify


def scores_table(labels, scores) -> str:
    """``<table id="utuning-scores">`` with one row per class: rank, label, score (6 decimals)."""
    rows = ''.join(f'<tr><td>{i}</td><td class="label">{html.escape(str(lab))}</td>'
                   f'<td class="score">{float(s):.6f}</td></tr>'
                   for i, (lab, s) in enumerate(zip(labels, scores), 1))
    return (f'<table id="{TABLE_ID}"><thead><tr><th>#</th><th>label</th><th>score</th></tr></thead>'
            f'<tbody>{rows}</tbody></table>')


def is_segmentation_folder(model_dir: str) -> bool:
    """Whether ``model_dir`` (a local folder) holds a segmentation model (its configuration's task)."""
    cfg = read_configuration(model_dir, required=False)
    return cfg.get('task') == SEG_TASK or (cfg.get('model') or {}).get('type') == SEG_TYPE


def palette(n: int):
    """``n`` distinct RGB colours (uint8 (n, 3)); class 0 grey, as a background usually is."""
    import colorsys
    import numpy as np
    colours = [(128, 128, 128)] + [tuple(int(255 * c) for c in colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.85, 0.95))
                                   for i in range(1, n)]
    return np.array(colours[:n], dtype=np.uint8)


def overlay(image, masks, num_classes: int, alpha: float = 0.5):
    """The image (``PIL.Image`` or path) with each pixel tinted by its class's colour -> ``PIL.Image`` RGB."""
    import numpy as np
    from PIL import Image
    rgb = np.asarray(load_image(image), dtype=np.float32)
    colours = palette(max(num_classes, int(masks.max()) + 1)).astype(np.float32)
    blended = (1 - alpha) * rgb + alpha * colours[masks]
    return Image.fromarray(np.clip(blended + 0.5, 0, 255).astype(np.uint8))


def classes_table(labels, masks) -> str:
    """``<table id="utuning-classes">``: the classes present, their colour and share of the pixels."""
    import numpy as np
    counts = np.bincount(masks.reshape(-1), minlength=len(labels))
    colours = palette(len(counts))
    rows = ''.join(f'<tr><td class="swatch" style="background: rgb{tuple(int(c) for c in colours[i])}">&nbsp;</td>'
                   f'<td class="label">{html.escape(str(labels[i]) if i < len(labels) else str(i))}</td>'
                   f'<td class="share">{counts[i] / counts.sum():.6f}</td></tr>'
                   for i in np.argsort(-counts, kind='stable') if counts[i])
    return (f'<table id="{CLASSES_ID}"><thead><tr><th></th><th>class</th><th>pixels</th></tr></thead>'
            f'<tbody>{rows}</tbody></table>')


def make_segmenter(model_dir: str, device: Optional[str] = None):
    """The function behind a segmentation page: an image -> (the image with its predicted classes overlaid, an HTML
    table of the classes present), both from ``pipeline('semantic-segmentation', model_dir)``."""
    import modelscope_utuning  # noqa: F401
    from modelscope.pipelines import pipeline
    segmenter = pipeline(SEG_TASK, model_dir, **({'device': device} if device else {}))

    def segment(image):
        if image is None:
            return None, ''
        result = segmenter(image)
        return overlay(image, result['masks'], len(result['labels'])), classes_table(result['labels'], result['masks'])

    return segment


def build_app(model_dir: str, topk: int = DEFAULT_TOPK, device: Optional[str] = None, title: Optional[str] = None):
    """A ``gradio.Blocks``: an image upload, the top-``topk`` labels (Gradio's Label) and a table of the exact
    scores. The classification function is also reachable as ``app.classify``. For a segmentation folder: the
    image with the predicted classes overlaid and a table of the classes present (``app.segment``)."""
    gr = require_gradio()
    if title:
        name = title
    elif os.path.isdir(model_dir):
        name = os.path.basename(os.path.normpath(os.path.abspath(model_dir)))
    else:  # a hub id
        name = str(model_dir)
    if os.path.isdir(model_dir) and is_segmentation_folder(model_dir):
        segment = make_segmenter(model_dir, device)
        with gr.Blocks(title=f'U-Tuning: {name}', analytics_enabled=False) as app:
            gr.Markdown(f'## U-Tuning semantic segmentation\n\nModel: `{name}`. Upload an image to see its pixels\' '
                        'classes overlaid on it.')
            with gr.Row():
                image = gr.Image(type='filepath', label='image', sources=['upload', 'clipboard'], height=320)
                shown = gr.Image(type='pil', label='classes', elem_id=OVERLAY_ID, height=320)
            table = gr.HTML(label='classes present')
            image.change(segment, inputs=image, outputs=[shown, table])
        app.segment = segment
        return app
    classify = make_classifier(model_dir, topk, device)
    with gr.Blocks(title=f'U-Tuning: {name}', analytics_enabled=False) as app:
        gr.Markdown(f'## U-Tuning image classification\n\nModel: `{name}`. Upload an image to see the top-{topk} '
                    'labels and their scores.')
        with gr.Row():
            image = gr.Image(type='filepath', label='image', sources=['upload', 'clipboard'], height=320)
            with gr.Column():
                label = gr.Label(num_top_classes=topk, label=f'top-{topk}')
                table = gr.HTML(label='scores')
        image.change(classify, inputs=image, outputs=[label, table])
    app.classify = classify
    return app


def launch(app_or_model_dir, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, block: bool = True, **kwargs):
    """Serve a :func:`build_app` page (or build one for a model folder / hub id) on ``host:port``, offline (see the
    module docstring). ``block=False`` returns at once (the server runs in a thread; ``app.close()`` stops it).
    Returns the app."""
    gr = require_gradio()
    app = build_app(app_or_model_dir) if isinstance(app_or_model_dir, (str, os.PathLike)) else app_or_model_dir
    theme = gr.themes.Default(font=list(SYSTEM_FONTS), font_mono=list(MONO_FONTS))
    app.launch(server_name=host, server_port=int(port), share=False, inbrowser=False, ssr_mode=False,
               prevent_thread_lock=not block, theme=theme, footer_links=[], show_error=True, **kwargs)
    return app


APP_PY = '''"""Web demo of this model folder (a ModelScope Studio app as it stands): upload an image, see its top-5 labels.

Needs: pip install 'modelscope-utuning[gradio]'   Run: python app.py   (GRADIO_SERVER_NAME / GRADIO_SERVER_PORT
choose the address; default 0.0.0.0:7860, as Studio expects.)
"""
import os

from modelscope_utuning.deploy.app import build_app, launch

HERE = os.path.dirname(os.path.abspath(__file__))
demo = build_app(HERE)

if __name__ == '__main__':
    launch(demo, host=os.environ.get('GRADIO_SERVER_NAME', '0.0.0.0'),
           port=int(os.environ.get('GRADIO_SERVER_PORT', '7860')))
'''


def app_source() -> str:
    """The ``app.py`` written into a trained output folder (imports nothing but this package and os)."""
    return APP_PY


def app_requirements() -> str:
    """The ``requirements.txt`` beside it: what a ModelScope Studio installs before running ``app.py``."""
    return f'# installed by ModelScope Studio before it runs app.py\nmodelscope-utuning[gradio]>={__version__}\n'


__all__ = ['APP_PY', 'app_requirements', 'app_source', 'build_app', 'classes_table', 'launch', 'make_classifier',
           'make_segmenter', 'overlay', 'scores_table']
