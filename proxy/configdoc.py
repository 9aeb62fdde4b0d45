"""The config file's JSON Schema and its Markdown reference, both generated from ``proxy.config``.

The models are the one source of truth: every key carries its description and examples there
(``Field(description=..., examples=[...])``, a docstring per model). ``json_schema()`` is what
``message-proxy schema`` prints and ``docs/message-proxy.schema.json`` holds; ``markdown()`` turns
that schema into ``docs/CONFIG.md``. ``uv run python -m proxy.configdoc`` rewrites both files.
"""

from __future__ import annotations

import json
import re
import sys
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretStr
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue, NoDefault
from pydantic_core import core_schema

from proxy.config import ENV_PREFIX, Config

SCHEMA_FILE = Path("docs/message-proxy.schema.json")
MARKDOWN_FILE = Path("docs/CONFIG.md")
REGENERATE = "uv run python -m proxy.configdoc"
# Schema keyword: the sibling keys a key's examples are shown with (``json_schema_extra``).
EXAMPLE_WITH = "x-example-with"
# Draft 7: what TOML language servers read (the schema uses nothing newer; "$defs" is only where
# the definitions live, found by JSON pointer).
JSON_SCHEMA_DIALECT = "http://json-schema.org/draft-07/schema#"


# --- the JSON Schema ---------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """A default as the user writes it: secrets in defaults are not secrets, tuples are arrays."""
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, tuple | list):
        return [_plain(item) for item in value]
    return value


class _TomlSchema(GenerateJsonSchema):
    """pydantic's schema, adjusted for a TOML file: TOML has no null, so an optional key is just
    a key that may be left out; a table's default is documented key by key, not as a blob."""

    def get_default_value(self, schema: core_schema.WithDefaultSchema) -> Any:
        if "default_factory" in schema and not schema.get("default_factory_takes_data"):
            return _plain(schema["default_factory"]())  # type: ignore[call-arg]
        default = schema.get("default", NoDefault)
        if default is None or isinstance(default, BaseModel):
            return NoDefault
        return _plain(default)

    def nullable_schema(self, schema: core_schema.NullableSchema) -> JsonSchemaValue:
        return self.generate_inner(schema["schema"])

    def field_title_should_be_set(self, schema: Any) -> bool:
        return False  # "Max Messages" says nothing the key does not; descriptions do

    def sort(self, value: JsonSchemaValue, parent_key: str | None = None) -> JsonSchemaValue:
        ordered: JsonSchemaValue = _sorted(value, parent_key)
        return ordered


def _sorted(value: Any, parent_key: str | None) -> Any:
    """Schema keywords sorted for stable output; keys, defaults and examples in their own order."""
    if isinstance(value, dict):
        keep = parent_key in ("properties", "default", "examples", "$defs")
        keys = value.keys() if keep else sorted(value)
        inner = "examples" if parent_key == "examples" else None
        return {key: _sorted(value[key], inner or key) for key in keys}
    if isinstance(value, list):
        return [_sorted(item, parent_key) for item in value]
    return value


def json_schema() -> dict[str, Any]:
    generated: dict[str, Any] = Config.model_json_schema(
        by_alias=True, schema_generator=_TomlSchema
    )
    generated.pop("title", None)
    return {
        "$schema": JSON_SCHEMA_DIALECT,
        "title": "message-proxy configuration",
        **generated,
    }


def schema_text() -> str:
    return json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n"


# --- walking the schema ------------------------------------------------------------------------


def resolve(schema: Mapping[str, Any], node: Mapping[str, Any]) -> dict[str, Any]:
    """``node`` with a ``$ref`` replaced by its definition (its own keywords win)."""
    if "$ref" not in node:
        return dict(node)
    name = node["$ref"].removeprefix("#/$defs/")
    return {**schema["$defs"][name], **{k: v for k, v in node.items() if k != "$ref"}}


def _is_table(schema: Mapping[str, Any], node: Mapping[str, Any]) -> bool:
    return "properties" in resolve(schema, node)


