"""python -m bench.gpu_session: its plan, its time budget and its records, checked without a GPU."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from bench import gpu_session as gs
from bench import harness


def _part(name, budget, kind="memory", required=False):
    return gs.Part(name, kind, budget, op=name, required=required)


def test_fit_leaves_out_the_slowest_first_and_keeps_the_order():
    parts = [_part("a", 10), _part("b", 50), _part("c", 30), _part("d", 5)]
    kept, left = gs.fit(parts, 50)
    assert [p.name for p in kept] == ["a", "c", "d"] and [p.name for p in left] == ["b"]
    kept, left = gs.fit(parts, 14)  # b, then c, then a: what is left is d
    assert [p.name for p in kept] == ["d"] and [p.name for p in left] == ["b", "c", "a"]
    assert gs.fit(parts, 1000) == (parts, [])


def test_the_tests_go_only_when_nothing_else_is_left():
    parts = [_part("tests", 100, "tests", required=True), _part("a", 10), _part("b", 20)]
    kept, left = gs.fit(parts, 105)
    assert [p.name for p in kept] == ["tests"] and {p.name for p in left} == {"a", "b"}
    kept, _ = gs.fit(parts, 50)
    assert "tests" not in [p.name for p in kept]


def test_the_gpu_plan_can_be_listed_without_a_gpu():
    parts, kept, left_out, skipped = gs.plan(gs.PREVIEW, 480, True, None)
    names = [p.name for p in parts]
    assert any(n.startswith("bench attention.fwd") for n in names)
    assert any(n.startswith("bench train.step") for n in names)
    assert any(n.startswith("bench generate") for n in names)
    assert [p.op for p in parts if p.kind == "memory"] == list(gs.MEMORY_OPS)
    assert not any("tokenizer" in n for n in names)  # the tokenizer runs on the CPU: not the session's
    assert any("tests are not installed" in s for s in skipped)
    assert gs.STARTUP_S + sum(p.budget_s for p in kept) <= 480
    assert set(map(id, kept)) | set(map(id, left_out)) == set(map(id, parts))
    # train.step.flops times the same step as train.step: one part holds both
    step = [p for p in parts if p.name.startswith("bench train.step")]
    assert len(step) == 1 and {c.op for c in step[0].cases} == {"train.step", "train.step.flops"}
    text = gs.format_plan(parts, kept, 480)
    assert "480 s budget" in text and "gpu tests" not in text


def test_count_gpu_tests_counts_only_the_marked_ones(tmp_path):
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "conftest.py").write_text(textwrap.dedent("""
        def pytest_configure(config):
            config.addinivalue_line("markers", "gpu: needs a GPU")
    """))
    (tests / "test_x.py").write_text(textwrap.dedent("""
        import pytest

        @pytest.mark.gpu
        def test_a(): pass

        @pytest.mark.gpu
        @pytest.mark.parametrize("n", [1, 2])
        def test_b(n): pass

        def test_c(): pass
    """))
    assert gs.count_gpu_tests(str(tests)) == 3


def test_junit_outcome(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text('<testsuites><testsuite><testcase classname="t" name="ok"/>'
                   '<testcase classname="t" name="bad"><failure message="assert 1 == 2"/></testcase>'
                   '<testcase classname="t" name="skip"><skipped message="no"/></testcase></testsuite></testsuites>')
    out = gs._junit(str(xml))
    assert (out["passed"], out["failed"], out["skipped"]) == (1, 1, 1)
    assert out["failures"] == [{"test": "t::bad", "message": "assert 1 == 2"}]


def test_a_session_short_of_time_leaves_out_the_slowest_and_says_so(tmp_path, monkeypatch):
    parts = [_part("layer_norm", 1.0), _part("attention", 500.0), _part("feed_forward", 2.0)]
    monkeypatch.setattr(harness, "device_info", lambda *a, **k: gs.PREVIEW)
    monkeypatch.setattr(gs, "plan", lambda *a: (parts, parts, [], []))
    ran = []
    monkeypatch.setattr(gs, "measure_memory", lambda op: ran.append(op) or [
        {"op": op, "shape": "s", "dtype": "bf16", "impl": "reference", "peak_gib": 0.5}])
    record = gs.run_session(str(tmp_path), budget_s=60.0, stream=open(tmp_path / "log.txt", "w"))
    assert ran == ["layer_norm", "feed_forward"]
    assert [p["part"] for p in record["left_out"]] == ["attention"]
    assert "the slowest go first" in record["left_out"][0]["why"]
    saved = json.loads((tmp_path / f"{gs.PREVIEW.slug}-session.json").read_text())
    assert [p["part"] for p in saved["parts"]] == ["layer_norm", "feed_forward"]
    assert saved["memory"][0]["peak_gib"] == 0.5 and saved["budget_s"] == 60.0
    assert (tmp_path / f"{gs.PREVIEW.slug}-session.png").stat().st_size > 1000
    log = (tmp_path / "log.txt").read_text()
    assert "s left] layer_norm" in log


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "bench.gpu_session", *args], capture_output=True, text=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="without a GPU the session refuses to run")
def test_without_a_gpu_the_session_says_what_to_run_instead():
    out = _cli("--out", "never-written")
    assert out.returncode == 2 and "--dry-run lists what it would run" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_budget_below_start_up_is_refused():
    out = _cli("--budget-s", "3", "--dry-run")
    assert out.returncode == 2 and "--budget-s must be more than" in out.stderr
