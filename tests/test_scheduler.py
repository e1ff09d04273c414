"""The streaming engine: same math as resident training, explicit unit states, bounded transfers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import run_main

from streamer import planner
from streamer.scheduler import InlineWorker, StreamEngine, UnitState, squared_norm
from streamer.train import TrainConfig, load_final, train


def _run(tmp_path, model, mode, offload="auto", **overrides):
    out = tmp_path / f"{model}-{mode}-{offload}"
    # The update's place is pinned: on CUDA, --update-on auto could choose differently for
    # two runs a test compares (a CPU device's auto is the host anyway).
    settings = dict(model=model, mode=mode, offload=offload, steps=6, batch_size=2, grad_accum=2, seq_len=32,
                    warmup=2, grad_clip=0.5, weight_decay=0.1, lr=3e-3, progress=False, out=str(out),
                    update_on="host" if mode == "stream" else "auto")
    settings.update(overrides)
    train(TrainConfig(**settings))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return rows, load_final(out / "final")


@pytest.mark.parametrize("recompute", ["yes", "no"])
@pytest.mark.parametrize("model", ["tiny", "tiny-gptj", "tiny-neox"])
def test_stream_matches_resident_for_each_tier(tmp_path, model, recompute):
    """Per-step losses and final weights agree to 1e-5 in float32.

    They are not bit-identical because float32 sums run in another order: the global
    norm is summed per unit instead of per tensor, a tied table's gradient adds the head's
    part before the embedding's, and the step loss is averaged in float32 on the device.
    """
    resident_rows, resident_w = _run(tmp_path, model, "resident")
    # Clipping must actually act for the comparison to cover it.
    assert max(r["grad_norm"] for r in resident_rows) > 0.5
    for offload in ("ram", "disk"):
        rows, weights = _run(tmp_path, model, "stream", offload, prefetch_depth=2, recompute=recompute)
        assert all(r["recompute"] == (recompute == "yes") for r in rows)
        assert [r["step"] for r in rows] == [r["step"] for r in resident_rows]
        for a, b in zip(rows, resident_rows):
            assert abs(a["loss"] - b["loss"]) <= 1e-5
            assert abs(a["lr"] - b["lr"]) == 0
        assert weights.keys() == resident_w.keys()
        for name in weights:
            torch.testing.assert_close(weights[name], resident_w[name], atol=1e-5, rtol=0)


def test_stream_reports_transfer_metrics(tmp_path):
    rows, _ = _run(tmp_path, "tiny-neox", "stream", "ram", steps=2, prefetch_depth=1)
    row = rows[-1]
    for key in ("bytes_in", "bytes_out", "link_gbps", "stall_s", "peak_device_bytes", "peak_rss_bytes",
                "predicted_step_s"):
        assert key in row
    n_params = sum(t.numel() for t in load_final(tmp_path / "tiny-neox-stream-ram" / "final").values())
    # Every gradient leaves exactly once; weights come in for the forward and again
    # for the backward, except units still resident from the forward.
    assert row["bytes_out"] == 4 * n_params
    assert 4 * n_params < row["bytes_in"] <= 2 * 4 * n_params


@pytest.mark.parametrize("depth", [1, 3])
def test_prefetch_depth_does_not_change_results(tmp_path, depth):
    base, w0 = _run(tmp_path / "a", "tiny", "stream", "ram", steps=3, prefetch_depth=2)
    rows, w1 = _run(tmp_path / "b", "tiny", "stream", "ram", steps=3, prefetch_depth=depth)
    assert [r["loss"] for r in rows] == [r["loss"] for r in base]
    for name in w0:
        assert torch.equal(w0[name], w1[name])


def test_the_host_memory_given_decides_the_tier(tmp_path):
    """`--host-memory` replaces what the OS reports: told the machine has 5 MiB, the
    engine keeps tiny's state (about 16 MB) on disk, and trains the same steps."""
    ram, _ = _run(tmp_path / "ram", "tiny", "stream", steps=2)
    disk, _ = _run(tmp_path / "disk", "tiny", "stream", steps=2, host_memory_gib=5 / 1024)
    assert {r["offload"] for r in ram} == {"ram"} and {r["offload"] for r in disk} == {"disk"}
    assert disk[-1]["store_read_bytes"] > 0
    for a, b in zip(ram, disk):
        assert abs(a["loss"] - b["loss"]) <= 1e-5


def test_inline_host_work_trains_exactly_as_a_worker_thread(tmp_path, monkeypatch):
    """A CPU device with a RAM store runs host work on the caller's thread; the same
    jobs on a worker thread give bit-identical losses and weights."""
    assert not planner.host_threads(device_is_host=True, store_in_ram=True)
    inline, w0 = _run(tmp_path / "a", "tiny", "stream", "ram", steps=3)
    monkeypatch.setattr(planner, "host_threads", lambda device_is_host, store_in_ram: True)
    threaded, w1 = _run(tmp_path / "b", "tiny", "stream", "ram", steps=3)
    assert [r["loss"] for r in inline] == [r["loss"] for r in threaded]
    for name in w0:
        assert torch.equal(w0[name], w1[name])


