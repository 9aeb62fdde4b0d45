"""pydantic's validation errors as problems a person can act on.

Every problem is listed (up to ``MAX_PROBLEMS``), each with the key it is about as the user wrote
it (``routes[0].to[1].maxlen``), in plain words, with the environment variable that set the value
when one did, and the key that was probably meant when a key is unknown. The input is never
echoed: it may be a URL with a password in it.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from pydantic import BaseModel, Tag, ValidationError
from pydantic_core import ErrorDetails

MAX_PROBLEMS = 20

Loc = tuple[int | str, ...]
Problem = tuple[str, str]  # (key, what is wrong with it)

# What pydantic says, in the words of a config file.
_PLAIN = {
    "int_parsing": "must be a whole number",
    "int_type": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "bool_parsing": "must be true or false",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "string_too_short": "must not be empty",
    "dict_type": "must be a table",
    "model_type": "must be a table",
    "model_attributes_type": "must be a table",
    "tuple_type": "must be an array",
    "list_type": "must be an array",
    "missing": "required key is missing",
    "extra_forbidden": "unknown key",
}
# An empty array where at least one item is needed, by the key's name.
_NEEDS_ONE = {
    "to": "a route needs at least one destination",
    "sources": "at least one [[sources]] table is needed",
    "routes": "at least one [[routes]] table is needed",
    "url": "needs at least one URL",
}
# The union tags of a key that takes one value or an array of them (``[amqp] url``): which shape
# was given, not a key the user wrote.
SHAPE_TAGS = frozenset({"single", "list"})


def models_in(
    annotation: Any, tag: str | None = None
) -> Iterator[tuple[type[BaseModel], str | None]]:
    """The models an annotation can hold, each with its union tag (``Tag("stream")``) if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation, tag
        return
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        inner, *metadata = typing.get_args(annotation)
        tags = [item.tag for item in metadata if isinstance(item, Tag)]
        yield from models_in(inner, tags[0] if tags else tag)
        return
    if origin is not None or isinstance(annotation, types.UnionType):
        for argument in typing.get_args(annotation):
            yield from models_in(argument, tag)


def _field(model: type[BaseModel], key: str) -> Any:
    for name, info in model.model_fields.items():
        if key in (name, info.alias):
            return info
    return None


def known_keys(root: type[BaseModel], loc: Loc) -> list[str]:
    """The keys a table at ``loc`` may have (a union's tag in ``loc`` picks its kind)."""
    candidates: list[tuple[type[BaseModel], str | None]] = [(root, None)]
    for part in loc:
        if isinstance(part, int):
            continue
        tagged = [(model, tag) for model, tag in candidates if tag == part]
        if tagged and len(tagged) < len(candidates):
            candidates = [(model, None) for model, _ in tagged]
            continue
        candidates = [
            found
            for model, _ in candidates
            if (info := _field(model, part)) is not None
            for found in models_in(info.annotation)
        ]
    keys: dict[str, None] = {}
    for model, _ in candidates:
        for name, info in model.model_fields.items():
            keys[info.alias or name] = None
    return list(keys)


def key_path(loc: Loc) -> str:
    """``('routes', 0, 'to', 1, 'stream', 'maxlen')`` as written: ``routes[0].to[1].maxlen``."""
    key = ""
    for position, part in enumerate(loc):
        after_destination = position >= 2 and loc[position - 2] == "to" and isinstance(
            loc[position - 1], int
        )
        if after_destination and part in ("stream", "exchange"):
            continue  # the discriminator's tag, not a key the user wrote
        if isinstance(part, int):
            key += f"[{part}]"
        else:
            key += f".{part}" if key else str(part)
    return key


def _in_data(data: Any, loc: Loc) -> bool:
    node = data
    for part in loc:
        if isinstance(part, int):
            if not isinstance(node, list) or part >= len(node):
                return False
        elif not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _set_by(
    loc: Loc, file_data: Mapping[str, Any], origins: Mapping[tuple[str, ...], str]
) -> list[tuple[tuple[str, ...], str]]:
    """The environment variables behind the value at ``loc`` (with the key path each sets): the
    one that set it, or those that created the table when the file has no such key."""
    path = tuple(str(part) for part in loc)
    for depth in range(len(path), 0, -1):  # the value itself, or the array it is an item of
        if path[:depth] in origins:
            return [(path[:depth], origins[path[:depth]])]
    if _in_data(file_data, loc):
        return []
    return [(key, name) for key, name in origins.items() if key[: len(path)] == path]


def _suggestion(
    root: type[BaseModel], loc: Loc, variables: Sequence[tuple[tuple[str, ...], str]]
) -> str:
    if not loc or not isinstance(loc[-1], str):
        return ""
    close = difflib.get_close_matches(loc[-1], known_keys(root, loc[:-1]), n=1, cutoff=0.6)
    if not close:
        return ""
    if len(variables) == 1:  # name the variable that was meant
        path, name = variables[0]
        prefix = name[: len(name) - len("__".join(path))]
        meant = [*path[: len(loc) - 1], close[0], *path[len(loc) :]]
        return f"; did you mean {prefix}{'__'.join(meant).upper()}?"
    return f"; did you mean {close[0]!r}?"


def _written(error: ErrorDetails) -> Loc:
    """The error's location as keys and indices the user wrote."""
    shapes = SHAPE_TAGS if error["type"] != "extra_forbidden" else frozenset()
    return tuple(
        part
        for part in error["loc"]
        if not str(part).startswith("function-") and part not in shapes
    )


def _problem(error: ErrorDetails, loc: Loc) -> str:
    kind = error["type"]
    if kind == "string_type" and "single" in error["loc"]:
        return "must be a string, or an array of strings"
    if kind == "too_short" and loc and str(loc[-1]) in _NEEDS_ONE:
        return _NEEDS_ONE[str(loc[-1])]
    if kind in _PLAIN:
        return _PLAIN[kind]
    message = error["msg"].removeprefix("Value error, ")
    if message.startswith("Input should be "):
        message = "must be " + message.removeprefix("Input should be ")
    return message


def problems(
    exc: ValidationError,
    root: type[BaseModel],
    file_data: Mapping[str, Any],
    origins: Mapping[tuple[str, ...], str],
) -> list[Problem]:
    """Every leaf problem of ``exc`` (a failed item also fails its container: only the item's
    problem is listed), at most ``MAX_PROBLEMS`` of them and then how many more there are."""
    errors = exc.errors(include_input=False, include_url=False)
    located = [(_written(error), error) for error in errors]
    locs = [loc for loc, _ in located]
    leaves = [
        (loc, error)
        for loc, error in located
        if not any(len(other) > len(loc) and other[: len(loc)] == loc for other in locs)
    ]
    found: list[Problem] = []
    for loc, error in leaves:
        variables = _set_by(loc, file_data, origins)
        problem = _problem(error, loc)
        if variables:
            problem += f" (set by {', '.join(name for _, name in variables)})"
        if error["type"] == "extra_forbidden":
            problem += _suggestion(root, loc, variables)
        found.append((key_path(loc) or "config", problem))
    if len(found) > MAX_PROBLEMS:
        more = len(found) - MAX_PROBLEMS
        found = [*found[:MAX_PROBLEMS], ("", f"... and {more} more problem{'s' * (more > 1)}")]
    return found
