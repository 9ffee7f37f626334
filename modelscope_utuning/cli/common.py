"""What every command shares: the program name, the one-line error, JSON files, metrics output, the trainer."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict

from .. import registration  # noqa: F401  (registers the plugin)
from ..fileio import read_json_object

PROG = 'modelscope-utuning'
TOKEN_ENV = 'MODELSCOPE_API_TOKEN'


class CLIError(Exception):
    """A bad argument: reported in one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + message
        self.exit(2, f'{self.prog}: error: {message} (see {self.prog} --help)\n')


def read_json(path: str) -> Dict:
    try:
        return read_json_object(path)
    except ValueError as e:
        raise CLIError(str(e)) from None


def build_trainer(**default_args):
    from modelscope.metainfo import Trainers
    from modelscope.trainers import build_trainer
    return build_trainer(name=Trainers.vision_efficient_tuning, default_args=default_args)


def print_metrics(metrics: Dict[str, Any], as_json: bool, out=None) -> None:
    out = out or sys.stdout
    if as_json:
        print(json.dumps(metrics, indent=2, default=float), file=out)
        return
    width = max((len(k) for k in metrics), default=6)
    for k, v in metrics.items():
        print(f'{k:<{width}}  {v:.4f}' if isinstance(v, float) else f'{k:<{width}}  {v}', file=out)