def test_inline_worker_runs_jobs_in_submission_order_when_needed():
    ran = []
    worker = InlineWorker()
    first = worker.submit(ran.append, 1)
    failing = worker.submit(lambda: 1 / 0)
    third = worker.submit(ran.append, 3)
    assert ran == []  # nothing runs until a result is needed
    assert third.result() is None and ran == [1, 3]  # earlier jobs first
    assert first.done() and isinstance(failing.exception(), ZeroDivisionError)
    with pytest.raises(ZeroDivisionError):
        failing.result()
    worker.submit(ran.append, 4)
    worker.shutdown(wait=True)
    assert ran == [1, 3, 4]


def test_squared_norm_is_exact_where_one_float32_sum_is_not():
    torch.manual_seed(0)
    flat = torch.randn(30_000_011) * torch.logspace(-2, 2, 30_000_011)
    exact = float((flat.double() ** 2).sum())
    assert abs(float(squared_norm(flat)) - exact) <= 1e-6 * exact
    assert abs(float(squared_norm(flat[:100])) - float((flat[:100].double() ** 2).sum())) <= 1e-9 * exact


def test_unit_state_transitions_are_asserted(tmp_path):
    from models import ModelConfig
    from streamer.optim import OptimConfig

    cfg = TrainConfig(model="tiny", mode="stream", offload="ram", seq_len=32, batch_size=1, prefetch_depth=1)
    engine = StreamEngine.create(cfg, ModelConfig.from_name("tiny"), OptimConfig(), tmp_path,
                                 torch.device("cpu"), torch.float32)
    try:
        assert engine.state[1] == UnitState.HOME
        with pytest.raises(AssertionError, match="waited on while home"):
            engine.wait(1)
        engine.acquire(1)
        assert engine.state[1] == UnitState.IN_FLIGHT
        engine.wait(1)
        assert engine.state[1] == UnitState.RESIDENT
        engine.release(1)
        assert engine.state[1] == UnitState.RELEASED
        with pytest.raises(AssertionError, match="released more often"):
            engine.release(1)
    finally:
        engine.close()



def test_calibration_takes_io_thread_rates_as_the_case_the_store_is_in(tmp_path):
    """The store's I/O threads time the kernel's copies when the page cache holds the
    store, and copies plus disk waits when it does not: the first calibrates the copy
    rate, the second the disk rates, never the other way round (a disk-bound thread's
    rate taken as the copy rate predicted a gpt3-2.7b step 30% too slow)."""
    from models import ModelConfig
    from streamer.optim import OptimConfig

    cfg = TrainConfig(model="tiny", mode="stream", offload="disk", seq_len=32, batch_size=1, prefetch_depth=1)
    engine = StreamEngine.create(cfg, ModelConfig.from_name("tiny"), OptimConfig(), tmp_path,
                                 torch.device("cpu"), torch.float32)
    try:
        assert engine.store_cached  # a tiny store fits any page cache
        seen = []
        engine.replan = lambda rates: seen.append(rates) or 1.0
        engine.counters["update_s"] = 0.01
        engine.io_step = {"store_read_s": 2.0, "store_write_s": 1.0, "store_read_bytes": 4e9,
                          "store_write_bytes": 2e9}
        engine._calibrate()
        assert seen[-1]["cached_io_bytes_per_s"] == pytest.approx(2e9)
        assert "disk_read_bytes_per_s" not in seen[-1]
        engine.store_cached = False
        engine._calibrate()
        assert seen[-1]["disk_read_bytes_per_s"] == pytest.approx(2e9)
        assert seen[-1]["disk_write_bytes_per_s"] == pytest.approx(2e9)
        assert "cached_io_bytes_per_s" not in seen[-1]
    finally:
        engine.close()

