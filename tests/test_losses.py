"""The DQN maths on tiny hand-made inputs (targets, loss, weights, dueling head)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.network import QNetwork
from learner.losses import dqn_loss, td_targets

GAMMA = 0.99

# online picks action 1 in row 0 (value 5) and action 0 in row 1; target evaluates
ONLINE_NEXT = torch.tensor([[1.0, 5.0, 2.0], [3.0, 0.0, 1.0], [0.0, 0.0, 4.0]])
TARGET_NEXT = torch.tensor([[10.0, 20.0, 30.0], [7.0, 8.0, 9.0], [1.0, 2.0, -3.0]])


@pytest.mark.parametrize(
    ("double", "expected"),
    [
        # row 0: 2-step, bootstraps Q_target(s', argmax online = 1) = 20 (double) or max 30
        # row 1: terminal within n steps: discount 0, no bootstrap
        # row 2: 3-step, double picks action 2 -> -3, plain takes max 2
        (True, [1.0 + GAMMA**2 * 20.0, 0.5, 0.25 + GAMMA**3 * -3.0]),
        (False, [1.0 + GAMMA**2 * 30.0, 0.5, 0.25 + GAMMA**3 * 2.0]),
    ],
)
def test_td_targets_double_and_plain(double: bool, expected: list[float]) -> None:
    returns = torch.tensor([1.0, 0.5, 0.25])
    discounts = torch.tensor([GAMMA**2, 0.0, GAMMA**3])
    got = td_targets(ONLINE_NEXT, TARGET_NEXT, returns, discounts, double=double)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)
    assert not got.requires_grad


def test_td_targets_carry_no_gradient() -> None:
    online = ONLINE_NEXT.clone().requires_grad_(True)
    target = TARGET_NEXT.clone().requires_grad_(True)
    got = td_targets(online, target, torch.zeros(3), torch.ones(3))
    assert not got.requires_grad


def test_nstep_return_and_discount_from_rewards() -> None:
    """The actors' real n-step code (`common.nstep.NStepAccumulator`) builds the
    return and discount that `td_targets` bootstraps from: rewards 1, 0, 1 over
    n=3 steps -> R = 1 + 0.99^2, discount 0.99^3; an episode that terminates
    after 2 steps -> R = 1 + 0.99 * 0.5, discount 0 (no bootstrap)."""
    from common.nstep import NStepAccumulator

    acc = NStepAccumulator(num_envs=1, n=3, gamma=GAMMA)
    stack = np.zeros((1, 4), np.int64)
    no = np.zeros(1, bool)
    out = None
    for t, reward in enumerate([1.0, 0.0, 1.0]):
        out = acc.add(stack + t, np.array([t % 2]), np.array([reward]), np.zeros(1, np.float32),
                      stack + t + 1, no, no)  # fmt: skip
    assert out is not None and len(out) == 1  # the window is full after n steps
    got = td_targets(
        torch.tensor([[0.0, 1.0]]),  # online argmax at s_{t+3}: action 1
        torch.tensor([[4.0, 2.0]]),
        torch.from_numpy(out.returns),
        torch.from_numpy(out.discounts),
    )
    assert got.item() == pytest.approx(1.0 + 0.9801 + 0.970299 * 2.0, rel=1e-6)

    acc = NStepAccumulator(num_envs=1, n=3, gamma=GAMMA)
    acc.add(stack, np.array([0]), np.array([1.0]), np.zeros(1, np.float32), stack + 1, no, no)
    out = acc.add(stack + 1, np.array([1]), np.array([0.5]), np.zeros(1, np.float32),
                  stack + 2, np.ones(1, bool), no)  # fmt: skip
    first = int(np.argmax(out.returns))  # the record from s_0: two rewards
    got = td_targets(
        torch.tensor([[0.0, 1.0]] * len(out)),
        torch.tensor([[4.0, 2.0]] * len(out)),
        torch.from_numpy(out.returns),
        torch.from_numpy(out.discounts),
    )
    assert got[first].item() == pytest.approx(1.0 + GAMMA * 0.5, rel=1e-6)
    assert out.discounts.tolist() == [0.0, 0.0]  # terminated: no bootstrap


def test_huber_loss_weighted_on_taken_action() -> None:
    q = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    actions = torch.tensor([1, 0])
    targets = torch.tensor([2.5, 0.0])
    weights = torch.tensor([1.0, 0.5])
    loss, td_abs = dqn_loss(q, actions, targets, weights)
    # errors: 2 - 2.5 = -0.5 (quadratic: 0.125), 3 - 0 = 3 (linear: 3 - 0.5 = 2.5)
    assert loss.item() == pytest.approx((1.0 * 0.125 + 0.5 * 2.5) / 2)
    np.testing.assert_allclose(td_abs.numpy(), [0.5, 3.0])
    loss.backward()
    # d/dq: row 0 = w * err / B = -0.25; row 1 = w * clip(err, 1) / B = 0.25
    np.testing.assert_allclose(q.grad.numpy(), [[0.0, -0.25], [0.25, 0.0]])


def test_zero_weight_row_contributes_no_gradient() -> None:
    torch.manual_seed(0)
    net = QNetwork(4, dueling=True)
    obs = torch.randint(0, 256, (2, 4, 84, 84), dtype=torch.uint8)
    actions = torch.tensor([2, 1])
    targets = torch.tensor([1.0, -3.0])

    loss, _ = dqn_loss(net(obs), actions, targets, torch.tensor([1.0, 0.0]))
    net.zero_grad()
    loss.backward()
    both = [p.grad.clone() for p in net.parameters()]

    loss_one, _ = dqn_loss(net(obs[:1]), actions[:1], targets[:1], torch.tensor([1.0]))
    net.zero_grad()
    loss_one.backward()
    # the mean runs over B = 2 rows: the zero-weight row only halves the average
    for g2, g1 in zip(both, net.parameters(), strict=True):
        torch.testing.assert_close(g2 * 2, g1.grad, rtol=1e-5, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in both)


@pytest.mark.parametrize("dueling", [True, False])
def test_network_output_shape_and_dueling_identity(dueling: bool) -> None:
    torch.manual_seed(1)
    net = QNetwork(6, dueling=dueling)
    obs = torch.randint(0, 256, (3, 4, 84, 84), dtype=torch.uint8)
    q = net(obs)
    assert q.shape == (3, 6) and q.dtype == torch.float32
    if dueling:  # Q = V + A - mean(A): the mean over actions is V
        value = net.value(net.torso(obs.float() / 255.0)).squeeze(1)
        torch.testing.assert_close(q.mean(dim=1), value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dueling", [True, False])
def test_output_layers_run_in_float32_under_bf16_autocast(dueling: bool) -> None:
    """The trunk may run in bf16; the output layers and the dueling sum must not:
    action gaps of 0.01 at Q = 20 survive (a bf16 output has steps of 0.125 there)."""
    torch.manual_seed(2)
    net = QNetwork(4, dueling=dueling)
    last = net.advantage[2] if dueling else net.head[2]
    with torch.no_grad():
        last.weight.mul_(1e-3)  # Q barely depends on the input...
        last.bias.copy_(torch.tensor([20.0, 20.01, 20.02, 19.99]))  # ...gaps of 0.01
        if dueling:
            net.value[2].weight.zero_()
            net.value[2].bias.zero_()
    seen: dict[str, torch.dtype] = {}
    for name, module in net.named_modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(lambda m, i, o, name=name: seen.update({name: o.dtype}))
    obs = torch.randint(0, 256, (5, 4, 84, 84), dtype=torch.uint8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        q = net(obs)
    assert q.dtype == torch.float32
    outputs = {"value.2", "advantage.2"} if dueling else {"head.2"}
    assert {n for n, d in seen.items() if d == torch.float32} == outputs
    assert {n for n, d in seen.items() if d == torch.bfloat16} == {n[:-1] + "0" for n in outputs}
    assert q.argmax(dim=1).tolist() == [2] * 5
    gaps = (q[:, 2] - q[:, 1]).numpy()
    np.testing.assert_allclose(gaps, 0.01, atol=2e-3)
    with torch.no_grad():  # float32 weights again: the same network in float32 agrees
        np.testing.assert_allclose(q.numpy(), net(obs).numpy(), atol=5e-3)


def test_set_trunk_dtype_keeps_the_output_layers_float32() -> None:
    net = QNetwork(3, dueling=True).set_trunk_dtype(torch.bfloat16)
    dtypes = {n: p.dtype for n, p in net.named_parameters()}
    assert {n for n, d in dtypes.items() if d == torch.float32} == {
        "value.2.weight", "value.2.bias", "advantage.2.weight", "advantage.2.bias"
    }  # fmt: skip
    q = net(torch.zeros(2, 4, 84, 84, dtype=torch.uint8))
    assert q.dtype == torch.float32 and q.shape == (2, 3)
