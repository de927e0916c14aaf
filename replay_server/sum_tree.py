"""A vectorized sum tree for proportional prioritized sampling (Schaul et al. 2016).

Leaves hold non-negative weights ``w_i`` (the shard stores ``priority**alpha``);
:meth:`SumTree.sample` draws leaves with probability ``w_i / total``. Batched
updates and draws are numpy loops over the ~log2(capacity) levels, not over
samples: 512 draws or 512 updates on a 2M-leaf tree take ~0.1-0.3 ms.

Parents are recomputed from their children on every update (never by adding
deltas), so float error does not accumulate over millions of updates.
Not thread-safe: the owner (``ReplayShard``) holds a lock.
"""

from __future__ import annotations

import numpy as np


class SumTree:
    """capacity leaves of float64 weights; internal node i = sum of its children."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity={capacity} must be >= 1")
        self.capacity = int(capacity)
        self._leaf0 = 1 << max(0, (self.capacity - 1).bit_length())
        self._depth = self._leaf0.bit_length() - 1
        self._tree = np.zeros(2 * self._leaf0, np.float64)

    @property
    def total(self) -> float:
        return float(self._tree[1])

    def get(self, idx: np.ndarray) -> np.ndarray:
        """float64 weights of leaves idx: int64[k]."""
        return self._tree[self._leaf0 + np.asarray(idx, np.int64)]

    def leaves(self) -> np.ndarray:
        """float64[capacity] view of all leaf weights."""
        return self._tree[self._leaf0 : self._leaf0 + self.capacity]

    def update(self, idx: np.ndarray, weights: np.ndarray) -> None:
        """Set leaves idx: int64[k] to weights: float[k] (>= 0; last write wins)."""
        idx = np.asarray(idx, np.int64)
        if idx.size == 0:
            return
        w = np.asarray(weights, np.float64)
        if np.any(idx < 0) or np.any(idx >= self.capacity):
            raise IndexError(f"leaf index out of range [0, {self.capacity})")
        if not np.all(np.isfinite(w)) or np.any(w < 0):
            raise ValueError("sum-tree weights must be finite and >= 0")
        node = idx + self._leaf0
        self._tree[node] = w
        t = self._tree
        node = np.unique(node)  # sorted; stays sorted under >> 1
        for _ in range(self._depth):
            node >>= 1
            if node.size > 1:
                keep = np.empty(node.size, bool)
                keep[0] = True
                np.not_equal(node[1:], node[:-1], out=keep[1:])
                node = node[keep]
            t[node] = t[2 * node] + t[2 * node + 1]

    def set_all(self, weights: np.ndarray) -> None:
        """Replace every leaf (float[capacity]) and rebuild the tree in O(n)."""
        w = np.asarray(weights, np.float64)
        if w.shape != (self.capacity,):
            raise ValueError(f"weights: expected float[{self.capacity}], got {list(w.shape)}")
        t = self._tree
        t[:] = 0.0
        t[self._leaf0 : self._leaf0 + self.capacity] = w
        lo = self._leaf0
        while lo > 1:
            parents = t[lo // 2 : lo]
            parents[:] = t[lo : 2 * lo : 2] + t[lo + 1 : 2 * lo : 2]
            lo //= 2

    def find(self, values: np.ndarray) -> np.ndarray:
        """Leaf index for each prefix-sum value in [0, total): int64[k]."""
        t = self._tree
        v = np.asarray(values, np.float64).copy()
        node = np.ones(v.shape[0], np.int64)
        for _ in range(self._depth):
            left = 2 * node
            lw = t[left]
            right_ok = t[left + 1] > 0
            go_right = (v >= lw) & right_ok
            v -= np.where(go_right, lw, 0.0)
            node = left + go_right
        return node - self._leaf0

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """n leaf indices drawn proportionally to weight, stratified: one draw
        uniformly inside each of n equal slices of [0, total). int64[n]."""
        total = self.total
        if total <= 0:
            raise ValueError("cannot sample from an empty sum tree (total weight 0)")
        u = (np.arange(n) + rng.random(n)) * (total / n)
        np.minimum(u, np.nextafter(total, 0.0), out=u)
        return self.find(u)
