"""Episodic life with DQN's meaning, on real Breakout (5 lives).

A lost life is a terminal for the learner (no bootstrap), but the game goes on:
no reset, the stack continues, and an episode (its return) is a whole game.
ale-py's own ``episodic_life=True`` restarted the whole game on each life loss.
"""

from __future__ import annotations

import numpy as np
import redis

from actors.actor import ApexActor
from common.config import Config, EnvConfig
from common.env import make_vector_env
from common.types import COUNTER_BITS
from common.wire import decode_batch
from replay_server.keys import ReplayKeys

LIVES = 5


def play_one_game(episodic_life: bool) -> tuple[list[int], list[bool], list[bool], list[int]]:
    """Random Breakout until game over (plus the reset step after it): per step the
    lives, life_lost, terminated and reset flags of the single env."""
    cfg = EnvConfig(env="breakout", sticky_actions=0.0, episodic_life=episodic_life)
    env = make_vector_env(cfg, 1, seed=7)
    rng = np.random.default_rng(7)
    env.reset()
    assert env.lives.tolist() == [LIVES]
    lives, lost, term, resets = [], [], [], []
    for _ in range(5000):
        step = env.step(rng.integers(0, env.num_actions, 1))
        lives.append(int(env.lives[0]))
        lost.append(bool(step.life_lost[0]))
        term.append(bool(step.terminated[0]))
        resets.append(bool(step.reset[0]))
        if resets[-1]:
            break
    env.close()
    assert resets[-1], "the game did not end in 5,000 random steps"
    return lives, lost, term, resets


def test_a_lost_life_is_a_terminal_for_the_learner_and_the_game_goes_on():
    lives, lost, term, resets = play_one_game(episodic_life=True)
    over = term.index(True)
    assert not any(resets[:over])  # one game: no reset until it is over
    assert sum(lost) == LIVES  # every life, the last one on the game-over step
    assert lost[over]
    lost_at = [t for t, x in enumerate(lost) if x]
    # lives go 5 -> 4 -> 3 -> 2 -> 1 -> 0, one at each life_lost step, never back up
    assert [lives[t] for t in lost_at] == [4, 3, 2, 1, 0]
    assert lives[: lost_at[0]] == [LIVES] * lost_at[0]
    assert all(a >= b for a, b in zip(lives[:over], lives[1 : over + 1], strict=True))
    assert resets[over + 1] and lives[over + 1] == LIVES  # then a new game


def test_without_episodic_life_lives_are_counted_but_nothing_is_terminal():
    lives, lost, term, resets = play_one_game(episodic_life=False)
    over = term.index(True)
    assert not any(lost)
    assert sorted(set(lives[: over + 1]), reverse=True) == [5, 4, 3, 2, 1, 0]


def test_actor_ends_nstep_windows_at_lost_lives_and_keeps_the_stack(redis_url):
    """Through the whole actor: each lost life flushes the n-step windows with
    discount 0, the next transition's s is the continuing stack (not a fresh one),
    and episodes (returns, lengths) are whole games."""
    cfg = Config()
    cfg.env.env = "breakout"
    cfg.env.episodic_life = True
    cfg.actor.actors, cfg.actor.envs_per_actor = 1, 2
    cfg.actor.push_every, cfg.actor.n_step = 10, 3
    envs = 2
    actor = ApexActor(cfg, 0, redis_url, inference_dtype="float32")
    stats = actor.run(max_steps=450)
    lives_now = actor._env.lives.copy()
    actor.close()
    client = redis.Redis.from_url(redis_url)
    batches = [decode_batch(p)[1] for p in client.lrange(ReplayKeys().incoming, 0, -1)]
    client.close()
    obs = np.concatenate([b.obs_ids for b in batches]) & ((1 << COUNTER_BITS) - 1)
    nxt = np.concatenate([b.next_obs_ids for b in batches]) & ((1 << COUNTER_BITS) - 1)
    disc = np.concatenate([b.discounts for b in batches])
    assert len(disc) == stats.transitions_pushed > 0
    env_of, step_of = obs % envs, obs // envs  # counters: the reset frames, then E per step
    nxt_env, nxt_step = nxt[:, -1] % envs, nxt[:, -1] // envs
    games = len(stats.episode_returns)
    assert games >= 1, stats.episode_lengths
    # learner terminals: the distinct (env, step) where windows ended with discount 0
    ends = zip(nxt_env[disc == 0], nxt_step[disc == 0], strict=True)
    terminals = sorted({(int(e), int(t)) for e, t in ends})
    # 5 per finished game, plus the lives lost so far in the games still running
    assert len(terminals) == LIVES * games + int((LIVES - lives_now[lives_now > 0]).sum())
    continued = fresh = 0
    for e, t in terminals:  # the transition that starts one step after the terminal
        rows = np.flatnonzero((env_of[:, -1] == e) & (step_of[:, -1] == t + 1))
        for r in rows:
            steps = step_of[r].tolist()
            assert (env_of[r] == e).all()
            if steps == [t - 2, t - 1, t, t + 1]:
                continued += 1  # a lost life: the stack goes on
            else:
                assert steps == [t + 1] * 4, steps  # game over: a new game's stack
                fresh += 1
    assert continued >= (LIVES - 1) * games and fresh <= games
    assert all(length > 0 for length in stats.episode_lengths)
    assert min(stats.episode_lengths) > 4 * cfg.actor.n_step  # whole games, not lives
