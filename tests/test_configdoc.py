"""docs/CONFIG.md and the JSON Schema: generated from the models, current, complete, and every
example config in the repository valid against the schema."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from proxy.config import parse_config
from proxy.configdoc import (
    EXAMPLE_WITH,
    MARKDOWN_FILE,
    REGENERATE,
    SCHEMA_FILE,
    example_documents,
    json_schema,
    markdown,
    missing_docs,
    model_keys,
    resolve,
    schema_text,
    sections,
)
from proxy.errors import ConfigError
from tests.helpers import REPO, run_cli

STALE = f"is out of date: run `{REGENERATE}` and commit docs/CONFIG.md and {SCHEMA_FILE}"
# TOML files that are tool settings, not message-proxy configs.
NOT_CONFIGS = {"pyproject.toml", "uv.toml", "ruff.toml", "taplo.toml", ".taplo.toml"}


def test_every_key_has_a_description_and_an_example() -> None:
    problems = missing_docs()
    assert not problems, (
        "config keys without documentation (add Field(description=..., examples=[...]) in "
        f"proxy/config.py, a docstring per model, then run `{REGENERATE}`):\n  "
        + "\n  ".join(problems)
    )


def test_config_md_is_current() -> None:
    current = (REPO / MARKDOWN_FILE).read_text(encoding="utf-8")
    assert current == markdown(), f"{MARKDOWN_FILE} {STALE}"


def test_schema_file_is_current() -> None:
    current = (REPO / SCHEMA_FILE).read_text(encoding="utf-8")
    assert current == schema_text(), f"{SCHEMA_FILE} {STALE}"


# Examples that name a file or a module that cannot exist here: the loader checks them at start.
NEEDS_THE_MACHINE = ("is not a readable file", "not a readable file", "cannot import")
# What a per-key example is shown without: the rest of a config the loader needs around it.
AROUND_AN_EXAMPLE: dict[str, Any] = {
    "sources": [{"queue": "q"}],
    "routes": [{"name": "r", "to": [{"stream": "s"}]}],
    "dead_letter": {"stream": "dl"},
}


def test_every_key_example_in_config_md_loads() -> None:
    """A user copies a key's example: it must be a valid config, not only schema-valid (a stream
    offset needs a stream queue, a sentinel key needs the sentinel mode: see EXAMPLE_WITH)."""
    schema = json_schema()
    problems = []
    for section in sections(schema):
        for key in section.keys:
            for document in example_documents(schema, key):
                try:
                    parse_config({**AROUND_AN_EXAMPLE, **document}, environ={})
                except ConfigError as exc:
                    wrong = [
                        f"{path}: {problem}"
                        for path, problem in exc.problems
                        if not any(reason in problem for reason in NEEDS_THE_MACHINE)
                    ]
                    problems += [f"{key.path}: {line}" for line in wrong]
    assert not problems, (
        f"examples in {MARKDOWN_FILE} that the loader refuses (give the key the siblings its "
        f"example needs with json_schema_extra={{{EXAMPLE_WITH!r}: ...}}, then run "
        f"`{REGENERATE}`):\n  " + "\n  ".join(problems)
    )


def _schema_node(schema: dict[str, Any], path: str) -> dict[str, Any] | None:
    """The schema of a key path such as ``routes[].to[].maxlen``, or None when it has none."""
    nodes = [resolve(schema, schema)]
    for part in path.split("."):
        name = part.removesuffix("[]")
        found = [
            resolve(schema, node["properties"][name])
            for node in nodes
            if name in node.get("properties", {})
        ]
        if not found:
            return None
        if part.endswith("[]"):
            found = [
                resolve(schema, item)
                for node in found
                for item in node["items"].get("oneOf", [node["items"]])
            ]
        nodes = found
    return nodes[0]


def test_every_key_of_the_models_is_in_config_md_and_the_schema() -> None:
    schema = json.loads((REPO / SCHEMA_FILE).read_text(encoding="utf-8"))
    document = (REPO / MARKDOWN_FILE).read_text(encoding="utf-8")
    paths = [path for path, _ in model_keys()]
    assert len(paths) > 40  # the walk found the nested models too
    missing_in_schema = [path for path in paths if _schema_node(schema, path) is None]
    missing_in_doc = [
        path
        for path in paths
        if f"`{path}`" not in document
        and f"`[{path}]`" not in document
        and f"`[[{path}]]`" not in document
    ]
    assert not missing_in_schema, f"not in {SCHEMA_FILE}: {missing_in_schema}; {STALE}"
    assert not missing_in_doc, f"not in {MARKDOWN_FILE}: {missing_in_doc}; {STALE}"


def test_schema_command_prints_the_shipped_schema() -> None:
    result = run_cli(["schema"])
    assert result.returncode == 0, result.stderr
    assert result.stdout == (REPO / SCHEMA_FILE).read_text(encoding="utf-8")
    jsonschema.Draft7Validator.check_schema(json.loads(result.stdout))


# --- the example configs -----------------------------------------------------------------------


def _tracked(pattern: str) -> list[Path]:
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", pattern],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: every file but the venv
        return sorted(p for p in REPO.rglob(pattern) if ".venv" not in p.parts)
    return [REPO / name for name in listed]


def _config_files() -> list[Path]:
    return [path for path in _tracked("*.toml") if path.name not in NOT_CONFIGS]


_FENCED = re.compile(r"^```toml\n(.*?)^```", re.MULTILINE | re.DOTALL)
_HEREDOC = re.compile(r"<<'?TOML'?\n(.*?)^TOML$", re.MULTILINE | re.DOTALL)


def _doc_snippets() -> list[tuple[str, str]]:
    snippets = []
    for path in _tracked("*.md"):
        text = path.read_text(encoding="utf-8")
        for pattern in (_FENCED, _HEREDOC):
            for found in pattern.finditer(text):
                line = text.count("\n", 0, found.start()) + 1
                snippets.append((f"{path.relative_to(REPO)}:{line}", found[1]))
    return snippets


def _without_required_root(schema: dict[str, Any]) -> dict[str, Any]:
    """For a fragment of a config (one table, one key): only the top level may be incomplete."""
    relaxed = copy.deepcopy(schema)
    relaxed.pop("required", None)
    return relaxed


def _problems(validator: jsonschema.Validator, data: Any) -> list[str]:
    return [
        f"{'.'.join(map(str, error.absolute_path)) or '(top)'}: {error.message}"
        for error in validator.iter_errors(data)
    ]


def test_example_config_files_are_valid() -> None:
    files = _config_files()
    assert any("docker" in path.parts for path in files), files
    validator = jsonschema.Draft7Validator(json_schema())
    for path in files:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        problems = _problems(validator, data)
        assert not problems, f"{path.relative_to(REPO)} does not match the schema: {problems}"
        parse_config(data, environ={})  # and the worker itself accepts it


def test_example_configs_in_the_docs_are_valid() -> None:
    snippets = _doc_snippets()
    assert any(where.startswith("README.md") for where, _ in snippets), "the quick start's config"
    assert sum(where.startswith(str(MARKDOWN_FILE)) for where, _ in snippets) > 40
    schema = json_schema()
    whole, fragment = jsonschema.Draft7Validator(schema), jsonschema.Draft7Validator(
        _without_required_root(schema)
    )
    for where, text in snippets:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            pytest.fail(f"{where}: not valid TOML: {exc}")
        complete = "sources" in data and "routes" in data
        problems = _problems(whole if complete else fragment, data)
        assert not problems, f"{where} does not match the schema: {problems}"


def test_every_schema_line_points_at_the_schema() -> None:
    found = 0
    for path in _config_files():
        first = path.read_text(encoding="utf-8").splitlines()[0]
        if first.startswith("#:schema "):
            found += 1
            target = (path.parent / first.removeprefix("#:schema ").strip()).resolve()
            assert target == (REPO / SCHEMA_FILE).resolve(), f"{path}: {first}"
    assert found >= 2


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("[amqp]\nprefetc = 5\n", id="unknown-key"),
        pytest.param("[amqp]\nprefetch = 0\n", id="below-minimum"),
        pytest.param("[health]\nport = 'eight'\n", id="wrong-type"),
        pytest.param("unrouted = 'keep'\n", id="not-in-enum"),
        pytest.param("[dedupe]\nwindow = 'forever'\n", id="bad-duration"),
        pytest.param("[[routes]]\nname = 'r'\nto = []\n", id="no-destinations"),
        pytest.param("[[routes]]\nname = 'r'\nto = [{ streem = 'x' }]\n", id="unknown-kind"),
        pytest.param(
            "[[routes]]\nname = 'r'\nto = [{ stream = 'x', exchange = 'y' }]\n", id="both"
        ),
    ],
)
def test_the_schema_refuses_what_the_worker_refuses(text: str) -> None:
    base = "[[sources]]\nqueue = 'q'\n"
    if "[[routes]]" not in text:
        base += "[[routes]]\nname = 'all'\nto = [{ stream = 's' }]\n"
    data = tomllib.loads(base + text if text.startswith("[") else text + base)
    assert _problems(jsonschema.Draft7Validator(json_schema()), data)
    with pytest.raises(ConfigError):
        parse_config(data, environ={})


def test_an_environment_variable_replaces_a_whole_array() -> None:
    config = parse_config(
        {"sources": [{"queue": "file"}], "routes": [{"name": "r", "to": [{"stream": "s"}]}]},
        environ={"MESSAGE_PROXY_SOURCES": '[{ queue = "from-env" }, { queue = "second" }]'},
    )
    assert [source.queue for source in config.sources] == ["from-env", "second"]
