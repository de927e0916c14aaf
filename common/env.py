"""Environment construction: game ids, DeepMind preprocessing, vectorized stepping.

`resolve_env` turns what a user typed (``ALE/Pong-v5``, ``PongNoFrameskip-v4``,
``pong``, ``ms_pacman``, ``ApexCatch-v0``) into an `EnvSpec`, or raises
`UnknownEnvError` listing close matches. `make_vector_env` builds a `FrameEnv`:
E environments stepped together that emit single preprocessed frames
``uint8[E, 84, 84]``. Frame stacking is the caller's job (the actor stacks frame
*ids* so that each frame is stored once).

ALE games run on ale-py's C++ ``AtariVectorEnv`` with the DeepMind preprocessing:
frame skip 4 with max-pool over the last two frames, 84x84 grayscale, up to
``noop_max`` no-op starts, fire on reset, and a frame cap per episode. Rewards come
back raw (unclipped); the caller clips for training and logs the raw score.
An id keeps its registered meaning: ``ALE/Pong-v5`` plays with sticky actions 0.25,
``PongNoFrameskip-v4`` with none; a bare name means its ``ALE/<Game>-v5`` id.
Frame skip is always 4 (the preprocessing's), whatever the id registers.

Other gymnasium ids (any registered env whose observations are pixels) run in a
gymnasium ``SyncVectorEnv``; observations are converted to 84x84 grayscale.

Autoreset follows gymnasium's NEXT_STEP mode for both kinds: when env i reports
``terminated`` or ``truncated`` at step t, the frame returned at step t is the
episode's *final* frame, and the next ``step`` call ignores env i's action, resets
it and returns the new episode's first frame with reward 0 and both flags False.
`FrameEnv.step` returns a ``reset`` mask marking those steps.

Episodic life (``--episodic-life``, ALE only) has DQN's meaning (Mnih et al.
2015): losing a life is a terminal for the learner, but the game goes on, and an
episode (its return, its frame stack) is a whole game. ale-py's own
``episodic_life=True`` resets the whole game on a life loss instead (0.12:
Breakout's lives go 5 -> 4 -> 5), so the agent would never see a second life.
Hence the vector env always runs with ``episodic_life=False`` and `FrameEnv`
derives life losses from its ``lives`` info: ``EnvStep.life_lost`` marks them,
``terminated`` keeps meaning game over (and the NEXT_STEP reset that follows it).
There is no automatic FIRE after a lost life (only at reset): in games that need
it, pressing FIRE is part of what the agent learns.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import NamedTuple

import gymnasium as gym
import numpy as np

from common.config import EnvConfig
from common.types import FRAME_SHAPE

CATCH_ID = "ApexCatch-v0"
FRAME_SKIP = 4  # DeepMind preprocessing, applied to every ALE id


class UnknownEnvError(ValueError):
    """The game id is neither an ALE game nor a registered gymnasium env."""


@dataclass(frozen=True)
class EnvSpec:
    """A resolved game.

    kind:     "ale" (AtariVectorEnv) or "gym" (gymnasium SyncVectorEnv)
    env_id:   the canonical id (``ALE/Pong-v5``, ``ApexCatch-v0``)
    game:     ALE ROM name (``pong``) for kind "ale", else the env id
    sticky:   repeat-action probability (ALE only)
    full_action_space: ALE only
    """

    kind: str
    env_id: str
    game: str
    sticky: float = 0.0
    full_action_space: bool = False


def _register() -> None:
    import ale_py

    gym.register_envs(ale_py)
    if CATCH_ID not in gym.registry:
        gym.register(CATCH_ID, entry_point="common.catch:CatchEnv")


_register()


def _camel(game: str) -> str:
    return "".join(part.capitalize() for part in game.split("_"))


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def ale_games() -> list[str]:
    from ale_py import roms

    return sorted(roms.get_all_rom_ids())


def resolve_env(env_id: str, cfg: EnvConfig | None = None) -> EnvSpec:
    """Resolve a user-given id; the config may override sticky actions."""
    cfg = cfg or EnvConfig()
    name = env_id.strip()
    games = ale_games()
    spec: EnvSpec | None = None
    if name in gym.registry:
        gspec = gym.spec(name)
        game = gspec.kwargs.get("game") if isinstance(gspec.kwargs, dict) else None
        if game is not None and "ale_py" in str(gspec.entry_point):
            spec = EnvSpec(
                kind="ale",
                env_id=name,
                game=str(game),
                sticky=float(gspec.kwargs.get("repeat_action_probability", 0.0)),
                full_action_space=bool(gspec.kwargs.get("full_action_space", False)),
            )
        else:
            spec = EnvSpec(kind="gym", env_id=name, game=name)
    else:
        candidate = name.lower().replace("-", "_")
        if candidate not in games:
            candidate = _snake(name)
        if candidate in games:
            canonical = f"ALE/{_camel(candidate)}-v5"
            if canonical in gym.registry:
                return resolve_env(canonical, cfg)
            spec = EnvSpec(kind="ale", env_id=canonical, game=candidate, sticky=0.25)
    if spec is None:
        options = list(gym.registry) + games
        close = difflib.get_close_matches(name, options, n=5, cutoff=0.5)
        close += [o for o in difflib.get_close_matches(name.lower(), games, n=3) if o not in close]
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise UnknownEnvError(
            f"unknown game {env_id!r}.{hint} Use a gymnasium id such as ALE/Pong-v5 or "
            f"a game name such as pong; {len(games)} ALE games are available "
            f"(python -c 'from common.env import ale_games; print(ale_games())')."
        )
    if spec.kind == "ale":
        sticky = spec.sticky if cfg.sticky_actions < 0 else cfg.sticky_actions
        spec = EnvSpec(
            kind="ale",
            env_id=spec.env_id,
            game=spec.game,
            sticky=float(sticky),
            full_action_space=spec.full_action_space or cfg.full_action_space,
        )
    return spec


class EnvStep(NamedTuple):
    """One vector step of E envs (unpacks like a tuple, in this order).

    frames:     uint8[E, 84, 84]  the new frame of each env
    rewards:    float32[E]        raw (unclipped) rewards
    terminated: bool[E]           the game is over (a NEXT_STEP reset follows)
    truncated:  bool[E]           the frame cap cut the game (a NEXT_STEP reset follows)
    reset:      bool[E]           this was env i's NEXT_STEP autoreset step: its
                                  action was ignored, ``frames[i]`` starts a new game
    life_lost:  bool[E]           episodic life only (else all False): a life was
                                  lost at this step; a terminal for the learner,
                                  but the game (and its stack) goes on
    """

    frames: np.ndarray
    rewards: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    reset: np.ndarray
    life_lost: np.ndarray

    @property
    def learner_terminal(self) -> np.ndarray:
        """bool[E]: no bootstrap past this step (game over, or a lost life)."""
        return self.terminated | self.life_lost


class FrameEnv:
    """E environments stepped together, emitting preprocessed single frames.

    reset(seed) -> uint8[E, 84, 84]
    step(actions int64[E]) -> `EnvStep`
    ``lives``: int32[E], each env's lives after the last call (ALE; 0 elsewhere).
    Not thread-safe.
    """

    def __init__(
        self, spec: EnvSpec, cfg: EnvConfig, num_envs: int, seed: int, num_threads: int = 1
    ):
        self.spec = spec
        self.num_envs = num_envs
        self.frame_skip = FRAME_SKIP if spec.kind == "ale" else 1  # emulator frames per step
        self._seed = seed
        self._done = np.zeros(num_envs, dtype=bool)
        self.episodic_life = bool(cfg.episodic_life) and spec.kind == "ale"
        self.lives = np.zeros(num_envs, dtype=np.int32)
        if spec.kind == "ale":
            from ale_py.vector_env import AtariVectorEnv

            self._env = AtariVectorEnv(
                spec.game,
                num_envs,
                num_threads=num_threads,
                stack_num=1,
                frameskip=FRAME_SKIP,
                maxpool=True,
                noop_max=cfg.noop_max,
                img_height=FRAME_SHAPE[0],
                img_width=FRAME_SHAPE[1],
                grayscale=True,
                reward_clipping=False,
                episodic_life=False,  # ale-py's resets the game; see the module docstring
                repeat_action_probability=spec.sticky,
                full_action_space=spec.full_action_space,
                max_num_frames_per_episode=cfg.max_episode_frames,
                autoreset_mode="NextStep",
            )
        else:
            self._env = gym.make_vec(
                spec.env_id,
                num_envs=num_envs,
                vectorization_mode="sync",
                vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.NEXT_STEP},
            )
        space = self._env.single_action_space
        if not isinstance(space, gym.spaces.Discrete):
            raise UnknownEnvError(f"{spec.env_id}: needs a discrete action space, got {space}")
        self.num_actions = int(space.n)

    def reset(self, seed: int | None = None) -> np.ndarray:
        obs, info = self._env.reset(seed=self._seed if seed is None else seed)
        self._done[:] = False
        self.lives = self._lives(info)
        return to_frames(obs, self.num_envs)

    def step(self, actions: np.ndarray) -> EnvStep:
        reset = self._done.copy()
        obs, reward, terminated, truncated, info = self._env.step(np.asarray(actions))
        terminated = np.asarray(terminated, dtype=bool)
        truncated = np.asarray(truncated, dtype=bool)
        self._done = terminated | truncated
        lives = self._lives(info)
        life_lost = (lives < self.lives) & ~reset if self.episodic_life else np.zeros_like(reset)
        self.lives = lives
        return EnvStep(
            to_frames(obs, self.num_envs),
            np.asarray(reward, dtype=np.float32),
            terminated,
            truncated,
            reset,
            life_lost,
        )

    def _lives(self, info: dict) -> np.ndarray:
        lives = info.get("lives") if isinstance(info, dict) else None
        if lives is None:
            return np.zeros(self.num_envs, dtype=np.int32)
        return np.asarray(lives, dtype=np.int32).copy()

    def close(self) -> None:
        self._env.close()


def make_vector_env(cfg: EnvConfig, num_envs: int, seed: int = 0, num_threads: int = 1) -> FrameEnv:
    """Build E environments for ``cfg.env`` (see the module docstring)."""
    return FrameEnv(resolve_env(cfg.env, cfg), cfg, num_envs, seed, num_threads)


def to_frames(obs: np.ndarray, num_envs: int) -> np.ndarray:
    """Observations of any pixel layout -> ``uint8[E, 84, 84]`` grayscale."""
    obs = np.asarray(obs)
    if obs.ndim == 4 and obs.shape[1] == 1:  # AtariVectorEnv stack_num=1: [E, 1, H, W]
        obs = obs[:, 0]
    elif obs.ndim == 4 and obs.shape[-1] in (1, 3):  # [E, H, W, C]
        if obs.shape[-1] == 3:
            obs = obs.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        else:
            obs = obs[..., 0]
    if obs.ndim != 3 or obs.shape[0] != num_envs:
        raise ValueError(f"expected pixel observations [E, H, W(, C)], got shape {obs.shape}")
    if obs.shape[1:] != FRAME_SHAPE:
        rows = np.linspace(0, obs.shape[1] - 1, FRAME_SHAPE[0]).round().astype(int)
        cols = np.linspace(0, obs.shape[2] - 1, FRAME_SHAPE[1]).round().astype(int)
        obs = obs[:, rows][:, :, cols]
    if obs.dtype != np.uint8:
        obs = np.clip(obs, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(obs)
