"""`python -m ernie_core.train CONFIG.yaml [key=value ...] [--print-config]`"""
from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
