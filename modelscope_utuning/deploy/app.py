"""The web demo: a Gradio page where a person uploads an image and sees the model's top-5 labels with their scores.

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

from ..extras import require

EXTRA = 'gradio'
DEFAULT_TOPK = 5
DEFAULT_HOST = '127.0.0.1'
DEFAULT_PORT = 7860
TABLE_ID = 'utuning-scores'  # the HTML table of labels and scores (what the browser test reads)
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


def build_app(model_dir: str, topk: int = DEFAULT_TOPK, device: Optional[str] = None, title: Optional[str] = None):
    """A ``gradio.Blocks``: an image upload, the top-``topk`` labels (Gradio's Label) and a table of the exact
    scores. The classification function is also reachable as ``app.classify``."""
    gr = require_gradio()
    classify = make_classifier(model_dir, topk, device)
    if title:
        name = title
    elif os.path.isdir(model_dir):
        name = os.path.basename(os.path.normpath(os.path.abspath(model_dir)))
    else:  # a hub id
        name = str(model_dir)
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
    from .. import __version__
    return f'# installed by ModelScope Studio before it runs app.py\nmodelscope-utuning[gradio]>={__version__}\n'


__all__ = ['APP_PY', 'app_requirements', 'app_source', 'build_app', 'launch', 'make_classifier', 'scores_table']
