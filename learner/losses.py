"""The DQN maths: n-step (Double) DQN targets and the importance-weighted Huber loss.

Pure functions on explicit tensors; nothing here knows about replay, devices or
optimizers.

    n-step Double DQN target (van Hasselt et al. 2016; Ape-X, Horgan et al. 2018):

        a*  = argmax_a Q_online(s_{t+n}, a)
        G_t = R_t^(n) + d_t * Q_target(s_{t+n}, a*)

    with R_t^(n) = sum_{k<n} gamma^k r_{t+k} (clipped rewards) and the discount
    d_t = gamma^n, or 0 when the episode terminated within the n steps (no
    bootstrap). Plain DQN (``double=False``) uses max_a Q_target(s_{t+n}, a).

    loss = mean_i( w_i * huber(Q_online(s_t, a_t)_i - G_t,i) )

with w_i the prioritized-replay importance weights (max 1) and Huber with
delta 1 (the gradient of each error is clipped to [-1, 1], Mnih et al. 2015).
Only the taken action's Q-value enters the loss; the other actions get no
gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def td_targets(
    online_next_q: torch.Tensor,
    target_next_q: torch.Tensor,
    returns: torch.Tensor,
    discounts: torch.Tensor,
    double: bool = True,
) -> torch.Tensor:
    """n-step (Double) DQN targets ``float32[B]``, without gradient.

    online_next_q: float[B, A]  Q_online(s_{t+n}, .)  (picks the action when double)
    target_next_q: float[B, A]  Q_target(s_{t+n}, .)  (evaluates it)
    returns:       float[B]     R_t^(n)
    discounts:     float[B]     gamma^n, 0 at terminal
    """
    with torch.no_grad():
        target_next_q = target_next_q.float()
        if double:
            best = online_next_q.float().argmax(dim=1, keepdim=True)
            next_value = target_next_q.gather(1, best).squeeze(1)
        else:
            next_value = target_next_q.max(dim=1).values
        return returns.float() + discounts.float() * next_value


def dqn_loss(
    q: torch.Tensor, actions: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Importance-weighted Huber loss on the taken actions.

    q:       float[B, A]  Q_online(s_t, .)
    actions: int64[B]     a_t
    targets: float[B]     G_t (from `td_targets`; treated as constants)
    weights: float[B]     importance weights
    Returns ``(loss: float[] scalar with gradient, td_abs: float32[B] |Q(s_t,a_t) - G_t|
    detached)``; ``td_abs`` is the new replay priority.
    """
    q_taken = q.float().gather(1, actions.long().unsqueeze(1)).squeeze(1)
    targets = targets.detach().float()
    per_row = F.huber_loss(q_taken, targets, reduction="none", delta=1.0)
    loss = (weights.float() * per_row).mean()
    return loss, (q_taken - targets).detach().abs()
