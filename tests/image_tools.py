"""The images without a Docker engine: build context, builder-stage replay, measurements.

Used by tests/test_images.py, and run as a script for the figures in docs/IMAGES.md::

    uv run python -m tests.image_tools

- The build context is computed from ``.dockerignore`` with the Docker CLI's rules (last matching
  line wins; a pattern that matches a parent folder matches everything below it; ``**``).
- ``replay_builder`` replays the builder stage of a Dockerfile on this machine: its ENV (paths under
  ``/app`` and other absolute paths moved into a scratch folder), its COPY steps from the context,
  its ``uv sync`` steps and its slimming step, with a local CPython 3.12 (glibc) standing in for the
  image's musl one. The image's own tooling steps (``apk add``, ``pip install uv``) are skipped;
  anything else in a RUN is an error, so the replay cannot silently drift from the Dockerfile.
"""

from __future__ import annotations

import glob
import os
import posixpath
import re
import resource
import shlex
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dockerfile_parse import DockerfileParser  # type: ignore[import-untyped]

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"
SLIM_SCRIPT = DOCKER / "slim-venv.sh"
IMAGE_VENV = "/app/.venv"


@dataclass(frozen=True)
class Role:
    name: str  # compose service name
    module: str  # python -m entry point

    @property
    def dockerfile(self) -> Path:
        return DOCKER / f"{self.name}.Dockerfile"

    @property
    def config(self) -> Path:
        return DOCKER / "config" / f"{self.name}.toml"


ROLES = {
    "stream-bridge": Role("stream-bridge", "workers.stream_bridge"),
    "exchange-relay": Role("exchange-relay", "workers.exchange_relay"),
}


# --- .dockerignore -----------------------------------------------------------------------------


@dataclass(frozen=True)
class IgnoreRule:
    pattern: str
    exclude: bool  # False for a "!" line
    regex: re.Pattern[str]


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Go's filepath.Match plus ``**`` (any number of folders), as moby's patternmatcher has it."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "[" and "]" in pattern[i + 1 :]:
            end = pattern.index("]", i + 1)
            out.append(pattern[i : end + 1])
            i = end + 1
            continue
        elif char == "\\" and i + 1 < len(pattern):
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        else:
            out.append(re.escape(char))
        i += 1
    return re.compile("".join(out) + r"\Z")


def parse_dockerignore(text: str) -> list[IgnoreRule]:
    rules = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exclude = not line.startswith("!")
        if not exclude:
            line = line[1:].strip()
        line = posixpath.normpath(line).lstrip("/")  # filepath.Clean, as the Docker CLI does
        if line in ("", "."):
            continue
        rules.append(IgnoreRule(line, exclude, _pattern_regex(line)))
    return rules


def read_dockerignore(path: Path = REPO / ".dockerignore") -> list[IgnoreRule]:
    return parse_dockerignore(path.read_text())


def is_ignored(rel: str, rules: Sequence[IgnoreRule]) -> bool:
    parts = rel.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    ignored = False
    for rule in rules:
        if any(rule.regex.match(candidate) for candidate in candidates):
            ignored = rule.exclude
    return ignored


def _may_reinclude(rel_dir: str, rules: Sequence[IgnoreRule]) -> bool:
    return any(
        not rule.exclude and (rule.pattern.startswith(rel_dir + "/") or "*" in rule.pattern)
        for rule in rules
    )


def context_files(root: Path = REPO, rules: Sequence[IgnoreRule] | None = None) -> dict[str, int]:
    """Every file the Docker CLI would send as build context: relative path -> bytes."""
    rules = read_dockerignore(root / ".dockerignore") if rules is None else rules
    files: dict[str, int] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        keep = []
        for name in dirnames:
            rel = rel_dir + name
            if (root / rel).is_symlink():
                filenames.append(name)
            elif not is_ignored(rel, rules) or _may_reinclude(rel, rules):
                keep.append(name)
        dirnames[:] = keep
        for name in filenames:
            rel = rel_dir + name
            if not is_ignored(rel, rules):
                files[rel] = (root / rel).lstat().st_size
    return files


