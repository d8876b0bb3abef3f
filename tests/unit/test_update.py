"""GRPO formulas on hand-sized tensors; the arithmetic is in the comments."""

import math

import pytest
import torch

from rredcot.advantages import frac_zero_std, group_advantages
from rredcot.losses import agg_dapo, clip_stats, per_token_terms, policy_loss

NAN = float("nan")


def test_group_advantages_group_scale_uses_bessel_std():
    # group 1: [1, 0] mean .5, Bessel std sqrt(((.5)^2 + (.5)^2) / 1) = .70711 -> +-.5 / (.70711 + 1e-4)
    # group 2: [1, 1] mean 1, std 0 -> 0 / (0 + 1e-4) = 0
    adv = group_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), group_size=2)
    expect = 0.5 / (math.sqrt(0.5) + 1e-4)
    assert torch.allclose(adv, torch.tensor([expect, -expect, 0.0, 0.0]), atol=1e-6)


def test_group_advantages_three_per_group():
    # [1, 0, 0]: mean 1/3; deviations [2/3, -1/3, -1/3]; Bessel var (4/9 + 1/9 + 1/9) / 2 = 1/3; std .57735
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0]), group_size=3)
    std = math.sqrt(1 / 3) + 1e-4
    assert torch.allclose(adv, torch.tensor([2 / 3 / std, -1 / 3 / std, -1 / 3 / std]), atol=1e-6)


def test_group_advantages_none_is_dr_grpo():
    # scale none: r - group mean only: [1, 0] -> [.5, -.5]; [.5, .5] -> [0, 0]
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.5, 0.5]), 2, scale="none")
    assert torch.allclose(adv, torch.tensor([0.5, -0.5, 0.0, 0.0]))


def test_group_advantages_batch_scale_uses_whole_batch_std():
    # group means [.5, 1]; batch std of [1, 0, 1, 1] (Bessel): mean .75, var (3 * .0625 + .5625) / 3 = .25 -> .5
    adv = group_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), 2, scale="batch")
    assert torch.allclose(adv, torch.tensor([0.5, -0.5, 0.0, 0.0]) / (0.5 + 1e-4), atol=1e-6)


def test_group_advantages_undefined_rewards_get_zero_and_leave_the_stats():
    # group [1, nan, 0]: stats over [1, 0] only -> +-.5 / (.70711 + 1e-4); the NaN row gets 0
    adv = group_advantages(torch.tensor([1.0, NAN, 0.0]), 3)
    e = 0.5 / (math.sqrt(0.5) + 1e-4)
    assert torch.allclose(adv, torch.tensor([e, 0.0, -e]), atol=1e-6)


def test_group_advantages_rejects_partial_groups():
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(torch.zeros(5), 2)


def test_frac_zero_std():
    assert frac_zero_std(torch.tensor([1.0, 1.0, 0.0, 1.0]), 2) == 0.5


def test_unclipped_loss_is_minus_advantage_when_ratio_is_one():
    # rho = exp(0) = 1: -min(1 * A, 1 * A) = -A on every token. A = [2, -1]
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.5]])
    loss, rho, kl = per_token_terms(logp, logp.clone(), torch.tensor([2.0, -1.0]))
    assert torch.allclose(loss, torch.tensor([[-2.0, -2.0], [1.0, 1.0]]))
    assert torch.allclose(rho, torch.ones(2, 2)) and kl is None


def test_clipping_takes_the_pessimistic_side():
    # rho = 1.5. A = +1: -min(1.5, clip(1.5, .8, 1.2) = 1.2) = -1.2 (clipped, no gradient through rho)
    #            A = -1: -min(-1.5, -1.2) = 1.5 (unclipped: the pessimistic bound keeps the gradient)
    old = torch.zeros(2, 1)
    logp = torch.full((2, 1), math.log(1.5))
    loss, _, _ = per_token_terms(logp, old, torch.tensor([1.0, -1.0]), eps_low=0.2, eps_high=0.2)
    assert torch.allclose(loss, torch.tensor([[-1.2], [1.5]]), atol=1e-6)


def test_eps_high_differs_from_eps_low():
    # rho = 1.25 with A = +1: eps_high .28 -> clip(1.25, .8, 1.28) = 1.25 -> -1.25 (inside the range)
    logp = torch.full((1, 1), math.log(1.25))
    loss, _, _ = per_token_terms(logp, torch.zeros(1, 1), torch.tensor([1.0]), eps_low=0.2, eps_high=0.28)
    assert torch.allclose(loss, torch.tensor([[-1.25]]), atol=1e-6)


