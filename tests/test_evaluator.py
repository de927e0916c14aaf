"""Evaluation during training, in-process: a real `Evaluator` (real envs, CPU torch)
in a thread, driven by `PeriodicEvaluation` on a test clock."""

from __future__ import annotations

import json
import time

import imageio
import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from common.config import Config
from learner.checkpoint import load_checkpoint
from learner.evaluator import (
    EvalFailed,
    Evaluator,
    PeriodicEvaluation,
    ThreadBackend,
    weights_digest,
)
from learner.learner import Learner
from learner.metrics import Metrics, progress_line

CATCH_ACTIONS = 3


def catch_config(**eval_kw) -> Config:
    cfg = Config()
    cfg.env.env = "ApexCatch-v0"
    cfg.learner.device = "cpu"
    cfg.learner.learner_dtype = "float32"  # no start-up precision probe: weights are all we need
    cfg.eval.eval_every_minutes = 1.0
    cfg.eval.eval_episodes = 12
    cfg.eval.eval_video_every = 2
    for k, v in eval_kw.items():
        setattr(cfg.eval, k, v)
    return cfg


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def wait_for_record(ev: PeriodicEvaluation, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = ev.collect()
        if record is not None:
            return record
        time.sleep(0.02)
    raise AssertionError("the evaluation did not finish")


def snapshot(learner: Learner, frames: int):
    return lambda: (learner.get_weights(), learner.state_dict(), {"frames": frames})


def perturb(learner: Learner, seed: int) -> None:
    """A different policy: new random weights, changed in place (as training does)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in learner.online.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def test_periodic_evaluation_records_each_result_and_keeps_the_best(tmp_path):
    cfg = catch_config()
    learner = Learner(cfg, CATCH_ACTIONS, "cpu")
    clock, lines = Clock(), []
    metrics = Metrics(str(tmp_path / "tb"))
    ev = PeriodicEvaluation(
        cfg,
        tmp_path,
        ThreadBackend(Evaluator(cfg, CATCH_ACTIONS)),
        metrics,
        "ApexCatch-v0",
        CATCH_ACTIONS,
        log=lines.append,
        clock=clock,
    )
    ev.step(1, 100, 1, 1.0, snapshot(learner, 100))
    assert ev.collect() is None and not (tmp_path / "evals.jsonl").exists()  # not due yet

    submitted = []
    for i in range(3):
        clock.t += 60.0
        perturb(learner, seed=i)
        frames = 1000 * (i + 1)
        digest = weights_digest(learner.get_weights())
        ev.step(10 + i, frames, 50 * (i + 1), 60.0 * (i + 1), snapshot(learner, frames))
        # training goes on while it plays: the evaluated weights must not change
        perturb(learner, seed=100 + i)
        ev.step(10 + i, frames + 1, 0, 0.0, snapshot(learner, 0))  # not due: nothing starts
        submitted.append((10 + i, frames, digest))
        wait_for_record(ev)

    records = [json.loads(line) for line in (tmp_path / "evals.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == [1, 2, 3]
    assert [(r["weight_version"], r["env_frames"], r["weights_digest"]) for r in records] == (
        submitted
    )
    running_best = None
    for r in records:
        assert len(r["scores"]) == 12 and all(s in (-1.0, 1.0) for s in r["scores"])
        assert r["eval_return_mean"] == pytest.approx(np.mean(r["scores"]))
        assert r["eval_return_median"] == pytest.approx(np.median(r["scores"]))
        assert r["eval_human_normalized"] is None  # Catch has no reference scores
        assert "no-op" in r["protocol"] and "epsilon 0.001" in r["protocol"]
        assert r["best"] == (running_best is None or r["eval_return_mean"] > running_best)
        if r["best"]:
            running_best = r["eval_return_mean"]

    # best.pt is the checkpoint of exactly the weights of the best evaluation
    best = max(records, key=lambda r: (r["eval_return_mean"], -r["index"]))
    state = load_checkpoint(tmp_path / "best.pt", expect_env="ApexCatch-v0")
    assert weights_digest(state["model"]) == best["weights_digest"]
    assert state["counters"]["eval"]["index"] == best["index"]
    assert state["counters"]["frames"] == best["env_frames"]
    from learner.evaluate import evaluate

    replay = evaluate(str(tmp_path / "best.pt"), episodes=2, log=lambda _: None)
    assert len(replay["scores"]) == 2  # `apex-dqn evaluate` takes best.pt like any checkpoint

    # every 2nd evaluation: one MP4 of its first episode, one video frame per step
    videos = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.glob("videos/*.mp4"))
    assert videos == [records[1]["video"]] and records[0]["video"] is None
    reader = imageio.get_reader(tmp_path / records[1]["video"])
    assert sum(1 for _ in reader) == records[1]["lengths"][0]
    reader.close()

    # TensorBoard: one point per evaluation, at the env frames of its weights
    metrics.close()
    tb = scalars(tmp_path / "tb")
    assert tb["eval_return_mean"] == [
        (r["env_frames"], pytest.approx(r["eval_return_mean"])) for r in records
    ]
    assert [v for _, v in tb["eval_weight_version"]] == [10, 11, 12]
    assert "eval_human_normalized" not in tb  # None is not written

    last = records[-1]
    assert ev.summary() == {
        "eval_return_mean": last["eval_return_mean"],
        "best_eval_return_mean": best["eval_return_mean"],
        "evaluations": 3,
        "evaluation_failures": 0,
        "eval_write_failures": 0,
        "best_checkpoint": str(tmp_path / "best.pt"),
    }
    line = progress_line({"updates": 1, **ev.latest()})
    assert f"eval {last['eval_return_mean']:.1f} @ 3.0K frames" in line
    assert any("eval 3:" in x for x in lines)
    ev.close()

    # a resumed run in the same logdir goes on counting and keeps the best
    again = PeriodicEvaluation(
        cfg, tmp_path, ThreadBackend(Evaluator(cfg, CATCH_ACTIONS)), Metrics(None),
        "ApexCatch-v0", CATCH_ACTIONS, clock=clock,
    )  # fmt: skip
    assert again.summary()["best_eval_return_mean"] == best["eval_return_mean"]
    clock.t += 60.0
    again.step(20, 9000, 500, 600.0, snapshot(learner, 9000))
    assert wait_for_record(again)["index"] == 4
    again.close()


def test_a_failed_evaluation_is_counted_and_the_next_one_runs(tmp_path):
    cfg = catch_config(eval_video_every=0)
    learner = Learner(cfg, CATCH_ACTIONS, "cpu")
    clock, lines = Clock(), []
    ev = PeriodicEvaluation(
        cfg,
        tmp_path,
        ThreadBackend(Evaluator(cfg, CATCH_ACTIONS)),
        Metrics(None),
        "ApexCatch-v0",
        CATCH_ACTIONS,
        log=lines.append,
        clock=clock,
    )
    clock.t += 60.0
    bad = {k: v[..., :1] for k, v in learner.get_weights().items()}  # wrong shapes
    ev.step(1, 10, 1, 1.0, lambda: (bad, learner.state_dict(), {}))
    deadline = time.monotonic() + 30
    while ev.failures == 0 and time.monotonic() < deadline:
        ev.collect()
        time.sleep(0.02)
    assert ev.failures == 1 and any("evaluation 1 failed" in x for x in lines)
    assert not (tmp_path / "best.pt").exists()
    clock.t += 60.0
    ev.step(2, 20, 2, 2.0, snapshot(learner, 20))
    record = wait_for_record(ev)
    assert record["index"] == 1 and record["weight_version"] == 2
    assert (tmp_path / "best.pt").is_file()
    ev.close()


def test_thread_backend_surfaces_errors():
    cfg = catch_config()
    backend = ThreadBackend(Evaluator(cfg, CATCH_ACTIONS))
    from learner.evaluator import EvalRequest

    backend.submit(EvalRequest(1, 0, 0, 0, 0.0, 1, 0, False), {"nope": np.zeros(1, np.float32)})
    deadline = time.monotonic() + 30
    with pytest.raises(EvalFailed, match="weights do not fit"):
        while time.monotonic() < deadline:
            if backend.poll() is not None:
                break
            time.sleep(0.01)
    backend.close()


def test_final_evaluation_waits_for_the_one_in_flight_then_plays_the_final_weights(tmp_path):
    """A run that ends gets the score of its final weights: an evaluation still
    running is waited for (not dropped), then the final version is played; a
    final version already evaluated is not played twice."""
    cfg = catch_config(eval_video_every=0)
    learner = Learner(cfg, CATCH_ACTIONS, "cpu")
    clock, lines = Clock(), []
    ev = PeriodicEvaluation(
        cfg,
        tmp_path,
        ThreadBackend(Evaluator(cfg, CATCH_ACTIONS)),
        Metrics(str(tmp_path / "tb")),
        "ApexCatch-v0",
        CATCH_ACTIONS,
        log=lines.append,
        clock=clock,
    )
    clock.t += 60.0
    perturb(learner, seed=1)
    ev.step(5, 500, 20, 60.0, snapshot(learner, 500))  # due: starts, still running
    perturb(learner, seed=2)
    final_digest = weights_digest(learner.get_weights())
    naps = []

    def nap(seconds: float) -> None:  # the real wait, and the test clock moves with it
        naps.append(seconds)
        time.sleep(seconds)
        clock.t += seconds

    record = ev.final(9, 900, 40, 90.0, snapshot(learner, 900), timeout=120.0, sleep=nap)
    records = [json.loads(line) for line in (tmp_path / "evals.jsonl").read_text().splitlines()]
    assert [r["weight_version"] for r in records] == [5, 9]  # the one in flight was kept
    assert record is not None and record["weight_version"] == 9
    assert record["weights_digest"] == final_digest and record["env_frames"] == 900
    assert ev.summary()["eval_return_mean"] == record["eval_return_mean"]
    assert any("final evaluation of weights v9" in line for line in lines)
    # the same version again: answered from the record, nothing played
    again = ev.final(9, 900, 40, 90.0, snapshot(learner, 900), timeout=5.0, sleep=nap)
    assert again == record and len((tmp_path / "evals.jsonl").read_text().splitlines()) == 2
    # a deadline that passes drops it and says so
    perturb(learner, seed=3)
    assert ev.final(10, 950, 41, 95.0, snapshot(learner, 950), timeout=0.0, sleep=nap) is None
    assert "final evaluation not done within 0 s: dropped" in lines[-1]
    ev.close()


def test_videos_are_capped_at_keep_videos(tmp_path):
    cfg = catch_config(eval_video_every=1, keep_videos=2)
    learner = Learner(cfg, CATCH_ACTIONS, "cpu")
    clock = Clock()
    ev = PeriodicEvaluation(
        cfg,
        tmp_path,
        ThreadBackend(Evaluator(cfg, CATCH_ACTIONS)),
        Metrics(None),
        "ApexCatch-v0",
        CATCH_ACTIONS,
        log=lambda _: None,
        clock=clock,
    )
    records = []
    for i in range(3):
        clock.t += 60.0
        ev.step(i + 1, 100 * (i + 1), i, 60.0 * (i + 1), snapshot(learner, 100 * (i + 1)))
        records.append(wait_for_record(ev))
    kept = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.glob("videos/*.mp4"))
    assert kept == [records[1]["video"], records[2]["video"]]  # the oldest one went
    ev.close()
