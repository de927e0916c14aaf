"""Play a checkpoint under the standard Atari evaluation protocol; write MP4 videos.

Protocol (Mnih et al. 2015; Machado et al. 2018 for sticky actions): the
checkpoint's own env config, with up to 30 no-op starts, episodes capped at
108,000 emulator frames, episodic life OFF (an episode is a whole game), raw
(unclipped) scores, epsilon-greedy with a small epsilon (0.001 by default), sticky
actions as the game id defines them (0.25 for ``ALE/*-v5``).

Episodes run in parallel, ``min(episodes, MAX_PARALLEL)`` environments of one
`make_vector_env`; when an environment finishes its episode, its NEXT_STEP
autoreset starts the next one until every requested episode has started. An
episode's stack begins with its first frame repeated 4 times (as the actors do).

Videos: one MP4 per episode (``episode_000.mp4``...), one video frame per agent
step: the 84x84 grayscale frame the step returned (what the network sees),
upscaled 4x to 336x336 with nearest-neighbour, at 15 fps (60 Hz / frame skip 4,
real time). The episode's very first (reset) frame is not in the video, so a
video holds exactly ``length`` frames.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from common.atari_scores import ATARI_SCORES, human_normalized
from common.config import Config
from common.env import make_vector_env, resolve_env
from common.network import QNetwork
from common.types import STACK
from learner.checkpoint import CheckpointError, load_checkpoint

MAX_PARALLEL = 8
VIDEO_SCALE = 4
VIDEO_FPS = 15


def eval_config(config: dict[str, Any], env_override: str | None = None) -> Config:
    """The checkpoint's config with the evaluation protocol applied."""
    cfg = Config.from_dict(config, source="checkpoint config")
    if env_override:
        cfg.env.env = env_override
    cfg.env.episodic_life = False
    cfg.env.noop_max = 30
    cfg.env.max_episode_frames = 108_000
    return cfg


class _Video:
    """One MP4 written frame by frame (uint8[84, 84] gray -> 336x336 RGB)."""

    def __init__(self, path: str):
        import imageio

        self.path = path
        self.frames = 0
        self._w = imageio.get_writer(
            path, fps=VIDEO_FPS, codec="libx264", macro_block_size=16, ffmpeg_log_level="error"
        )

    def add(self, frame: np.ndarray) -> None:
        big = frame.repeat(VIDEO_SCALE, axis=0).repeat(VIDEO_SCALE, axis=1)
        self._w.append_data(np.repeat(big[..., None], 3, axis=2))
        self.frames += 1

    def close(self) -> None:
        self._w.close()