# --- Dockerfiles -------------------------------------------------------------------------------


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[dict[str, str]] = field(default_factory=list)

    def of(self, instruction: str) -> list[str]:
        return [i["value"] for i in self.instructions if i["instruction"] == instruction]

    def env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for value in self.of("ENV"):
            for item in shlex.split(value):
                key, _, val = item.partition("=")
                env[key] = val
        return env


@dataclass
class Dockerfile:
    path: Path
    global_args: dict[str, str]
    stages: list[Stage]
    parser: DockerfileParser

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)


def parse_dockerfile(path: Path) -> Dockerfile:
    parser = DockerfileParser(str(path))
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for instruction in parser.structure:
        kind = instruction["instruction"]
        if kind == "COMMENT":
            continue
        if kind == "FROM":
            words = instruction["value"].split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(name, words[0]))
        elif not stages and kind == "ARG":
            key, _, default = instruction["value"].partition("=")
            global_args[key] = default
        elif stages:
            stages[-1].instructions.append(instruction)
    return Dockerfile(path, global_args, stages, parser)


def run_commands(run_value: str) -> list[list[str]]:
    """The commands of one RUN (shell form joined by ``&&``), each split into words."""
    return [shlex.split(part) for part in run_value.split("&&") if part.strip()]


def uv_syncs(stage: Stage) -> list[list[str]]:
    return [
        argv for run in stage.of("RUN") for argv in run_commands(run) if argv[:2] == ["uv", "sync"]
    ]


def extras_of(argv: Sequence[str]) -> list[str]:
    return [argv[i + 1] for i, word in enumerate(argv[:-1]) if word == "--extra"]


def slim_commands(stage: Stage) -> list[list[str]]:
    return [
        argv
        for run in stage.of("RUN")
        for argv in run_commands(run)
        if argv[0] == "sh" and argv[1].endswith("slim-venv")
    ]


def startup_modules(dockerfile: Dockerfile) -> list[str]:
    """The modules the Dockerfile has the slimming script import: what the worker starts with."""
    (argv,) = slim_commands(dockerfile.stage("builder"))
    args = [a for a in argv[2:] if not a.startswith("--")]
    return args[1:]


# --- replaying the builder stage ---------------------------------------------------------------


def find_python312() -> str | None:
    """A CPython 3.12 to stand in for the image's (MESSAGE_PROXY_TEST_PYTHON312 wins)."""
    candidates = [
        os.environ.get("MESSAGE_PROXY_TEST_PYTHON312", ""),
        *sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.12*/bin/python3.12"))),
        "/usr/local/bin/python3.12",
        "/usr/bin/python3.12",
    ]
    for candidate in candidates:
        if not candidate or not os.access(candidate, os.X_OK):
            continue
        probe = subprocess.run(
            [candidate, "-c", "import sys; print(sys.version_info[:2] == (3, 12))"],
            capture_output=True,
            text=True,
            check=False,
        )
        if probe.stdout.strip() == "True":
            return candidate
    return None


def find_uv() -> str | None:
    return os.environ.get("UV") or shutil.which("uv")


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without anything that steers Python, uv or a venv."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PYTHON", "UV_", "VIRTUAL_ENV", "MESSAGE_PROXY_"))
    }
    env.update(extra or {})
    return env


@dataclass
class Replay:
    role: Role
    root: Path  # the scratch folder that stands for the image's /
    venv: Path  # the slimmed venv, where the image has /app/.venv
    unslimmed: Path  # a copy taken just before the slimming step
    slim_log: str

    def map(self, image_path: str) -> str:
        return map_path(self.root, image_path)

    def runtime_env(
        self, dockerfile: Dockerfile, extra: Mapping[str, str] | None = None
    ) -> dict[str, str]:
        """The runtime stage's ENV with its paths moved into the scratch folder."""
        env = clean_env()
        for key, value in dockerfile.stage("runtime").env().items():
            if key == "PATH":
                value = value.replace("$PATH", env.get("PATH", "/usr/bin:/bin"))
            env[key] = re.sub(r"(?<![\w.])/app\b", str(self.root / "app"), value)
        env.update(extra or {})
        return env


def map_path(root: Path, image_path: str) -> str:
    return str(root / image_path.lstrip("/"))


