"""The network the value and attribution estimators read: the live policy, or a lagged frozen copy."""

from __future__ import annotations

import copy

from rredcot.ui import note


class Critic:
    """The network the value and attribution estimators read (PolicyContext.model): the live policy, or
    with train.critic_lag=N a frozen copy refreshed from it every N steps (so the policy cannot move its
    own critic within a step's reach). Monte Carlo continuations still come from the rollout backend."""

    def __init__(self, policy, lag: int, start_step: int = 0):
        self.policy, self.lag = policy, lag
        self.model = copy.deepcopy(policy).requires_grad_(False).eval() if lag else policy
        if lag and start_step % lag:
            note(
                f"train.critic_lag={lag}: resumed at step {start_step}, the critic restarts from these weights, not "
                f"from step {start_step - start_step % lag} as the uninterrupted run's would."
            )

    def after_step(self, step: int) -> None:
        if self.lag and step % self.lag == 0:
            self.model.load_state_dict(self.policy.state_dict())
