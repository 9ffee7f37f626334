"""``push`` to the hub, ``serve`` the web demo, run the embedded ``demo``, list the ``presets``."""
from __future__ import annotations

import json
import os
import sys

from ..extras import MissingExtraError
from ..location import HUB_ID
from .common import TOKEN_ENV, CLIError
from .models import list_presets, resolve_model

def cmd_push(args) -> int:
    folder = args.model_dir
    if not os.path.isdir(folder):
        raise CLIError(f'{folder!r}: no such folder')
    if not os.path.isfile(os.path.join(folder, 'configuration.json')):
        raise CLIError(f'{folder!r} has no configuration.json (push a trained output folder)')
    if not HUB_ID.match(args.repo_id):
        raise CLIError(f'repository id {args.repo_id!r}: expected owner/name')
    token = os.environ.get(TOKEN_ENV, '').strip()
    if not token:
        raise CLIError(f'no hub token: set {TOKEN_ENV} to an access token of your ModelScope account')
    from modelscope.hub.api import HubApi
    from modelscope.hub.constants import ModelVisibility
    api = HubApi(token=token)
    visibility = ModelVisibility.PUBLIC if args.public else ModelVisibility.PRIVATE
    api.create_repo(args.repo_id, token=token, visibility=visibility, exist_ok=True)
    api.upload_folder(repo_id=args.repo_id, folder_path=os.path.abspath(folder),
                      commit_message=args.message or f'Upload {os.path.basename(os.path.abspath(folder))}',
                      revision=args.revision, token=token, ignore_patterns=['.tmp-*', '*.pyc', '__pycache__'])
    print(f'uploaded {folder} to {api.get_model_url(args.repo_id)}')
    return 0


def cmd_serve(args) -> int:
    from ..deploy import app as web  # optional: the Gradio app ([gradio] extra) loads only for serve
    if not 0 < args.port < 65536:
        raise CLIError(f'--port {args.port}: expected 1 to 65535')
    if args.topk < 1:
        raise CLIError(f'--topk {args.topk}: expected a positive number')
    try:
        web.require_gradio()  # before the model is loaded: a missing package is a setup problem, said in one line
    except MissingExtraError as e:
        raise CLIError(str(e)) from None
    model = resolve_model(args.model, allow_config=False)
    page = web.build_app(model, topk=args.topk, device=args.device)
    print(f'serving {args.model} on http://{args.host}:{args.port} (Ctrl+C stops)', flush=True)
    web.launch(page, host=args.host, port=args.port, quiet=True)
    return 0


def cmd_demo(args) -> int:
    from ..demo import run_demo  # keeps the CLI light: the demo (an entry point of its own) loads only for demo
    if args.threads is not None and args.threads < 0:
        raise CLIError(f'--threads {args.threads}: expected 0 (torch default) or more')
    if args.segmentation:
        from ..demo_segmentation import run_segmentation_demo  # keeps the CLI light (see run_demo above)
        result = run_segmentation_demo(args.work_dir, quick=args.quick, show_logs=args.show_logs,
                                       threads=1 if args.threads is None else args.threads)
        if args.json:
            print(json.dumps(result, indent=2, default=float))
        return 0
    result = run_demo(args.work_dir, quick=args.quick, verbose=True, show_logs=args.show_logs,
                      threads=args.threads)
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != 'settings'}, indent=2, default=float))
    return 0


def cmd_presets(args) -> int:
    presets = list_presets()
    if not presets:
        print('no presets installed', file=sys.stderr)
        return 0
    width = max(len(n) for n in presets)
    for name, path in presets.items():
        print(f'{name:<{width}}  {path}')
    return 0