def _alternatives(schema: Mapping[str, Any], node: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The tables an array's items may be (one, or one per kind of a tagged union)."""
    items = node.get("items")
    if not isinstance(items, dict):
        return []
    choices = items.get("oneOf") or items.get("anyOf") or [items]
    return [resolve(schema, choice) for choice in choices if _is_table(schema, choice)]


@dataclass(frozen=True)
class Frame:
    """One table on the way to a key: its name, whether it is an array, and its schema."""

    name: str
    array: bool
    table: Mapping[str, Any]


@dataclass(frozen=True)
class Key:
    """One documented key: where it lives and its (resolved) schema."""

    frames: tuple[Frame, ...]
    name: str
    node: Mapping[str, Any]
    required: bool

    @property
    def path(self) -> str:
        parts = [frame.name + ("[]" if frame.array else "") for frame in self.frames]
        return ".".join([*parts, self.name])

    @property
    def env(self) -> str | None:
        if any(frame.array for frame in self.frames):
            return None
        return ENV_PREFIX + "__".join([*(f.name for f in self.frames), self.name]).upper()


@dataclass(frozen=True)
class Section:
    """A table of the file (or the file's top level) and the keys documented in it."""

    title: str
    path: str
    description: str
    keys: tuple[Key, ...]
    example: Key | None = None  # the key whose examples show the whole table
    same_as: str | None = None  # the path of a section with the same keys


def _section_title(frames: Sequence[Frame], kind: str | None) -> str:
    if not frames:
        return "Top-level keys"
    first = frames[0]
    head = f"[[{first.name}]]" if first.array else f"[{first.name}]"
    rest = ".".join(frame.name + ("[]" if frame.array else "") for frame in frames[1:])
    title = f"`{head}`" + (f" `{rest}`" if rest else "")
    return f"{title} with `{kind}`" if kind else title


def _docstring(schema: Mapping[str, Any], raw: Mapping[str, Any]) -> str:
    """The description of the model a field refers to (its docstring), not the field's own."""
    if "$ref" not in raw:
        return ""
    return str(resolve(schema, {"$ref": raw["$ref"]}).get("description", ""))


def _kind(alternative: Mapping[str, Any]) -> str:
    """What tells one kind of a tagged union from the others: its first required key."""
    required = alternative.get("required") or list(alternative["properties"])
    return str(required[0])


def sections(schema: Mapping[str, Any]) -> list[Section]:
    """Every table of the file, depth first, in the models' field order."""
    found: list[Section] = []
    documented: dict[str, str] = {}  # definition title -> the path of the section documenting it

    def visit(
        frames: tuple[Frame, ...], description: str, example: Key | None, kind: str | None
    ) -> None:
        table = frames[-1].table if frames else schema
        keys: list[Key] = []
        nested: list[tuple[tuple[Frame, ...], str, Key | None, str | None]] = []
        required = set(table.get("required", ()))
        for name, raw in table["properties"].items():
            node = resolve(schema, raw)
            key = Key(frames, name, node, name in required)
            alternatives = _alternatives(schema, node)
            if frames or not ("properties" in node or alternatives):
                keys.append(key)
            if "properties" in node:
                text = _docstring(schema, raw) or node.get("description", "")
                frame = Frame(name, False, node)
                nested.append(((*frames, frame), text, None if frames else key, None))
            for alternative in alternatives:
                text = alternative.get("description", "")
                if not frames:  # a top-level array: what it is for, then what one item is
                    text = f"{node.get('description', '')}\n\n{text}".strip()
                variant = _kind(alternative) if len(alternatives) > 1 else None
                frame = Frame(name, True, alternative)
                nested.append(((*frames, frame), text, None if frames else key, variant))
        path = ".".join(f.name + ("[]" if f.array else "") for f in frames)
        title = str(table.get("title", ""))
        same_as = documented.get(title) if frames else None
        if same_as is not None and example is not None:
            description = str(example.node.get("description", ""))
        found.append(
            Section(
                _section_title(frames, kind),
                path,
                description,
                tuple(keys),
                example,
                same_as,
            )
        )
        if frames and title and title not in documented:
            documented[title] = path
        if same_as is None:
            for child in nested:
                visit(*child)

    visit((), str(schema.get("description", "")), None, None)
    return found


# --- TOML rendering ----------------------------------------------------------------------------


class Table(dict[str, Any]):
    """A table of the config's structure: a section header or dotted keys, never inline."""


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def toml_key(name: str) -> str:
    return name if _BARE_KEY.match(name) else json.dumps(name)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, dict):
        if not value:
            return "{}"
        return "{ " + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        inner = ", ".join(toml_value(item) for item in value)
        spaced = value and isinstance(value[0], dict)
        return f"[ {inner} ]" if spaced else f"[{inner}]"
    raise TypeError(f"no TOML form for {value!r}")


