"""YAML configs with a pydantic schema: load, apply ``key=value`` overrides, report every error at once.

Every stage script defines its schema as pydantic models built on :class:`Section` (unknown keys forbidden,
values frozen) and calls :func:`load_config`. Errors come back together, each with its dotted key path and,
for an unknown key, the closest valid names::

    config/lora_train.yaml: invalid config
      optim.lrr: unknown key (did you mean 'lr'?)
      train.mixed_precision: Input should be 'no', 'fp16' or 'bf16'

No torch import here: a bad config fails in milliseconds, before accelerate starts.
"""

from __future__ import annotations

import contextlib
import difflib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from ai.common.cli import UserError
from ai.common.io import atomic_write_text

C = TypeVar("C", bound=BaseModel)


class Section(BaseModel):
    """Base for config sections: unknown keys are errors (a typo never silently falls back to a default)."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML: {exc}".replace("\n", " ")) from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (['a', 'b'], value); the value is read as YAML (``1e-4`` -> float, ``[1, 2]`` -> list)."""
    if "=" not in text or text.startswith("-"):
        raise UserError(
            f"override {text!r} is not key=value; use dotted keys such as optim.learning_rate=5e-5"
            + (f" (did you mean {text.lstrip('-').replace(' ', '=')}?)" if text.startswith("--") else "")
        )
    key, value = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise UserError(f"override {text!r} has an empty key part")
    parsed = yaml.safe_load(value) if value != "" else ""
    # YAML 1.1 reads 1e-4 (no dot) as a string: accept it as the float users mean
    if isinstance(parsed, str) and any(c in parsed.lower() for c in "e.") and not parsed.isalpha():
        with contextlib.suppress(ValueError):
            parsed = float(parsed)
    return key.split("."), parsed


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with dotted ``key=value`` overrides applied (sections created as needed)."""
    import copy

    out = copy.deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        node = out
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                if k in node and node[k] is not None:
                    raise UserError(f"override {text!r}: {k} is a value, not a section")
                node[k] = {}
            node = node[k]
        node[keys[-1]] = value
    return out


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The valid field names at ``loc`` (the parent of an unknown key), following nested models."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return []
        annotation = fields[part].annotation
        current = _model_in(annotation)
        if current is None:
            return []
    return list(getattr(current, "model_fields", {}))


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def format_validation_error(exc: ValidationError, model: type[BaseModel], source: str) -> str:
    lines = [f"{source}: invalid config"]
    for err in exc.errors():
        loc = tuple(err["loc"])
        path = ".".join(str(p) for p in loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=3, cutoff=0.5)
            hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
            if not close and allowed:
                hint = f" (valid keys here: {', '.join(allowed)})"
            lines.append(f"  {path}: unknown key{hint}")
        else:
            msg = err["msg"]
            if err["type"] not in ("missing",) and "input" in err and not isinstance(err["input"], dict):
                msg += f" (got {err['input']!r})"
            lines.append(f"  {path}: {msg}")
    return "\n".join(lines)


def validate_config(model: type[C], data: dict[str, Any], source: str = "config") -> C:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise UserError(format_validation_error(exc, model, source)) from None


def load_config(model: type[C], path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> C:
    """Read ``path`` (YAML), apply overrides, validate against ``model``; all errors in one UserError."""
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides)
    return validate_config(model, data, str(path) if path is not None else "config")


def config_to_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def save_resolved_config(cfg: BaseModel, path: str | os.PathLike) -> None:
    """Write the resolved config (defaults filled in, overrides applied) next to a run's outputs."""
    atomic_write_text(path, config_to_yaml(cfg))


def config_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two resolved configs (for refusing incompatible resumes)."""
    keys = sorted(set(old) | set(new))
    out: list[str] = []
    for k in keys:
        a, b = old.get(k), new.get(k)
        path = f"{prefix}{k}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, path + ".")
        elif a != b:
            out.append(path)
    return out
