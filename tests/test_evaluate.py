"""evaluate(): raw scores under the protocol, playable MP4s, foreign envs refused."""

from __future__ import annotations

import imageio
import numpy as np
import pytest

from common.atari_scores import ATARI_SCORES, human_normalized
from common.config import Config
from learner.checkpoint import CheckpointError, save_checkpoint
from learner.evaluate import evaluate
from learner.learner import Learner


def write_checkpoint(path: str, env_id: str, num_actions: int) -> str:
    cfg = Config()
    cfg.env.env = env_id
    cfg.env.episodic_life = True  # evaluate must turn it off
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
    assert result["human_normalized"] is None and result["updates"] == 7
    assert len(result["videos"]) == 3
    for path, length in zip(result["videos"], result["lengths"], strict=True):
        assert count_frames(path) == length
    assert sum(line.startswith("episode ") for line in lines) == 3
    assert "mean" in lines[-2]


def test_pong_under_the_protocol_with_human_normalized_score(tmp_path) -> None:
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


def test_action_count_mismatch_and_corrupt_checkpoint_refused(tmp_path) -> None:
    ckpt = write_checkpoint(str(tmp_path / "c.pt"), "ApexCatch-v0", 3)
    with pytest.raises(CheckpointError, match=r"has 3 actions .*ALE/Pong-v5 has 6"):
        evaluate(ckpt, episodes=1, env_override="ALE/Pong-v5", log=lambda s: None)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="unreadable"):
        evaluate(str(bad), episodes=1, log=lambda s: None)
