"""Build an SDXL-architecture model folder from config, no downloads.

Usage:
    python -m ai.common.build_model --preset tiny --out models/tiny-sdxl
    python -m ai.common.build_model --preset sdxl-base --out models/sdxl-base-random --dtype bfloat16
"""

import sys

from ai.common.cli import run_main
from ai.common.models import main

if __name__ == "__main__":
    sys.exit(run_main(main))