def _body(table: Mapping[str, Any], prefix: str = "") -> Iterator[str]:
    for name, value in table.items():
        if isinstance(value, Table):
            yield from _body(value, f"{prefix}{toml_key(name)}.")
        else:
            yield f"{prefix}{toml_key(name)} = {toml_value(value)}"


def toml_document(document: Mapping[str, Any]) -> str:
    """A config (or part of one) as TOML: top-level keys, then ``[tables]`` and ``[[arrays]]``."""
    lines = [
        f"{toml_key(name)} = {toml_value(value)}"
        for name, value in document.items()
        if not isinstance(value, Table) and not _is_table_array(value)
    ]
    for name, value in document.items():
        if isinstance(value, Table):
            lines += ["" if lines else None, f"[{toml_key(name)}]", *_body(value)]  # type: ignore[list-item]
        elif _is_table_array(value):
            for item in value:
                lines += ["" if lines else None, f"[[{toml_key(name)}]]", *_body(item)]  # type: ignore[list-item]
    return "\n".join(line for line in lines if line is not None) + "\n"


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, Table) for v in value)


def _as_structure(schema: Mapping[str, Any], node: Mapping[str, Any], value: Any) -> Any:
    """An example value with the tables of the config's structure marked as ``Table``."""
    node = resolve(schema, node)
    if isinstance(value, dict) and "properties" in node:
        properties = node["properties"]
        return Table(
            {k: _as_structure(schema, properties.get(k, {}), v) for k, v in value.items()}
        )
    if isinstance(value, list) and (alternatives := _alternatives(schema, node)):
        return [_as_item(schema, alternatives, item) for item in value]
    return value


def _as_item(
    schema: Mapping[str, Any], alternatives: Sequence[Mapping[str, Any]], item: Any
) -> Any:
    for alternative in alternatives:
        if isinstance(item, dict) and set(item) <= set(alternative["properties"]):
            return _as_structure(schema, alternative, item)
    return item


def _first_example(schema: Mapping[str, Any], node: Mapping[str, Any]) -> Any:
    examples = resolve(schema, node).get("examples") or [None]
    return _as_structure(schema, node, examples[0])


def example_documents(schema: Mapping[str, Any], key: Key) -> list[dict[str, Any]]:
    """Every example of ``key`` in its place in a config file.

    A key's ``x-example-with`` names the sibling keys its examples need that the schema cannot
    call required (a mode, a queue type): one mapping for every example, or a list of them, one
    per example (``null`` for none).
    """
    examples = key.node.get("examples", ())
    needs = key.node.get(EXAMPLE_WITH) or {}
    per_example = needs if isinstance(needs, list) else [needs] * len(examples)
    return [
        example_document(schema, key, value, with_=extra or {})
        for value, extra in zip(examples, per_example, strict=True)
    ]


