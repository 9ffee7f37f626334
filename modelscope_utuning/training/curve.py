"""``training_curve.png``: what a run did, read back from ModelScope's ``{timestamp}.log.json``.

The log has one JSON object a line. Train rows: ``{"mode": "train", "epoch": e, "iter": i, "loss": ...}`` with
``e`` counted from 1 and ``i`` the iteration within the epoch (``TextLoggerHook`` logs every ``interval``
iterations, the loss averaged over them). Evaluation rows: ``{"mode": "eval", "epoch": e, "evaluation/accuracy":
...}`` (ModelScope's EvaluationHook prefixes each metric with ``evaluation/``; older releases wrote ``mode: "val"``
and bare metric names, which are read too).

The picture has epochs on both x-axes: the train loss per logged iteration at fractional epochs
``e - 1 + i / iterations_per_epoch`` (left), and every evaluation metric at the end of its epoch (right). With
matplotlib (extra ``[plot]``) it has axes, ticks, grids and legends; without it a basic Pillow drawing of the same
series is written, and the model card says so.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from ..extras import available
from ..fileio import atomic_write

TRAIN_MODES = ('train',)
EVAL_MODES = ('eval', 'val')
EVAL_PREFIX = 'evaluation/'
# Bookkeeping keys of the log rows: not metrics.
NOT_METRICS = {'mode', 'epoch', 'iter', 'lr', 'time', 'data_time', 'data_load_time', 'iter_time', 'memory', 'eta'}
SIZE = (10.0, 4.0)  # inches, at DPI
DPI = 100


@dataclass
class CurveData:
    """The series the picture shows: ``train`` = (fractional epochs, loss); ``eval`` = metric -> (epochs, values)."""
    train: Tuple[List[float], List[float]] = field(default_factory=lambda: ([], []))
    eval: Dict[str, Tuple[List[float], List[float]]] = field(default_factory=dict)

    def empty(self) -> bool:
        return not self.train[0] and not any(xs for xs, _ in self.eval.values())


@dataclass
class Curve:
    """What :func:`write_training_curve` drew: the data, the backend ('matplotlib' | 'pillow') and, for matplotlib,
    the Figure (its axes and lines can be inspected)."""
    data: CurveData
    backend: str
    path: str
    figure: Any = None


def read_log(log_json: Optional[str]) -> List[Dict]:
    """The JSON objects of a ``*.log.json`` file (lines that do not parse are skipped); [] when there is none."""
    if not log_json or not os.path.isfile(log_json):
        return []
    rows = []
    with open(log_json, encoding='utf-8') as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict):
                    rows.append(row)
    return rows


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def curve_data(rows: List[Dict], iters_per_epoch: Optional[int] = None) -> CurveData:
    """The series of the log ``rows``. ``iters_per_epoch``: the trainer's (when unknown, the largest iteration
    logged in any epoch, exact when the logging interval divides the epoch)."""
    train = [r for r in rows if r.get('mode') in TRAIN_MODES and _number(r.get('loss')) and _number(r.get('epoch'))]
    ipe = iters_per_epoch or max((r.get('iter') for r in train if _number(r.get('iter'))), default=0) or None
    data = CurveData()
    for r in train:
        it = r.get('iter')
        x = r['epoch'] - 1 + (it / ipe if ipe and _number(it) else 1.0)
        data.train[0].append(float(x))
        data.train[1].append(float(r['loss']))
    for r in rows:
        if r.get('mode') not in EVAL_MODES or not _number(r.get('epoch')):
            continue
        for key, value in r.items():
            if key in NOT_METRICS or not _number(value):
                continue
            name = key[len(EVAL_PREFIX):] if key.startswith(EVAL_PREFIX) else key
            xs, ys = data.eval.setdefault(name, ([], []))
            xs.append(float(r['epoch']))
            ys.append(float(value))
    return data


def write_training_curve(rows: List[Dict], path: str, iters_per_epoch: Optional[int] = None,
                         backend: Optional[str] = None) -> Optional[Curve]:
    """Draw the curve of the log ``rows`` into ``path`` (PNG); None when the log holds nothing to draw.
    ``backend``: 'matplotlib' (the default where it is installed) or 'pillow'."""
    data = curve_data(rows, iters_per_epoch)
    if data.empty():
        return None
    backend = backend or ('matplotlib' if available('matplotlib') else 'pillow')
    if backend == 'matplotlib':
        figure = _draw_matplotlib(data)
        atomic_write(path, lambda tmp: figure.savefig(tmp, format='png', dpi=DPI))
        return Curve(data, backend, path, figure)
    if backend == 'pillow':
        image = _draw_pillow(data)
        atomic_write(path, lambda tmp: image.save(tmp, format='PNG'))
        return Curve(data, backend, path)
    raise ValueError(f"backend={backend!r}: expected 'matplotlib' or 'pillow'")


# -- matplotlib ---------------------------------------------------------------------------------------------------------
def _draw_matplotlib(data: CurveData):
    """Two panels on a Figure of its own (no pyplot: no global state, no GUI backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator
    fig = Figure(figsize=SIZE, dpi=DPI, layout='constrained')
    FigureCanvasAgg(fig)
    loss_ax, eval_ax = fig.subplots(1, 2)
    last = max([x for x in data.train[0]] + [x for xs, _ in data.eval.values() for x in xs] + [1.0])
    xs, ys = data.train
    if xs:
        loss_ax.plot(xs, ys, color='tab:red', linewidth=1.5, marker='.' if len(xs) < 60 else None, label='train loss')
        loss_ax.legend(loc='upper right')
    else:
        loss_ax.text(0.5, 0.5, 'no train loss logged', ha='center', va='center', transform=loss_ax.transAxes)
    loss_ax.set(title='train loss (per logged iteration)', xlabel='epoch', ylabel='loss')
    if data.eval:
        for name, (ex, ey) in sorted(data.eval.items()):
            eval_ax.plot(ex, ey, marker='o', linewidth=1.5, label=name)
        eval_ax.legend(loc='best')
    else:
        eval_ax.text(0.5, 0.5, 'no evaluation logged', ha='center', va='center', transform=eval_ax.transAxes)
    eval_ax.set(title='evaluation (per epoch)', xlabel='epoch', ylabel='metric')
    for ax in (loss_ax, eval_ax):
        ax.set_xlim(-0.04 * math.ceil(last), 1.04 * math.ceil(last))  # end markers stay whole
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
    return fig


# -- Pillow (the basic fallback) -----------------------------------------------------------------------------------------
COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (148, 103, 189), (140, 86, 75), (227, 119, 194)]


