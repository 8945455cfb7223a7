"""The mini-BDD100K command (``python convert/make_mini_bdd.py`` / ``python -m convert.make_mini_bdd``), as the README
names it; the generator lives in the mini_bdd package (mini_bdd/make.py), below every stage."""

import sys

from core.cli import run_main
from mini_bdd.make import main

if __name__ == "__main__":
    sys.exit(run_main(main))
