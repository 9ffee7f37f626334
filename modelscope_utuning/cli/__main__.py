"""``python -m modelscope_utuning.cli``."""
import sys

from . import main

sys.exit(main())
