"""The repository stands alone: no file in it points at something a fresh clone does not have."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.helpers import REPO

# Each pattern is assembled from pieces so that this file does not match its own patterns.
OUTSIDE = [
    (re.compile("CONTRACT" + r"\.md", re.IGNORECASE), "a specification file users do not have"),
    (re.compile(r"\.\./" + "shared" + r"\b|\bshared/(seeds|recipes)/"), "a folder outside"),
    (re.compile(r"\b" + "shared" + r" folder\b", re.IGNORECASE), "a folder outside"),
    (re.compile(r"\bseed" + r"[ -]note", re.IGNORECASE), "a note users do not have"),
    (
        re.compile(r"\bsection \d+ of the (contract|spec|brief|seed)", re.IGNORECASE),
        "a section of a document users do not have",
    ),
    (re.compile(r"(?<![\w.-])/" + r"work/"), "a path on the developers' machine"),
    (re.compile(r"(?<![\w.-])/home/" + r"[a-z_][\w.-]*/"), "a home directory"),
    (re.compile(r"(?<![\w.-])/Users/" + r"[A-Za-z]"), "a home directory"),
    # /root/.cache is a path inside the images, which docker/slim-venv.sh empties.
    (re.compile(r"(?<![\w.-])/ro" + r"ot/(?!\.cache\b)"), "a home directory"),
]


def _repository_files() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    return [REPO / name for name in listed if (REPO / name).is_file()]


def test_no_file_refers_to_a_path_outside_the_repository() -> None:
    files = _repository_files()
    assert any(path.name == "README.md" for path in files)
    found = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # images and other binary files
        for number, line in enumerate(text.splitlines(), 1):
            for pattern, what in OUTSIDE:
                if match := pattern.search(line):
                    found.append(f"{path.relative_to(REPO)}:{number}: {match[0]!r} ({what})")
    assert not found, "the repository must stand alone:\n" + "\n".join(found)


def test_the_patterns_catch_what_they_are_for() -> None:
    examples = [
        "see CONTR" + "ACT.md section 2",
        "the se" + "ed note's list",
        "cat ../sha" + "red/recipes/extra.md",
        "/wo" + "rk/main/proxy/config.py",
        "/ho" + "me/alice/project",
        "/ro" + "ot/.pyenv/versions/3.12/bin/python",
    ]
    for example in examples:
        assert any(pattern.search(example) for pattern, _ in OUTSIDE), example
    harmless = ["rm -rf /root/.cache", "tests/data/contract.toml", "/etc/message-proxy/c.toml"]
    for example in harmless:
        assert not any(pattern.search(example) for pattern, _ in OUTSIDE), example


_LINK = re.compile(r"\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^#{1,6} (.+?)\s*$", re.MULTILINE)
_FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def _anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a page's headings (a repeated heading gets -1, -2, ...)."""
    seen: dict[str, int] = {}
    anchors = set()
    for heading in _HEADING.findall(_FENCE.sub("", markdown)):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def test_links_between_the_docs_resolve() -> None:
    broken = []
    for page in (p for p in _repository_files() if p.suffix == ".md"):
        text = _FENCE.sub("", page.read_text(encoding="utf-8"))
        for target in _LINK.findall(text):
            if re.match(r"^[a-z]+:", target):
                continue  # https:, mailto:
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append(f"{page.relative_to(REPO)}: {target} (no such file)")
            elif anchor and linked.suffix == ".md":
                if anchor not in _anchors(linked.read_text(encoding="utf-8")):
                    broken.append(f"{page.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)