def _copy_from_context(
    context: Mapping[str, int], sources: Sequence[str], dest: Path, dest_is_dir: bool
) -> None:
    for source in sources:
        source = posixpath.normpath(source)
        if source in context:
            target = dest / posixpath.basename(source) if dest_is_dir else dest
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / source, target, follow_symlinks=False)
            continue
        below = [rel for rel in context if rel.startswith(source + "/")]
        if not below:
            raise FileNotFoundError(f"COPY {source}: not in the build context (.dockerignore?)")
        for rel in below:
            target = dest / rel[len(source) + 1 :]
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, target, follow_symlinks=False)


def replay_builder(role: Role, workdir: Path, python: str, uv: str) -> Replay:
    """Run the builder stage of ``role``'s Dockerfile here; the slimmed venv and a copy before."""
    dockerfile = parse_dockerfile(role.dockerfile)
    builder = dockerfile.stage("builder")
    root = workdir / f"{role.name}-root"
    unslimmed = workdir / f"{role.name}-unslimmed"
    context = context_files()
    cwd = root
    env = clean_env({"UV_PYTHON_DOWNLOADS": "never"})
    slim_log = ""
    for instruction in builder.instructions:
        kind, value = instruction["instruction"], instruction["value"]
        if kind == "WORKDIR":
            cwd = Path(map_path(root, value)) if value.startswith("/") else cwd / value
            cwd.mkdir(parents=True, exist_ok=True)
        elif kind == "ENV":
            for key, val in builder_env_items(value):
                env[key] = map_path(root, val) if val.startswith("/app") else val
        elif kind == "COPY":
            words = shlex.split(value)
            if any(word.startswith("--") for word in words):
                raise NotImplementedError(f"COPY flags are not replayed: {value}")
            *sources, dest = words
            dest_path = Path(map_path(root, dest)) if dest.startswith("/") else cwd / dest
            _copy_from_context(context, sources, dest_path, dest.endswith("/") or len(sources) > 1)
        elif kind == "RUN":
            for argv in run_commands(value):
                slim_log += _replay_command(argv, root, cwd, env, python, uv, unslimmed)
        elif kind not in ("ARG", "LABEL"):
            raise NotImplementedError(f"{kind} is not replayed")
    return Replay(role, root, Path(map_path(root, IMAGE_VENV)), unslimmed, slim_log)


def builder_env_items(value: str) -> Iterator[tuple[str, str]]:
    for item in shlex.split(value):
        key, _, val = item.partition("=")
        yield key, val


def _replay_command(
    argv: list[str], root: Path, cwd: Path, env: dict[str, str], python: str, uv: str, copy: Path
) -> str:
    if argv[:2] == ["uv", "sync"]:
        run_env = {**env, "UV_PYTHON": python}
        run_env.pop("UV_NO_CACHE", None)  # the local cache only makes this faster
        subprocess.run([uv, *argv[1:]], cwd=cwd, env=run_env, check=True, capture_output=True)
        return ""
    if argv[0] == "sh" and argv[1].endswith("slim-venv"):
        args = [a for a in argv[2:] if a != "--system-caches"]  # never empty this machine's /tmp
        venv = map_path(root, args[0])
        shutil.copytree(venv, copy, symlinks=True)
        toolbox = make_toolbox(root.parent / "toolbox")
        done = subprocess.run(
            [str(toolbox / "sh"), str(SLIM_SCRIPT), venv, *args[1:]],
            env={**env, "PATH": str(toolbox)},
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"slim-venv failed ({done.returncode}):\n{done.stderr}")
        return done.stdout + done.stderr
    if argv[0] in ("apk", "pip"):  # the image's own tooling: binutils, uv
        return ""
    raise NotImplementedError(f"don't know how to replay: {shlex.join(argv)}")


# Alpine's userland is busybox: when busybox is here, the script runs on its applets only
# (strip comes from binutils, as in the image's builder stage).
SCRIPT_TOOLS = ("sh", "find", "sed", "grep", "du", "cut", "rm", "mv", "cp")


def make_toolbox(folder: Path, *, with_strip: bool = True) -> Path:
    """A folder to be the whole PATH of the slimming script: busybox applets where possible."""
    folder.mkdir(parents=True, exist_ok=True)
    busybox = shutil.which("busybox")
    for tool in SCRIPT_TOOLS:
        target = busybox or shutil.which(tool)
        if target and not (folder / tool).exists():
            (folder / tool).symlink_to(target)
    strip = shutil.which("strip")
    if with_strip and strip and not (folder / "strip").exists():
        (folder / "strip").symlink_to(strip)
    return folder


