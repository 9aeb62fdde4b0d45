"""Summaries of the instructions mode's raw runs: printed tables and the BENCHMARKS.md section."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from bench import stages


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: Sequence[float]) -> float:
    """(max - min) / median, as a fraction: how far repeated counts of one commit stray."""
    middle = _median(values)
    if len(values) < 2 or not middle:
        return float("nan") if len(values) < 2 else 0.0
    return (max(values) - min(values)) / middle


def _runs(tree: dict[str, Any], role: str, pass_: str) -> list[dict[str, Any]]:
    return [r for r in tree["runs"] if r["role"] == role and r["pass"] == pass_]


def roles_of(results: dict[str, Any]) -> list[str]:
    seen: list[str] = []
    for tree in results.get("trees", []):
        for run in tree["runs"]:
            if run["role"] not in seen:
                seen.append(run["role"])
    return seen


def per_message(tree: dict[str, Any], role: str, pass_: str = "plain") -> float:
    return _median([r["per_message"] for r in _runs(tree, role, pass_)])


def stage_medians(tree: dict[str, Any], role: str) -> dict[str, float]:
    runs = _runs(tree, role, "stages")
    return {name: _median([r["stages"][name] for r in runs]) for name in stages.STAGES}


def _every(values: Sequence[float]) -> str:
    text = ", ".join(f"{v:,.0f}" for v in values)
    if len(values) > 1:
        text += f" (spread {spread(values):.1%})"
    return text


def role_rows(tree: dict[str, Any], role: str) -> list[list[str]]:
    """stage, instructions per message, share, every run: the stages pass, then the totals."""
    runs = _runs(tree, role, "stages")
    rows = []
    if runs:
        medians = stage_medians(tree, role)
        total = sum(medians.values())
        for name in stages.STAGES:
            rows.append(
                [
                    name,
                    f"{medians[name]:,.0f}",
                    f"{medians[name] / total:.1%}",
                    _every([r["stages"][name] for r in runs]),
                ]
            )
        rows.append(
            [
                "total, with the perf trampoline",
                f"{per_message(tree, role, 'stages'):,.0f}",
                "",
                _every([r["per_message"] for r in runs]),
            ]
        )
    plain = _runs(tree, role, "plain")
    if plain:
        rows.append(
            [
                "**total, plain interpreter**",
                f"**{per_message(tree, role):,.0f}**",
                "",
                _every([r["per_message"] for r in plain]),
            ]
        )
    return rows


HEADER = ["stage", "instructions per message", "share", "every run"]


def comparison_rows(results: dict[str, Any]) -> list[list[str]]:
    """Each role's plain count on every tree against the first tree's."""
    trees = results.get("trees", [])
    if len(trees) < 2:
        return []
    base = trees[0]
    rows = []
    for role in roles_of(results):
        before = per_message(base, role)
        for tree in trees[1:]:
            after = per_message(tree, role)
            if before != before or after != after:  # not measured on one side
                continue
            rows.append(
                [
                    role,
                    f"{base['commit']}: {before:,.0f}",
                    f"{tree['commit']}: {after:,.0f}",
                    f"{after / before:.3f}x ({after / before - 1:+.1%})",
                ]
            )
    return rows


COMPARISON_HEADER = ["role", "before", "after", "after / before"]


def _top_lines(tree: dict[str, Any], role: str, count: int = 12) -> list[str]:
    runs = _runs(tree, role, "stages")
    if not runs:
        return []
    return [f"{cost:>9,.0f}  {name}" for name, cost in runs[0]["top"][:count]]


def _unnamed_lines(tree: dict[str, Any], role: str) -> list[str]:
    runs = _runs(tree, role, "stages")
    if not runs:
        return []
    return [f"{cost:>9,.0f}  {name}" for name, cost in runs[0]["unnamed_proxy"] if cost >= 500]


def _problems(tree: dict[str, Any], role: str) -> list[str]:
    """Runs whose output did not hold exactly the messages counted: their count is not valid."""
    return [
        f"PROBLEM: {r['pass']} pass: {r['written']:,} written of {r['messages']:,} "
        "(redelivered or lost: repeat the measurement)"
        for r in tree["runs"]
        if r["role"] == role and r["written"] != r["messages"]
    ]


def _batches(tree: dict[str, Any], role: str) -> str:
    runs = [r for r in tree["runs"] if r["role"] == role and r["batches"]]
    if not runs:
        return ""
    return f"{_median([r['messages'] / r['batches'] for r in runs]):,.0f} messages per batch"


def _title(results: dict[str, Any], tree: dict[str, Any], role: str) -> str:
    label = "the working tree" if tree["label"] == "." else tree["label"]
    named = "" if tree["commit"].startswith(label) else f" ({label})"
    batches = _batches(tree, role)
    return (
        f"{role} at {tree['commit']}{named}: {results['messages']:,} messages after "
        f"{results['warmup']:,} of warm-up" + (f", {batches}" if batches else "")
    )


def text(results: dict[str, Any]) -> str:
    from bench.report import plain_table

    out = [
        f"instructions per message, callgrind ({results['valgrind']}), workers on "
        f"{results['python']}"
    ]
    for tree in results["trees"]:
        for role in roles_of(results):
            if not any(r["role"] == role for r in tree["runs"]):
                continue
            out.append("\n" + _title(results, tree, role))
            out.append(plain_table(HEADER, role_rows(tree, role)).replace("**", ""))
            out += ["  " + line for line in _problems(tree, role)]
            top = _top_lines(tree, role)
            if top:
                out.append("  top functions, own instructions per message (the C they call in):")
                out += ["  " + line for line in top]
            unnamed = _unnamed_lines(tree, role)
            if unnamed:
                out.append("  proxy/ functions no stage rule names (charged to their callers):")
                out += ["  " + line for line in unnamed]
    comparison = comparison_rows(results)
    if comparison:
        out.append("\nplain interpreter, instructions per message")
        out.append(plain_table(COMPARISON_HEADER, comparison))
    return "\n".join(out)


def markdown(results: dict[str, Any]) -> str:
    from bench.report import markdown_table

    out = [
        f"Workers on {results['python']} under {results['valgrind']}; "
        f"{results['messages']:,} messages counted after {results['warmup']:,} of warm-up "
        "(method below).\n"
    ]
    comparison = comparison_rows(results)
    if comparison:
        out.append(markdown_table(COMPARISON_HEADER, comparison) + "\n")
    for tree in results["trees"]:
        for role in roles_of(results):
            if not any(r["role"] == role for r in tree["runs"]):
                continue
            out.append(f"**{_title(results, tree, role)}**\n")
            out.append(markdown_table(HEADER, role_rows(tree, role)) + "\n")
            out += [f"- **{line}**\n" for line in _problems(tree, role)]
            top = _top_lines(tree, role, 10)
            if top:
                out.append(
                    "Top functions, own instructions per message (with the C they call):\n\n```"
                )
                out += top
                out.append("```\n")
    return "\n".join(out)


def bridge_target(results: dict[str, Any]) -> tuple[float, str] | None:
    """The stream bridge's plain count on the last tree over the first: (ratio, commits)."""
    trees = results.get("trees", [])
    if len(trees) < 2:
        return None
    role = "stream bridge"
    before, after = per_message(trees[0], role), per_message(trees[-1], role)
    if before != before or after != after:
        return None
    return after / before, f"{trees[-1]['commit']} / {trees[0]['commit']}"
