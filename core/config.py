"""YAML configs with a pydantic schema: load, apply ``key=value`` overrides, report every error at once.

Every stage script defines its schema as pydantic models built on :class:`Section` (unknown keys forbidden,
values frozen) and calls :func:`load_config`. Errors come back together, each with its dotted key path and,
for an unknown key, the closest valid names::

    config/lora_train.yaml: invalid config
      optim.lrr: unknown key (did you mean 'lr'?)
      train.mixed_precision: Input should be 'no', 'fp16' or 'bf16'

String values may name environment variables, expanded after YAML parsing (values only, never keys or
comments) and in ``key=value`` overrides alike:

* ``${NAME}``: the variable's value; an error names the key and the variable when it is not set;
* ``${NAME:-default}``: the default when the variable is unset or empty (the default may hold references too:
  ``${VAE_DIR:-${MODEL_DIR}/vae}``);
* a value that is exactly one reference and expands to the empty string becomes null (``vae: ${VAE_DIR:-}`` with
  ``VAE_DIR`` empty or unset: no separate VAE); an empty ``${NAME}`` inside a longer value is an error, since
  ``${BDD_DATA_DIR}/labels`` would silently become ``/labels``;
* expanded values are text that the schema converts like any YAML string: ``${STEPS:-1000}`` for an int key
  validates as the int 1000, ``true``/``false`` for a bool; a list cannot come from a variable;
* ``$${`` writes a literal ``${``; any other ``$`` is kept as it is.

Variables come from the environment and from ``.env`` at the repo root (:mod:`core.envfile`; the environment
wins), which :func:`read_yaml` loads first, so a stage run with plain ``python`` sees what its launcher sees.

No torch import here: a bad config fails in milliseconds, before accelerate starts.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from core.cli import UserError, warn_deprecated
from core.io import atomic_write_text

C = TypeVar("C", bound=BaseModel)
_BOOL_TAG = "tag:yaml.org,2002:bool"


class _Loader(yaml.SafeLoader):
    """YAML with only true/false as booleans (as YAML 1.2): ``mixed_precision: no`` and the override
    ``train.mixed_precision=no`` mean the string 'no', not False; a bool key still reads yes/no/on/off."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def load_yaml_text(text: str) -> Any:
    """``yaml.safe_load`` with YAML 1.2's booleans (see :class:`_Loader`)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


class Section(BaseModel):
    """Base for config sections: unknown keys are errors (a typo never silently falls back to a default)."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def read_yaml(path: str | os.PathLike, *, expand: bool = True) -> dict[str, Any]:
    """A YAML mapping, with ``${VAR}`` references in its values expanded (``expand``; .env loaded first)."""
    from core.envfile import load_env_file

    path = Path(path)
    if not path.is_file():
        raise UserError(f"config not found: {path}")
    load_env_file()
    try:
        data = load_yaml_text(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML: {exc}".replace("\n", " ")) from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return expand_env(data, source=str(path))[0] if expand else data


# ---------------------------------------------------------------------------------------------------------------
# ${VAR} and ${VAR:-default} in values
# ---------------------------------------------------------------------------------------------------------------

_VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class _RefError(ValueError):
    pass


class _Expander:
    """A small recursive scanner for ``${NAME}``, ``${NAME:-default}`` (nestable) and the ``$${`` escape."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.empty: list[str] = []  # ${NAME} references (no default) that were set but empty

    def scan(self, text: str, pos: int, evaluate: bool, in_default: bool) -> tuple[str, int]:
        """Expand ``text`` from ``pos`` to its end (or, in a default, to the ``}`` that closes it)."""
        out: list[str] = []
        depth = 0  # literal { } pairs inside a default, e.g. ${A:-{x}}
        while pos < len(text):
            if text.startswith("$${", pos):
                out.append("${")
                pos += 3
            elif text.startswith("${", pos):
                value, pos = self.reference(text, pos + 2, evaluate)
                out.append(value)
            elif in_default and text[pos] == "}" and depth == 0:
                return "".join(out), pos
            else:
                if in_default:
                    depth += {"{": 1, "}": -1}.get(text[pos], 0)
                out.append(text[pos])
                pos += 1
        if in_default:
            raise _RefError("a ${...} reference is not closed with }")
        return "".join(out), pos

    def reference(self, text: str, pos: int, evaluate: bool) -> tuple[str, int]:
        """One reference; ``pos`` is just after its ``${``. Returns its value and the position after its ``}``."""
        match = _VAR_NAME.match(text, pos)
        if match is None:
            raise _RefError(
                f"{text[pos - 2 : pos + 10]!r} is not a variable reference; use ${{NAME}} or ${{NAME:-default}} "
                "(NAME: letters, digits, _), or $${ for a literal ${"
            )
        name, pos = match.group(), match.end()
        if text.startswith("}", pos):
            value = self.env.get(name)
            if evaluate and value is None:
                raise _RefError(
                    f"${{{name}}} is not set: set {name} in .env (see .env.example) or in the environment"
                )
            if evaluate and value == "":
                self.empty.append(name)
            return value or "", pos + 1
        if text.startswith(":-", pos):
            value = self.env.get(name) or ""
            default, pos = self.scan(text, pos + 2, evaluate and not value, in_default=True)
            return value or default, pos + 1
        if pos >= len(text):
            raise _RefError("a ${...} reference is not closed with }")
        raise _RefError(
            f"${{{name}{text[pos : pos + 2]}...}} is not supported; use ${{{name}}} or ${{{name}:-default}}"
        )


def expand_value(text: str, env: Mapping[str, str] | None = None) -> str | None:
    """``text`` with its references expanded; None when it is exactly one reference that expands to ''.

    Raises ValueError (its message names the variable and where to set it) for an unset ``${NAME}``, an empty
    ``${NAME}`` inside a longer value, or a malformed reference.
    """
    if "$" not in text:
        return text
    expander = _Expander(os.environ if env is None else env)
    value, _ = expander.scan(text, 0, evaluate=True, in_default=False)
    whole = text.startswith("${") and _Expander({}).reference(text, 2, evaluate=False)[1] == len(text)
    if whole:
        return value or None
    if expander.empty:
        name = expander.empty[0]
        raise _RefError(
            f"${{{name}}} is empty, which would leave {text!r} as {value!r}: set {name} in .env (see .env.example) "
            f"or write ${{{name}:-default}}"
        )
    return value


def expand_env(
    data: Any, env: Mapping[str, str] | None = None, source: str = "config"
) -> tuple[Any, dict[str, str]]:
    """``data`` with every string value expanded (:func:`expand_value`), and where each expanded value came from.

    The second result maps dotted keys to their text before expansion (validation errors quote it). All errors
    are reported at once in one UserError naming each dotted key.
    """
    origins: dict[str, str] = {}
    errors: list[str] = []

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, dict):
            return {k: walk(v, f"{path}.{k}" if path else str(k)) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(node)]
        if isinstance(node, str) and "$" in node:
            try:
                value = expand_value(node, env)
            except ValueError as exc:
                errors.append(f"  {path or '(top level)'}: {exc}")
                return node
            if value != node:
                origins[path] = node
            return value
        return node

    out = walk(data, "")
    if errors:
        raise UserError("\n".join([f"{source}: cannot expand environment variables", *errors]))
    return out, origins


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
    try:
        parsed = load_yaml_text(value) if value != "" else ""
    except yaml.YAMLError as exc:
        raise UserError(
            f"override {text!r}: the value is not valid YAML ({str(exc).splitlines()[0]}); quote it for the shell, "
            f"e.g. '{key}=[1, 2]'"
        ) from None
    # YAML 1.1 reads 1e-4 (no dot) as a string: accept it as the float users mean
    if isinstance(parsed, str) and any(c in parsed.lower() for c in "e.") and not parsed.isalpha():
        with contextlib.suppress(ValueError):
            parsed = float(parsed)
    return key.split("."), parsed


def set_dotted(data: dict[str, Any], keys: Sequence[str], value: Any, text: str = "") -> None:
    """``data[keys[0]][keys[1]]... = value``, sections created as needed; a value in the way is an error."""
    node = data
    for k in keys[:-1]:
        if not isinstance(node.get(k), dict):
            if k in node and node[k] is not None:
                raise UserError(f"override {text or '.'.join(keys)!r}: {k} is a value, not a section")
            node[k] = {}
        node = node[k]
    node[keys[-1]] = value


def apply_overrides(
    data: dict[str, Any], overrides: Sequence[str], renamed: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Return a copy of ``data`` with dotted ``key=value`` overrides applied (sections created as needed); an
    override of an old key name (``renamed``: old dotted key -> new) sets the new key, with a warning."""
    import copy

    out = copy.deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        old = ".".join(keys)
        if renamed and old in renamed:
            warn_deprecated(old, renamed[old])
            keys = renamed[old].split(".")
        set_dotted(out, keys, value, text)
    return out


