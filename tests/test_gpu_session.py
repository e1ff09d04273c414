"""The GPU session's runner (benchmarks/gpu_session.sh): it keeps to its time budget,
refuses what it does not know, skips what is done, and hands its results back as one
file. Only the runner is exercised here: every stage it skips needs a GPU."""

from __future__ import annotations

import os
import subprocess
import tarfile
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_session.sh"


def session(tmp_path: Path, *stages: str, budget: str = "100") -> subprocess.CompletedProcess:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    env = {**os.environ, "OUT": str(out), "BUDGET_S": budget, "GPU_RESULTS": str(tmp_path / "results"),
           "GPU_STAGES_DONE": str(tmp_path / "done"), "GPU_COMMITTED_RESULTS": str(tmp_path / "committed")}
    return subprocess.run(["bash", str(SCRIPT), *stages], env=env, capture_output=True, text=True, timeout=60)


def test_a_stage_whose_floor_exceeds_the_budget_left_is_skipped_and_said(tmp_path: Path) -> None:
    run = session(tmp_path, "neox20b", "gptj-sharded", budget="100")
    assert run.returncode == 0, run.stderr
    log = (tmp_path / "out" / "stages.log").read_text()
    assert "neox20b: skipped, 100s left of the budget and it needs 240s" in log
    assert "gptj-sharded: skipped" in log
    with tarfile.open(tmp_path / "out" / "gpu_results.tar") as tar:  # one file back, whatever ran
        assert "./stages.log" in tar.getnames()
    assert not (tmp_path / "out" / "gpu_results.tar.part").exists()


def test_stages_done_on_this_machine_are_not_run_again(tmp_path: Path) -> None:
    (tmp_path / "done").mkdir()
    for stage in ("limits", "kernels", "tests", "neox20b", "xl-overlap", "xl-sharded", "gptj-sharded", "sample",
                  "docmask"):
        (tmp_path / "done" / stage).touch()
    run = session(tmp_path, budget="570")
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("done earlier on this machine") == 9
    assert "==" not in run.stdout  # no stage started


def test_an_unknown_stage_or_budget_is_refused_in_one_line(tmp_path: Path) -> None:
    run = session(tmp_path, "limits", "neox-20b")
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "gpu_session.sh: unknown stage 'neox-20b': choose from "
        "limits kernels tests neox20b xl-overlap xl-sharded gptj-sharded sample docmask"]
    run = session(tmp_path, budget="ten")
    assert run.returncode == 2 and "BUDGET_S must be a whole number of seconds, got 'ten'" in run.stderr
    assert not (tmp_path / "results").exists()


def test_stages_whose_results_are_committed_are_left_to_the_rest(tmp_path: Path) -> None:
    """A fresh machine spends its minutes on what no session has measured: a stage with a
    complete committed result is passed over by a default call (a 20B run cut short, or
    a test log with a failure, is not complete), and runs when named."""
    committed = tmp_path / "committed"
    committed.mkdir()
    for name in ("kernels_cuda.json", "stream_vs_resident_cuda.json", "stream_vs_sharded_cuda.json",
                 "stream_vs_sharded_gptj_cuda.json"):
        (committed / name).write_text("{}")
    (committed / "gpu_tests.log").write_text("....\n104 passed, 3 skipped in 80.1s\n")
    (committed / "train_neox20b_cuda.jsonl").write_text("{}\n" * 4)  # four of the ten steps

    def call(*stages: str) -> str:  # stages.log, this call's lines last
        assert session(tmp_path, *stages, budget="0").returncode == 0
        return (tmp_path / "out" / "stages.log").read_text()

    log = call()
    for stage in ("kernels", "tests", "xl-overlap", "xl-sharded", "gptj-sharded"):
        assert f"{stage}: measured already ({committed}/" in log
    assert "neox20b: skipped, 0s left" in log and "limits: skipped, 0s left" in log
    (committed / "gpu_tests.log").write_text("..F.\n1 failed, 103 passed in 80.1s\n")
    assert "tests: skipped, 0s left" in call()
    assert call("kernels").splitlines()[-2] == "kernels: skipped, 0s left of the budget and it needs 30s"
