"""Every TRL 1.16 loss option we have, against TRL's own formulas on hand-sized tensors.

The reference functions below are TRL 1.16.0's code (trl/trainer/grpo_trainer.py), copied with `self.` and
`self.args.` turned into the `a` namespace and the vLLM / entropy / logging branches this comparison does not
use left out; nothing else is changed. One micro-batch on one process with one accumulation step, so TRL's
normalizers reduce to ours (num_items_in_batch = the micro-batch's active tokens)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from rredcot.losses import policy_loss
from rredcot.registry import entry
from rredcot.surrogates import Surrogate, per_token_terms, sampler_correction

# ---- TRL 1.16.0, trl/trainer/grpo_trainer.py ------------------------------------------------------------------


def trl_get_off_policy_mask(advantages, per_token_logps, sampling_per_token_logps, mask, off_policy_threshold):
    # GRPOTrainer.get_off_policy_mask
    kl_div = sampling_per_token_logps - per_token_logps.detach()
    kl_div = torch.nan_to_num(kl_div, nan=0.0)
    seq_kl_sum = (kl_div * mask).sum(dim=1, keepdim=True)
    avg_seq_kl = seq_kl_sum / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
    is_pos_adv = advantages >= 0
    is_low_kl = avg_seq_kl <= off_policy_threshold
    return (is_pos_adv | is_low_kl).to(dtype=mask.dtype)


@torch.no_grad()
def trl_get_gamma_weights(
    advantages, log_ratio_per_token, mask, importance_sampling_ratio, k_pos, lambda_pos, k_neg, lambda_neg
):
    # GRPOTrainer.get_gamma_weights
    lower_clamp = math.log(1e-8)
    log_ratio_clamped = torch.clamp(log_ratio_per_token, -20.0, 20.0)
    seq_log_ratio = torch.sum(log_ratio_clamped * mask, dim=-1, keepdim=True)
    if importance_sampling_ratio is not None:
        log_is_ratio = torch.clamp(torch.log(importance_sampling_ratio), lower_clamp, 20.0)
        seq_log_ratio += torch.sum(log_is_ratio, dim=-1, keepdim=True)
    log_w_seq = torch.clamp(seq_log_ratio, lower_clamp, 20.0)
    w_seq = torch.exp(log_w_seq)
    is_nonneg_adv = advantages >= 0
    k_seq = torch.where(is_nonneg_adv, k_pos, k_neg)
    lambda_seq = torch.where(is_nonneg_adv, lambda_pos, lambda_neg).clamp(min=1e-4)
    log_phi = lambda_seq + k_seq * log_w_seq - lambda_seq * w_seq
    phi_seq = torch.exp(log_phi).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    return phi_seq


def trl_compute_loss(a, per_token_logps, old_per_token_logps, advantages, mask, inputs):
    # GRPOTrainer._compute_loss, from "Compute the loss" to the loss types' aggregation (mode "train",
    # current_gradient_accumulation_steps = 1, num_processes = 1, steps_per_generation = 1)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    if a.off_policy_mask_threshold is not None:
        sampling_per_token_logps = inputs.get("sampling_per_token_logps", old_per_token_logps)
        off_policy_mask = trl_get_off_policy_mask(
            advantages, per_token_logps, sampling_per_token_logps, mask, a.off_policy_mask_threshold
        )
    log_ratio = per_token_logps - old_per_token_logps
    if a.importance_sampling_level == "token":
        log_importance_weights = log_ratio
    elif a.importance_sampling_level == "sequence":
        log_importance_weights = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        log_importance_weights = log_importance_weights.unsqueeze(-1)
    coef_1 = torch.exp(log_importance_weights)
    if a.beta != 0.0:
        ref_per_token_logps = inputs["ref_per_token_logps"]
        per_token_kl = torch.exp(ref_per_token_logps - per_token_logps) - (ref_per_token_logps - per_token_logps) - 1
        if a.use_bias_correction_kl:
            per_token_kl = per_token_kl * coef_1
    if a.loss_type == "cispo":
        clamped_ratios = torch.clamp(coef_1, max=a.epsilon_high).detach()
        per_token_loss = -clamped_ratios * advantages * per_token_logps
    elif a.loss_type in ["grpo", "bnpo", "dr_grpo", "dapo", "luspo"]:
        coef_2 = torch.clamp(coef_1, 1 - a.epsilon_low, 1 + a.epsilon_high)
        if a.delta is not None:
            coef_1 = torch.clamp(coef_1, max=a.delta)
        per_token_loss1 = coef_1 * advantages
        per_token_loss2 = coef_2 * advantages
        per_token_loss = -torch.min(per_token_loss1, per_token_loss2)
    elif a.loss_type == "sapo":
        temperatures = torch.where(advantages > 0, a.sapo_temperature_pos, a.sapo_temperature_neg)
        soft_coef_1 = torch.sigmoid(temperatures * (coef_1 - 1)) * 4 / temperatures
        per_token_loss = -soft_coef_1 * advantages
    elif a.loss_type == "vespo":
        phi_seq = trl_get_gamma_weights(
            advantages,
            log_ratio,
            mask,
            inputs.get("importance_sampling_ratio"),
            a.vespo_k_pos,
            a.vespo_lambda_pos,
            a.vespo_k_neg,
            a.vespo_lambda_neg,
        )
        per_token_loss = -phi_seq * advantages * per_token_logps
    if a.off_policy_mask_threshold is not None:
        per_token_loss = per_token_loss * off_policy_mask
    if a.use_vllm and a.vllm_importance_sampling_correction and a.loss_type != "vespo":
        per_token_loss = per_token_loss * inputs["importance_sampling_ratio"]
    if a.beta != 0.0:
        per_token_loss = per_token_loss + a.beta * per_token_kl
    if a.loss_type in ["grpo", "sapo"]:
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif a.loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    elif a.loss_type == "dr_grpo":
        loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * a.max_completion_length)
    elif a.loss_type in ["cispo", "dapo", "vespo"]:
        normalizer = inputs["num_items_in_batch"].clamp(min=1.0)
        loss = (per_token_loss * mask).sum() / normalizer
    elif a.loss_type == "luspo":
        loss = (per_token_loss * mask).sum(-1).mean()
    return loss


def trl_vllm_importance_sampling_ratio(a, old_per_token_logps, sampling_per_token_logps, mask):
    # GRPOTrainer._generate_and_score_completions, "Compute the importance sampling ratio when using vLLM"
    per_token_logps_diff = (old_per_token_logps - sampling_per_token_logps) * mask
    per_token_logps_diff = torch.nan_to_num(per_token_logps_diff, nan=0.0)
    sequence_level_is = a.vllm_importance_sampling_mode in ["sequence_mask", "sequence_truncate"]
    if sequence_level_is:
        per_sequence_logps_diff = per_token_logps_diff.sum(dim=-1, keepdim=True)
        logps_diff = per_sequence_logps_diff
    else:
        logps_diff = per_token_logps_diff
    vllm_importance_sampling_ratio = torch.exp(logps_diff)
    if a.vllm_importance_sampling_mode in ["sequence_truncate", "token_truncate"]:
        vllm_importance_sampling_ratio = torch.clamp(
            vllm_importance_sampling_ratio,
            min=a.vllm_importance_sampling_clip_min,
            max=a.vllm_importance_sampling_clip_max,
        )
    elif a.vllm_importance_sampling_mode in ["sequence_mask", "token_mask"]:
        min_val = a.vllm_importance_sampling_clip_min if a.vllm_importance_sampling_clip_min is not None else -math.inf
        max_val = a.vllm_importance_sampling_clip_max if a.vllm_importance_sampling_clip_max is not None else math.inf
        invalid_mis_mask = (vllm_importance_sampling_ratio < min_val) | (vllm_importance_sampling_ratio > max_val)
        vllm_importance_sampling_ratio = vllm_importance_sampling_ratio.masked_fill(invalid_mis_mask, value=0.0)
    return vllm_importance_sampling_ratio


# ---- TRL 1.16.0's GRPOConfig defaults (trl/trainer/grpo_config.py) for the keys compared -----------------------

TRL_DEFAULTS = dict(
    beta=0.0,
    epsilon_low=0.2,
    epsilon_high=0.2,
    delta=None,
    importance_sampling_level="token",
    off_policy_mask_threshold=None,
    use_bias_correction_kl=True,
    sapo_temperature_pos=1.0,
    sapo_temperature_neg=1.05,
    vespo_k_pos=2.0,
    vespo_lambda_pos=3.0,
    vespo_k_neg=3.0,
    vespo_lambda_neg=2.0,
    use_vllm=False,
    vllm_importance_sampling_correction=True,
    max_completion_length=4,
)
# Our names for TRL's (update.*; Surrogate's fields): TRL name -> ours
OURS = {"epsilon_low": "eps_low", "epsilon_high": "eps_high", "importance_sampling_level": "level"}

# ---- hand-sized tensors: B = 3 rows, T = 4 tokens, the last row's last two tokens padding -------------------------
# old - new log ratios from -.6 to .7, so that ratios fall on both sides of 1 +- eps (and past delta = 1.5)
NEW = torch.tensor([[-1.0, -0.5, -2.0, -0.2], [-0.3, -1.2, -0.8, -1.5], [-0.9, -0.1, -3.0, -0.4]])
# row 2 (A < 0): a ratio past delta, and a mean KL (old - new: .0875) past the off-policy threshold .05
OLD = NEW - torch.tensor([[0.3, -0.6, 0.05, 0.7], [-0.3, -0.2, -0.45, 0.6], [0.5, -0.35, 9.0, 9.0]])
# old - sampler sums per row .5, .05, .95: sequence ratios 1.65, 1.05, 2.59 (one inside [.9, 1.1], two outside)
SAMPLER = OLD - torch.tensor([[0.2, -0.1, 0.4, 0.0], [-0.5, 0.3, 0.1, 0.15], [0.05, 0.9, 5.0, 5.0]])
REF = NEW + 0.1 * torch.arange(12.0).view(3, 4) / 12
MASK = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
ADV_ROW = torch.tensor([1.5, -0.8, 0.0])  # GRPO's [B]
ADV_TOKEN = torch.tensor([[1.0, -0.5, 0.3, 2.0], [-1.0, -0.2, 0.4, -0.7], [0.6, -0.9, 0.0, 0.0]])  # token credit

LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "luspo", "sapo", "cispo", "vespo"]
OPTIONS = {
    "defaults": {},
    "sequence": {"importance_sampling_level": "sequence"},
    "delta": {"delta": 1.5},
    "asymmetric": {"epsilon_high": 0.28},
    "off_policy_mask": {"off_policy_mask_threshold": 0.05},
    "kl": {"beta": 0.1, "use_bias_correction_kl": False},
    "kl_bias_corrected": {"beta": 0.1, "use_bias_correction_kl": True},
    "sequence_kl_delta": {"importance_sampling_level": "sequence", "beta": 0.04, "delta": 1.3},
    "sapo_vespo_knobs": {"sapo_temperature_pos": 0.7, "sapo_temperature_neg": 1.4, "vespo_k_pos": 1.5},
}


def _trl_args(loss_type: str, **changes) -> SimpleNamespace:
    a = SimpleNamespace(**{**TRL_DEFAULTS, **changes, "loss_type": loss_type})
    if loss_type == "cispo" and "epsilon_high" not in changes:
        a.epsilon_high = 1.5  # cispo's cap of the ratio itself (we refuse eps_high <= 1): one that ratios here pass
    return a


def _ours(a: SimpleNamespace) -> Surrogate:
    keys = Surrogate.__dataclass_fields__
    return Surrogate(**{OURS.get(k, k): v for k, v in vars(a).items() if OURS.get(k, k) in keys})


def _both(loss_type: str, adv: torch.Tensor, changes: dict, is_weight=None, sampler=None):
    """(TRL's loss, its gradient, ours, its gradient) on the tensors above."""
    a = _trl_args(loss_type, **changes)
    inputs = {"ref_per_token_logps": REF, "num_items_in_batch": MASK.sum()}
    if is_weight is not None:
        a.use_vllm = True
        inputs.update(importance_sampling_ratio=is_weight, sampling_per_token_logps=sampler)
    out = []
    for fn in ("trl", "ours"):
        logp = NEW.clone().requires_grad_(True)
        if fn == "trl":
            loss = trl_compute_loss(a, logp, OLD, adv, MASK, inputs)
        else:
            e = entry("loss", loss_type)
            tok, _, _ = per_token_terms(
                logp,
                OLD,
                adv,
                ref_logp=REF,
                is_weight=is_weight,
                mask=MASK,
                surrogate=e.surrogate,
                options=_ours(a),
                sampler_logp=sampler,
            )
            loss = e.obj(tok, MASK, max_completion_length=a.max_completion_length, num_items=float(MASK.sum()))
        loss.backward()
        out += [loss.detach(), logp.grad]
    return out


@pytest.mark.parametrize("option", sorted(OPTIONS))
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("adv", [ADV_ROW, ADV_TOKEN], ids=["row_advantages", "token_advantages"])
def test_loss_and_gradient_are_trl_116s(loss_type, option, adv):
    trl, trl_grad, ours, our_grad = _both(loss_type, adv, OPTIONS[option])
    assert ours.item() == pytest.approx(trl.item(), rel=1e-6, abs=1e-7)
    assert torch.allclose(our_grad, trl_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
@pytest.mark.parametrize("clip", [(None, 3.0), (0.5, 1.2), (0.9, 1.1)], ids=["trl_default", "both", "narrow"])
def test_vllm_importance_weights_are_trl_116s(mode, clip):
    clip_min, clip_max = clip
    a = SimpleNamespace(
        vllm_importance_sampling_mode=mode,
        vllm_importance_sampling_clip_min=clip_min,
        vllm_importance_sampling_clip_max=clip_max,
    )
    trl = trl_vllm_importance_sampling_ratio(a, OLD, SAMPLER, MASK)
    ours, stats = sampler_correction(OLD, SAMPLER, MASK, cap=clip_max, mode=mode, cap_min=clip_min or 0.0)
    assert ours.shape == trl.shape == ((3, 1) if mode.startswith("sequence") else (3, 4))
    assert torch.allclose(ours, trl, rtol=1e-6)
    assert 0 <= stats["sampler/is_capped_frac"] <= 1


def test_the_weights_are_not_vacuous():
    # the narrow clip masks some sequences and keeps others (and truncation then moves some weights)
    ratio = torch.exp(((OLD - SAMPLER) * MASK).sum(-1))
    assert ((ratio < 0.9) | (ratio > 1.1)).any() and ((ratio >= 0.9) & (ratio <= 1.1)).any()


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_mask"])
@pytest.mark.parametrize("changes", [{}, {"off_policy_mask_threshold": 0.05}], ids=["plain", "off_policy_mask"])
def test_with_a_samplers_weights_the_loss_is_trl_116s(loss_type, mode, changes):
    """rollout=vllm: the weights multiply the surrogate (vespo: inside phi), the off-policy mask reads the
    sampler's log-probs. TRL refuses vespo with sequence modes; so do we (checks.py)."""
    if loss_type == "vespo" and mode.startswith("sequence"):
        pytest.skip("refused by TRL 1.16 and by our config check")
    a = SimpleNamespace(
        vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_min=None, vllm_importance_sampling_clip_max=3
    )
    w = trl_vllm_importance_sampling_ratio(a, OLD, SAMPLER, MASK)
    trl, trl_grad, ours, our_grad = _both(loss_type, ADV_ROW, changes, is_weight=w, sampler=SAMPLER)
    assert ours.item() == pytest.approx(trl.item(), rel=1e-6, abs=1e-7)
    assert torch.allclose(our_grad, trl_grad, rtol=1e-5, atol=1e-7)


def test_options_change_the_loss():
    """Not vacuous: each option moves the loss on these tensors (an option read nowhere would not)."""
    base = _both("dapo", ADV_ROW, {})[2]
    for option in ("sequence", "delta", "asymmetric", "off_policy_mask", "kl"):
        assert _both("dapo", ADV_ROW, OPTIONS[option])[2].item() != pytest.approx(base.item()), option
    kl, corrected = (_both("dapo", ADV_ROW, OPTIONS[k])[2] for k in ("kl", "kl_bias_corrected"))
    assert kl.item() != pytest.approx(corrected.item())


def test_hand_examples():
    one = torch.zeros(1, 1)
    # delta: rho = 3, A = -1: -min(3 * -1, 1.2 * -1) = 3; with delta 2: -min(-2, -1.2) = 2
    rho3 = torch.full((1, 1), math.log(3.0))
    assert per_token_terms(rho3, one, torch.tensor([-1.0]))[0].item() == pytest.approx(3.0)
    assert per_token_terms(rho3, one, torch.tensor([-1.0]), options=Surrogate(delta=2.0))[0].item() == pytest.approx(2)
    # GSPO: log ratios [.1, .3] (third token padding) -> one ratio exp(.2) for the row
    logp, mask = torch.tensor([[0.1, 0.3, 9.0]]), torch.tensor([[1.0, 1.0, 0.0]])
    _, rho, _ = per_token_terms(
        logp, torch.zeros(1, 3), torch.tensor([1.0]), mask=mask, options=Surrogate(level="sequence")
    )
    assert rho[0].tolist() == pytest.approx([math.exp(0.2)] * 3)
    # sapo at rho = 1: -sigmoid(0) * 4 / tau * A = -2 A / tau
    sapo = Surrogate(sapo_temperature_pos=0.5)
    assert per_token_terms(one, one, torch.tensor([1.0]), surrogate="sapo", options=sapo)[0].item() == pytest.approx(-4)
    # cispo: rho = 3 capped at 2, A = 1, log pi = log 3: -2 * log 3
    cispo = Surrogate(eps_high=2.0)
    assert per_token_terms(rho3, one, torch.tensor([1.0]), surrogate="cispo", options=cispo)[0].item() == pytest.approx(
        -2 * math.log(3.0)
    )
    # vespo at w = 1: phi = e^l * 1 * e^-l = 1, so the loss is -A log pi
    assert per_token_terms(rho3, rho3, torch.tensor([2.0]), surrogate="vespo")[0].item() == pytest.approx(
        -2 * math.log(3.0)
    )


def test_policy_loss_takes_the_entrys_surrogate():
    # sapo aggregates as grpo but gates softly: at rho = 1, -2 A / 1.0 for A > 0
    logp, mask = torch.zeros(2, 2), torch.ones(2, 2)
    assert policy_loss(logp, logp, torch.tensor([1.0, 1.0]), mask, loss_type="sapo").item() == pytest.approx(-2.0)
    assert policy_loss(logp, logp, torch.tensor([1.0, 1.0]), mask, loss_type="grpo").item() == pytest.approx(-1.0)