def rename_keys(data: dict[str, Any], renamed: Mapping[str, str], source: str = "config") -> dict[str, Any]:
    """``data`` with each old dotted key (``renamed``: old -> new) moved to its new name, with a warning naming the
    new key; an old and a new key both set to different values is an error (which one was meant?)."""
    import copy

    out = copy.deepcopy(data)
    for old, new in renamed.items():
        *parents, leaf = old.split(".")
        node = out
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            continue
        value = node.pop(leaf)
        warn_deprecated(f"{source}: {old}", new)
        *new_parents, new_leaf = new.split(".")
        target = out
        for part in new_parents:
            if not isinstance(target.get(part), dict):
                target[part] = {}
            target = target[part]
        if new_leaf in target and target[new_leaf] != value:
            raise UserError(
                f"{source}: {new} and {old} (its old name) are both set, to {target[new_leaf]!r} and {value!r}; "
                f"keep {new} only"
            )
        target[new_leaf] = value
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


def format_validation_error(
    exc: ValidationError, model: type[BaseModel], source: str, origins: Mapping[str, str] | None = None
) -> str:
    """One line per error with its dotted key; ``origins`` (from :func:`expand_env`) adds what a value expanded from."""
    lines = [f"{source}: invalid config"]
    for err in exc.errors():
        loc = tuple(err["loc"])
        path = ".".join(str(p) for p in loc) or "(top level)"
        origin = (origins or {}).get(path)
        hint = (
            f" (the value comes from {origin!r}: set the variable in .env, see .env.example, or in the environment)"
            if origin is not None
            else ""
        )
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
            lines.append(f"  {path}: {msg}{hint}")
    return "\n".join(lines)


