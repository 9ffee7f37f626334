"""``predict``: top-k labels of images, files, folders or URLs, from one model or several side by side."""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict, List, Sequence

from .. import registration  # noqa: F401  (registers the plugin)
from ..data import IMAGE_EXTENSIONS
from ..data.readers import walk_images
from .common import CLIError
from .models import resolve_model

PREDICT_CHUNK = 64  # images per pipeline call (the pipeline batches inside it)


def expand_inputs(items: Sequence[str]) -> List[str]:
    """Files as given, folders walked (sorted, image extensions only, hidden entries skipped), URLs kept."""
    out: List[str] = []
    for item in items:
        if item.startswith(('http://', 'https://')):
            out.append(item)
        elif os.path.isdir(item):
            found = walk_images(item)
            if not found:
                raise CLIError(f'folder {item!r} holds no images ({", ".join(IMAGE_EXTENSIONS)})')
            out += found
        elif os.path.isfile(item):
            out.append(item)
        else:
            raise CLIError(f'{item!r}: no such file or folder')
    return out


def format_table(rows: List[Dict[str, Any]], topk: int) -> str:
    """``image  label  score`` (and the other top-k labels) as aligned text."""
    width = max([len('image')] + [len(r['input']) for r in rows])
    lw = max([len('label')] + [len(r['labels'][0]) for r in rows if r['labels']])
    head = f'{"image":<{width}}  {"label":<{lw}}  score'
    if topk > 1:
        head += '   next'
    lines = [head]
    for r in rows:
        line = f'{r["input"]:<{width}}  {r["labels"][0]:<{lw}}  {r["scores"][0]:.4f}'
        if topk > 1 and len(r['labels']) > 1:
            line += '   ' + ', '.join(f'{lab} {s:.3f}' for lab, s in zip(r['labels'][1:], r['scores'][1:]))
        lines.append(line)
    return '\n'.join(lines)


def format_columns(rows: List[Dict[str, Any]], names: List[str]) -> str:
    """``image  <model 1>  <model 2> ...``: each model's top label and score in a column of its own."""
    cells = [[f'{m["labels"][0]} {m["scores"][0]:.4f}' for m in r['models']] for r in rows]
    width = max([len('image')] + [len(r['input']) for r in rows])
    widths = [max([len(n)] + [len(c[i]) for c in cells]) for i, n in enumerate(names)]
    lines = ['  '.join([f'{"image":<{width}}'] + [f'{n:<{w}}' for n, w in zip(names, widths)])]
    for r, c in zip(rows, cells):
        lines.append('  '.join([f'{r["input"]:<{width}}'] + [f'{x:<{w}}' for x, w in zip(c, widths)]))
    return '\n'.join(lines)


def cmd_predict(args) -> int:
    if args.topk < 1:
        raise CLIError(f'--topk {args.topk}: expected a positive number')
    if args.batch_size < 1:
        raise CLIError(f'--batch-size {args.batch_size}: expected a positive number')
    specs = [m for m in args.model.split(',') if m] + list(args.also or [])
    models = [resolve_model(m, allow_config=False) for m in specs]
    if args.backbone and not os.path.exists(args.backbone):
        raise CLIError(f'--backbone {args.backbone!r}: no such file or folder')
    inputs = expand_inputs(args.inputs)
    from modelscope.pipelines import pipeline
    from tqdm import tqdm
    kwargs = {'device': args.device} if args.device else {}
    if args.backbone:
        kwargs['backbone'] = os.path.abspath(args.backbone)
    many = len(models) > 1
    classifier = pipeline('vision-efficient-tuning', models if many else models[0], batch_size=args.batch_size,
                          **kwargs)
    rows: List[Dict[str, Any]] = []
    chunk = max(PREDICT_CHUNK, args.batch_size)

    def row(path, r):
        return {'input': path, 'labels': list(r['labels']), 'scores': [float(s) for s in r['scores']]}
    with tqdm(total=len(inputs), unit='img', desc='predict', file=sys.stderr,
              disable=True if len(inputs) <= chunk else None) as bar:
        for start in range(0, len(inputs), chunk):
            part = inputs[start:start + chunk]
            results = classifier(part, topk=args.topk)
            if many:  # one result per model and image
                rows += [{'input': path, 'models': [dict(row(path, m), model=s) for m, s in zip(r, specs)]}
                         for path, r in zip(part, results)]
            else:
                rows += [row(path, r) for path, r in zip(part, results)]
            bar.update(len(part))
    if args.json:
        text = json.dumps(rows, indent=2)
    else:
        text = format_columns(rows, specs) if many else format_table(rows, args.topk)
    if args.output:
        with open(args.output, 'w', encoding='utf-8') as f:
            f.write(text + '\n')
        print(f'{len(rows)} predictions written to {args.output}', file=sys.stderr)
    else:
        print(text)
    return 0

