"""Reading callgrind's output: the call graph of one dump, folded onto Python functions.

CPython 3.11 shows a callgrind reader only C functions: all Python code is one
``_PyEval_EvalFrameDefault``. CPython 3.12's perf trampoline (``python -X perf``) runs every
Python function through a small stub of machine code of its own and lists the stubs' addresses
in ``/tmp/perf-<pid>.map``. Callgrind names code without a symbol by its address, so each stub is
a function in the call graph, named ``0x...``, that the map turns back into a Python function.

With ``--fn-skip`` for every named C function, callgrind charges C code (the interpreter's
included) to the function that called it: a Python stub's own cost is then everything that ran
while it was the innermost Python function on the stack. A few call-graph nodes stay that are
neither: the C functions kept at the bottom of every thread (callgrind needs one), and code
without a symbol that is not a stub (PLT entries): those are folded into their callers.
"""

from __future__ import annotations

import bisect
import re
import string
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

# What callgrind needs at the bottom of a thread, the dynamic loader (start-up only), and the
# interpreter's garbage collector: it runs where an allocation crossed a threshold, so charged
# to that function it would move from run to run; kept, it is a node (and a stage) of its own.
GARBAGE_COLLECTOR = "_Py_RunGC"
KEPT = (
    GARBAGE_COLLECTOR,
    "_start",
    "(below main)",
    "main",
    "start_thread",
    "clone*",
    "__clone*",
    "__libc*",
    "__tunable*",
    "_dl*",
    "dl_*",
)
_FIRST = string.ascii_letters + "_(."
_NEXT = string.ascii_letters + string.digits + "_.:(<@$~ "


def skip_patterns(kept: Sequence[str] = KEPT) -> list[str]:
    """``--fn-skip`` patterns (``*`` and ``?`` only) that match every symbol name except ``kept``.

    Names of code without a symbol start with ``0x`` and are never matched. A kept name ending in
    ``*`` keeps every name with that prefix.
    """

    def below(keep: list[str], prefix: str) -> list[str]:
        out = []
        for char in _NEXT if prefix else _FIRST:
            at = prefix + char
            if any(k.endswith("*") and k[:-1] == at for k in keep):
                continue
            under = [k for k in keep if k.startswith(at)]
            if not under:
                out.append(at + "*")
            elif under == [at]:  # longer names only: callgrind's "?" also matches nothing
                out.extend(at + following + "*" for following in _NEXT)
            else:
                out.extend(below([k for k in under if k != at], at))
        return out

    return below(list(kept), "")


