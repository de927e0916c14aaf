"""Evaluation: the protocol (published no-op starts by default, sticky actions on
request), raw scores, playable MP4s, the JSON report, and the reusable runner."""

from __future__ import annotations

import json

import imageio
import numpy as np
import pytest
import torch

from common.atari_scores import ATARI_SCORES, human_normalized
from common.config import Config, EnvConfig
from common.evaluation import EpisodeRunner, EvalProtocol
from common.network import QNetwork, weights_to_numpy
from deploy.cli import main as cli_main
from learner.checkpoint import CheckpointError, save_checkpoint
from learner.evaluate import evaluate
from learner.learner import Learner


def write_checkpoint(path: str, env_id: str, num_actions: int) -> str:
    cfg = Config()
    cfg.env.env = env_id
    cfg.env.episodic_life = True  # evaluate must turn it off
    cfg.env.noop_max = 3  # ...and play the protocol's 30 no-op starts
    cfg.learner.learner_dtype = "float32"
    learner = Learner(cfg, num_actions, "cpu")
    counters = {"updates": 7, "frames": 1000}
    return save_checkpoint(path, learner.state_dict(), counters, cfg.to_dict(), env_id, num_actions)


def count_frames(path: str) -> int:
    reader = imageio.get_reader(path)
    try:
        shape = reader.get_data(0).shape
        assert shape == (336, 336, 3)
        return sum(1 for _ in reader)
    finally:
        reader.close()


def constant_policy(action: int, num_actions: int = 3) -> dict[str, np.ndarray]:
    """Weights whose greedy action is always ``action``, whatever the screen."""
    net = QNetwork(num_actions, dueling=True)
    with torch.no_grad():
        net.advantage[2].weight.zero_()
        net.advantage[2].bias.zero_()
        net.advantage[2].bias[action] = 5.0
    return weights_to_numpy(net)


def test_catch_scores_and_one_playable_mp4_per_episode(tmp_path) -> None:
    ckpt = write_checkpoint(str(tmp_path / "c.pt"), "ApexCatch-v0", 3)
    lines: list[str] = []
    result = evaluate(
        ckpt, episodes=3, epsilon=0.0, video_dir=str(tmp_path / "v"), log=lines.append
    )
    assert result["env_id"] == "ApexCatch-v0" and result["episodes"] == 3
    assert result["lengths"] == [9, 9, 9]  # Catch: the ball falls 9 rows
    assert all(s in (-1.0, 1.0) for s in result["scores"])
    assert result["mean"] == pytest.approx(np.mean(result["scores"]))
    assert result["median"] == pytest.approx(np.median(result["scores"]))
    assert result["human_normalized"] is None and result["updates"] == 7
    assert len(result["videos"]) == 3
    for path, length in zip(result["videos"], result["lengths"], strict=True):
        assert count_frames(path) == length
    assert sum(line.startswith("episode ") for line in lines) == 3
    assert lines[1].startswith("no-op starts protocol: sticky actions 0, up to 30 no-op")
    assert "mean" in lines[-2] and "(no-op starts)" in lines[-2]


def test_pong_v5_plays_the_published_protocol_by_default(tmp_path) -> None:
    ckpt = write_checkpoint(str(tmp_path / "p.pt"), "ALE/Pong-v5", 6)
    result = evaluate(
        ckpt, episodes=1, epsilon=0.001, video_dir=str(tmp_path / "v"), log=lambda s: None
    )
    score, length = result["scores"][0], result["lengths"][0]
    assert -21.0 <= score <= 21.0 and score == int(score)
    assert 200 < length <= 27_000  # a whole game (no life loss in Pong), 108K-frame cap
    assert count_frames(result["videos"][0]) == length
    assert result["human_normalized"] == pytest.approx(human_normalized("pong", score))
    assert ATARI_SCORES["pong"] == (-20.7, 14.6)
    # ALE/Pong-v5 registers sticky actions 0.25: the published protocol has none
    assert result["protocol"] == {
        "name": "no-op starts",
        "sticky_actions": 0.0,
        "noop_max": 30,
        "max_episode_frames": 108_000,
        "epsilon": 0.001,
    }
    assert result["reference_scores_comparable"] is True


def test_protocols_set_up_the_env_they_name() -> None:
    env = EnvConfig(env="ALE/Breakout-v5", noop_max=5, max_episode_frames=999, episodic_life=True)
    published = EpisodeRunner(env, 4, protocol=EvalProtocol.published(), parallel=1)
    sticky = EpisodeRunner(env, 4, protocol=EvalProtocol.sticky(0.01), parallel=1)
    try:
        assert published.spec.sticky == 0.0 and sticky.spec.sticky == 0.25
        for runner, noops in ((published, 30), (sticky, 0)):
            assert runner.env_cfg.noop_max == noops
            assert runner.env_cfg.max_episode_frames == 108_000
            assert not runner.env_cfg.episodic_life and not runner.env.episodic_life
        assert sticky.protocol.epsilon == 0.01 and not sticky.protocol.matches_reference_scores
        assert "sticky actions 0.25" in sticky.protocol.describe()
    finally:
        published.close()
        sticky.close()


def test_runner_plays_the_weights_it_is_given(tmp_path) -> None:
    """The periodic-evaluation entry point: numpy weights in, raw scores out."""
    runner = EpisodeRunner(
        EnvConfig(env="ApexCatch-v0"), 3, protocol=EvalProtocol.published(0.0), parallel=4
    )
    try:
        left = runner.run(constant_policy(0), episodes=10, seed=5)
        right = runner.run(constant_policy(2), episodes=10, seed=5, video_dir=str(tmp_path),
                           max_videos=1)  # fmt: skip
        again = runner.run(constant_policy(0), episodes=10, seed=5)
    finally:
        runner.close()
    assert left.scores == again.scores  # same seed, same weights: the same games
    assert left.lengths == [9] * 10 and left.truncated == [False] * 10
    # the same 10 balls: always-left catches only column 0, always-right column 4
    assert left.scores != right.scores
    assert not any(a == b == 1.0 for a, b in zip(left.scores, right.scores, strict=True))
    assert len(right.videos) == 1 and count_frames(right.videos[0]) == 9
    report = left.to_dict()
    assert report["scores"] == left.scores and report["mean"] == pytest.approx(left.mean)


def test_cli_prints_the_protocol_and_writes_the_json_report(tmp_path, capsys) -> None:
    ckpt = write_checkpoint(str(tmp_path / "c.pt"), "ApexCatch-v0", 3)
    out = tmp_path / "eval.json"
    code = cli_main(["evaluate", ckpt, "--episodes", "2", "--sticky-actions", "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "sticky actions protocol: sticky actions 0.25, up to 0 no-op starts" in printed
    report = json.loads(out.read_text())
    assert report["protocol"]["name"] == "sticky actions"
    assert report["protocol"]["sticky_actions"] == 0.25
    assert len(report["scores"]) == 2 and report["median"] == pytest.approx(
        np.median(report["scores"])
    )
    assert {"mean", "median", "human_normalized", "protocol_description"} <= set(report)


def test_action_count_mismatch_and_corrupt_checkpoint_refused(tmp_path) -> None:
    ckpt = write_checkpoint(str(tmp_path / "c.pt"), "ApexCatch-v0", 3)
    with pytest.raises(CheckpointError, match=r"3 actions .*ALE/Pong-v5 has 6"):
        evaluate(ckpt, episodes=1, env_override="ALE/Pong-v5", log=lambda s: None)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="unreadable"):
        evaluate(str(bad), episodes=1, log=lambda s: None)
