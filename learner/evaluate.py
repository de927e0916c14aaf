"""``apex-dqn evaluate``: play a checkpoint under an evaluation protocol, report scores.

The protocol and the episode runner are `common.evaluation`'s (the same ones
periodic evaluation during training uses): by default the published no-op-starts
protocol that the human and random reference scores were measured under (no
sticky actions, up to 30 no-op starts, 108,000-frame cap, epsilon 0.001), or
with ``sticky=True`` the ``ALE/*-v5`` protocol (sticky actions 0.25). The report
names the protocol, lists each episode's raw score, the mean, median, max, min
and the human-normalized mean; it says when the protocol does not match the
reference scores'.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from common.atari_scores import ATARI_SCORES
from common.config import Config
from common.evaluation import EpisodeRunner, EvalProtocol
from common.network import network_of
from learner.checkpoint import CheckpointError, load_checkpoint

MAX_PARALLEL = 8


def evaluate(
    checkpoint_path: str,
    episodes: int = 10,
    epsilon: float = 0.001,
    video_dir: str | None = None,
    env_override: str | None = None,
    seed: int = 0,
    sticky: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Play ``episodes`` episodes; print and return the report.

    sticky: play the ``ALE/*-v5`` protocol (`EvalProtocol.sticky`) instead of
    the published no-op-starts one (`EvalProtocol.published`).
    Returns `EvalResult.to_dict` (``env_id``, ``game``, ``protocol``,
    ``protocol_description``, ``scores`` (raw, in episode order), ``lengths``
    (agent steps), ``truncated``, ``mean``, ``median``, ``max``, ``min``,
    ``human_normalized`` (of the mean; None when the game has no reference
    scores), ``human_normalized_median``, ``reference_scores_comparable``,
    ``videos``) plus ``checkpoint``, ``updates``, ``frames`` (the checkpoint's
    counters) and ``epsilon``.
    Raises `CheckpointError` for an unreadable checkpoint or an env whose
    action count does not match it.
    """
    state = load_checkpoint(checkpoint_path)
    cfg = Config.from_dict(state["config"], source="checkpoint config")
    cfg.env.env = env_override or state["env_id"]
    protocol = EvalProtocol.sticky(epsilon) if sticky else EvalProtocol.published(epsilon)
    num_actions = int(state["num_actions"])
    try:
        runner = EpisodeRunner(
            cfg.env,
            num_actions,
            dueling=cfg.learner.dueling,
            network=network_of(state["model"]),
            protocol=protocol,
            parallel=min(episodes, MAX_PARALLEL),
            seed=seed,
        )
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {checkpoint_path} ({state['env_id']}): {exc}") from None
    try:
        runner.load_state_dict(state["model"])
        log(f"evaluating {checkpoint_path} on {runner.spec.env_id}: {episodes} episodes")
        log(protocol.describe())
        result = runner.run(None, episodes, seed=seed, video_dir=video_dir, log=log)
    finally:
        runner.close()

    report = result.to_dict()
    report.update(
        checkpoint=checkpoint_path,
        epsilon=epsilon,
        updates=int(state["counters"].get("updates", 0)),
        frames=int(state["counters"].get("frames", 0)),
    )
    line = (
        f"{result.env_id}: mean {report['mean']:g}, median {report['median']:g}, "
        f"max {report['max']:g}, min {report['min']:g} over {episodes} episodes ({protocol.name})"
    )
    if report["human_normalized"] is not None:
        rnd, human = ATARI_SCORES[result.game]
        line += (
            f"; human-normalized {100 * report['human_normalized']:.1f}% "
            f"(random {rnd:g}, human {human:g}"
        )
        if not protocol.matches_reference_scores:
            line += "; NOTE: those reference scores are no-op-start scores, not sticky-action ones"
        line += ")"
    log(line)
    if result.videos:
        log(f"videos: {video_dir} ({len(result.videos)} MP4 files)")
    return report
