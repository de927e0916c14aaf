"""A full disk under the logdir: a real tmpfs the test mounts (root only) and fills.

A checkpoint, best.pt, a video or an evals.jsonl line that cannot be written is
an outage of that writer, not of training: warned, counted, the last good file
kept (never a half-written one, no temporary file left), and the next write
after space comes back succeeds. Skipped, saying why, where no tmpfs can be
mounted (not root).
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from bench.disks import fill_disk
from learner.checkpoint import load_checkpoint
from learner.learner import Learner
from learner.loop import TrainLoop
from learner.metrics import Metrics
from tests.test_learner_loop import Harness, catch_transitions, make_cfg  # noqa: F401

pytestmark = pytest.mark.slow


@pytest.fixture
def small_disk(tmpfs):
    return tmpfs("128m")


def wait_for(cond, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# TensorBoard's own writer thread dies of the ENOSPC (what Metrics must survive),
# and Metrics keeps its traceback off stderr (it says so in one line)
@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_full_disk_stops_checkpoints_not_training(small_disk, catch_transitions):  # noqa: F811
    cfg = make_cfg(small_disk, max_seconds=0)
    cfg.learner.network = "small"  # ~21 MB a checkpoint: three fit in 128 MB
    cfg.learner.checkpoint_minutes = 0.05  # every 3 s
    cfg.learner.keep_checkpoints = 2
    harness = Harness(catch_transitions)
    lines: list[str] = []
    metrics = Metrics(str(small_disk / "tb"))  # TensorBoard on the same full disk
    loop = TrainLoop(
        cfg,
        Learner(cfg, 3, "cpu"),
        sample=harness.sample,
        update_priorities=harness.update_priorities,
        publish=harness.publish,
        poll_external=harness.poll,
        metrics=metrics,
        checkpoint_path=str(small_disk / "checkpoint.pt"),
        log=lines.append,
    )
    stop = threading.Event()
    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(loop.run(stop)), daemon=True)
    thread.start()
    try:
        ckpt = small_disk / "checkpoint.pt"
        wait_for(ckpt.exists, what="the first checkpoint")
        filler = fill_disk(small_disk)
        good = load_checkpoint(ckpt)["counters"]["updates"]
        wait_for(lambda: loop.checkpoint_failures >= 2, what="two failed checkpoints")
        assert thread.is_alive(), "training stopped on a full disk"
        updates_then = loop.learner.updates
        wait_for(lambda: loop.learner.updates > updates_then + 5, what="more updates")
        # the last good checkpoint is intact; nothing half-written is left
        assert load_checkpoint(ckpt)["counters"]["updates"] == good
        assert not [p for p in os.listdir(small_disk) if ".tmp-" in p]
        warned = [ln for ln in lines if "checkpoint not written" in ln]
        assert warned and "No space left on device" in warned[0] and "is kept" in warned[0]
        # space comes back: the next period writes again
        filler.unlink()
        wait_for(
            lambda: load_checkpoint(ckpt)["counters"]["updates"] > good,
            what="a checkpoint after space came back",
        )
    finally:
        stop.set()
        thread.join(timeout=60)
    assert out["checkpoint_failures"] >= 2 and out["checkpoint"] == str(ckpt)
    assert metrics.write_failures >= 1  # TensorBoard lost writes, said so, went on
    assert len(list(small_disk.glob("checkpoint-*.pt"))) == 2  # keep_checkpoints


def test_a_full_disk_skips_best_pt_and_evals_jsonl_and_goes_on(small_disk):
    from learner.evaluator import Evaluator, PeriodicEvaluation, ThreadBackend
    from tests.test_evaluator import CATCH_ACTIONS, Clock, catch_config, snapshot, wait_for_record

    cfg = catch_config(eval_video_every=1)
    cfg.learner.network = "small"
    learner = Learner(cfg, CATCH_ACTIONS, "cpu")
    clock, lines = Clock(), []
    ev = PeriodicEvaluation(
        cfg,
        small_disk,
        ThreadBackend(Evaluator(cfg, CATCH_ACTIONS)),
        Metrics(None),
        "ApexCatch-v0",
        CATCH_ACTIONS,
        log=lines.append,
        clock=clock,
    )
    filler = fill_disk(small_disk)
    clock.t += 60.0
    ev.step(1, 100, 10, 60.0, snapshot(learner, 100))
    record = wait_for_record(ev)
    assert record["best"] is False and record["video"] is None  # neither could be written
    assert not (small_disk / "best.pt").exists() and not list(small_disk.glob("videos/*.mp4"))
    assert ev.write_failures == 3  # the video, best.pt and the evals.jsonl line
    assert ev.latest()["eval_return_mean"] == record["eval_return_mean"]  # still known
    assert any("best.pt not written" in ln for ln in lines)
    filler.unlink()
    clock.t += 60.0
    ev.step(2, 200, 20, 120.0, snapshot(learner, 200))
    record = wait_for_record(ev)
    assert record["best"] is True and (small_disk / "best.pt").is_file()
    assert load_checkpoint(small_disk / "best.pt")["counters"]["eval"]["index"] == 2
    assert ev.summary()["eval_write_failures"] == 3
    ev.close()
