"""rollout=vllm through its interface: the importance correction's arithmetic, the install and version
messages, and the backend driving an engine (tests/fake_vllm.py stands in for vLLM on CPU): weight pushes
(LoRA merged), sleep/wake order, seeds, the trainer's re-scoring, the mismatch it logs."""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch
from omegaconf import OmegaConf

from rredcot.errors import UserError
from rredcot.losses import per_token_terms, sampler_correction
from rredcot.registry import get
from rredcot.stages.montecarlo import sample_from_ids
from rredcot.stages.rollout import sample_rollout
from rredcot.types import Sample

SAMPLES = [Sample("a=1, b=a+2. b=?\n", "3"), Sample("x=10, y=x*2. y=?\n", "20")]


def test_sampler_correction_example():
    # old -1.0 vs sampler -1.5: w = e^0.5 = 1.6487; old -1.0 vs sampler -2.0: e^1 = 2.718 capped at 2;
    # the third token is padding: out of the stats. |diff| mean = (.5 + 1) / 2 = .75, max 1.
    old = torch.tensor([[-1.0, -1.0, -3.0]])
    sampler = torch.tensor([[-1.5, -2.0, 0.0]])
    mask = torch.tensor([[1, 1, 0]])
    w, stats = sampler_correction(old, sampler, mask, cap=2.0)
    assert w[0, :2].tolist() == pytest.approx([math.exp(0.5), 2.0])
    assert stats["sampler/logp_diff_mean"] == pytest.approx(0.75) and stats["sampler/logp_diff_max"] == pytest.approx(
        1.0
    )
    assert stats["sampler/is_capped_frac"] == pytest.approx(0.5)
    assert stats["sampler/is_ratio_mean"] == pytest.approx((math.exp(0.5) + math.e) / 2)
    assert sampler_correction(old, sampler, mask, cap=0)[0] is None  # cap 0: measured, not corrected


def test_importance_weight_scales_the_surrogate_not_the_kl():
    # rho = 1, A = 2: surrogate -2, times w = .5 -> -1; the k3 KL (delta = .1: .00517) is added unweighted
    logp = torch.tensor([[-1.0]])
    loss, _, kl = per_token_terms(
        logp, logp, torch.tensor([2.0]), beta=1.0, ref_logp=logp + 0.1, is_weight=torch.tensor([[0.5]])
    )
    assert loss.item() == pytest.approx(-1.0 + kl.item()) and kl.item() == pytest.approx(math.exp(0.1) - 1.1, abs=1e-6)


def test_without_vllm_the_backend_says_how_to_install_it(monkeypatch):
    from rredcot.stages import vllm_backend

    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError, installed or not
    with pytest.raises(UserError, match=r"pip install 'rredcot\[vllm\]'.*rollout=sample"):
        vllm_backend._import_vllm()


def test_an_unsupported_vllm_version_is_named(monkeypatch):
    from rredcot.stages import vllm_backend

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(__version__="0.8.5"))
    with pytest.raises(UserError, match=r"supports vLLM >=0.10.2,<0.12; this environment has 0.8.5"):
        vllm_backend._import_vllm()


def _backend(model, tok, **opts):
    return get("rollout", "vllm")(model, tok, **{"chunk_size": 16, **opts})


def test_the_engine_samples_with_the_trainers_weights_and_sleeps_between(fake_vllm, tiny_model):
    model, tok = tiny_model
    backend = _backend(model, tok, gpu_memory_utilization=0.4)
    engine = fake_vllm.LLM.instances[0]
    assert engine.kwargs["gpu_memory_utilization"] == 0.4 and engine.kwargs["max_num_seqs"] == 16
    assert engine.kwargs["enable_sleep_mode"] and engine.kwargs["skip_tokenizer_init"]
    assert engine.kwargs["logprobs_mode"] == "processed_logprobs" and engine.kwargs["dtype"] == "float32"
    assert engine.calls == ["sleep1"]  # asleep until the first sample
    assert "distributed_executor_backend" not in engine.kwargs  # one process: vLLM's own default

    torch.manual_seed(0)
    ro = sample_rollout(backend, tok, SAMPLES, group_size=3, max_new_tokens=12, temperature=0.7)
    assert engine.calls[1:] == ["wake_up", "load_weights", "reset_prefix_cache", "generate"]
    assert ro.completion_ids.shape[0] == 6 and ro.sampler_logprobs is not None
    m = ro.completion_mask.bool()
    # the trainer re-scored the engine's tokens: same weights, so the same log-probs (float noise only)
    assert torch.allclose(ro.logprobs[m], ro.sampler_logprobs[m], atol=1e-4)
    assert (ro.entropies[m] > 0).all()
    assert ro.texts[0] == tok.decode(ro.completion_ids[0][m[0]].tolist(), skip_special_tokens=True)

    torch.manual_seed(0)  # the per-request seeds come from torch's generator: a seeded run repeats itself
    again = sample_rollout(backend, tok, SAMPLES, group_size=3, max_new_tokens=12, temperature=0.7)
    assert torch.equal(again.completion_ids, ro.completion_ids)
    assert engine.calls.count("load_weights") == 1  # nothing changed, nothing pushed

    with torch.no_grad():  # an optimizer step
        next(model.parameters()).add_(0.05)
    backend.sync(model)
    backend.sleep()
    sample_rollout(backend, tok, SAMPLES, group_size=2, max_new_tokens=8)
    assert engine.calls[-5:] == ["sleep1", "wake_up", "load_weights", "reset_prefix_cache", "generate"]
    for name, t in model.state_dict().items():
        assert torch.equal(engine.net.state_dict()[name], t), name


