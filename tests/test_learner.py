"""Learner.step on real torch (CPU): targets, loss, priorities, target copies, optimizers."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from common.config import Config
from common.types import SampleBatch
from learner.learner import Learner

B = 8


def make_cfg(**learner: object) -> Config:
    cfg = Config()
    cfg.env.env = "ApexCatch-v0"
    cfg.learner.target_update = 1000
    for k, v in learner.items():
        setattr(cfg.learner, k, v)
    return cfg


def make_batch(seed: int = 0, n: int = B, num_actions: int = 3) -> SampleBatch:
    rng = np.random.default_rng(seed)
    batch = SampleBatch(
        obs=rng.integers(0, 256, (n, 4, 84, 84), dtype=np.uint8),
        next_obs=rng.integers(0, 256, (n, 4, 84, 84), dtype=np.uint8),
        actions=rng.integers(0, num_actions, n).astype(np.int64),
        returns=rng.normal(size=n).astype(np.float32),
        discounts=np.where(np.arange(n) % 3 == 0, 0.0, 0.99**3).astype(np.float32),
        weights=rng.uniform(0.2, 1.0, n).astype(np.float32),
        keys=np.arange(n, dtype=np.int64),
    )
    batch.validate()
    return batch


def huber(x: np.ndarray) -> np.ndarray:
    return np.where(np.abs(x) <= 1.0, 0.5 * x * x, np.abs(x) - 0.5)


@pytest.mark.parametrize("double", [True, False])
def test_step_gives_hand_computed_target_and_loss(double: bool) -> None:
    learner = Learner(make_cfg(double=double), num_actions=3, device="cpu")
    # make online and target differ so that double and plain targets differ
    with torch.no_grad():
        for p in learner.target.parameters():
            p.mul_(1.5)
    online, target = copy.deepcopy(learner.online), copy.deepcopy(learner.target)
    batch = make_batch()
    with torch.no_grad():
        q = online(torch.from_numpy(batch.obs)).numpy().astype(np.float64)
        on_next = online(torch.from_numpy(batch.next_obs)).numpy().astype(np.float64)
        tg_next = target(torch.from_numpy(batch.next_obs)).numpy().astype(np.float64)
    rows = np.arange(B)
    if double:
        bootstrap = tg_next[rows, on_next.argmax(axis=1)]
    else:
        bootstrap = tg_next.max(axis=1)
    g = batch.returns + batch.discounts * bootstrap
    td = q[rows, batch.actions] - g
    expected_loss = float(np.mean(batch.weights * huber(td)))

    out = learner.step(batch)

    assert out["loss"] == pytest.approx(expected_loss, rel=1e-4)
    assert out["q_mean"] == pytest.approx(q[rows, batch.actions].mean(), rel=1e-4)
    assert out["priorities"].dtype == np.float32 and out["priorities"].shape == (B,)
    np.testing.assert_allclose(out["priorities"], np.abs(td), rtol=1e-4, atol=1e-5)
    assert out["td_abs_mean"] == pytest.approx(np.abs(td).mean(), rel=1e-4)
    assert out["updates"] == learner.updates == 1
    # online moved, target untouched (target_update = 1000)
    changed = [
        not torch.equal(a, b)
        for a, b in zip(learner.online.parameters(), online.parameters(), strict=True)
    ]
    assert all(changed)
    for a, b in zip(learner.target.parameters(), target.parameters(), strict=True):
        assert torch.equal(a, b)


def test_double_and_plain_targets_differ_on_the_same_batch() -> None:
    losses = []
    for double in (True, False):
        learner = Learner(make_cfg(double=double), 3, "cpu")
        with torch.no_grad():
            for p in learner.target.parameters():
                p.mul_(1.5)
        losses.append(learner.step(make_batch())["loss"])
    assert losses[0] != pytest.approx(losses[1], rel=1e-6)


def test_target_copied_every_target_update() -> None:
    learner = Learner(make_cfg(target_update=2), 3, "cpu")
    before = copy.deepcopy(learner.target.state_dict())
    learner.step(make_batch(1))
    assert all(torch.equal(before[k], v) for k, v in learner.target.state_dict().items())
    learner.step(make_batch(2))
    online = learner.online.state_dict()
    assert all(torch.equal(online[k], v) for k, v in learner.target.state_dict().items())
    assert not all(torch.equal(before[k], v) for k, v in learner.target.state_dict().items())


def test_optimizers_follow_the_config() -> None:
    adam = Learner(make_cfg(), 3, "cpu").optimizer
    assert isinstance(adam, torch.optim.Adam)
    assert adam.defaults["lr"] == pytest.approx(1e-4) and adam.defaults["eps"] == 1.5e-4
    rms = Learner(make_cfg(optimizer="rmsprop"), 3, "cpu").optimizer
    assert isinstance(rms, torch.optim.RMSprop)
    assert rms.defaults["lr"] == pytest.approx(0.00025 / 4)
    assert rms.defaults["centered"] is True and rms.defaults["eps"] == 1.5e-7


def test_gradient_norm_is_clipped() -> None:
    learner = Learner(make_cfg(grad_clip=1e-3, optimizer="rmsprop"), 3, "cpu")
    batch = make_batch()
    batch.returns[:] = 100.0  # large errors: grad norm far above the clip
    out = learner.step(batch)
    assert out["grad_norm"] > 1e-3
    total = torch.sqrt(sum((p.grad**2).sum() for p in learner.online.parameters()))
    assert total.item() == pytest.approx(1e-3, rel=1e-3)


def test_get_weights_matches_online_net_and_dueling_shapes() -> None:
    learner = Learner(make_cfg(dueling=True), 5, "cpu")
    w = learner.get_weights()
    assert w["advantage.2.weight"].shape == (5, 512) and w["value.2.weight"].shape == (1, 512)
    assert all(v.dtype == np.float32 for v in w.values())
    state = learner.online.state_dict()
    assert set(w) == set(state)
    np.testing.assert_array_equal(w["torso.0.weight"], state["torso.0.weight"].numpy())
