"""The ``.env`` file (copied from ``.env.example``): read the same way by the launchers and by the Python stages.

Which file: ``$BDD_SDXL_ENV_FILE`` when that variable is set (empty: none), else ``.env`` at the repo root. It is
read with python-dotenv (``KEY=value`` lines, ``#`` comments, quotes, ``export`` prefixes, ``${VAR}`` inside
values) and never overrides a variable that is already set, so ``MODEL_DIR=/other bash ai/lora/run_lora_train.sh``
wins over the file for one run. The stage scripts load it when they read a config (:func:`core.config.read_yaml`),
so ``python -m ai.lora.train_lora_sdxl ...`` sees the same variables as the launcher, which runs
``python -m core.envfile`` and evaluates the ``export`` lines it prints (bash never parses the file itself).

No imports beyond python-dotenv: the launchers call this before every stage.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from pathlib import Path

ENV_FILE_VAR = "BDD_SDXL_ENV_FILE"
REPO_ROOT = Path(__file__).resolve().parents[1]
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def env_file() -> Path | None:
    """The .env file to read, or None (``$BDD_SDXL_ENV_FILE`` empty, or no .env at the repo root)."""
    chosen = os.environ.get(ENV_FILE_VAR)
    if chosen is not None:
        return Path(chosen) if chosen else None
    default = REPO_ROOT / ".env"
    return default if default.is_file() else None


def new_variables(path: Path | None = None) -> dict[str, str]:
    """The file's variables that the environment does not set yet (``KEY=`` gives ''; a bare ``KEY`` nothing)."""
    from dotenv import dotenv_values

    path = path if path is not None else env_file()
    if path is None:
        return {}
    if not path.is_file():
        from core.cli import UserError

        raise UserError(f"{ENV_FILE_VAR}={path}: file not found (unset it to use .env at the repo root)")
    values = dotenv_values(path, interpolate=True, encoding="utf-8")
    return {
        key: value
        for key, value in values.items()
        if value is not None and _NAME.match(key) and key not in os.environ
    }


def load_env_file() -> dict[str, str]:
    """Set the .env file's variables that are not set yet in ``os.environ``; returns what it set."""
    added = new_variables()
    os.environ.update(added)
    return added


def main() -> int:
    """Print ``export KEY='value'`` for each new variable (the launchers ``eval`` this)."""
    from core.cli import UserError

    try:
        added = new_variables()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for key, value in added.items():
        print(f"export {key}={shlex.quote(value)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
