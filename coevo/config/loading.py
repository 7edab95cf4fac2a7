"""Read YAML configs, apply dotted ``key.path=value`` overrides, validate with pydantic.

Follows torchtune's flow: YAML gives the defaults, ``--set`` overrides adjust them, and a
frozen ``extra="forbid"`` model rejects typos with the dotted path the user would fix.
"""

from __future__ import annotations

import copy
import difflib
import os
import reprlib
import types
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

ModelT = TypeVar("ModelT", bound=BaseModel)
PathLike = str | os.PathLike[str]


class ConfigError(ValueError):
    """Bad config: one ``<dotted.path>: <what is wrong> (<what is allowed>)`` line a problem."""

    def __init__(self, problems: str | Sequence[str]) -> None:
        self.problems = (problems,) if isinstance(problems, str) else tuple(problems)
        super().__init__("\n".join(self.problems))


def load_yaml(path: PathLike) -> dict[str, Any]:
    """Read a YAML file whose top level is a mapping; an empty file reads as ``{}``.

    Raises:
        ConfigError: The file is missing, unreadable, bad YAML or not a mapping.
    """
    try:
        with open(path, encoding="utf-8") as stream:
            data = yaml.safe_load(stream)
    except (OSError, UnicodeDecodeError) as exc:
        reason = "not found" if isinstance(exc, FileNotFoundError) else f"unreadable: {exc}"
        raise ConfigError(f"{path}: config file {reason} (expected a YAML file)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or exc
        raise ConfigError(f"{path}: YAML syntax error{where}: {problem}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level is a {type(data).__name__} (expected a mapping)")
    return data


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``a.b.c=value`` override applied in order.

    Values are parsed with ``yaml.safe_load``; integer segments index lists
    (``strategies.1.lr=0.01``). Missing mapping keys are created so optional knobs can be
    set, but indexing past a list's end or into a scalar is an error.

    Raises:
        ConfigError: Listing every override that could not be applied.
    """
    if isinstance(overrides, str):
        raise TypeError(f"overrides must be a list of key.path=value strings, got {overrides!r}")
    result = copy.deepcopy(dict(data))
    outcomes = [(override, _apply_one(result, override)) for override in overrides]
    problems = [f"override {override!r}: {problem}" for override, problem in outcomes if problem]
    if problems:
        raise ConfigError(problems)
    return result


def _apply_one(root: dict[str, Any], override: str) -> str | None:
    """Apply one override to ``root`` in place; return a problem line or None."""
    key_path, sep, value_text = override.partition("=")
    segments = key_path.strip().split(".")
    if not sep or not all(segments):
        return "not an override (expected the form key.path=value)"
    try:
        value = yaml.safe_load(value_text)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or exc
        return f"value {value_text!r} is not valid YAML ({problem}; quote it for a string)"
    node: Any = root
    for depth, segment in enumerate(segments):
        path = ".".join(segments[: depth + 1])
        key: Any = segment
        if isinstance(node, list):
            if not segment.isdigit() or int(segment) >= len(node):
                allowed = f"use an index 0..{len(node) - 1}" if node else "the list is empty"
                what = f"index {segment} is past the end" if segment.isdigit() else "not an index"
                return f"{path}: {what} of a {len(node)}-item list ({allowed})"
            key = int(segment)
        elif not isinstance(node, dict):
            parent = ".".join(segments[:depth])
            return f"{path}: {parent} is {node!r}, not a mapping or list (set {parent}=... instead)"
        if depth == len(segments) - 1:
            node[key] = value
        else:
            node = node.setdefault(key, {}) if isinstance(node, dict) else node[key]
    return None


def parse(
    model: type[ModelT], data: Mapping[str, Any], *, source: str = "config", prefix: str = ""
) -> ModelT:
    """Validate ``data`` as ``model``, turning pydantic's errors into one ConfigError.

    Lines read ``<source>: <dotted.path>: <problem>``; unknown keys list the allowed names.
    Discriminated-union tags are left out of the path so it matches the YAML. ``prefix`` is
    prepended to every path when ``data`` is a part of a larger file (``strategies.1.``).
    """
    try:
        return model.model_validate(dict(data))
    except ValidationError as exc:
        lines = [f"{source}: {prefix}{_describe(model, error)}" for error in exc.errors()]
        raise ConfigError(list(dict.fromkeys(lines))) from None


def load_config(model: type[ModelT], path: PathLike, overrides: Sequence[str] = ()) -> ModelT:
    """Read ``path``, apply ``overrides``, validate as ``model``; ConfigError if any fails."""
    return parse(model, apply_overrides(load_yaml(path), overrides), source=str(path))


def dump_config(config: BaseModel) -> str:
    """Render ``config`` as YAML text that ``load_config`` reads back to an equal model."""
    data = config.model_dump(mode="json", by_alias=True)
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def _describe(model: type[BaseModel], error: Any) -> str:
    """Format one pydantic error dict as ``<dotted.path>: <problem>``."""
    loc = tuple(error["loc"])
    if error["type"] == "extra_forbidden" and loc:
        shown, labels, parent = _walk(model, loc[:-1])
        shown.append(str(loc[-1]))
        members = [member for member in _union_members(parent) if _is_model(member)]
        fields = members[0].model_fields.items() if len(members) == 1 else ()
        allowed = sorted(field.alias or name for name, field in fields)
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f", did you mean {close[0]!r}?" if close else ""
        problem = f"unknown field{hint} (allowed: {', '.join(allowed) or 'none listed'})"
    else:
        shown, labels, _ = _walk(model, loc)
        problem, given = error["msg"], error.get("input")
        if error["type"] != "missing":
            problem += f" (got {reprlib.repr(given)})"
    context = "".join(f"as {label}: " for label in labels)  # which member of a plain union
    return f"{'.'.join(shown) or '(top level)'}: {context}{problem}"


def _walk(model: type[BaseModel], loc: Sequence[Any]) -> tuple[list[str], list[str], Any]:
    """Follow ``loc`` through annotations: (YAML path, union labels, end annotation or None)."""
    shown: list[str] = []
    labels: list[str] = []
    current: Any = model
    for segment in loc:
        members = _union_members(current)
        if len(members) <= 1:
            shown.append(str(segment))
            current = _child_type(members[0], segment)
            continue
        # Pydantic puts each union member's tag in ``loc``; it is no key in the YAML.
        current = next((m for m in members if _is_model(m) and _has_tag(m, segment)), None)
        if current is None or segment == current.__name__:
            labels.append(str(segment))
    return shown, labels, current


def _union_members(annotation: Any) -> list[Any]:
    """Return the non-None members of a union, or ``[annotation]`` for anything else."""
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) not in (Union, types.UnionType):
        return [annotation]
    members = (_union_members(arg) for arg in get_args(annotation) if arg is not type(None))
    return [member for nested in members for member in nested]


def _has_tag(model: type[BaseModel], tag: Any) -> bool:
    """Tell whether pydantic labels ``model`` as ``tag`` inside a union."""
    fields = model.model_fields.values()
    literals = [get_args(f.annotation) for f in fields if get_origin(f.annotation) is Literal]
    return tag == model.__name__ or any(tag in values for values in literals)


def _child_type(annotation: Any, segment: Any) -> Any:
    """Return the annotation one ``loc`` segment below ``annotation``, or None."""
    if _is_model(annotation):
        fields = annotation.model_fields.items()
        return next((f.annotation for n, f in fields if segment in (n, f.alias)), None)
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (list, tuple, set, frozenset, Sequence) and isinstance(segment, int) and args:
        return args[0]
    if origin in (dict, Mapping) and len(args) == 2:
        return args[1]
    return None


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)