def _draw_pillow(data: CurveData):
    """The same series as lines in two framed panels, x placed by epoch; min / max and the legend as text."""
    from PIL import Image, ImageDraw
    img = Image.new('RGB', (int(SIZE[0] * DPI), int(SIZE[1] * DPI)), 'white')
    draw = ImageDraw.Draw(img)
    last = max([x for x in data.train[0]] + [x for xs, _ in data.eval.values() for x in xs] + [1.0])
    x_max = math.ceil(last)
    panels = (((40, 40, 480, 350), 'train loss (per logged iteration), x: epoch', {'loss': data.train}, [(214, 39, 40)]),
              ((540, 40, 980, 350), 'evaluation (per epoch), x: epoch', data.eval, COLORS))
    for box, title, series, colors in panels:
        draw.rectangle(box, outline=(160, 160, 160))
        draw.text((box[0], 15), title, fill='black')
        values = [v for _, ys in series.values() for v in ys]
        if not values:
            draw.text((box[0] + 10, (box[1] + box[3]) // 2), 'nothing logged', fill='black')
            continue
        lo, hi = min(values), max(values)
        span = hi - lo
        top, bottom = box[1] + 20, box[3] - 20  # a margin, so that lines do not run on the frame
        for k, (name, (xs, ys)) in enumerate(sorted(series.items())):
            color = colors[k % len(colors)]
            pts = [(box[0] + (box[2] - box[0]) * x / x_max,
                    bottom - (bottom - top) * ((y - lo) / span if span else 0.5)) for x, y in zip(xs, ys)]
            draw.line(pts if len(pts) > 1 else pts * 2, fill=color, width=2)
            for px, py in pts:
                draw.ellipse((px - 2, py - 2, px + 2, py + 2), fill=color)
            draw.text((box[0] + 6, box[3] + 8 + 14 * k), name, fill=color)
        draw.text((box[0] + 4, box[1] + 2), f'max {hi:.4g}', fill='black')
        draw.text((box[0] + 4, box[3] - 14), f'min {lo:.4g}', fill='black')
        draw.text((box[2] - 60, box[3] + 8), f'epoch {x_max}', fill='black')
    return img


__all__ = ['Curve', 'CurveData', 'curve_data', 'read_log', 'write_training_curve']