# --- measuring ---------------------------------------------------------------------------------


def tree_bytes(path: Path, predicate: Callable[[Path], bool] | None = None) -> int:
    """Apparent size of the regular files below ``path`` (symlinks not followed)."""
    total = 0
    for dirpath, _dirnames, filenames in os.walk(path):
        for name in filenames:
            file = Path(dirpath) / name
            if file.is_symlink():
                continue
            if predicate is None or predicate(file):
                total += file.stat().st_size
    return total


def site_packages(venv: Path) -> Path:
    return next((venv / "lib").glob("python3.*/site-packages"))


def elf_section_names(path: Path) -> set[str]:
    """Section names of an ELF file (64-bit little endian is all we ship)."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError(f"{path}: not a 64-bit little-endian ELF file")
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    names_offset = struct.unpack_from("<Q", data, shoff + shstrndx * shentsize + 0x18)[0]
    names = set()
    for index in range(shnum):
        name_at = struct.unpack_from("<I", data, shoff + index * shentsize)[0]
        end = data.index(b"\0", names_offset + name_at)
        names.add(data[names_offset + name_at : end].decode())
    return names


def time_runs(
    argv: Sequence[str], cases: Mapping[str, Mapping[str, str]], rounds: int = 15
) -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) seconds of ``argv`` under each environment, the cases interleaved
    round by round so that load from elsewhere on the machine falls on all of them alike."""
    samples: dict[str, list[tuple[float, float]]] = {label: [] for label in cases}
    for _ in range(rounds):
        for label, env in cases.items():
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            subprocess.run(
                argv, env=env, check=True, capture_output=True, cwd=tempfile.gettempdir()
            )
            wall = time.perf_counter() - start
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
            samples[label].append((wall, cpu))
    return {
        label: (
            statistics.median(w for w, _ in runs),
            statistics.median(c for _, c in runs),
        )
        for label, runs in samples.items()
    }


def _mib(n: float) -> str:
    return f"{n / 1024 / 1024:.1f} MiB"


def measure() -> None:  # pragma: no cover - prints the figures for docs/IMAGES.md
    python, uv = find_python312(), find_uv()
    if not python or not uv:
        sys.exit("needs a CPython 3.12 and uv")
    print(f"python: {python}")
    ours = context_files()
    denylist = context_files(rules=parse_dockerignore(DENYLIST_DOCKERIGNORE))
    everything = context_files(rules=[])
    print("\n## build context")
    for label, files in (("ours", ours), ("deny-list", denylist), ("no .dockerignore", everything)):
        print(f"{label:>18}: {len(files):6d} files {sum(files.values()):12d} bytes")
    with tempfile.TemporaryDirectory(prefix="message-proxy-images-") as tmp:
        for role in ROLES.values():
            replay = replay_builder(role, Path(tmp), python, uv)
            _report(replay, python)


# A typical deny-list .dockerignore: editor folders, env files, build output, CI files, docs, tests.
DENYLIST_DOCKERIGNORE = """
.project
.pydevproject
.settings/
.env
.env.*
!.env.example
dist/
build/
*.egg-info/
.eggs/
*.egg
.github/
.gitlab-ci.yml
.travis.yml
docs/
tests/
"""