def example_document(
    schema: Mapping[str, Any], key: Key, value: Any, *, with_: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """``value`` for ``key`` in its place in a config file, with the keys its tables require
    and the siblings ``with_`` names."""
    inner: Any = _as_structure(schema, key.node, value)
    name = key.name
    needs: Mapping[str, Any] = with_ or {}
    for frame in reversed(key.frames):
        required = set(frame.table.get("required", ()))
        table = Table()
        properties = frame.table["properties"]
        for sibling, node in properties.items():
            if sibling == name:
                for other, other_value in needs.items():
                    table[other] = _as_structure(schema, properties[other], other_value)
                table[sibling] = inner
            elif sibling in required and (example := _first_example(schema, node)) is not None:
                table[sibling] = example
        needs = {}
        inner = [table] if frame.array else table
        name = frame.name
    return {name: inner}


# --- Markdown ----------------------------------------------------------------------------------


def _range(node: Mapping[str, Any]) -> str:
    low, high = node.get("minimum"), node.get("maximum")
    if "exclusiveMinimum" in node:
        return f" > {node['exclusiveMinimum']}"
    if low is not None and high is not None:
        return f", {low} to {high}"
    if low is not None:
        return f" >= {low}"
    if high is not None:
        return f" <= {high}"
    return ""


def describe_type(schema: Mapping[str, Any], raw: Mapping[str, Any]) -> str:
    node = resolve(schema, raw)
    if choices := node.get("anyOf") or node.get("oneOf"):
        return " or ".join(describe_type(schema, choice) for choice in choices)
    if "enum" in node:
        values: dict[str, Any] = {}
        for value in node["enum"]:
            values.setdefault(str(value).lower(), value)
        any_case = " (any case)" if len(values) < len(node["enum"]) else ""
        return " or ".join(f"`{toml_value(v)}`" for v in values.values()) + any_case
    kind = node.get("type")
    if "title" in node and kind in ("string", "number", "integer"):
        return str(node["title"])  # a named form, e.g. a duration string
    if kind == "string":
        if node.get("format") == "password":
            return "string (secret)"
        return "non-empty string" if node.get("minLength") == 1 else "string"
    if kind in ("integer", "number"):
        return f"{kind}{_range(node)}"
    if kind == "boolean":
        return "boolean"
    if kind == "object":
        values_node = node.get("additionalProperties")
        if isinstance(values_node, dict) and values_node.get("type") == "string":
            return "table of strings"
        return "table"
    if kind == "array":
        items = node.get("items", {})
        noun = "tables" if _alternatives(schema, node) else _plural(describe_type(schema, items))
        least = f", at least {node['minItems']}" if node.get("minItems") else ""
        return f"array of {noun}{least}"
    return "any value"


def _plural(kind: str) -> str:
    """``string`` -> ``strings``; ``string (secret)`` -> ``strings (secret)``."""
    item, paren, note = kind.partition(" (")
    return f"{item}s{paren}{note}"


def _default(key: Key) -> str:
    if "default" in key.node:
        return f"`{toml_value(key.node['default'])}`"
    return "required" if key.required else "not set"


def _anchor(text: str) -> str:
    """The anchor GitHub gives a heading."""
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def _env_cell(key: Key) -> str:
    if key.env is not None:
        return f"`{key.env}`"
    array = next(frame.name for frame in key.frames if frame.array)
    return f"none (part of `{ENV_PREFIX}{array.upper()}`)"


def _key_markdown(schema: Mapping[str, Any], key: Key) -> list[str]:
    lines = [
        f"### `{key.path}`",
        "",
        key.node.get("description", ""),
        "",
        "| type | default | environment |",
        "|---|---|---|",
        f"| {describe_type(schema, key.node)} | {_default(key)} | {_env_cell(key)} |",
        "",
    ]
    return [*lines, *_examples(schema, key)]


def _examples(schema: Mapping[str, Any], key: Key) -> list[str]:
    lines: list[str] = []
    for document in example_documents(schema, key):
        lines += ["```toml", toml_document(document).rstrip(), "```"]
    return [*lines, ""] if lines else []


def _section_markdown(
    schema: Mapping[str, Any], section: Section, titles: Mapping[str, str]
) -> list[str]:
    lines = [f"## {section.title}", "", section.description, ""]
    if section.example is not None:
        lines += _examples(schema, section.example)
    if section.same_as is not None:
        original = titles[section.same_as]
        lines += [
            f"The same keys as [{original}](#{_anchor(original)}):",
            "",
            "| key | environment |",
            "|---|---|",
        ]
        for key in section.keys:
            same = f"{section.same_as}.{key.name}"
            lines.append(f"| `{key.path}` (see [`{same}`](#{_anchor(same)})) | {_env_cell(key)} |")
        return [*lines, ""]
    if section.keys:
        lines += ["| key | type | default |", "|---|---|---|"]
        for key in section.keys:
            lines.append(
                f"| [`{key.name}`](#{_anchor(key.path)}) | {describe_type(schema, key.node)} "
                f"| {_default(key)} |"
            )
        lines.append("")
    for key in section.keys:
        lines += _key_markdown(schema, key)
    return lines


INTRO = """\
# Configuration reference

<!-- Generated from the config models (proxy/config.py) by `uv run python -m proxy.configdoc`.
     Do not edit by hand: change the models' descriptions and examples, then run it again. -->

A worker reads one TOML file, named by `--config FILE` or the environment variable
`MESSAGE_PROXY_CONFIG`. Only `[[sources]]` and `[[routes]]` are required; every other key has
a default. `message-proxy check --config FILE` validates a file and prints its routes; a
file with problems exits with code 2 and lists each problem with the key it is about.

**Environment overrides.** Any key outside an array can be set from the environment as
`MESSAGE_PROXY_<SECTION>__<KEY>` (two underscores between the parts), e.g.
`MESSAGE_PROXY_AMQP__URL` or, for a top-level key, `MESSAGE_PROXY_LOG_LEVEL`. The variable wins
over the file. Its value is read as a TOML value when it is one (`8001`, `true`, `2.5`,
`["a", "b"]`, `{ url = "..." }`) and as a string otherwise. The keys of `[[sources]]` and
`[[routes]]` live in arrays: a variable can only replace a whole array, e.g.
`MESSAGE_PROXY_SOURCES='[{ queue = "events" }]'`. Secrets (the passwords in URLs) are best
passed this way rather than written in the file.

**Editor support.** [message-proxy.schema.json](message-proxy.schema.json) is the JSON Schema
of this file (`message-proxy schema` prints it). TOML language servers such as taplo (used by
VS Code's "Even Better TOML") read a `#:schema` comment on the first line of the file and then
complete keys, show these descriptions and flag mistakes as you type:

```toml
#:schema ./docs/message-proxy.schema.json
```

(a path relative to the TOML file, or an `https://` URL).

**Templates.** Stream names, exchange names and routing keys of destinations are templates:
`{routing_key}`, `{routing_key.N}` (word N of the routing key, from 0), `{exchange}`,
`{queue}`, `{message_id}`, `{headers.NAME}` and `{json.PATH}` (a dotted path into a JSON body)
are replaced by the message's values, `{{` and `}}` are literal braces. An unknown placeholder
is a config error; a message that lacks a value is dead-lettered with reason `template`.
"""


def markdown(schema: Mapping[str, Any] | None = None) -> str:
    schema = json_schema() if schema is None else schema
    found = sections(schema)
    titles = {section.path: section.title for section in found}
    lines = [INTRO, "## Contents", ""]
    for section in found:
        lines.append(f"- [{section.title}](#{_anchor(section.title)})")
    lines.append("")
    for section in found:
        lines += _section_markdown(schema, section, titles)
    return "\n".join(lines).rstrip() + "\n"


# --- what the models must document -------------------------------------------------------------


def _models_in(annotation: Any) -> Iterator[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
        return
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        yield from _models_in(typing.get_args(annotation)[0])
        return
    if origin is not None or isinstance(annotation, types.UnionType):
        for argument in typing.get_args(annotation):
            yield from _models_in(argument)


def model_keys(model: type[BaseModel] = Config, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(path, field info) of every key of the models, named as ``Key.path`` names them."""
    for name, info in model.model_fields.items():
        path = f"{prefix}{info.alias or name}"
        yield path, info
        marker = "[]" if _is_sequence(info.annotation) else ""
        for inner in _models_in(info.annotation):
            yield from model_keys(inner, f"{path}{marker}.")


def _is_sequence(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (tuple, list):
        return True
    if origin is typing.Annotated:
        return _is_sequence(typing.get_args(annotation)[0])
    return False


def _all_models(model: type[BaseModel] = Config) -> Iterator[type[BaseModel]]:
    seen: set[type[BaseModel]] = set()
    pending = [model]
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        yield current
        for info in current.model_fields.values():
            pending.extend(_models_in(info.annotation))


def missing_docs() -> list[str]:
    """What the models leave undocumented: every key needs a description and an example, every
    model a docstring."""
    problems = [
        f"{path}: no description" for path, info in model_keys() if not info.description
    ]
    problems += [f"{path}: no example" for path, info in model_keys() if not info.examples]
    problems += [
        f"{model.__name__}: no docstring"
        for model in _all_models()
        if not (model.__doc__ or "").strip()
    ]
    return problems


# --- the command -------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Rewrite docs/CONFIG.md and docs/message-proxy.schema.json in the current directory."""
    del argv
    problems = missing_docs()
    if problems:
        print("proxy/config.py leaves keys undocumented; add them and run again:", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        print(
            '  (each key: Field(..., description="...", examples=[...]); each model: a docstring)',
            file=sys.stderr,
        )
        return 1
    if not Path("pyproject.toml").is_file() or not MARKDOWN_FILE.parent.is_dir():
        print("run this from the repository's top directory", file=sys.stderr)
        return 2
    SCHEMA_FILE.write_text(schema_text(), encoding="utf-8")
    MARKDOWN_FILE.write_text(markdown(), encoding="utf-8")
    print(f"wrote {MARKDOWN_FILE} and {SCHEMA_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
