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
    cfg.learner.learner_dtype = "float32"  # hand-computed float32 references below
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
    assert rms.defaults["centered"] is True
    # TF's 1.5e-7 sits inside the square root, torch's eps outside: sqrt(1.5e-7)
    assert rms.defaults["eps"] == pytest.approx(3.873e-4, rel=1e-3)


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


def test_bfloat16_learner_keeps_q_values_and_td_errors_in_float32() -> None:
    """Under bf16 autocast (the torso), Q-values near 20 still resolve TD errors of
    1e-3: bf16 would round them to steps of 0.125 there."""
    learner = Learner(make_cfg(learner_dtype="bfloat16"), 3, "cpu")
    assert learner.dtype == "bfloat16" and "--learner-dtype" in learner.dtype_reason
    with torch.no_grad():  # Q around 20, nearly independent of the input
        learner.online.value[2].bias.fill_(20.0)
        learner.online.value[2].weight.mul_(0.01)
        learner.online.advantage[2].weight.mul_(0.01)
    online = copy.deepcopy(learner.online)
    batch = make_batch(3)
    batch.discounts[:] = 0.0  # targets = returns: TD errors are Q(s, a) - R
    with torch.no_grad():  # the all-float32 reference
        q = online(torch.from_numpy(batch.obs)).numpy().astype(np.float64)
    q_taken = q[np.arange(B), batch.actions]
    assert 19.0 < q_taken.min() and q_taken.max() < 21.0
    offsets = np.linspace(1e-3, 8e-3, B)
    batch.returns = (q_taken - offsets).astype(np.float32)
    out = learner.step(batch)
    # the bf16 torso perturbs Q by far less than 1e-3 here (head weights scaled by 0.01)
    want = np.abs(q_taken - batch.returns.astype(np.float64))
    np.testing.assert_allclose(out["priorities"], want, atol=3e-4)
    assert len(np.unique(out["priorities"])) == B  # no two rounded onto one bf16 step
    assert out["q_mean"] == pytest.approx(q_taken.mean(), abs=3e-4)


def test_auto_dtype_probes_both_and_says_why() -> None:
    learner = Learner(make_cfg(learner_dtype="auto", batch_size=8), 3, "cpu")
    assert learner.dtype in ("float32", "bfloat16")
    assert learner.dtype_reason.startswith("auto: bfloat16 ")
    before = copy.deepcopy(learner.online.state_dict())
    times = learner.probe_dtype(8, reps=1)
    assert set(times) == {"float32", "bfloat16"} and min(times.values()) > 0
    # the probe changes nothing: same parameters, no gradients left behind
    assert all(torch.equal(before[k], v) for k, v in learner.online.state_dict().items())
    assert all(p.grad is None for p in learner.online.parameters())