def _report(replay: Replay, python: str) -> None:  # pragma: no cover
    dockerfile = parse_dockerfile(replay.role.dockerfile)
    before, after = replay.unslimmed, replay.venv
    site_before = site_packages(before)
    print(f"\n## {replay.role.name}")
    print(replay.slim_log.strip())
    rows = {
        "venv, as uv sync leaves it": tree_bytes(before),
        "venv, slimmed (incl. stdlib bytecode)": tree_bytes(after),
        "  of which stdlib opt-2 bytecode": tree_bytes(
            after / "pycache", lambda p: "site-packages" not in str(p)
        ),
        "  of which venv opt-2 bytecode": tree_bytes(
            after / "pycache", lambda p: "site-packages" in str(p)
        ),
        "shared objects before": tree_bytes(site_before, lambda p: ".so" in p.name),
        "shared objects after": tree_bytes(site_packages(after), lambda p: ".so" in p.name),
        "dist-info before": sum(tree_bytes(d) for d in site_before.glob("*.dist-info")),
        "dist-info after": sum(tree_bytes(d) for d in site_packages(after).glob("*.dist-info")),
        "tests folders": sum(
            tree_bytes(d)
            for d in site_before.rglob("*")
            if d.is_dir() and d.name in ("tests", "test")
        ),
        "stubs and extension sources": tree_bytes(
            site_before,
            lambda p: (
                p.suffix in (".pyi", ".c", ".h", ".pyx", ".pxd", ".pxi") or p.name == "py.typed"
            ),
        ),
    }
    # the usual slimming recipe on the same venv: no .pyc, no dist-info, no strip
    usual = before.parent / f"{replay.role.name}-usual"
    shutil.copytree(before, usual, symlinks=True)
    for path in list(site_packages(usual).glob("*.dist-info")):
        shutil.rmtree(path)
    rows["venv, the usual recipe"] = tree_bytes(usual)
    for label, value in rows.items():
        print(f"{label:>40}: {value:12d} bytes ({_mib(value)})")
    usual_import = subprocess.run(
        [str(usual / "bin" / "python"), "-c", f"import {', '.join(startup_modules(dockerfile))}"],
        env=clean_env({"PYTHONOPTIMIZE": "2", "PYTHONDONTWRITEBYTECODE": "1"}),
        capture_output=True,
        text=True,
        check=False,
        cwd=tempfile.gettempdir(),
    )
    print(
        f"usual-recipe venv, import: exit {usual_import.returncode}: "
        f"{(usual_import.stderr.strip().splitlines() or [''])[-1]}"
    )
    # start-up: the import of the entry point as the image runs it, with and without bytecode
    imports = ", ".join(startup_modules(dockerfile))
    argv = [replay.map(IMAGE_VENV + "/bin/python"), "-c", f"import {imports}"]
    runtime = replay.runtime_env(dockerfile)
    empty = before.parent / "empty-pycache"
    empty.mkdir(exist_ok=True)
    venv_only = before.parent / f"{replay.role.name}-venv-only-pycache"
    prefix = Path(runtime["PYTHONPYCACHEPREFIX"])
    shutil.copytree(prefix, venv_only, symlinks=True)
    stdlib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('stdlib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    shutil.rmtree(venv_only / stdlib.lstrip("/"))
    cases = {
        "opt-2 bytecode for the venv and the stdlib (the image)": runtime,
        "opt-2 bytecode for the venv only": {**runtime, "PYTHONPYCACHEPREFIX": str(venv_only)},
        "no bytecode at all (every .pyc deleted, read-only root)": {
            **runtime,
            "PYTHONPYCACHEPREFIX": str(empty),
        },
    }
    time_runs(argv, cases, rounds=2)  # warm the page cache
    for label, (wall, cpu) in time_runs(argv, cases).items():
        print(f"{label:>58}: wall {wall * 1000:5.0f} ms, CPU {cpu * 1000:5.0f} ms (median of 15)")
    if shutil.which("valgrind"):  # instructions do not depend on what else the machine runs
        for label, env in cases.items():
            print(f"{label:>58}: {instructions(argv, env) / 1e6:7.0f} M instructions")
        # the HEALTHCHECK, every 10 s for the container's life (no sidecar here: exits 1)
        probe = [argv[0], "-m", "proxy.probe", "--port", "9"]
        for label, env in cases.items():
            count = instructions(probe, env, check=False)
            print(f"{'HEALTHCHECK, ' + label:>58}: {count / 1e6:7.0f} M instructions")


def instructions(argv: Sequence[str], env: Mapping[str, str], *, check: bool = True) -> int:
    done = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *argv],
        env=env,
        capture_output=True,
        text=True,
        check=check,
        cwd=tempfile.gettempdir(),
    )
    found = re.search(r"Collected : (\d+)", done.stderr)
    assert found, done.stderr
    return int(found.group(1))


if __name__ == "__main__":  # pragma: no cover
    measure()
