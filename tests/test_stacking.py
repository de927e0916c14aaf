"""Frame stacking (`common.stacking`) on hand-made inputs, and the bench writer
(`bench.synthetic`) built from the shared stacking and n-step pieces."""

from __future__ import annotations

import numpy as np
import pytest

from bench.synthetic import SyntheticActor
from common.stacking import FrameStack, FrameStacker


def test_stack_rolls_oldest_first_and_restarts_on_reset():
    st = FrameStack(2, (), np.int64)
    st.reset(np.array([1, 10]))
    assert st.values.tolist() == [[1, 1, 1, 1], [10, 10, 10, 10]]
    st.push(np.array([2, 11]))
    st.push(np.array([3, 12]), reset=np.array([False, False]))
    assert st.values.tolist() == [[1, 1, 2, 3], [10, 10, 11, 12]]
    st.push(np.array([4, 20]), reset=np.array([False, True]))  # env 1: a new episode
    assert st.values.tolist() == [[1, 2, 3, 4], [20, 20, 20, 20]]
    st.push(np.array([5, 21]))
    assert st.values.tolist() == [[2, 3, 4, 5], [20, 20, 20, 21]]


def test_pixel_and_id_stacks_move_together():
    sk = FrameStacker(2)
    frames = np.zeros((2, 84, 84), np.uint8)
    sk.reset(frames, np.array([0, 100]))
    for t in range(1, 6):
        frames = np.full((2, 84, 84), t, np.uint8)
        sk.step(frames, np.array([t, 100 + t]), reset=np.array([False, t == 4]))
    assert sk.obs.shape == (2, 4, 84, 84) and sk.obs.dtype == np.uint8
    assert sk.ids.tolist() == [[2, 3, 4, 5], [104, 104, 104, 105]]
    # the pixels are the frames the ids name (frame t is filled with t)
    assert sk.obs[:, :, 0, 0].tolist() == [[2, 3, 4, 5], [4, 4, 4, 5]]


def test_synthetic_writer_never_crosses_episodes_and_ends_them_terminal():
    """Pool episodes end at steps 4 and 9 (terminal: discount 0; steps 5 and 10 are
    the NEXT_STEP resets); every stack belongs to one episode, and s' follows s by
    the n steps its discount says."""
    pool = np.arange(7, dtype=np.uint8)[:, None, None].repeat(84, 1).repeat(84, 2)
    actor = SyntheticActor(3, num_envs=2, n_step=3, gamma=0.5, frame_pool=pool, pool_episode=5)
    fids, frames, batch = actor.push(12)
    actor.close()
    batch.validate()
    assert len(fids) == len(frames) == 2 * 13  # the reset frames + one per step
    step_of = {int(f): i // 2 for i, f in enumerate(fids)}  # frame id -> vector step
    terminal = batch.discounts == 0.0
    assert terminal.sum() == 2 * 2 * 3  # 2 envs x 2 episode ends x the 3 held records
    for i in range(len(batch)):
        s = [step_of[int(f)] for f in batch.obs_ids[i]]
        s2 = [step_of[int(f)] for f in batch.next_obs_ids[i]]
        k = s2[-1] - s[-1]
        if terminal[i]:
            assert s2[-1] in (4, 9) and 1 <= k <= 3
        else:
            assert k == 3 and batch.discounts[i] == pytest.approx(0.5**3)
        for st in (s, s2):
            assert len({x // 5 for x in st}) == 1, st  # episodes: steps 0-4, 5-9, 10-


def test_synthetic_writer_on_a_real_game_bootstraps_a_frame_cap_truncation():
    """Pong capped at 40 emulator frames (10 steps): the writer uses the actors'
    n-step, so a truncation bootstraps (discount gamma^k > 0), never 0."""
    actor = SyntheticActor(1, game="pong", num_envs=2, n_step=3, gamma=0.5, max_episode_frames=40)
    _, _, batch = actor.push(25)
    actor.close()
    assert len(batch) > 0
    assert set(np.round(batch.discounts, 6).tolist()) == {0.5, 0.25, 0.125}
