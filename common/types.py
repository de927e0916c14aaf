"""Plain data types that cross role boundaries (actor -> replay -> learner).

Nothing here imports a role. Arrays are numpy; shapes and dtypes are part of the
contract and are checked by :func:`TransitionBatch.validate` /
:func:`SampleBatch.validate`.

Frame ids
---------
A frame id is an ``int64``: ``(incarnation << 40) | counter``. ``incarnation`` is
unique per actor process start (taken from Redis with ``INCR``), ``counter``
counts the frames that incarnation produced. Ids are therefore unique across
actors and across actor restarts, and stay unique for 2**40 frames per start.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

FRAME_SHAPE = (84, 84)
FRAME_BYTES = FRAME_SHAPE[0] * FRAME_SHAPE[1]
STACK = 4
COUNTER_BITS = 40
# The one priority floor (raw |TD|, before the exponent alpha), applied to the
# actors' initial priorities and to the learner's updates alike: a zero priority
# would never be sampled again, so its transition would never be re-evaluated.
PRIORITY_FLOOR = 1e-3


def make_frame_id(incarnation: int, counter: int | np.ndarray) -> int | np.ndarray:
    """Frame id from an actor incarnation and that incarnation's frame counter."""
    return (np.int64(incarnation) << np.int64(COUNTER_BITS)) | np.int64(counter)


@dataclass
class TransitionBatch:
    """n-step transitions as an actor pushes them; frames are referred to by id.

    obs_ids:       int64[n, 4]   frame ids of the stack s_t (oldest first)
    next_obs_ids:  int64[n, 4]   frame ids of the stack s_{t+k} (k <= n steps)
    actions:       int64[n]      action a_t
    returns:       float32[n]    sum_{i<k} gamma^i r_{t+i} (clipped rewards)
    discounts:     float32[n]    gamma^k, or 0.0 when the episode terminated
                                 within the k steps (no bootstrap)
    priorities:    float32[n]    initial priority |n-step TD error| (> 0)
    """

    obs_ids: np.ndarray
    next_obs_ids: np.ndarray
    actions: np.ndarray
    returns: np.ndarray
    discounts: np.ndarray
    priorities: np.ndarray

    def __len__(self) -> int:
        return int(self.actions.shape[0])

    def validate(self) -> None:
        n = len(self)
        _check(self.obs_ids, np.int64, (n, STACK), "obs_ids")
        _check(self.next_obs_ids, np.int64, (n, STACK), "next_obs_ids")
        _check(self.actions, np.int64, (n,), "actions")
        for name in ("returns", "discounts", "priorities"):
            _check(getattr(self, name), np.float32, (n,), name)

    @classmethod
    def concat(cls, batches: list[TransitionBatch]) -> TransitionBatch:
        return cls(
            **{f.name: np.concatenate([getattr(b, f.name) for b in batches]) for f in fields(cls)}
        )


@dataclass
class SampleBatch:
    """A training minibatch as the learner receives it.

    obs:          uint8[B, 4, 84, 84]  stacked s_t
    next_obs:     uint8[B, 4, 84, 84]  stacked s_{t+k}
    actions:      int64[B]
    returns:      float32[B]           n-step discounted return
    discounts:    float32[B]           gamma^k, 0 at terminal
    weights:      float32[B]           importance weights, max 1 (all 1 when uniform)
    keys:         int64[B]             opaque replay keys for update_priorities
    """

    obs: np.ndarray
    next_obs: np.ndarray
    actions: np.ndarray
    returns: np.ndarray
    discounts: np.ndarray
    weights: np.ndarray
    keys: np.ndarray

    def __len__(self) -> int:
        return int(self.actions.shape[0])

    def validate(self) -> None:
        b = len(self)
        _check(self.obs, np.uint8, (b, STACK, *FRAME_SHAPE), "obs")
        _check(self.next_obs, np.uint8, (b, STACK, *FRAME_SHAPE), "next_obs")
        _check(self.actions, np.int64, (b,), "actions")
        _check(self.keys, np.int64, (b,), "keys")
        for name in ("returns", "discounts", "weights"):
            _check(getattr(self, name), np.float32, (b,), name)


def _check(arr: np.ndarray, dtype: type, shape: tuple[int, ...], name: str) -> None:
    if not isinstance(arr, np.ndarray) or arr.dtype != dtype or arr.shape != shape:
        got = f"{arr.dtype}{list(arr.shape)}" if isinstance(arr, np.ndarray) else type(arr).__name__
        raise ValueError(f"{name}: expected {np.dtype(dtype)}{list(shape)}, got {got}")
