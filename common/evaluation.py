"""The evaluation protocol and an episode runner: the one way scores are measured.

`EvalProtocol` says how episodes are played for a reported score:

* ``EvalProtocol.published()`` (the default): the protocol behind the published
  human and random scores (`common.atari_scores`) and the Ape-X, DQN and Rainbow
  tables: no sticky actions, up to 30 no-op starts, episodes capped at 108,000
  emulator frames (30 minutes), epsilon 0.001, a lost life is not an episode end.
  It overrides the game id's own sticky actions (``ALE/Pong-v5`` registers 0.25).
* ``EvalProtocol.sticky()``: the ``ALE/*-v5`` protocol (Machado et al. 2018):
  sticky actions 0.25 and no no-op starts, otherwise the same. Its scores are not
  comparable with the no-op-start human and random scores; reports say so.

`EpisodeRunner` plays N episodes with given weights under a protocol and returns
raw scores (`EvalResult`), optionally writing MP4 videos. It is a plain class
built from plain values (an `EnvConfig`, the action count, the protocol), so it
runs as well in a Ray actor as in the ``evaluate`` command: construct it once,
call ``run(weights, episodes)`` with the float32 numpy weights the learner
publishes (`common.network.weights_to_numpy`) as often as needed.

Episodes run in parallel, ``parallel`` environments of one `make_vector_env`;
when an environment finishes its episode, its NEXT_STEP autoreset starts the
next one until every requested episode has started. Stacks follow
`common.stacking` (an episode's first frame repeated 4 times), actions
`common.exploration.epsilon_greedy` on float32 Q-values of a float32 network.

Videos: one MP4 per recorded episode (``episode_000.mp4``...), one video frame
per agent step: the 84x84 grayscale frame the step returned (what the network
sees), upscaled 4x to 336x336 with nearest-neighbour, at 15 fps (60 Hz / frame
skip 4, real time). The episode's very first (reset) frame is not in the video,
so a video holds exactly ``length`` frames.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from common.atari_scores import human_normalized
from common.config import EnvConfig
from common.env import EnvSpec, make_vector_env, resolve_env
from common.exploration import epsilon_greedy
from common.network import QNetwork, load_numpy_weights
from common.stacking import FrameStack

VIDEO_SCALE = 4
VIDEO_FPS = 15


@dataclass(frozen=True)
class EvalProtocol:
    """How evaluation episodes are played.

    name:               "no-op starts" or "sticky actions" (shown in reports)
    sticky_actions:     repeat-action probability, overriding the game id's own
    noop_max:           up to this many no-op actions at the start of an episode
    max_episode_frames: emulator frames per episode cap (frame skip counted)
    epsilon:            probability of a uniformly random action at each step
    Episodic life is always off: an episode is a whole game.
    """

    name: str = "no-op starts"
    sticky_actions: float = 0.0
    noop_max: int = 30
    max_episode_frames: int = 108_000
    epsilon: float = 0.001

    @classmethod
    def published(cls, epsilon: float = 0.001) -> EvalProtocol:
        """No sticky actions, up to 30 no-op starts, 108K-frame cap (Mnih et al. 2015)."""
        return cls(epsilon=epsilon)

    @classmethod
    def sticky(cls, epsilon: float = 0.001) -> EvalProtocol:
        """The ``ALE/*-v5`` protocol: sticky actions 0.25, no no-op starts (Machado et al. 2018)."""
        return cls(name="sticky actions", sticky_actions=0.25, noop_max=0, epsilon=epsilon)

    @property
    def matches_reference_scores(self) -> bool:
        """Whether human-normalized scores from `common.atari_scores` (a no-op-start
        table) are comparable with scores played under this protocol."""
        return self.sticky_actions == 0.0

    def env_config(self, env: EnvConfig) -> EnvConfig:
        """A copy of ``env`` that plays under this protocol."""
        return dataclasses.replace(
            env,
            sticky_actions=self.sticky_actions,
            noop_max=self.noop_max,
            max_episode_frames=self.max_episode_frames,
            episodic_life=False,
        )

    def describe(self) -> str:
        """One line for logs and reports."""
        return (
            f"{self.name} protocol: sticky actions {self.sticky_actions:g}, up to "
            f"{self.noop_max} no-op starts, {self.max_episode_frames:,}-frame cap, "
            f"epsilon {self.epsilon:g}, episodic life off"
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class EvalResult:
    """Raw scores of the episodes one `EpisodeRunner.run` played, in episode order.

    scores: list[float] raw (unclipped) returns; lengths: list[int] agent steps;
    truncated: list[bool] cut by the frame cap; videos: list[str] MP4 paths.
    """

    env_id: str
    game: str
    kind: str
    protocol: EvalProtocol
    scores: list[float]
    lengths: list[int]
    truncated: list[bool]
    videos: list[str] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return float(np.mean(self.scores))

    @property
    def median(self) -> float:
        return float(np.median(self.scores))

    def human_normalized(self, score: float | None = None) -> float | None:
        """``(score - random) / (human - random)`` of ``score`` (default: the mean);
        None for games without reference scores (not ALE, or not in the table)."""
        if self.kind != "ale":
            return None
        return human_normalized(self.game, self.mean if score is None else score)

    def to_dict(self) -> dict[str, Any]:
        """Plain values: what the ``--json`` report holds."""
        return {
            "env_id": self.env_id,
            "game": self.game,
            "protocol": self.protocol.to_dict(),
            "protocol_description": self.protocol.describe(),
            "episodes": len(self.scores),
            "scores": list(self.scores),
            "lengths": list(self.lengths),
            "truncated": list(self.truncated),
            "mean": self.mean,
            "median": self.median,
            "max": float(np.max(self.scores)),
            "min": float(np.min(self.scores)),
            "human_normalized": self.human_normalized(),
            "human_normalized_median": self.human_normalized(self.median),
            "reference_scores_comparable": self.protocol.matches_reference_scores,
            "videos": list(self.videos),
        }


class EpisodeRunner:
    """Plays episodes of one game under an `EvalProtocol`. Not thread-safe.

    env:         the game's `EnvConfig` (e.g. a checkpoint's); the protocol
                 overrides its sticky actions, no-op starts, frame cap and
                 episodic life
    num_actions: the network's action count A; `ValueError` if the env's differs
    dueling:     the network's head (``cfg.learner.dueling``)
    network:     the network's torso (``cfg.network()``: nature or small)
    parallel:    environments stepped together (episodes beyond it queue up)
    seed:        env and epsilon seed of the first `run` (later runs: their own)

    ``run(weights, episodes)`` -> `EvalResult`; ``close()`` frees the envs.
    """

    def __init__(
        self,
        env: EnvConfig,
        num_actions: int,
        dueling: bool = True,
        network: str = "nature",
        protocol: EvalProtocol | None = None,
        parallel: int = 8,
        seed: int = 0,
    ):
        self.protocol = protocol or EvalProtocol.published()
        self.env_cfg = self.protocol.env_config(env)
        self.spec: EnvSpec = resolve_env(self.env_cfg.env, self.env_cfg)
        self.parallel = max(1, parallel)
        self.seed = seed
        self.net = QNetwork(num_actions, dueling=dueling, network=network).eval()
        self.env = make_vector_env(self.env_cfg, self.parallel, seed=seed)
        if self.env.num_actions != num_actions:
            self.env.close()
            raise ValueError(
                f"the network has {num_actions} actions but {self.spec.env_id} has "
                f"{self.env.num_actions}; evaluate it on its own game"
            )

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a torch state dict (a checkpoint's ``model``) into the network."""
        self.net.load_state_dict(state)

    def run(
        self,
        weights: dict[str, np.ndarray] | None,
        episodes: int,
        seed: int | None = None,
        video_dir: str | None = None,
        max_videos: int | None = None,
        log: Callable[[str], None] | None = None,
    ) -> EvalResult:
        """Play ``episodes`` whole episodes; raw scores in episode order.

        weights:    float32 numpy state dict to play (None: the loaded ones)
        seed:       env and epsilon seed (default: the constructor's)
        video_dir:  write ``episode_NNN.mp4`` here for the first ``max_videos``
                    episodes (default: all)
        log:        called with one line per finished episode
        """
        if episodes < 1:
            raise ValueError(f"episodes={episodes} must be >= 1")
        if weights is not None:
            load_numpy_weights(self.net, weights)
        seed = self.seed if seed is None else seed
        rng = np.random.default_rng(seed)
        record = episodes if max_videos is None else min(max_videos, episodes)
        if video_dir and record:
            os.makedirs(video_dir, exist_ok=True)
        n = self.parallel
        scores: list[float] = [0.0] * episodes
        lengths = [0] * episodes
        cut = [False] * episodes
        videos: list[str] = []
        slot_ep: list[int | None] = [i if i < episodes else None for i in range(n)]
        slot_ret = np.zeros(n, np.float64)
        slot_len = np.zeros(n, np.int64)
        writers: dict[int, _Video] = {}
        next_ep = min(n, episodes)

        def open_video(slot: int, ep: int) -> None:
            if video_dir and ep < record:
                path = os.path.join(video_dir, f"episode_{ep:03d}.mp4")
                writers[slot] = _Video(path)
                videos.append(path)

        stack = FrameStack(n)
        try:
            stack.reset(self.env.reset(seed=seed))
            for slot, ep in enumerate(slot_ep):
                if ep is not None:
                    open_video(slot, ep)
            while any(e is not None for e in slot_ep) or next_ep < episodes:
                with torch.inference_mode():
                    q = self.net(torch.from_numpy(stack.values)).numpy()
                actions = epsilon_greedy(q, self.protocol.epsilon, rng)
                step = self.env.step(actions)
                stack.push(step.frames, step.reset)
                for slot in range(n):
                    if step.reset[slot]:
                        if next_ep < episodes and slot_ep[slot] is None:
                            slot_ep[slot], slot_ret[slot], slot_len[slot] = next_ep, 0.0, 0
                            open_video(slot, next_ep)
                            next_ep += 1
                        continue
                    ep = slot_ep[slot]
                    if ep is None:
                        continue
                    slot_ret[slot] += float(step.rewards[slot])
                    slot_len[slot] += 1
                    if slot in writers:
                        writers[slot].add(step.frames[slot])
                    if step.terminated[slot] or step.truncated[slot]:
                        scores[ep], lengths[ep] = float(slot_ret[slot]), int(slot_len[slot])
                        cut[ep] = bool(step.truncated[slot] and not step.terminated[slot])
                        if log is not None:
                            capped = " (frame cap)" if cut[ep] else ""
                            log(
                                f"episode {ep}: score {scores[ep]:g} in {lengths[ep]} steps{capped}"
                            )
                        if slot in writers:
                            writers.pop(slot).close()
                        slot_ep[slot] = None
        finally:
            for w in writers.values():
                w.close()
        return EvalResult(
            env_id=self.spec.env_id,
            game=self.spec.game,
            kind=self.spec.kind,
            protocol=self.protocol,
            scores=scores,
            lengths=lengths,
            truncated=cut,
            videos=videos,
        )

    def close(self) -> None:
        self.env.close()


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
