"""rollout=vllm through its interface: the importance correction's arithmetic, the install and version
messages, and the backend driving an engine (tests/fake_vllm.py stands in for vLLM on CPU): weight pushes
(LoRA merged), sleep/wake order, seeds, the trainer's re-scoring, the mismatch it logs."""

from __future__ import annotations

import math
import os
import random
import sys
import types

import numpy
import pytest
import torch
from omegaconf import OmegaConf

from rredcot.compose import load_config
from rredcot.errors import UserError
from rredcot.losses import per_token_terms, sampler_correction
from rredcot.registry import get
from rredcot.stages.montecarlo import sample_from_ids
from rredcot.stages.rollout import Sampling, sample_rollout
from rredcot.stages.vllm_backend import VLLMBackend
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
    with pytest.raises(UserError, match=r"supports vLLM >=0.22.0,<=0.31.0 \(the range TRL 1.16 supports.*has 0.8.5"):
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


def test_on_one_gpu_the_engine_core_stays_in_this_process_so_the_first_push_lands(fake_vllm, tiny_model):
    # vLLM V1 runs its engine core in a child process by default, and there LLMEngine has no model_executor
    # (tests/fake_vllm.py reproduces it): the trainer's tensors cannot reach the worker by reference
    model, tok = tiny_model
    default = fake_vllm.LLM(model=_saved(model), dtype="float32")
    assert not hasattr(default.llm_engine, "model_executor")
    with pytest.raises(RuntimeError, match="another process"):
        VLLMBackend(model, tok, default, fake_vllm.SamplingParams)

    backend = _backend(model, tok)  # one process, no launcher: external_launcher all the same, as TRL does
    engine = fake_vllm.LLM.instances[-1]
    assert engine.kwargs["distributed_executor_backend"] == "external_launcher"
    assert engine.launch_env["RANK"] == "0" and engine.launch_env["LOCAL_RANK"] == "0"
    sample_rollout(backend, tok, SAMPLES[:1], group_size=2, max_new_tokens=4)
    assert engine.calls.count("load_weights") == 1
    assert not {"RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"} & set(os.environ)  # set for the build only


def test_under_a_launcher_the_engine_takes_its_rank_and_rendezvous(fake_vllm, tiny_model, monkeypatch):
    launch = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "node0", "MASTER_PORT": "29500"}
    for k, v in launch.items():
        monkeypatch.setenv(k, v)
    model, tok = tiny_model
    _backend(model, tok)
    assert fake_vllm.LLM.instances[0].launch_env == {
        k: launch[k] for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    assert {k: os.environ[k] for k in launch} == launch  # the launcher's, left as they were


def test_building_the_engine_leaves_the_trainers_random_streams_alone(fake_vllm, tiny_model):
    # vLLM's worker reseeds python's, numpy's and torch's generators with the engine's seed while it is built
    model, tok = tiny_model
    torch.manual_seed(123), random.seed(123), numpy.random.seed(123)
    expected = torch.rand(3), random.random(), numpy.random.rand()
    torch.manual_seed(123), random.seed(123), numpy.random.seed(123)
    _backend(model, tok)
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    assert numpy.random.rand() == expected[2]


def test_an_eos_drawn_as_the_last_allowed_token_is_not_a_truncation(fake_vllm, tiny_model):
    # truncated means "no stop token", whatever finish_reason says: vLLM 0.10.2 answered "length" for an EOS drawn
    # at max_tokens (0.22.0 and later check the stop ids first and answer "stop")
    model, tok = tiny_model
    backend = _backend(model, tok, sleep=False)
    eos, word = tok.eos_token_id, tok("a", add_special_tokens=False)["input_ids"][0]
    canned = [([word, word, eos], "length"), ([word, word, word], "length"), ([word, eos], "stop")]
    outs = [
        types.SimpleNamespace(
            outputs=[types.SimpleNamespace(token_ids=t, logprobs=[{i: _Lp(-1.0)} for i in t], finish_reason=r)]
        )
        for t, r in canned
    ]
    fake_vllm.LLM.instances[0].generate = lambda prompts, sampling_params, use_tqdm=False: outs
    backend.stale = False  # canned answers: no weights to push
    ids = torch.tensor([[5, 6]] * 3)
    gen = backend.generate(ids, torch.ones_like(ids), Sampling(max_new_tokens=3, temperature=1.0))
    assert gen.truncated.tolist() == [False, True, False]
    assert gen.mask.sum(1).tolist() == [3, 3, 2]


def test_max_model_len_null_is_the_longest_sequence_a_run_makes_within_the_context(fake_vllm, tiny_model):
    model, tok = tiny_model  # a context of 128 positions
    _backend(model, tok, max_prompt_tokens=60, max_completion_tokens=20)
    _backend(model, tok, max_prompt_tokens=200, max_completion_tokens=40)
    _backend(model, tok, max_model_len=64, max_num_batched_tokens=1024)
    lens = [(e.kwargs["max_model_len"], e.kwargs["max_num_batched_tokens"]) for e in fake_vllm.LLM.instances]
    assert lens == [(81, 4096), (128, 4096), (64, 1024)]  # +1: a continuation of a whole completion asks for one


def test_the_shipped_config_feeds_max_model_len_from_the_run(fake_vllm):
    cfg = load_config(["rollout=vllm", "train.max_prompt_tokens=300", "rollout.max_new_tokens=64"])
    assert cfg.rollout.max_prompt_tokens == 300 and cfg.rollout.max_completion_tokens == 64
    assert cfg.rollout.max_model_len is None and cfg.rollout.max_num_batched_tokens == 4096
    assert cfg.rollout.mode == "colocate"


def test_an_unknown_mode_is_refused_with_the_valid_names(fake_vllm):
    with pytest.raises(UserError, match=r"rollout.mode='remote' is out of range: it must be one of colocate, server"):
        load_config(["rollout=vllm", "rollout.mode=remote"])


class _Lp:
    def __init__(self, logprob):
        self.logprob = logprob


def _saved(model) -> str:
    import tempfile

    path = tempfile.mkdtemp(prefix="rredcot_test_vllm_")
    model.save_pretrained(path)
    return path