@pytest.mark.gpu
def test_stream_matches_resident_on_cuda(tmp_path):
    """bf16 on the device: both modes compute in bf16, so agreement is to bf16 precision."""
    for model in ("tiny", "tiny-neox"):
        resident, rw = _run(tmp_path, model, "resident", device="cuda", dtype="float32")
        stream, sw = _run(tmp_path, model, "stream", "ram", device="cuda", dtype="float32", prefetch_depth=2)
        for a, b in zip(stream, resident):
            assert abs(a["loss"] - b["loss"]) <= 1e-4
        for name in rw:
            torch.testing.assert_close(sw[name], rw[name], atol=1e-4, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("state", ["fp32", "compact8"])
def test_auto_updates_where_the_planner_predicts_the_shorter_step_on_cuda(tmp_path, monkeypatch, state):
    """--update-on auto on a GPU plans AdamW on the host and on the device (its rate
    measured on this GPU), runs the place with the shorter predicted step, records it,
    and trains."""
    weighed = []
    real = planner.faster_update_place
    monkeypatch.setattr(planner, "faster_update_place", lambda plans: weighed.append(plans) or real(plans))
    rows, _ = _run(tmp_path, "tiny-gptj", "stream", "ram", device="cuda", steps=3, state=state, update_on="auto")
    [plans] = weighed
    assert set(plans) == {"host", "device"}
    chosen = min(plans, key=lambda place: (plans[place].predicted_step_s, place != "host"))
    record = json.loads((tmp_path / "tiny-gptj-stream-ram" / "run.json").read_text())
    assert record["update_on"] == chosen  # and it runs the plan it weighed:
    assert record["plan"]["predicted_step_s"] == plans[chosen].predicted_step_s
    assert rows[-1]["loss"] < rows[0]["loss"]


@pytest.mark.gpu
@pytest.mark.parametrize("offload", ["ram", "disk"])
def test_the_link_rate_while_copying_is_reported_and_within_the_links(tmp_path, offload):
    """Each step times its host-to-device copies with CUDA events: the link's rate while
    it copies (a page-locked RAM tier's chunks, or a disk tier's through a pinned
    staging buffer), which must be positive and below any PCIe or NVLink-C2C link."""
    rows, _ = _run(tmp_path, "tiny", "stream", offload, device="cuda", steps=3)
    for row in rows:
        assert 0 < row["h2d_copy_gbps"] < 1000


def test_kept_graphs_hold_no_weights(tmp_path):
    """Without recompute, a unit's slot is reused by other units between its forward and
    backward (depth 1, six units); results still equal recompute exactly, so the backward
    read the unit's weights from its new slot, not stale slot contents."""
    kept, w_kept = _run(tmp_path / "kept", "tiny-neox", "stream", "ram", steps=3, prefetch_depth=1, recompute="no")
    redo, w_redo = _run(tmp_path / "redo", "tiny-neox", "stream", "ram", steps=3, prefetch_depth=1, recompute="yes")
    assert [r["loss"] for r in kept] == [r["loss"] for r in redo]
    for name in w_kept:
        assert torch.equal(w_kept[name], w_redo[name])


def test_a_memory_limit_keeps_some_graphs_and_recomputes_the_rest(tmp_path):
    """--max-memory between the all-recompute and keep-everything peaks: the planner
    keeps the graphs of the last blocks that fit and the rest recompute; the math is
    the same as recomputing everything, bit for bit."""
    from models import ModelConfig
    from streamer import planner

    cfg = ModelConfig.from_name("tiny-neox")
    profile = planner.replace(planner.PROFILES["cpu"], compute_bytes=4)
    tokens = 2 * 2 * 32  # batch 2, accumulation 2, seq_len 32, as _run trains
    peaks = [sum(planner.memory_bytes(cfg, profile, tokens, 2 * 32, "ram", 1, kept)) for kept in range(cfg.n_layer + 1)]
    partial = peaks[: cfg.n_layer]  # keeping every graph also drops the boundary activations
    assert partial == sorted(partial) and len(set(partial)) == len(partial)  # each kept graph costs memory
    assert peaks[cfg.n_layer] > peaks[2]
    limit = peaks[2] / 2**30
    some, w_some = _run(tmp_path / "some", "tiny-neox", "stream", "ram", steps=3, prefetch_depth=1,
                        max_memory_gib=limit)
    redo, w_redo = _run(tmp_path / "redo", "tiny-neox", "stream", "ram", steps=3, prefetch_depth=1, recompute="yes")
    assert {r["kept_graphs"] for r in some} == {2} and all(r["recompute"] for r in some)
    assert some[0]["predicted_peak_bytes"] == peaks[2]
    assert [r["loss"] for r in some] == [r["loss"] for r in redo]
    for name in w_some:
        assert torch.equal(w_some[name], w_redo[name])


def test_chunked_disk_updates_equal_whole_unit_updates(tmp_path, monkeypatch):
    """The disk tier reads, updates and writes a unit in chunks; chunk edges (including
    the weight-decay boundary inside a chunk) must not change the result."""
    import streamer.store

    whole, w_whole = _run(tmp_path / "whole", "tiny", "stream", "disk", steps=3)
    monkeypatch.setattr(streamer.store, "CHUNK_NUMEL", 1000)
    chunked, w_chunked = _run(tmp_path / "chunked", "tiny", "stream", "disk", steps=3)
    assert [r["loss"] for r in chunked] == [r["loss"] for r in whole]
    for name in w_whole:
        assert torch.equal(w_whole[name], w_chunked[name])


@pytest.mark.parametrize("state", ["fp32", "compact", "compact8"])
def test_a_split_store_trains_exactly_as_one_tier(tmp_path, monkeypatch, state):
    """Units 0-2 in RAM and the rest on disk (as when a state fits neither alone): the
    same losses and weights, bit for bit, as the whole state in RAM; only the disk
    part has files (kept here past the run's end, which removes them, to be seen)."""
    from streamer import planner, scheduler

    ram, w_ram = _run(tmp_path / "ram", "tiny", "stream", "ram", steps=4, state=state)
    monkeypatch.setattr(planner, "split_ram_units", lambda cfg, available, state="fp32": 3)
    monkeypatch.setattr(scheduler, "remove_store", lambda root, rank, world: None)
    split, w_split = _run(tmp_path / "split", "tiny", "stream", "split", steps=4, state=state)
    assert [r["loss"] for r in split] == [r["loss"] for r in ram]
    for name in w_ram:
        assert torch.equal(w_ram[name], w_split[name]), name
    assert all(r["offload"] == "split" and r["store_read_bytes"] > 0 for r in split[1:])
    files = sorted(p.name for p in (tmp_path / "split" / "tiny-stream-split" / "store").iterdir())
    n_units = len(files) + 3
    assert files == [f"unit_{u:05d}.safetensors" for u in range(3, n_units)]


def _force_early_updates(monkeypatch, early: bool) -> None:
    """Plan every run with (or without) early updates, which a CPU device never picks."""
    step_visits = planner.step_visits

    def forced(cfg, profile, tokens, seq_len, offload, depth, kept, state="fp32", ram_units=None, early_=None,
               held=0):
        return step_visits(cfg, profile, tokens, seq_len, offload, depth, kept, state, ram_units, early, held), early

    monkeypatch.setattr(planner, "fastest_visits", forced)


@pytest.mark.parametrize(("offload", "state"), [("disk", "fp32"), ("split", "compact")])
def test_early_updates_of_the_disk_part_train_exactly_as_updates_at_staging(tmp_path, monkeypatch, offload, state):
    """The disk units' updates run on their own lane as soon as the backward ends, beside
    the next forward's staging (both passing over many chunks at once): the same losses
    and weights, bit for bit, as each update run when its unit is staged; the staging
    then reads the updated weights again."""
    import streamer.store
    from streamer.state import BLOCK

    monkeypatch.setattr(streamer.store, "CHUNK_NUMEL", 4 * BLOCK)  # whole blocks of the 8-bit moments
    monkeypatch.setattr(planner, "split_ram_units", lambda cfg, available, state="fp32": 3)
    settings = dict(steps=4, state=state, prefetch_depth=1)
    _force_early_updates(monkeypatch, False)
    staged, w_staged = _run(tmp_path / "staged", "tiny", "stream", offload, **settings)
    _force_early_updates(monkeypatch, True)
    early, w_early = _run(tmp_path / "early", "tiny", "stream", offload, **settings)
    assert [r["loss"] for r in early] == [r["loss"] for r in staged]
    for name in w_staged:
        assert torch.equal(w_staged[name], w_early[name]), name
    assert all(r["early_updates"] for r in early) and not any(r["early_updates"] for r in staged)
    # Steps after the first carry updates: the early ones re-read the disk units' weights.
    assert all(e["store_read_bytes"] > s["store_read_bytes"] for e, s in zip(early[1:], staged[1:]))


@pytest.mark.gpu
def test_early_updates_on_the_device_train_exactly_as_updates_at_staging(tmp_path, monkeypatch):
    """On CUDA the lane updates on a stream of its own (the device's rounding is seeded
    per chunk, so the results are still bit for bit the same)."""
    monkeypatch.setattr(planner, "split_ram_units", lambda cfg, available, state="fp32": 3)
    settings = dict(device="cuda", steps=4, state="compact", update_on="device")
    _force_early_updates(monkeypatch, False)
    staged, w_staged = _run(tmp_path / "staged", "tiny", "stream", "split", **settings)
    _force_early_updates(monkeypatch, True)
    early, w_early = _run(tmp_path / "early", "tiny", "stream", "split", **settings)
    assert [r["loss"] for r in early] == [r["loss"] for r in staged]
    for name in w_staged:
        assert torch.equal(w_staged[name], w_early[name]), name


@pytest.mark.parametrize(("model", "state", "offload"), [("tiny", "fp32", "ram"), ("tiny-gptj", "compact8", "ram"),
                                                         ("tiny-neox", "compact", "ram"), ("tiny", "fp32", "split")])
def test_held_updates_train_exactly_as_updates_at_staging(tmp_path, monkeypatch, model, state, offload):
    """The first units keep their gradients and bring their state in during the
    backward, and update from it when staged (streamer.scheduler's [Note: updates held
    on the device]): the same losses and weights, bit for bit, as every update run from
    the store, for a tied table (tiny) and an untied one, and beside a disk part (whose
    gradients a thread of their own writes, in order with the held ones)."""
    monkeypatch.setattr(planner, "split_ram_units", lambda cfg, available, state="fp32": 4)
    # A CPU device never holds units on its own (nor runs AdamW anywhere but its cores).
    settings = dict(steps=4, state=state, prefetch_depth=1, update_on="device")
    plain, w_plain = _run(tmp_path / "plain", model, "stream", offload, **settings)
    held, w_held = _run(tmp_path / "held", model, "stream", offload, held_units=3, **settings)
    assert [r["loss"] for r in held] == [r["loss"] for r in plain]
    assert w_held.keys() == w_plain.keys()
    for name in w_plain:
        assert torch.equal(w_held[name], w_plain[name]), name
    assert all(r["held_units"] == 3 for r in held) and not any(r["held_units"] for r in plain)


def test_a_run_with_the_fused_kernels_trains_as_one_with_the_ops(tmp_path, monkeypatch, host_compiler):
    """The whole engine with compact8's update and gradient coding as the fused kernels
    (their CUDA source, run on the host: STREAMER_FUSED_UPDATE=host), held units and all:
    the chunk offsets, the decay boundary inside a unit and the coded gradients it
    hands the kernels are the engine's own (chunks of 64 blocks here, so a unit spans
    several and the decay boundary falls inside one). Same random bits, so the same
    losses to the last few bits and almost every stored weight equal: the two round
    alike but for the last bits of a few float32 results, from the host's vectorised
    math, which differs by CPU (0.08% of the weights differ where torch runs AVX2
    kernels, 0.13% where it runs AVX-512 ones). Such a difference flips a stochastic
    rounding or an 8-bit moment's code: a bf16 step of a small weight, at most 5e-4
    here, where a wrong offset or decay boundary would move many, or weights of 1."""
    import streamer.store
    from streamer.state import BLOCK, FUSED_ENV

    monkeypatch.setattr(streamer.store, "CHUNK_NUMEL", 64 * BLOCK)
    settings = dict(steps=3, state="compact8", prefetch_depth=1, update_on="device", held_units=2)
    ops, w_ops = _run(tmp_path / "ops", "tiny-gptj", "stream", "ram", **settings)
    monkeypatch.setenv(FUSED_ENV, "host")
    fused, w_fused = _run(tmp_path / "fused", "tiny-gptj", "stream", "ram", **settings)
    for a, b in zip(fused, ops, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    differ = sum(int((w_fused[n] != w_ops[n]).sum()) for n in w_ops)
    assert differ <= sum(w.numel() for w in w_ops.values()) // 200
    for name in w_ops:
        assert (w_fused[name].float() - w_ops[name].float()).abs().max() <= 1e-3, name


@pytest.mark.gpu
@pytest.mark.parametrize("state", ["fp32", "compact8"])
def test_held_updates_on_the_device_train_exactly_as_updates_at_staging(tmp_path, monkeypatch, state):
    """On CUDA the held state comes in on the copy stream during the backward, updates
    on the update stream and goes back on the gradient stream; with many chunks per
    unit and prefetch deep enough that a unit is re-staged from the store while its
    write-back may still run, the run is bit for bit the one without held units."""
    import streamer.store
    from streamer.state import BLOCK

    monkeypatch.setattr(streamer.store, "CHUNK_NUMEL", 4 * BLOCK)
    settings = dict(device="cuda", steps=4, state=state, update_on="device", prefetch_depth=3)
    plain, w_plain = _run(tmp_path / "plain", "tiny-gptj", "stream", "ram", held_units=0, **settings)
    held, w_held = _run(tmp_path / "held", "tiny-gptj", "stream", "ram", held_units=4, **settings)
    assert [r["loss"] for r in held] == [r["loss"] for r in plain]
    for name in w_plain:
        assert torch.equal(w_held[name], w_plain[name]), name
    assert all(r["held_units"] == 4 for r in held)


EVALUATED = {  # engine, then the stream settings
    "resident": dict(mode="resident"),
    "ram": dict(mode="stream", offload="ram", prefetch_depth=2),
    "disk compact, early updates": dict(mode="stream", offload="disk", state="compact"),
    "split, AdamW on the device": dict(mode="stream", offload="split", update_on="device", prefetch_depth=3),
    "compact8 held units": dict(mode="stream", offload="ram", state="compact8", update_on="device", held_units=2),
}


@pytest.mark.parametrize("name", list(EVALUATED))
def test_evaluating_changes_nothing_in_training(tmp_path, monkeypatch, name):
    """An evaluation visits every unit, so it applies the last step's pending updates
    (held ones, early ones from the disk lane, on the device) where the next forward
    would have: a run evaluated after every step trains bit for bit as one evaluated
    only after its last, and its held-out losses in float32 are the resident engine's."""
    monkeypatch.setattr(planner, "split_ram_units", lambda cfg, available, state="fp32": 3)
    _force_early_updates(monkeypatch, True)
    settings = dict(steps=4, eval_tokens=256, **EVALUATED[name])
    every, w_every = _run(tmp_path / "every", "tiny-gptj", settings.pop("mode"), eval_every=1, **settings)
    last, w_last = _run(tmp_path / "last", "tiny-gptj", EVALUATED[name]["mode"], eval_every=4, **settings)
    assert [r["loss"] for r in every] == [r["loss"] for r in last]
    for name_ in w_last:
        assert torch.equal(w_every[name_], w_last[name_]), name_
    assert [r["step"] for r in every if "eval_loss" in r] == [0, 1, 2, 3]
    assert every[-1]["eval_loss"] == last[-1]["eval_loss"]
    assert every[-1]["eval_loss"] < every[0]["eval_loss"]
    if EVALUATED[name].get("state", "fp32") == "fp32":
        resident, _ = _run(tmp_path / "resident", "tiny-gptj", "resident", steps=4, eval_tokens=256, eval_every=1)
        for a, b in zip(every, resident, strict=True):
            assert a["eval_loss"] == pytest.approx(b["eval_loss"], abs=1e-5)


@pytest.mark.gpu
def test_evaluating_on_cuda_changes_nothing_in_training(tmp_path):
    """On CUDA the evaluation's copies and the held and streamed updates it applies run
    on the engine's streams, the compute stream waiting on events: still the same run."""
    settings = dict(device="cuda", steps=4, eval_tokens=512, state="compact8", update_on="device", held_units=2)
    every, w_every = _run(tmp_path / "every", "tiny-gptj", "stream", "ram", eval_every=1, **settings)
    last, w_last = _run(tmp_path / "last", "tiny-gptj", "stream", "ram", eval_every=4, **settings)
    assert [r["loss"] for r in every] == [r["loss"] for r in last]
    for name in w_last:
        assert torch.equal(w_every[name], w_last[name]), name
    assert every[-1]["eval_loss"] == pytest.approx(last[-1]["eval_loss"], abs=1e-6)


@pytest.mark.parametrize("state", ["compact", "compact8"])
def test_compact_state_trains_close_to_fp32(tmp_path, state):
    """bf16 weights with stochastic rounding and 8-bit moments (and, in compact8, an
    8-bit gradient): after 40 steps on real
    text the loss is within 1% of the float32 state's, and falling like it. Both runs see
    the same batches; the loss is averaged over the last 5 of them, since one batch's loss
    moves by more than 1% with rounding alone (torch 2.11 gave +1.1% on the last step and
    +0.6% on the average of five)."""
    exact, _ = _run(tmp_path, "tiny", "stream", "ram", steps=40, grad_accum=1, batch_size=8, seq_len=64)
    compact, _ = _run(tmp_path / "c", "tiny", "stream", "ram", steps=40, grad_accum=1, batch_size=8, seq_len=64,
                      state=state)
    assert compact[-1]["loss"] < 0.6 * compact[0]["loss"]
    late_exact = sum(r["loss"] for r in exact[-5:]) / 5
    late_compact = sum(r["loss"] for r in compact[-5:]) / 5
    assert abs(late_compact - late_exact) < 0.01 * late_exact


@pytest.mark.gpu
@pytest.mark.parametrize("state", ["fp32", "compact", "compact8"])
def test_a_page_locked_ram_tier_trains_exactly_as_staged_copies(tmp_path, monkeypatch, state):
    """On CUDA the RAM tier is page-locked: weights go to the device from it and
    gradients come back into it directly, with no staging buffer; the results are bit
    for bit those of the staged path (the same values, the same roundings)."""
    from streamer import store

    settings = dict(device="cuda", dtype="float32", steps=4, state=state)
    real, results = store.page_lock, []
    monkeypatch.setattr(store, "page_lock", lambda tensors: results.append(real(tensors)) or results[-1])
    locked, w_locked = _run(tmp_path / "locked", "tiny", "stream", "ram", **settings)
    assert results and results[0], "the driver refused cudaHostRegister: nothing here was page-locked"
    monkeypatch.setattr(store, "page_lock", lambda tensors: [])
    staged, w_staged = _run(tmp_path / "staged", "tiny", "stream", "ram", **settings)
    assert [r["loss"] for r in locked] == [r["loss"] for r in staged]
    for name in w_locked:
        assert torch.equal(w_locked[name], w_staged[name]), name
    # The gradient leaves the device as the store keeps it: 4, 2 or about 1 byte each.
    from models import ModelConfig
    from streamer.state import FORMATS

    n_params = ModelConfig.from_name("tiny").n_params()
    assert locked[0]["bytes_out"] == pytest.approx(FORMATS[state].bytes_per_param(("grad",)) * n_params, abs=8)


@pytest.mark.gpu
@pytest.mark.parametrize("state", ["fp32", "compact", "compact8"])
def test_device_updates_over_two_streams_train_exactly_as_one_chunk_at_a_time(tmp_path, monkeypatch, state):
    """A page-locked unit's update chunks alternate between two streams with no wait
    between them; with page-locking refused they run one at a time, each waited for.
    With many small chunks per unit the two give the same losses and weights, bit for
    bit (the device's rounding is seeded per chunk): no chunk reads or writes out of
    order."""
    import streamer.store
    from streamer.state import BLOCK

    monkeypatch.setattr(streamer.store, "CHUNK_NUMEL", 4 * BLOCK)
    settings = dict(device="cuda", steps=4, state=state, update_on="device")
    two, w_two = _run(tmp_path / "two", "tiny", "stream", "ram", **settings)
    monkeypatch.setattr(streamer.store, "page_lock", lambda tensors: [])
    one, w_one = _run(tmp_path / "one", "tiny", "stream", "ram", **settings)
    assert [r["loss"] for r in two] == [r["loss"] for r in one]
    for name in w_two:
        assert torch.equal(w_two[name], w_one[name]), name


@pytest.mark.gpu
@pytest.mark.parametrize(("offload", "state"), [("ram", "compact"), ("disk", "compact"), ("split", "compact"),
                                               ("ram", "compact8")])
def test_compact_updates_on_the_device_track_host_updates(tmp_path, monkeypatch, offload, state):
    """The compact state updated on the GPU (its own random bits, so not bit-equal)
    trains like the same state updated on the host; the updated weights go from the
    update straight into the slot, from a page-locked RAM tier or a disk tier's chunks."""
    monkeypatch.setattr(planner, "split_ram_units", lambda cfg, available, state="fp32": 3)
    settings = dict(device="cuda", steps=30, grad_accum=1, batch_size=8, seq_len=64, state=state)
    host, _ = _run(tmp_path / "host", "tiny", "stream", offload, **settings)
    device, _ = _run(tmp_path / "device", "tiny", "stream", offload, update_on="device", **settings)
    assert device[-1]["loss"] < 0.7 * device[0]["loss"]
    assert abs(device[-1]["loss"] - host[-1]["loss"]) < 0.02 * host[-1]["loss"]


@pytest.mark.parametrize("workers", [1, 3])
def test_the_store_is_initialised_as_units_built_one_by_one(tmp_path, workers):
    """Units drawn several at a time into reused buffers give each unit the weights it
    has when built and initialised alone, in every tier; the disk tier's files come out
    in order, each with zero moments."""
    from models import ModelConfig
    from models.gpt import build_unit, init_unit
    from streamer.scheduler import initialise_store
    from streamer.store import DiskStore, SplitStore, UnitLayout

    cfg = ModelConfig.from_name("tiny-neox")
    units = [build_unit(cfg, i) for i in range(cfg.n_layer + 2)]
    for i, unit in enumerate(units):
        init_unit(unit, cfg, seed=5, index=i)
    layouts = [UnitLayout.of(i, u) for i, u in enumerate(units)]
    store = SplitStore(layouts, tmp_path / "store", ram_units=3)
    initialise_store(store, layouts, cfg, seed=5, workers=workers)
    for i, layout in enumerate(layouts):
        got = store.open(i, ("param", "exp_avg"), 0, layout.numel)
        assert torch.equal(got["param"], layout.flatten(units[i])), f"unit {i}"
        assert not got["exp_avg"].any()
    assert isinstance(store.disk, DiskStore) and len(store.disk.fds) == len(layouts) - 3
    store.close()


@pytest.mark.parametrize(("model", "offload", "depth"), [("tiny", "ram", 1), ("tiny", "disk", 3),
                                                         ("tiny-gptj", "ram", 2)])
def test_the_plan_counts_the_bytes_the_engine_moves(tmp_path, model, offload, depth):
    """The plan's bytes per step over the link are what the engine counts moving: weights
    in for the forward and for the backward unless still in the prefetch window (a tied
    table never leaves), gradients out."""
    rows, _ = _run(tmp_path, model, "stream", offload, steps=3, prefetch_depth=depth)
    plan = json.loads((tmp_path / f"{model}-stream-{offload}" / "run.json").read_text())["plan"]
    assert [r["bytes_in"] for r in rows] == [plan["h2d_bytes_per_step"]] * 3
    assert [r["bytes_out"] for r in rows] == [plan["d2h_bytes_per_step"]] * 3


@pytest.mark.parametrize("model", ["tiny", "tiny-gptj", "tiny-neox"])
def test_a_run_starts_from_a_hugging_face_checkpoint(tmp_path, model, hugging_face_checkpoint, first_step_loss):
    """--init-from: the first step's loss, before any update, is the transformers
    model's own on that batch, in each engine and tier (the stream store is filled a
    unit at a time); a compact state starts from the weights rounded to bfloat16."""
    reference = hugging_face_checkpoint(model, tmp_path / "hf")
    expected = first_step_loss(lambda x: reference(x).logits)
    runs = {"resident": ("resident", "auto", "fp32"), "ram": ("stream", "ram", "fp32"),
            "disk": ("stream", "disk", "fp32"), "compact8": ("stream", "split", "compact8")}
    for name, (mode, offload, state) in runs.items():
        rows, _ = _run(tmp_path / name, model, mode, offload, steps=2, state=state, init_from=str(tmp_path / "hf"))
        assert rows[0]["loss"] == pytest.approx(expected, abs=1e-4 if state == "fp32" else 2e-2), name
        assert rows[1]["loss"] < rows[0]["loss"], name  # and it trains from there


@pytest.mark.parametrize("model", ["tiny", "tiny-neox"])
def test_weights_of_an_architecture_no_entry_has_train_as_they_are(tmp_path, model, hugging_face_checkpoint,
                                                                    first_step_loss):
    """`--init-from DIR` with no --model: the weights' own architecture (here 3 layers
    of 64, which no registry entry has) is the model, planned and trained; the first
    step's loss is the transformers model's. `--model DIR` trains that architecture
    from a random start, as a registry name would."""
    folder = tmp_path / "own-model"
    reference = hugging_face_checkpoint(model, folder, std=0.3, n_layer=3, d_model=64)
    expected = first_step_loss(lambda x: reference(x).logits)
    common = ["--steps", "2", "--batch-size", "2", "--grad-accum", "2", "--seq-len", "32", "--warmup", "2",
              "--no-progress", "--mode", "stream", "--offload", "ram"]
    done = run_main(["train", "--init-from", str(folder), "--out", str(tmp_path / "run"), *common])
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] == pytest.approx(expected, abs=1e-4) and rows[1]["loss"] < rows[0]["loss"]
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["model"]["name"] == "own-model" and record["model"]["n_layer"] == 3
    assert record["plan"]["n_params"] == sum(p.numel() for p in reference.parameters())
    fresh = run_main(["train", "--model", str(folder), "--out", str(tmp_path / "fresh"), *common])
    assert fresh.returncode == 0, fresh.stderr
    assert json.loads((tmp_path / "fresh" / "run.json").read_text())["model"] == record["model"]
    first = json.loads((tmp_path / "fresh" / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert first == pytest.approx(math.log(256), abs=0.25) and abs(first - expected) > 0.3, (first, expected)


def test_a_run_starts_from_another_runs_final_weights(tmp_path, first_step_loss):
    """--init-from a `final/` export (bfloat16 master weights of a compact state), or
    the run's checkpoint of its last step (the same weights, from the store's shards):
    the new run, in another engine and tier, starts exactly from them."""
    from models import GPT, ModelConfig

    _run(tmp_path / "first", "tiny-neox", "stream", "ram", steps=3, state="compact", checkpoint_every=3)
    first = tmp_path / "first" / "tiny-neox-stream-ram"
    model = GPT(ModelConfig.from_name("tiny-neox"))
    model.load_state_dict({k: v.float() for k, v in load_final(first / "final").items()})
    expected = first_step_loss(model)
    for mode, offload, source in (("resident", "auto", "final"), ("stream", "disk", "final"),
                                  ("stream", "ram", "checkpoints/step-00000003")):
        rows, _ = _run(tmp_path / mode / offload, "tiny-neox", mode, offload, steps=1,
                       init_from=str(first / source))
        assert rows[0]["loss"] == pytest.approx(expected, abs=1e-5), source


def test_a_mixtures_evaluation_by_file_changes_nothing_in_training(tmp_path, token_file):
    """Two files' held-out windows in passes of their own: the streamed run evaluated
    every step still trains bit for bit as one evaluated at its end, and each file's
    held-out loss is the resident engine's."""
    import sysconfig
    from pathlib import Path

    from streamer.data import prepare

    other = tmp_path / "other.npy"
    prepare(other, [Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py"])
    settings = dict(steps=3, eval_tokens=256, data=[str(token_file), str(other)], data_weights=[1.0, 2.0])
    every, w_every = _run(tmp_path / "every", "tiny", "stream", "ram", eval_every=1, **settings)
    last, w_last = _run(tmp_path / "last", "tiny", "stream", "ram", eval_every=3, **settings)
    assert [r["loss"] for r in every] == [r["loss"] for r in last]
    assert all(torch.equal(w_every[name], w_last[name]) for name in w_last)
    assert every[-1]["eval_loss_by_file"] == last[-1]["eval_loss_by_file"]
    resident, _ = _run(tmp_path / "resident", "tiny", "resident", eval_every=1, **settings)
    for a, b in zip(every, resident, strict=True):
        assert list(a["eval_loss_by_file"]) == [str(token_file), str(other)]
        assert a["eval_loss_by_file"] == pytest.approx(b["eval_loss_by_file"], abs=1e-5)


@pytest.mark.parametrize("recompute", ["yes", "no"])
@pytest.mark.parametrize("model", ["tiny", "tiny-neox"])
def test_stream_matches_resident_with_attention_within_documents(tmp_path, documents_file, model, recompute):
    """--document-mask ([Note: documents in a window]): the streamed units, recomputed
    or keeping their graphs, give the resident model's losses and weights; and the mask
    acts (the losses are not those of attention across the whole window)."""
    common = dict(model=model, data=str(documents_file), seq_len=64, device="cpu")
    resident_rows, resident_w = _run(tmp_path, **common, mode="resident", document_mask=True)
    rows, weights = _run(tmp_path, **common, mode="stream", offload="ram", recompute=recompute, document_mask=True)
    for a, b in zip(rows, resident_rows, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-5
    for name in weights:
        torch.testing.assert_close(weights[name], resident_w[name], atol=1e-5, rtol=0)
    across, _ = _run(tmp_path / "across", **common, mode="resident")
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(across, resident_rows)) > 1e-3


@pytest.mark.gpu
def test_attention_within_documents_on_cuda(tmp_path, documents_file):
    """The GPU's attention kernel that reads a mask: streamed as resident."""
    common = dict(model="tiny-neox", data=str(documents_file), seq_len=64, device="cuda", dtype="float32",
                  document_mask=True)
    resident, rw = _run(tmp_path, **common, mode="resident")
    stream, sw = _run(tmp_path, **common, mode="stream", offload="ram", prefetch_depth=2)
    for a, b in zip(stream, resident, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-4
    for name in rw:
        torch.testing.assert_close(sw[name], rw[name], atol=1e-4, rtol=0)


def test_the_disk_tier_lives_in_store_dir_and_goes_when_the_run_ends(tmp_path, token_file, monkeypatch):
    """--store-dir: the store's files are in a folder of the run's own there, named
    after --out (run.json says which), never under --out; the run is the one with the
    store under --out; and when it ends, both places are empty."""
    from streamer import scheduler

    seen = []
    real = scheduler.remove_store

    def remove(root, rank, world):  # what the store held as the run ended
        seen.extend(sorted(p.name for p in root.iterdir()))
        real(root, rank, world)

    monkeypatch.setattr(scheduler, "remove_store", remove)
    common = dict(steps=3, data=str(token_file), device="cpu")
    under_out, w_out = _run(tmp_path / "a", "tiny", "stream", "disk", **common)
    scratch = tmp_path / "nvme"
    elsewhere, w_elsewhere = _run(tmp_path / "b", "tiny", "stream", "disk", store_dir=str(scratch), **common)
    assert [r["loss"] for r in elsewhere] == [r["loss"] for r in under_out]
    assert all(torch.equal(w_out[name], w_elsewhere[name]) for name in w_out)
    n_units = len(seen) // 2
    assert seen == 2 * [f"unit_{u:05d}.safetensors" for u in range(n_units)] and n_units == 6
    out = tmp_path / "b" / "tiny-stream-disk"
    store = Path(json.loads((out / "run.json").read_text())["store"])
    assert store.parent == scratch and store.name.startswith("streamer-tiny-stream-disk-")
    assert list(scratch.iterdir()) == [] and not (out / "store").exists()
    assert not (tmp_path / "a" / "tiny-stream-disk" / "store").exists()