def test_monte_carlo_continuations_come_from_the_engine_within_each_budget(fake_vllm, tiny_model):
    model, tok = tiny_model
    backend = _backend(model, tok, sleep=False)
    engine = fake_vllm.LLM.instances[0]
    prefixes = [tok("a=1, b=a+2. b=?\n", add_special_tokens=False)["input_ids"]] * 2
    texts = sample_from_ids(backend, tok, prefixes, 3, [4, 9])
    assert len(texts) == 6 and "generate" in engine.calls and "sleep1" not in engine.calls
    assert all(len(tok(t, add_special_tokens=False)["input_ids"]) <= 4 for t in texts[:3])


def test_a_bf16_engine_mismatch_is_measured_and_capped(fake_vllm, tiny_model):
    from rredcot.stages.update import update_policy

    model, tok = tiny_model
    fake_vllm.LLM.dtype_override = torch.bfloat16  # the engine rounds the weights: its log-probs drift
    backend = _backend(model, tok)
    torch.manual_seed(1)
    ro = sample_rollout(backend, tok, SAMPLES, group_size=4, max_new_tokens=16)
    m = ro.completion_mask.bool()
    assert (ro.logprobs[m] - ro.sampler_logprobs[m]).abs().max() > 1e-3
    credit = types.SimpleNamespace(valid=torch.ones(8, dtype=torch.bool), advantages=torch.randn(8))
    cfg = OmegaConf.create(
        {
            "loss_type": "dapo",
            "eps_low": 0.2,
            "eps_high": 0.2,
            "beta": 0.0,
            "num_iterations": 1,
            "steps_per_generation": 1,
            "micro_batch_size": 4,
            "mask_truncated_completions": False,
            "max_grad_norm": 1.0,
            "is_cap": 1.001,
        }
    )
    from accelerate import Accelerator

    from rredcot.optim import build_optimizer
    from rredcot.stages.update import Learner

    opt, sched = build_optimizer(
        model,
        OmegaConf.create(
            {
                "lr": 1e-3,
                "beta1": 0.9,
                "beta2": 0.99,
                "weight_decay": 0.0,
                "adam_eps": 1e-8,
                "warmup_steps": 0,
                "warmup_ratio": 0.0,
                "schedule": "constant",
            }
        ),
        1,
    )
    stats = update_policy(
        Learner(model, opt, sched, Accelerator(cpu=True)), ro, credit, cfg, temperature=1.0, max_completion_length=16
    )
    assert stats["sampler/logp_diff_mean"] > 1e-4 and stats["sampler/logp_diff_max"] >= stats["sampler/logp_diff_mean"]
    assert 0 < stats["sampler/is_capped_frac"] < 1  # a cap this close to 1 catches some tokens, not all


def test_a_lora_policy_reaches_the_engine_merged(fake_vllm):
    peft = pytest.importorskip("peft")
    from rredcot.stages.vllm_backend import merged_weights
    from rredcot.task.model import build_tiny, load_tokenizer

    tok = load_tokenizer("builtin")
    base = build_tiny(
        OmegaConf.create(
            {"arch": "qwen2", "hidden_size": 32, "intermediate_size": 64, "layers": 2, "heads": 2, "max_positions": 128}
        ),
        len(tok),
        seed=0,
    )
    plain_names = set(base.state_dict())
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)  # a trained adapter (lora_B starts at zero)
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    with merged_weights(model) as pairs:
        names = {n for n, _ in pairs}
        merged = {n: t.clone() for n, t in pairs}
    assert names <= plain_names and {n for n in plain_names if "proj" in n} <= names  # engine names, no lora_*
    with torch.no_grad():
        assert torch.allclose(
            model(input_ids=ids).logits, before, atol=1e-5
        )  # unmerged again: the adapter still trains
        q = model.base_model.model.model.layers[0].self_attn.q_proj
        delta = (q.lora_B["default"].weight @ q.lora_A["default"].weight) * q.scaling["default"]
        assert torch.allclose(merged["model.layers.0.self_attn.q_proj.weight"], q.base_layer.weight + delta, atol=1e-6)


def test_under_data_parallel_each_rank_runs_its_engine_in_the_trainers_process_group(
    fake_vllm, tiny_model, monkeypatch
):
    from rredcot import collectives

    monkeypatch.setattr(collectives, "active", lambda: True)
    model, tok = tiny_model
    _backend(model, tok)
    assert fake_vllm.LLM.instances[0].kwargs["distributed_executor_backend"] == "external_launcher"