def test_k3_kl_term():
    # delta = ref - logp = .1: k3 = e^.1 - .1 - 1 = .0051709; beta .5 -> + .0025855 on top of -A = -1
    logp = torch.zeros(1, 1)
    loss, _, kl = per_token_terms(logp, logp, torch.tensor([1.0]), beta=0.5, ref_logp=torch.full((1, 1), 0.1))
    assert torch.allclose(kl, torch.tensor([[math.exp(0.1) - 1.1]]), atol=1e-7)
    assert torch.allclose(loss, torch.tensor([[-1 + 0.5 * (math.exp(0.1) - 1.1)]]), atol=1e-7)


# Two rows: per-token losses [[1, 2, 3], [4, 5, 6]] (A = -1 with rho = 1 makes loss = token value... we build
# them directly through advantages), mask [[1, 1, 0], [1, 0, 0]]: row 1 has 2 tokens, row 2 has 1.
LOGP = torch.zeros(2, 3)
ADV = -torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])  # rho = 1 -> per-token loss = -A = [[1,2,3],[4,5,6]]
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


@pytest.mark.parametrize(
    "loss_type, expect",
    [
        ("grpo", ((1 + 2) / 2 + 4 / 1) / 2),  # mean of row means: (1.5 + 4) / 2 = 2.75
        ("bnpo", (1 + 2 + 4) / 3),  # token mean: 7 / 3
        ("dr_grpo", (1 + 2 + 4) / (2 * 10)),  # sum / (B * max_completion_length=10) = 7 / 20
        ("dapo", (1 + 2 + 4) / 3),  # sum / active tokens of the batch given = 7 / 3
    ],
)
def test_loss_types(loss_type, expect):
    loss = policy_loss(LOGP, LOGP, ADV, MASK, loss_type=loss_type, max_completion_length=10)
    assert loss.item() == pytest.approx(expect)


def test_dapo_normaliser_is_the_whole_batch_when_given():
    # the micro-batch holds 3 active tokens, the generation batch 12: 7 / 12
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    assert agg_dapo(per_token, MASK, num_items=12).item() == pytest.approx(7 / 12)


def test_unknown_loss_type_lists_the_valid_ones():
    from rredcot.errors import UserError

    with pytest.raises(UserError, match="bnpo, cispo, dapo, dr_grpo, grpo, luspo, sapo, vespo"):
        policy_loss(LOGP, LOGP, ADV, MASK, loss_type="ppo")


def test_gradient_is_not_zero_when_loss_is_near_zero():
    # num_iterations=1: old = logp.detach(), rho = 1; with advantages [1, -1] the loss is (-1 + 1) / 2 = 0,
    # but d loss / d logp = -A * rho / 2 = [-.5, .5] per token.
    logp = torch.zeros(2, 1, requires_grad=True)
    loss = policy_loss(logp, logp.detach(), torch.tensor([1.0, -1.0]), torch.ones(2, 1), loss_type="bnpo")
    loss.backward()
    assert loss.item() == pytest.approx(0.0)
    assert torch.allclose(logp.grad, torch.tensor([[-0.5], [0.5]]))


def test_clip_stats():
    # rho [.5, 1.5, 1.5, 1.0], A [-1, 1, -1, 1]: low-clipped (rho < .8, A < 0): token 0;
    # high (rho > 1.2, A > 0): token 1
    rho = torch.tensor([[0.5, 1.5, 1.5, 1.0]])
    adv = torch.tensor([[-1.0, 1.0, -1.0, 1.0]])
    s = clip_stats(rho, adv, torch.ones(1, 4), 0.2, 0.2)
    assert s == {"clip_ratio/low_mean": 0.25, "clip_ratio/high_mean": 0.25, "clip_ratio/region_mean": 0.5}


def test_gradient_checkpointing_recomputes_activations_and_gives_the_same_gradients(tiny_model):
    """update.gradient_checkpointing: the same gradients, and the layers really run again in backward."""
    from rredcot.logprobs import completion_logprobs
    from rredcot.optim import enable_checkpointing
    from rredcot.optim import grad_mode as _grad_mode

    model, _ = tiny_model
    ids = torch.randint(3, 20, (2, 12), generator=torch.Generator().manual_seed(0))
    ones = torch.ones_like(ids)

    def grads():
        model.zero_grad(set_to_none=True)
        with _grad_mode(model):
            logp, _ = completion_logprobs(model, ids[:, :4], ones[:, :4], ids[:, 4:], ones[:, 4:])
        logp.sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    calls = []
    model.model.layers[0].self_attn.register_forward_pre_hook(lambda *a: calls.append(1))
    plain = grads()
    assert len(calls) == 1
    enable_checkpointing(model)
    calls.clear()
    checkpointed = grads()
    assert len(calls) == 2  # forward, then again in backward
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, checkpointed))
    assert not model.training  # probes and rollouts (KV caches) still see an eval-mode model


