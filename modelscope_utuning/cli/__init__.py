"""``modelscope-utuning``: train, evaluate, predict, export and publish U-Tuning models from the command line.

::

    modelscope-utuning demo [--quick]
    modelscope-utuning train MODEL --train-data DATA [--eval-data DATA] [--work-dir DIR] [key=value ...]
    modelscope-utuning eval MODEL --data DATA [--json]
    modelscope-utuning predict MODEL IMAGE_OR_FOLDER ... [--topk K] [--json]
    modelscope-utuning export MODEL OUT_DIR (--tuner-only | --merge-lora | --onnx)
    modelscope-utuning push MODEL_DIR OWNER/NAME          # token from $MODELSCOPE_API_TOKEN
    modelscope-utuning serve MODEL [--host H] [--port P]  # web demo (extra [gradio])

MODEL is a model folder (configuration.json, and pytorch_model.pt once trained), a hub id (``owner/name``), a
preset name (``modelscope-utuning presets`` lists them) or the path of a configuration.json. DATA is an image
folder (one sub-directory per class), a CSV / TSV / JSONL manifest, a VTAB-1K ``"path label"`` list or an FGVC
json split. ``key=value`` overrides edit the configuration before training, as ModelScope's
``Config.merge_from_dict`` does (``train.max_epochs=20``, ``model.backbone.tuners.0.dim=16``); values are read as
JSON when they parse (numbers, true / false / null, lists, objects), else as strings; a list value replaces the
list it names.

Exit status: 0 on success, 2 for bad arguments (one line on stderr), 1 when the work itself fails.
"""
from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

from .common import PROG, CLIError
from .models import list_presets, locate_model, resolve_model
from .overrides import apply_overrides, parse_override, parse_overrides
from .parser import build_parser
from .predict import expand_inputs, format_columns, format_table
from .train import resume_point

__all__ = ['CLIError', 'apply_overrides', 'build_parser', 'expand_inputs', 'format_columns', 'format_table',
           'list_presets', 'locate_model', 'main', 'parse_override', 'parse_overrides', 'resolve_model',
           'resume_point']


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:
            if getattr(args, 'command', None) == 'train' and not any(e.startswith('-') for e in extra):
                args.overrides = list(args.overrides) + extra  # key=value after the options
            else:
                parser.error(f'unrecognized arguments: {" ".join(extra)}')
    except SystemExit as e:  # --help, --version, or a parse error (already printed)
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    if not getattr(args, 'command', None):
        parser.print_help(sys.stderr)
        return 2
    prog = f'{PROG} {args.command}'
    try:
        return int(args.func(args) or 0)
    except CLIError as e:
        print(f'{prog}: error: {e}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f'{prog}: interrupted', file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `modelscope-utuning predict ... | head`: the reader left, nothing to report
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that Python's final flush does not fail again
        return 1
    except (ValueError, OSError, RuntimeError, TypeError, KeyError) as e:
        if args.traceback:
            raise
        print(f'{prog}: error: {type(e).__name__}: {e}' if isinstance(e, (KeyError, TypeError)) else
              f'{prog}: error: {e}', file=sys.stderr)
        print(f'(run `{PROG} --traceback {args.command} ...` for the full traceback)', file=sys.stderr)
        return 1

