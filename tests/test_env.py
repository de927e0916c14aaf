"""Environment construction on real ALE games and the Catch test game."""

from __future__ import annotations

import numpy as np
import pytest

from common.config import EnvConfig
from common.env import UnknownEnvError, make_vector_env, resolve_env, to_frames


@pytest.mark.parametrize(
    "given, env_id, sticky",
    [
        ("ALE/Pong-v5", "ALE/Pong-v5", 0.25),
        ("PongNoFrameskip-v4", "PongNoFrameskip-v4", 0.0),
        ("pong", "ALE/Pong-v5", 0.25),
        ("MsPacman", "ALE/MsPacman-v5", 0.25),
        ("ApexCatch-v0", "ApexCatch-v0", 0.0),
    ],
)
def test_ids_keep_their_registered_meaning(given, env_id, sticky):
    spec = resolve_env(given)
    assert (spec.env_id, spec.sticky) == (env_id, sticky)


def test_sticky_override():
    assert resolve_env("ALE/Pong-v5", EnvConfig(sticky_actions=0.0)).sticky == 0.0


def test_unknown_game_lists_close_matches():
    with pytest.raises(UnknownEnvError, match="unknown game 'breakot'.*breakout"):
        resolve_env("breakot")


def test_pong_frames_are_84x84_uint8_with_raw_rewards():
    env = make_vector_env(EnvConfig(env="PongNoFrameskip-v4", max_episode_frames=2000), 2, seed=3)
    frames = env.reset()
    assert frames.shape == (2, 84, 84) and frames.dtype == np.uint8
    rng = np.random.default_rng(0)
    rewards, dones, resets = [], 0, 0
    for _ in range(600):
        frames, r, term, trunc, reset, _ = env.step(rng.integers(0, env.num_actions, 2))
        assert frames.shape == (2, 84, 84) and frames.dtype == np.uint8
        rewards.append(r)
        resets += int(reset.sum())
        dones += int((term | trunc).sum())
    assert frames.std() > 0  # a real screen, not a blank
    assert set(np.unique(np.concatenate(rewards))) <= {-1.0, 0.0, 1.0}
    assert dones >= 2 and resets >= 2  # the 2000-frame cap truncated episodes


def test_next_step_reset_mask_marks_the_first_frame_of_a_new_episode():
    env = make_vector_env(EnvConfig(env="ApexCatch-v0"), 2, seed=0)
    first = env.reset()
    seen_done = np.zeros(2, bool)
    for step in range(12):
        frames, _, term, trunc, reset, _ = env.step(np.array([1, 1]))
        assert np.array_equal(reset, seen_done)  # the step after a done is a reset step
        if reset.any():
            # the ball is back on the top row: the first frame of a new episode
            assert (frames[reset][:, 2:10].max(axis=(1, 2)) == 255).all()
        seen_done = term | trunc
        if step == 8:
            assert term.all()
    assert first.shape == (2, 84, 84)


def test_to_frames_converts_rgb_and_resizes():
    rgb = np.full((3, 210, 160, 3), 200, np.uint8)
    out = to_frames(rgb, 3)
    assert out.shape == (3, 84, 84) and out.dtype == np.uint8
    assert int(out[0, 0, 0]) in (199, 200)