def evaluate(
    checkpoint_path: str,
    episodes: int = 10,
    epsilon: float = 0.001,
    video_dir: str | None = None,
    env_override: str | None = None,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Play ``episodes`` episodes; print and return the raw scores.

    Returns ``env_id``, ``game``, ``scores`` (list[float], raw, in episode
    order), ``lengths`` (agent steps), ``mean``, ``median``, ``max``, ``min``,
    ``human_normalized`` (of the mean; None when the game is not in
    `common.atari_scores`), ``videos`` (paths), ``checkpoint``, ``updates``,
    ``frames`` (the checkpoint's counters), ``epsilon``.
    Raises `CheckpointError` for an unreadable checkpoint or an env whose
    action count does not match it.
    """
    state = load_checkpoint(checkpoint_path)
    cfg = eval_config(state["config"], env_override or state["env_id"])
    spec = resolve_env(cfg.env.env, cfg.env)
    num_actions = int(state["num_actions"])
    net = QNetwork(num_actions, dueling=cfg.learner.dueling)
    net.load_state_dict(state["model"])
    net.eval()
    parallel = min(episodes, MAX_PARALLEL)
    env = make_vector_env(cfg.env, parallel, seed=seed)
    if env.num_actions != num_actions:
        env.close()
        raise CheckpointError(
            f"checkpoint {checkpoint_path} has {num_actions} actions ({state['env_id']}) "
            f"but {spec.env_id} has {env.num_actions}; evaluate it on its own game."
        )
    if video_dir:
        os.makedirs(video_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    log(
        f"evaluating {checkpoint_path} on {spec.env_id}: {episodes} episodes, "
        f"epsilon {epsilon}, {cfg.env.noop_max} no-op starts, 108K-frame cap"
    )

    scores: list[float | None] = [None] * episodes
    lengths = [0] * episodes
    videos: list[str] = []
    slot_ep: list[int | None] = list(range(parallel))
    slot_ret = np.zeros(parallel, np.float64)
    slot_len = np.zeros(parallel, np.int64)
    writers: dict[int, _Video] = {}
    next_ep = parallel

    def open_video(slot: int, ep: int) -> None:
        if video_dir:
            path = os.path.join(video_dir, f"episode_{ep:03d}.mp4")
            writers[slot] = _Video(path)
            videos.append(path)

    try:
        frames = env.reset(seed=seed)
        stack = np.repeat(frames[:, None], STACK, axis=1)
        for slot in range(parallel):
            open_video(slot, slot)
        while any(e is not None for e in slot_ep) or next_ep < episodes:
            with torch.inference_mode():
                greedy = net(torch.from_numpy(stack)).argmax(dim=1).numpy()
            explore = rng.random(parallel) < epsilon
            actions = np.where(explore, rng.integers(0, num_actions, parallel), greedy)
            frames, rewards, terminated, truncated, reset, _ = env.step(actions.astype(np.int64))
            stack[:, :-1] = stack[:, 1:]
            stack[:, -1] = frames
            stack[reset] = frames[reset][:, None]
            for slot in range(parallel):
                if reset[slot]:
                    if next_ep < episodes and slot_ep[slot] is None:
                        slot_ep[slot], slot_ret[slot], slot_len[slot] = next_ep, 0.0, 0
                        open_video(slot, next_ep)
                        next_ep += 1
                    continue
                ep = slot_ep[slot]
                if ep is None:
                    continue
                slot_ret[slot] += float(rewards[slot])
                slot_len[slot] += 1
                if slot in writers:
                    writers[slot].add(frames[slot])
                if terminated[slot] or truncated[slot]:
                    scores[ep], lengths[ep] = float(slot_ret[slot]), int(slot_len[slot])
                    cut = " (108K-frame cap)" if truncated[slot] else ""
                    log(f"episode {ep}: score {scores[ep]:g} in {lengths[ep]} steps{cut}")
                    if slot in writers:
                        writers.pop(slot).close()
                    slot_ep[slot] = None
    finally:
        for w in writers.values():
            w.close()
        env.close()

    raw = np.asarray(scores, np.float64)
    result: dict[str, Any] = {
        "checkpoint": checkpoint_path,
        "env_id": spec.env_id,
        "game": spec.game,
        "episodes": episodes,
        "epsilon": epsilon,
        "scores": raw.tolist(),
        "lengths": lengths,
        "mean": float(raw.mean()),
        "median": float(np.median(raw)),
        "max": float(raw.max()),
        "min": float(raw.min()),
        "human_normalized": human_normalized(spec.game, float(raw.mean()))
        if spec.kind == "ale"
        else None,
        "videos": videos,
        "updates": int(state["counters"].get("updates", 0)),
        "frames": int(state["counters"].get("frames", 0)),
    }
    line = (
        f"{spec.env_id}: mean {result['mean']:g}, median {result['median']:g}, "
        f"max {result['max']:g}, min {result['min']:g} over {episodes} episodes"
    )
    if result["human_normalized"] is not None:
        rnd, human = ATARI_SCORES[spec.game]
        line += (
            f"; human-normalized {100 * result['human_normalized']:.1f}% "
            f"(random {rnd:g}, human {human:g})"
        )
    log(line)
    if videos:
        log(f"videos: {video_dir} ({len(videos)} MP4 files)")
    return result
