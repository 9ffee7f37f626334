"""``python -m modelscope_utuning`` = the ``modelscope-utuning`` command."""
from .cli import main

raise SystemExit(main())
