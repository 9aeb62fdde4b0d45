"""The instructions mode's pure helpers: reading callgrind dumps and charging stages."""

from __future__ import annotations

import fnmatch

import pytest

from bench import callgrind
from bench.callgrind import PerfMap, Profile, Rule

# A dump as callgrind writes it with --fn-skip: two trampolines (0x...1000 runs ``outer``,
# 0x...2000 ``inner``), one PLT entry without a symbol (0x...9000), the thread's bottom (main),
# compressed names and relative positions.
DUMP = """\
# callgrind format
version: 1
positions: line
events: Ir
summary: 1000

ob=(1) /usr/bin/python3.12
fl=(1) ???
fn=(1) main
0 10
cfn=(2) 0x0000000000001000
calls=1 0
0 990

fn=(2)
+3 300
cfn=(3) 0x0000000000002000
calls=4 0
* 600
cfn=(4) 0x0000000000009000'2
calls=2 0
0 90

fn=(3)
0 500
cfn=(4)
calls=1 0
0 100

fn=(4)
0 190
totals: 1000
"""

PERF_MAP = """\
1000 b py::outer:/srv/proxy/pipeline.py
2000 b py::inner:/srv/proxy/routing.py
"""


def test_parse_reads_own_costs_calls_and_the_summary() -> None:
    graph = callgrind.parse(DUMP)
    assert graph.total == 1000
    assert graph.own == {"main": 10, "0x0000000000001000": 300, "0x0000000000002000": 500,
                         "0x0000000000009000": 190}  # fmt: skip
    assert graph.calls["0x0000000000001000"] == {
        "0x0000000000002000": 600,
        "0x0000000000009000": 90,  # the recursion suffix 'N is one function
    }
    assert sum(graph.own.values()) == graph.total


def test_perf_map_names_trampolines_by_address_range() -> None:
    perf_map = PerfMap.parse(PERF_MAP + "3000 10 something-else\n")
    assert perf_map.function("0x0000000000001000") == "outer:/srv/proxy/pipeline.py"
    assert perf_map.function("0x000000000000100a") == "outer:/srv/proxy/pipeline.py"
    assert perf_map.function("0x000000000000100b") is None
    assert perf_map.function("0x0000000000003000") is None  # not a Python trampoline
    assert perf_map.function("PyObject_Call") is None


def test_code_without_a_symbol_is_folded_into_its_callers_by_what_their_calls_cost() -> None:
    profile = callgrind.python_profile(callgrind.parse(DUMP), PerfMap.parse(PERF_MAP))
    outer, inner = "py:outer:/srv/proxy/pipeline.py", "py:inner:/srv/proxy/routing.py"
    # The PLT entry's 190 went to outer and inner as 90 : 100.
    assert profile.own == pytest.approx({"main": 10, outer: 390, inner: 600})
    assert sum(profile.own.values()) == pytest.approx(1000)
    assert profile.calls[outer] == {inner: 600}


@pytest.mark.parametrize(
    ("rules", "expected"),
    [
        pytest.param(
            [Rule("route", "proxy/routing.py"), Rule("batch", "proxy/pipeline.py")],
            {"other": 10, "batch": 390, "route": 600},
            id="each-function-its-own-stage",
        ),
        pytest.param(
            [Rule("batch", "proxy/pipeline.py")],
            {"other": 10, "batch": 990},
            id="an-unnamed-callee-takes-its-callers-stage",
        ),
        pytest.param(
            [Rule("route", "proxy/")],
            {"other": 10, "route": 990},
            id="a-package-rule",
        ),
        pytest.param(
            [Rule("route", "proxy/routing.py", "out*")],
            {"other": 1000},
            id="qualname-pattern-must-match",
        ),
    ],
)
def test_by_stage(rules: list[Rule], expected: dict[str, float]) -> None:
    profile = callgrind.python_profile(callgrind.parse(DUMP), PerfMap.parse(PERF_MAP))
    split = callgrind.by_stage(profile, callgrind.stage_of(rules), "other")
    assert {k: v for k, v in split.items() if v} == pytest.approx(expected)


def test_an_unnamed_helper_is_shared_between_stages_and_survives_recursion() -> None:
    profile = Profile(
        total=0,
        own={"py:a:x/a.py": 100, "py:b:x/b.py": 100, "py:helper:x/h.py": 300},
        calls={
            "py:a:x/a.py": {"py:helper:x/h.py": 100},
            "py:b:x/b.py": {"py:helper:x/h.py": 200},
            "py:helper:x/h.py": {"py:helper:x/h.py": 50},
        },
    )
    rules = [Rule("A", "x/a.py"), Rule("B", "x/b.py")]
    split = callgrind.by_stage(profile, callgrind.stage_of(rules), "other")
    assert split == pytest.approx({"A": 200, "B": 300})


def test_skip_patterns_skip_every_symbol_but_the_kept_ones_and_no_address() -> None:
    patterns = callgrind.skip_patterns()

    def skipped(name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in patterns)

    for name in ("_PyEval_EvalFrameDefault", "PyObject_Call", "malloc", "uv_run", "mainloop",
                 "start_threads", "_started", "__pyx_f_6uvloop_4loop"):  # fmt: skip
        assert skipped(name), name
    for name in ("main", "_start", "start_thread", "clone3", "__clone_internal", "(below main)",
                 "_dl_runtime_resolve_xsave", "_Py_RunGC", "0x0000000004947948"):  # fmt: skip
        assert not skipped(name), name