@dataclass
class Graph:
    """One dump: each function's own cost and its calls (callee -> inclusive cost)."""

    total: int = 0
    own: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    calls: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(dict))

    def callers(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = defaultdict(dict)
        for caller, callees in self.calls.items():
            for callee, cost in callees.items():
                out[callee][caller] = cost
        return out


_NAMED = re.compile(r"^\((\d+)\)(?: (.*))?$")
_RECURSION = re.compile(r"'\d+$")


def parse(text: str) -> Graph:
    """The call graph of a callgrind output file with one event (``Ir``)."""
    graph = Graph()
    names: dict[str, str] = {}
    current = pending = ""
    callee: str | None = None
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        if line[0].isdigit() or line[0] in "+-*":
            cost = _cost(line)
            if callee is None:
                graph.own[current] += cost
            else:  # the line after ``calls=``: what those calls cost, callee included
                calls = graph.calls[current]
                calls[callee] = calls.get(callee, 0) + cost
                callee = None
            continue
        key, _, value = line.partition("=")
        if key == "fn":
            current = _name(value, names)
        elif key == "cfn":
            pending = _name(value, names)
        elif key == "calls":
            callee = pending
        elif line.startswith("summary:"):
            graph.total = int(line.split()[1])
    return graph


def _name(value: str, names: dict[str, str]) -> str:
    """A function name, through callgrind's compression: ``(id) name`` defines, ``(id)`` uses."""
    match = _NAMED.match(value)
    if not match:
        return _RECURSION.sub("", value)
    key, given = match.groups()
    if given is not None:
        names[key] = _RECURSION.sub("", given)
    return names[key]


def _cost(line: str) -> int:
    parts = line.split()
    return int(parts[1]) if len(parts) > 1 else 0


@dataclass(frozen=True)
class PerfMap:
    """``/tmp/perf-<pid>.map``: the trampolines' address ranges, the Python function of each."""

    starts: tuple[int, ...]
    ends: tuple[int, ...]
    names: tuple[str, ...]

    @staticmethod
    def parse(text: str) -> PerfMap:
        rows = []
        for line in text.splitlines():
            parts = line.split(" ", 2)
            if len(parts) == 3 and parts[2].startswith("py::"):
                start, size = int(parts[0], 16), int(parts[1], 16)
                rows.append((start, start + size, parts[2][4:]))
        rows.sort()
        return PerfMap(
            tuple(r[0] for r in rows), tuple(r[1] for r in rows), tuple(r[2] for r in rows)
        )

    def function(self, node: str) -> str | None:
        """``qualname:file`` of the Python function a ``0x...`` node runs, if it is a trampoline."""
        if not node.startswith("0x"):
            return None
        try:
            address = int(node, 16)
        except ValueError:
            return None
        index = bisect.bisect_right(self.starts, address) - 1
        if index >= 0 and address < self.ends[index]:
            return self.names[index]
        return None


@dataclass
class Profile:
    """Each Python function's own cost (with the C it called) and the calls between them."""

    total: int
    own: dict[str, float]
    calls: dict[str, dict[str, float]]
    count: dict[str, float] = field(default_factory=dict)  # inclusive cost, for the top list


def python_profile(graph: Graph, perf_map: PerfMap) -> Profile:
    """Fold every node that is not a Python function into its callers.

    A node's own cost and its calls are shared among its callers in proportion to what each
    caller's calls to it cost. Functions kept at a thread's bottom have no caller: they stay,
    named as they are (the event loop's own C code lands there or in the frame that runs it).
    """
    own: dict[str, float] = defaultdict(float)
    calls: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    rename: dict[str, str] = {}
    for node in set(graph.own) | set(graph.calls) | {c for cs in graph.calls.values() for c in cs}:
        python = perf_map.function(node)
        rename[node] = f"py:{python}" if python else node
    for node, cost in graph.own.items():
        own[rename[node]] += cost
    for caller, callees in graph.calls.items():
        for callee, cost in callees.items():
            if rename[callee] != rename[caller]:
                calls[rename[caller]][rename[callee]] += cost
    foldable = [n for n in set(own) | set(calls) if n.startswith("0x") and not n.startswith("py:")]
    for node in foldable:
        _fold(node, own, calls)
    return Profile(graph.total, dict(own), {k: dict(v) for k, v in calls.items()})


def _fold(node: str, own: dict[str, float], calls: dict[str, dict[str, float]]) -> None:
    callers = {c: cs[node] for c, cs in calls.items() if node in cs and c != node}
    weight = sum(callers.values())
    mine = own.pop(node, 0.0)
    out = calls.pop(node, {})
    out.pop(node, None)
    for caller in callers:
        del calls[caller][node]
    if weight <= 0:
        if mine or out:  # nobody called it inside the dump: it is a root, keep it
            own[node] = mine
            calls[node] = defaultdict(float, out)
        return
    for caller, cost in callers.items():
        share = cost / weight
        own[caller] = own.get(caller, 0.0) + mine * share
        for callee, callee_cost in out.items():
            if callee != caller:
                calls[caller][callee] += callee_cost * share
            else:
                own[caller] += callee_cost * share


# --- stages -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """Python functions of a file (``path`` ends with ``/``: of a package) by qualname pattern."""

    stage: str
    path: str
    qualname: str = "*"

    def matches(self, qualname: str, path: str) -> bool:
        where = "/" + path
        if self.path.endswith("/"):
            inside = "/" + self.path in where
        else:
            inside = where.endswith("/" + self.path)
        return inside and fnmatchcase(qualname, self.qualname)


def stage_of(
    rules: Sequence[Rule], native: Mapping[str, str] | None = None
) -> Callable[[str], str | None]:
    """The stage of a profile node: a Python one (``py:qualname:file``) by the first matching
    rule, a C function kept in the graph by name (``native``)."""
    cache: dict[str, str | None] = {}
    native = native or {}

    def lookup(node: str) -> str | None:
        if node not in cache:
            cache[node] = native.get(node)
            if node.startswith("py:"):
                qualname, _, path = node[3:].partition(":")
                for rule in rules:
                    if rule.matches(qualname, path):
                        cache[node] = rule.stage
                        break
        return cache[node]

    return lookup


def by_stage(
    profile: Profile, stage: Callable[[str], str | None], default: str, rounds: int = 200
) -> dict[str, float]:
    """Every instruction of the profile charged to a stage.

    A function with a stage keeps its own cost there. A function without one (a library's, or a
    helper of several stages) is charged to its callers' stages in proportion to what each
    caller's calls to it cost; a function nobody called (the event loop) goes to ``default``.
    Solved by iteration: a function's shares are the weighted mean of its callers' until they
    settle (recursion and mutual recursion included).
    """
    callers: dict[str, dict[str, float]] = defaultdict(dict)
    for caller, callees in profile.calls.items():
        for callee, cost in callees.items():
            if callee != caller:
                callers[callee][caller] = cost
    nodes = set(profile.own) | set(callers)
    shares: dict[str, dict[str, float]] = {}
    free = []
    for node in nodes:
        named = stage(node)
        if named is not None:
            shares[node] = {named: 1.0}
        else:
            shares[node] = {default: 1.0}
            if sum(callers.get(node, {}).values()) > 0:
                free.append(node)
    for _ in range(rounds):
        moved = 0.0
        for node in free:
            mixed = _mix(callers[node], shares)
            before = shares[node]
            moved = max(moved, *(abs(mixed[k] - before.get(k, 0.0)) for k in mixed))
            shares[node] = mixed
        if moved < 1e-9:
            break
    totals: dict[str, float] = defaultdict(float)
    for node, cost in profile.own.items():
        for name, part in shares[node].items():
            totals[name] += cost * part
    return dict(totals)


def _mix(parents: dict[str, float], shares: dict[str, dict[str, float]]) -> dict[str, float]:
    """The callers' stage shares, weighted by what each caller's calls cost."""
    weight = sum(parents.values())
    mixed: dict[str, float] = defaultdict(float)
    for parent, cost in parents.items():
        for name, part in shares[parent].items():
            mixed[name] += part * cost / weight
    return dict(mixed)


def inclusive(profile: Profile) -> dict[str, float]:
    """Each function's own cost plus what its calls cost (recursion counted once per edge)."""
    out = dict(profile.own)
    for caller, callees in profile.calls.items():
        out[caller] = out.get(caller, 0.0) + sum(callees.values())
    return out


def top(values: Mapping[str, float], count: int) -> list[tuple[str, float]]:
    return sorted(values.items(), key=lambda item: -item[1])[:count]


def read(dump: Path, perf_map: Path) -> Profile:
    return python_profile(parse(dump.read_text()), PerfMap.parse(perf_map.read_text()))


def short(node: str) -> str:
    """``py:Pipeline._flush:/x/proxy/pipeline.py`` -> ``proxy/pipeline.py:Pipeline._flush``."""
    if not node.startswith("py:"):
        return node
    qualname, _, path = node[3:].partition(":")
    for marker in ("/site-packages/", "/lib/python3."):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker == "/lib/python3.":
                path = "stdlib/" + path.split("/", 1)[1]
            break
    else:
        for marker in ("/proxy/", "/workers/", "/bench/"):
            if marker in path:
                path = marker[1:] + path.split(marker, 1)[1]
                break
    return f"{path}:{qualname}"


def lines(values: Iterable[tuple[str, float]], per: float) -> list[str]:
    return [f"{cost / per:>10,.0f}  {short(name)}" for name, cost in values]