def validate_config(
    model: type[C], data: dict[str, Any], source: str = "config", origins: Mapping[str, str] | None = None
) -> C:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise UserError(format_validation_error(exc, model, source, origins)) from None


def load_config(
    model: type[C],
    path: str | os.PathLike | None,
    overrides: Sequence[str] = (),
    flags: Mapping[str, Any] | None = None,
) -> C:
    """Read ``path`` (YAML; None: the schema's defaults), then the command-line ``flags`` that were given (dotted key
    -> value, None: not given), then the ``key=value`` overrides; expand ``${VAR}`` references; validate. All errors
    come in one UserError, each with its dotted key.

    Keys the schema renamed (its ``RENAMED_KEYS``: old dotted key -> new) still work, in the file and in overrides,
    with a warning that names the new key. A script's flags are other spellings of its keys (``--epochs`` sets
    ``train.epochs``), so a flag, the YAML key and ``train.epochs=...`` are one setting.
    """
    from core.envfile import load_env_file

    load_env_file()
    given = {key: value for key, value in (flags or {}).items() if value is not None}
    source = str(path) if path is not None else "config"
    if flags is not None:  # a script whose flags set keys: errors may come from either
        source = f"{path} with flags" if path is not None else "flags"
    renamed = getattr(model, "RENAMED_KEYS", {})
    data = rename_keys(read_yaml(path, expand=False), renamed, str(path)) if path is not None else {}
    for key, value in given.items():
        set_dotted(data, key.split("."), value)
    data, origins = expand_env(apply_overrides(data, overrides, renamed), source=source)
    return validate_config(model, data, source, origins)


#: argparse destinations of :func:`add_config_arguments` (every other flag of a script that uses them sets a key)
CONFIG_ARGUMENTS = ("config", "check", "overrides")


def add_config_arguments(parser, default_config: str | None = None, check_help: str | None = None) -> None:
    """The arguments every config-driven script takes: ``--config`` (YAML), ``--check`` and ``key=value`` overrides.

    The script's own flags are other spellings of config keys: declare each with ``dest="<dotted key>"`` and
    ``default=None`` (``parser.add_argument("--epochs", dest="train.epochs", type=int)``), and pass
    :func:`flag_values` to :func:`load_config`: YAML < flags < overrides, all validated by one schema.
    """
    parser.add_argument(
        "--config",
        default=default_config,
        help=f"YAML config (default: {default_config or 'none, the defaults'})",
    )
    parser.add_argument(
        "--check", action="store_true", help=check_help or "validate the config and the inputs, then exit"
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides (dotted keys, e.g. train.epochs=5)",
    )


def flag_values(args, exclude: Sequence[str] = ()) -> dict[str, Any]:
    """The config keys a parsed command line sets through flags (dotted key -> value; None: not given)."""
    return {k: v for k, v in vars(args).items() if k not in CONFIG_ARGUMENTS and k not in exclude}


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
