"""Stage outputs under concurrency and kills, and plans of an empty data root (no Ray)."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass

import pytest

from pipeline.config import ConfigError
from pipeline.stage import (
    StageOutput,
    StageSpec,
    commit_stage,
    committed_dir,
    is_locked,
    leftovers,
    output_lock,
    read_record,
)
from workflows.plan import PlanError, load_workflow, plan_workflow


@dataclass(frozen=True)
class Cfg:
    n: int = 1


def _slow_writer(calls):
    def run(config, ctx):
        calls.append(threading.get_ident())
        (ctx.output_dir / "data.txt").write_text(str(config.n))
        time.sleep(0.5)  # long enough that the second run arrives while this one writes
        return {"n": config.n}
    return run


def test_concurrent_runs_of_one_output_run_it_once(tmp_path):
    calls, waited, results = [], [], {}
    spec = StageSpec("w", Cfg, _slow_writer(calls))

    def worker(i):
        results[i] = commit_stage(spec, Cfg(3), StageOutput(tmp_path, "w", "fp"), {"fingerprint": "fp"},
                                  on_wait=lambda: waited.append(i))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    threads[0].start()
    time.sleep(0.1)
    threads[1].start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and waited == [1]
    assert [results[i][2] for i in range(2)] == [False, True]  # ran, then reused
    assert results[0][0] == results[1][0] == committed_dir(tmp_path, "w", "fp")
    assert results[1][1]["summary"] == {"n": 3}
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["fp", "fp.lock"]


def test_failed_forced_rerun_keeps_the_committed_output(tmp_path):
    spec = StageSpec("w", Cfg, _slow_writer([]))
    out, _, _ = commit_stage(spec, Cfg(1), StageOutput(tmp_path, "w", "fp"), {"fingerprint": "fp"})

    def broken(config, ctx):
        (ctx.output_dir / "data.txt").write_text("partial")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        commit_stage(StageSpec("w", Cfg, broken), Cfg(2), StageOutput(tmp_path, "w", "fp"), {}, force=True)
    assert (out / "data.txt").read_text() == "1" and read_record(out)["summary"] == {"n": 1}
    _, record, reused = commit_stage(spec, Cfg(5), StageOutput(tmp_path, "w", "fp"), {}, force=True)
    assert not reused and record["summary"] == {"n": 5} and (out / "data.txt").read_text() == "5"
    assert leftovers(tmp_path, "w") == []


KILLED_STAGE = textwrap.dedent("""
    import sys, time
    from dataclasses import dataclass
    from pathlib import Path
    from pipeline.stage import StageOutput, StageSpec, commit_stage

    @dataclass(frozen=True)
    class Cfg:
        n: int = 1

    def run(config, ctx):
        (ctx.output_dir / "half.txt").write_text("partial")
        time.sleep(600)

    commit_stage(StageSpec("k", Cfg, run), Cfg(), StageOutput(Path(sys.argv[1]), "k", "fp"), {})
""")


def test_sigkilled_stage_leaves_nothing_complete_and_no_lock(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", KILLED_STAGE, str(tmp_path)])
    deadline = time.time() + 60
    while not any(p.glob("half.txt") for p in leftovers(tmp_path, "k")):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.1)
    assert is_locked(tmp_path, "k", "fp")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert read_record(committed_dir(tmp_path, "k", "fp")) is None
    assert not committed_dir(tmp_path, "k", "fp").exists()
    assert not is_locked(tmp_path, "k", "fp")  # flock died with its holder
    [stale] = leftovers(tmp_path, "k", "fp")
    with output_lock(tmp_path, "k", "fp"):  # no wait: nobody holds it
        pass
    spec = StageSpec("k", Cfg, lambda c, ctx: (ctx.output_dir / "x").write_text("ok") and {})
    out, _, reused = commit_stage(spec, Cfg(), StageOutput(tmp_path, "k", "fp"), {})
    assert not reused and (out / "x").read_text() == "ok" and not (out / "half.txt").exists()
    assert not stale.exists() and leftovers(tmp_path, "k") == []


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    return load_workflow("workflows/demo.yaml", [f"data_root={root}"])


def test_empty_data_root_plans_every_stage_to_run(demo):
    plan = plan_workflow(demo)
    assert [(p.name, p.action) for p in plan] == [(n, "run") for n in demo.stages]
    assert plan[0].reason == "no committed output yet"
    assert plan[2].reason == "upstream preprocess reruns"
    assert [p.name for p in plan if p.forced] == []


def test_from_reruns_downstream_and_force_only_itself(demo):
    plan = {p.name: p for p in plan_workflow(demo, from_=["train"], force=["synth"])}
    after_train = list(demo.stages)[list(demo.stages).index("train"):]  # all read train's output
    assert [n for n, p in plan.items() if p.forced] == ["synth", *after_train]
    assert plan["train"].reason == "--from train"
    assert plan["evaluate"].reason == "downstream of --from train"
    assert plan["synth"].reason == "--force synth"
    assert not plan["preprocess"].forced


def test_only_needs_committed_inputs_and_skips_the_rest(demo):
    plan = {p.name: p for p in plan_workflow(demo, only=["synth"])}
    assert {n: p.action for n, p in plan.items()} == {
        n: "run" if n == "synth" else "skip" for n in demo.stages}
    with pytest.raises(PlanError, match=r"--only train: train reads the output of preprocess, "
                       r"which has no committed output .*add --only preprocess"):
        plan_workflow(demo, only=["train"])
    plan = plan_workflow(demo, only=["synth", "preprocess"])
    assert [p.action for p in plan] == ["run", "run"] + ["skip"] * (len(demo.stages) - 2)


def test_bad_flags_and_object_store_roots_are_config_errors(demo):
    with pytest.raises(ConfigError, match=r"--from names unknown stage 'trian' \(stages: synth"):
        plan_workflow(demo, from_=["trian"])
    with pytest.raises(ConfigError, match=r"data_root 's3://bucket/mmvq': .*atomic"):
        plan_workflow(dataclasses.replace(demo, data_root="s3://bucket/mmvq"))
