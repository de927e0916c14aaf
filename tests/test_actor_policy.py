"""The actor's acting network: dtypes agree, weights load, outputs stay float32."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actors.policy import ActingNetwork
from common.network import QNetwork, weights_to_numpy


def test_bfloat16_matches_float32_and_weights_load():
    torch.manual_seed(0)
    source = QNetwork(6, dueling=True)
    with torch.no_grad():  # larger Q-values than the init gives, to compare against
        source.advantage[2].weight.mul_(50)
        source.value[2].bias.fill_(3.0)
    weights = weights_to_numpy(source)
    obs = np.random.default_rng(1).integers(0, 255, (16, 4, 84, 84), dtype=np.uint8)
    f32 = ActingNetwork(6, True, 16, "float32")
    b16 = ActingNetwork(6, True, 16, "bfloat16")
    before = f32.q_values(obs)
    f32.load(weights)
    b16.load(weights)
    q32, q16 = f32.q_values(obs), b16.q_values(obs)
    assert q32.dtype == np.float32 and q16.dtype == np.float32 and q32.shape == (16, 6)
    assert not np.allclose(before, q32)  # the weights took effect
    with torch.inference_mode():
        want = source(torch.from_numpy(obs)).numpy()
    np.testing.assert_allclose(q32, want, rtol=1e-5, atol=1e-5)
    assert np.abs(q16 - q32).max() < 0.05 * np.abs(q32).max()
    assert ActingNetwork(6, True, 16, "auto").dtype in ("float32", "bfloat16")
    with pytest.raises(ValueError, match="inference dtype"):
        ActingNetwork(6, True, 16, "int4")


def test_bfloat16_torso_keeps_small_action_gaps():
    """Q about 20 with action gaps of 0.01: a bf16 output (steps of 0.125 there)
    would tie every action and pick action 0; float32 output layers pick the best."""
    torch.manual_seed(3)
    source = QNetwork(4, dueling=True)
    with torch.no_grad():
        source.advantage[2].weight.mul_(1e-3)
        source.advantage[2].bias.copy_(torch.tensor([0.0, 0.01, 0.02, -0.01]))
        source.value[2].weight.mul_(1e-3)
        source.value[2].bias.fill_(20.0)
    b16 = ActingNetwork(4, True, 8, "bfloat16")
    b16.load(weights_to_numpy(source))
    assert b16.net.torso[0].weight.dtype == torch.bfloat16
    assert b16.net.value[0].weight.dtype == torch.bfloat16  # the hidden layer: trunk
    assert b16.net.value[2].weight.dtype == torch.float32  # the output layer
    obs = np.random.default_rng(2).integers(0, 255, (8, 4, 84, 84), dtype=np.uint8)
    q = b16.q_values(obs)
    assert q.dtype == np.float32 and 19.5 < q.min() and q.max() < 20.5
    assert q.argmax(axis=1).tolist() == [2] * 8
    np.testing.assert_allclose(q[:, 2] - q[:, 1], 0.01, atol=2e-3)