def test_autocast_computes_in_bf16_keeps_fp32_weights_and_fp32_logprobs(tiny_model):
    """update.autocast=bfloat16: the forward runs in bf16 (close to fp32), the weights and their
    gradients stay fp32, and the log-probs come out fp32."""
    from rredcot.logprobs import completion_logprobs
    from rredcot.optim import grad_mode as _grad_mode

    model, _ = tiny_model
    ids = torch.randint(3, 20, (2, 12), generator=torch.Generator().manual_seed(0))
    ones = torch.ones_like(ids)
    ref, _ = completion_logprobs(model, ids[:, :4], ones[:, :4], ids[:, 4:], ones[:, 4:])
    with _grad_mode(model, "bfloat16"):
        logp, _ = completion_logprobs(model, ids[:, :4], ones[:, :4], ids[:, 4:], ones[:, 4:])
    logp.sum().backward()
    assert logp.dtype == torch.float32 and not torch.equal(logp, ref)  # computed in bf16 ...
    assert torch.allclose(logp, ref, atol=0.1)  # ... close to fp32
    assert all(
        p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None
    )


def test_compile_wraps_each_layer_in_place_and_keeps_checkpoint_names(tiny_model):
    """update.compile=true: every decoder layer compiled in place (no run here: compiling takes ~30 s on CPU,
    see the slow test); parameter names, hence checkpoints, unchanged; a model without layers is refused."""
    from rredcot.errors import UserError
    from rredcot.optim import compile_layers

    model, _ = tiny_model
    names = list(model.state_dict())
    assert compile_layers(model) == 2
    assert all(layer._compiled_call_impl is not None for layer in model.model.layers)
    assert list(model.state_dict()) == names
    with pytest.raises(UserError, match="update.compile=false"):
        compile_layers(torch.nn.Linear(2, 2))


@pytest.mark.slow
def test_compiled_layers_give_the_eager_log_probs_gradients_and_samples(tiny_model):
    from rredcot.logprobs import completion_logprobs
    from rredcot.optim import compile_layers
    from rredcot.stages.rollout import sample_rollout
    from rredcot.types import Sample

    model, tok = tiny_model
    samples = [Sample("a=1, b=a+2. b=?\n", "3"), Sample("x=10, y=x*2. y=?\n", "20")]

    def run():
        torch.manual_seed(0)
        ro = sample_rollout(model, tok, samples, group_size=3, max_new_tokens=16)
        model.zero_grad(set_to_none=True)
        logp, _ = completion_logprobs(model, ro.prompt_ids, ro.prompt_mask, ro.completion_ids, ro.completion_mask)
        (logp * ro.completion_mask).sum().backward()
        return ro.completion_ids, logp.detach(), [p.grad.clone() for p in model.parameters()]

    eager = run()
    compile_layers(model)
    compiled = run()
    assert torch.equal(eager[0], compiled[0])
    assert torch.allclose(eager[1], compiled[1], atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(eager[2], compiled[2]))


def test_advantage_by_group_splits_the_token_mean_by_group_type():
    from rredcot.advantages import advantage_by_group

    # G=2: group 0 (right, right), group 1 (right, wrong), group 2 (wrong, wrong); 2 active tokens per row
    # except the last row (1 token). Advantages per token: .5 | .25, -.25 | .1 (all-wrong: no baseline pushes it)
    adv = torch.tensor([[0.5, 0.5], [0.5, 0.5], [0.25, 0.25], [-0.25, -0.25], [0.1, 0.1], [0.1, 0.0]])
    mask = torch.tensor([[1, 1], [1, 1], [1, 1], [1, 1], [1, 1], [1, 0]])
    correct = torch.tensor([True, True, True, False, False, False])
    out = advantage_by_group(adv, mask, correct, 2)
    # 11 active tokens; all right: 4 * .5 = 2; mixed: .5 - .5 = 0; all wrong: .2 + .1 = .3
    assert out["advantage/mass_all_right"] == pytest.approx(2 / 11)
    assert out["advantage/mass_mixed"] == pytest.approx(0.0)
    assert out["advantage/mass_all_wrong"] == pytest.approx(0.3 / 11)
    assert out["advantage/token_mean"] == pytest.approx(2.3 / 11)
    assert (
        out["groups/frac_all_right"] == out["groups/frac_mixed"] == out["groups/frac_all_wrong"] == pytest.approx(1 / 3)
    )


def test_a_lagged_critic_is_a_frozen_copy_refreshed_every_n_steps(tiny_model):
    from rredcot.critic import Critic

    model, _ = tiny_model
    assert Critic(model, 0).model is model  # no lag: the live policy
    critic = Critic(model, 2)
    w = next(model.parameters())
    with torch.no_grad():
        w.add_(1.0)  # step 1 trains the policy ...
    critic.after_step(1)
    assert not torch.equal(next(critic.model.parameters()), w)  # ... the critic is still the old one
    critic.after_step(2)
    assert torch.equal(next(critic.model.parameters()), w)  # refreshed at step 2
    assert not any(p.requires_grad for p in critic.model.parameters())
