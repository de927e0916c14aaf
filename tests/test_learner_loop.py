"""TrainLoop in-process: real Learner, real Catch frames, plain-Python callables."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from common.config import Config
from common.env import make_vector_env
from common.stacking import FrameStack
from common.types import SampleBatch
from learner.background import RunStatus
from learner.checkpoint import load_checkpoint
from learner.learner import Learner
from learner.loop import TrainLoop
from learner.metrics import Metrics

BATCH = 8
FRAMES_PER_POLL = 400


@pytest.fixture(scope="module")
def catch_transitions() -> dict[str, np.ndarray]:
    """1-step transitions of random Catch play: stacks of real frames (NEXT_STEP
    autoreset: the step that resets an env is not a transition)."""
    cfg = Config()
    cfg.env.env = "ApexCatch-v0"
    env = make_vector_env(cfg.env, 4, seed=0)
    rng = np.random.default_rng(0)
    stack = FrameStack(4)
    stack.reset(env.reset())
    out: dict[str, list] = {k: [] for k in ("obs", "next_obs", "actions", "returns", "disc")}
    episodes: list[tuple[float, int]] = []
    for _ in range(40):
        actions = rng.integers(0, 3, 4)
        obs = stack.values.copy()
        frames, rewards, term, trunc, reset, _ = env.step(actions)
        stack.push(frames, reset)
        for i in np.flatnonzero(~reset):
            out["obs"].append(obs[i])
            out["next_obs"].append(stack.values[i].copy())
            out["actions"].append(actions[i])
            out["returns"].append(rewards[i])
            out["disc"].append(0.0 if term[i] else 0.99)
            if term[i]:
                episodes.append((float(rewards[i]), 9))
    env.close()
    data = {k: np.asarray(v) for k, v in out.items()}
    data["episodes"] = np.asarray(episodes)
    return data


class Harness:
    """The callables the launcher would wire to Ray and the replay."""

    def __init__(self, data: dict[str, np.ndarray]):
        self.data = data
        self.n = len(data["actions"])
        self.rng = np.random.default_rng(1)
        self.betas: list[float] = []
        self.priority_calls: list[tuple[np.ndarray, np.ndarray]] = []
        self.published: list[tuple[int, dict]] = []
        self.polls = 0
        self.lock = threading.Lock()

    def sample(self, beta: float) -> SampleBatch:
        self.betas.append(beta)
        idx = self.rng.integers(0, self.n, BATCH)
        d = self.data
        return SampleBatch(
            obs=d["obs"][idx],
            next_obs=d["next_obs"][idx],
            actions=d["actions"][idx].astype(np.int64),
            returns=d["returns"][idx].astype(np.float32),
            discounts=d["disc"][idx].astype(np.float32),
            weights=np.ones(BATCH, np.float32),
            keys=idx.astype(np.int64),
        )

    def update_priorities(self, keys: np.ndarray, priorities: np.ndarray) -> None:
        with self.lock:
            self.priority_calls.append((keys, priorities))

    def publish(self, version: int, weights: dict) -> None:
        self.published.append((version, weights))

    def poll(self) -> RunStatus:
        with self.lock:
            self.polls += 1
            eps = [(float(r), int(n)) for r, n in self.data["episodes"][:2]]
            return RunStatus(
                frames=self.polls * FRAMES_PER_POLL,
                transitions=self.polls * 100,
                episodes=eps,
                replay_size=self.n,
                replay_inserted=self.polls * 100,
                epsilon_min=0.0002,
                epsilon_max=0.4,
            )


def make_cfg(tmp_path, max_seconds: float) -> Config:
    cfg = Config()
    cfg.env.env = "ApexCatch-v0"
    cfg.learner.batch_size = BATCH
    cfg.learner.publish_seconds = 0.3
    cfg.learner.target_update = 5
    cfg.run.log_every = 0.5
    cfg.run.max_seconds = max_seconds
    cfg.replay.beta_anneal_updates = 100
    return cfg


def run_loop(tmp_path, data, max_seconds=3.0, learner=None, counters=None, **cfg_kw):
    cfg = make_cfg(tmp_path, max_seconds)
    for k, v in cfg_kw.items():
        setattr(cfg.run, k, v)
    learner = learner or Learner(cfg, 3, "cpu")
    h = Harness(data)
    lines: list[str] = []
    metrics = Metrics(str(tmp_path / "tb"), use_ray=False)
    loop = TrainLoop(
        cfg,
        learner,
        sample=h.sample,
        update_priorities=h.update_priorities,
        publish=h.publish,
        poll_external=h.poll,
        metrics=metrics,
        checkpoint_path=str(tmp_path / "checkpoint.pt"),
        counters=counters,
        log=lines.append,
        poll_seconds=0.2,
        metrics_seconds=0.5,
    )
    summary = loop.run(threading.Event())
    metrics.close()
    return summary, h, lines, learner


def test_train_loop_counts_publishes_and_checkpoints(tmp_path, catch_transitions) -> None:
    summary, h, lines, learner = run_loop(tmp_path, catch_transitions)
    updates = summary["updates"]
    assert updates == learner.updates >= 3
    assert summary["stop_reason"].startswith("max_seconds")
    # frames come from poll_external; every poll brought 2 episodes
    assert summary["frames"] == h.polls * FRAMES_PER_POLL
    assert summary["episodes"] == 2 * h.polls
    first_two = [float(r) for r, _ in catch_transitions["episodes"][:2]]
    assert summary["mean_return"] == pytest.approx(np.mean(first_two))
    assert summary["max_return"] == max(first_two)
    # priorities: every sampled row got a new priority back, keys from the sample
    keys = np.concatenate([k for k, _ in h.priority_calls])
    prios = np.concatenate([p for _, p in h.priority_calls])
    assert len(keys) == updates * BATCH and prios.dtype == np.float32
    assert np.all(prios >= 0) and keys.max() < h.n
    # weights published with consecutive versions, the newest are the learner's
    versions = [v for v, _ in h.published]
    assert versions == list(range(1, len(versions) + 1)) and len(versions) >= 2
    assert summary["weight_version"] == versions[-1]
    # beta annealed from 0.4 with the update count (anneal over 100 updates)
    assert h.betas[0] == pytest.approx(0.4)
    assert h.betas[-1] == pytest.approx(0.4 + 0.6 * min(1.0, (updates - 1) / 100))
    # checkpoint at exit holds the summary's counters
    state = load_checkpoint(summary["checkpoint"], "ApexCatch-v0", 3)
    c = state["counters"]
    assert (c["updates"], c["frames"], c["episodes"], c["weight_version"]) == (
        updates,
        summary["frames"],
        summary["episodes"],
        summary["weight_version"],
    )
    assert any(line.startswith("[apex] frames") for line in lines)
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "updates_per_s", "data_wait_fraction", "episode_return", "env_frames"} <= tags

    # resume: counters continue from the checkpoint
    cfg = make_cfg(tmp_path, 1.5)
    resumed = Learner(cfg, 3, "cpu")
    resumed.load_state_dict(state)
    s2, h2, _, _ = run_loop(tmp_path, catch_transitions, 1.5, resumed, c)
    assert h2.published[0][0] == summary["weight_version"] + 1
    assert s2["updates"] > updates
    assert s2["frames"] == summary["frames"] + h2.polls * FRAMES_PER_POLL
    assert s2["episodes"] == summary["episodes"] + 2 * h2.polls
    assert h2.betas[0] == pytest.approx(0.4 + 0.6 * min(1.0, updates / 100))
    c2 = load_checkpoint(s2["checkpoint"])["counters"]
    assert c2["elapsed_s"] > c["elapsed_s"] + 1.0


def test_train_loop_stops_at_max_frames(tmp_path, catch_transitions) -> None:
    summary, h, _, _ = run_loop(tmp_path, catch_transitions, 60.0, max_frames=1200)
    assert summary["stop_reason"] == "max_frames=1200 reached"
    assert summary["frames"] >= 1200
    assert summary["elapsed_s"] < 30


class Diverging(Harness):
    """Real batches, then (after a checkpoint was written) one with a NaN return."""

    def __init__(self, data, ckpt: str, after: int):
        super().__init__(data)
        self.ckpt, self.after, self.calls = ckpt, after, 0

    def sample(self, beta: float) -> SampleBatch:
        batch = super().sample(beta)
        self.calls += 1
        import os

        if self.calls > self.after and os.path.exists(self.ckpt):
            batch.returns[0] = np.nan
        return batch


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, catch_transitions):
    from learner.loop import NonFiniteLoss

    cfg = make_cfg(tmp_path, 60.0)
    cfg.learner.checkpoint_minutes = 0.05  # every 3 s
    cfg.learner.keep_checkpoints = 2
    cfg.learner.learner_dtype = "float32"
    ckpt = tmp_path / "checkpoint.pt"
    h = Diverging(catch_transitions, str(ckpt), after=5)
    metrics = Metrics(str(tmp_path / "tb"), use_ray=False)
    learner = Learner(cfg, 3, "cpu")
    loop = TrainLoop(
        cfg, learner, sample=h.sample, update_priorities=h.update_priorities,
        publish=h.publish, poll_external=h.poll, metrics=metrics,
        checkpoint_path=str(ckpt), log=lambda _: None, poll_seconds=0.2,
    )  # fmt: skip
    with pytest.raises(NonFiniteLoss, match=r"diverged at update \d+: the loss is nan") as err:
        loop.run(threading.Event())
    metrics.close()
    assert str(ckpt) in str(err.value) and "--lr" in str(err.value)
    good = load_checkpoint(ckpt)
    assert good["counters"]["updates"] < learner.updates + 1
    for tensor in good["model"].values():  # the kept checkpoint is finite
        assert np.isfinite(tensor.numpy()).all()
    numbered = sorted(p.name for p in tmp_path.glob("checkpoint-*.pt"))
    assert 1 <= len(numbered) <= 2, numbered  # --keep-checkpoints 2
    assert (tmp_path / numbered[-1]).stat().st_ino == ckpt.stat().st_ino  # the newest


def test_keep_checkpoints_keeps_the_newest_k(tmp_path):
    from learner.checkpoint import save_checkpoint

    cfg = Config()
    learner = Learner(cfg, 3, "cpu")
    path = tmp_path / "checkpoint.pt"
    for updates in (10, 20, 30, 40):
        save_checkpoint(
            path, learner.state_dict(), {"updates": updates}, cfg.to_dict(), "ApexCatch-v0", 3,
            keep=3,
        )  # fmt: skip
    names = sorted(p.name for p in tmp_path.glob("checkpoint-*.pt"))
    assert names == [f"checkpoint-{u:010d}.pt" for u in (20, 30, 40)]
    assert load_checkpoint(path)["counters"]["updates"] == 40
