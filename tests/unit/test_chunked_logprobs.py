"""Chunked log-probs (rredcot/logprobs.py): the [n, T, V] logits never exist, and the log-probs, entropies,
gradients and an update step are those of the full path (logit_chunk=0), on tiny Llama and Qwen2 models
(tied and untied output layers), with left-padded prompts, with and without a temperature; the models whose
forward post-processes the logits (Gemma2 softcapping, Cohere's logit_scale, Granite's logits_scaling)
reproduced, any other post-processing sent to the full path."""

from __future__ import annotations

import math
import types
import warnings

import pytest
import torch
import transformers
from omegaconf import OmegaConf

from rredcot import logprobs
from rredcot.logprobs import completion_logprobs, no_grad_logprobs
from rredcot.losses import policy_loss

V = 40  # vocabulary of the tiny transformers models


class HandLM(torch.nn.Module):
    """V = 2, H = 2: the hidden state is the one-hot of the input token; lm_head maps it to logits [0, 0] after
    token 0 and [0, log 3] after token 1 (softmax [1/4, 3/4])."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(2, 2)
        self.lm_head = torch.nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.embed.weight.copy_(torch.eye(2))
            self.lm_head.weight.copy_(torch.tensor([[0.0, 0.0], [0.0, math.log(3)]]))  # [V, H]

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep, use_cache):
        h = self.embed(input_ids)[:, -logits_to_keep:]  # [n, T+1, H]
        return types.SimpleNamespace(logits=self.lm_head(h))


def _head_inputs(head: torch.nn.Module) -> list[tuple[int, ...]]:
    """The input shapes of every call of `head` from now on."""
    shapes: list[tuple[int, ...]] = []
    head.register_forward_hook(lambda mod, args, out: shapes.append(tuple(args[0].shape)))
    return shapes


def test_hand_sized_log_probs_entropies_and_gradient_one_token_per_chunk():
    # prompt [1], completion [1, 0]: both positions see token 1, logits [0, log 3], softmax [1/4, 3/4]:
    # log p(1) = log 3/4 = -.2877, log p(0) = log 1/4 = -1.3863; H = -(.25 log .25 + .75 log .75) = .5623.
    # d log p(y) / d logits = onehot(y) - p: [-1/4, 1/4] and [3/4, -3/4]; h = e1 both times, so
    # d (sum log p) / d W = column 1 of the sum = [1/2, -1/2], column 0 zero.
    model = HandLM()
    calls = _head_inputs(model.lm_head)
    one = torch.ones(1, 1, dtype=torch.long)
    lp, ent = completion_logprobs(
        model, one, one, torch.tensor([[1, 0]]), torch.ones(1, 2), with_entropy=True, logit_chunk=1
    )
    assert lp[0].tolist() == pytest.approx([math.log(0.75), math.log(0.25)], abs=1e-6)
    assert ent[0].tolist() == pytest.approx([0.5623] * 2, abs=1e-4)
    lp.sum().backward()
    assert torch.allclose(model.lm_head.weight.grad, torch.tensor([[0.0, 0.5], [0.0, -0.5]]), atol=1e-6)
    assert calls == [(1, 2)] * 4  # two chunks of one token, each projected again in the backward
    assert model.lm_head is model.get_output_embeddings() and isinstance(model.lm_head, torch.nn.Linear)


def test_hand_sized_temperature_divides_the_logits():
    # T = 2: logits [0, log 3] / 2 = [0, log sqrt 3]: p(1) = sqrt 3 / (1 + sqrt 3) = .6340, log p(1) = -.4556
    one = torch.ones(1, 1, dtype=torch.long)
    lp, _ = completion_logprobs(HandLM(), one, one, one, one, temperature=2.0, logit_chunk=1)
    assert lp.item() == pytest.approx(math.log(math.sqrt(3) / (1 + math.sqrt(3))), abs=1e-6)


def _tiny(arch: str, tied: bool, **extra) -> torch.nn.Module:
    config_cls, model_cls = {
        "llama": ("LlamaConfig", "LlamaForCausalLM"),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
        "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
        "cohere": ("CohereConfig", "CohereForCausalLM"),
        "granite": ("GraniteConfig", "GraniteForCausalLM"),
    }[arch]
    config = getattr(transformers, config_cls)(
        vocab_size=V,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        pad_token_id=0,
        **extra,
    )
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config)
    with torch.no_grad():  # random, larger logits than the init gives: softcapping and scaling really bite
        model.get_output_embeddings().weight.normal_(0, 1.0)
    return model


def _batch():
    """3 rows, prompts left-padded to P = 4 (row 0 has 2 real tokens, row 1 has 3), T = 5 completion tokens
    (row 2's last two masked): n T = 15 tokens, so logit_chunk=4 gives chunks of 4, 4, 4, 3 across rows."""
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(1, V, (3, 4), generator=g)
    pmask = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1]])
    prompt = prompt * pmask
    completion = torch.randint(1, V, (3, 5), generator=g)
    cmask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    return prompt, pmask, completion, cmask


def _run(model, chunk: int, temperature: float):
    """(log-probs, entropies, gradients of a dapo loss on the log-probs w.r.t. every parameter)."""
    model.zero_grad(set_to_none=True)
    prompt, pmask, completion, cmask = _batch()
    lp, ent = completion_logprobs(model, prompt, pmask, completion, cmask, temperature, True, chunk)
    adv = torch.tensor([1.0, -0.5, 0.25])
    old = lp.detach() + 0.1 * torch.arange(15.0).view(3, 5).sin()  # rho != 1: some tokens clipped
    policy_loss(lp, old, adv, cmask.float()).backward()
    return lp.detach(), ent, [p.grad for p in model.parameters()]


def _assert_same(a, b, atol=1e-5):
    assert torch.allclose(a[0], b[0], atol=atol) and torch.allclose(a[1], b[1], atol=atol)
    assert all((x is None) == (y is None) for x, y in zip(a[2], b[2]))
    assert all(torch.allclose(x, y, atol=atol) for x, y in zip(a[2], b[2]) if x is not None)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_matches_the_full_logits(arch, tied, temperature):
    model = _tiny(arch, tied)
    full = _run(model, 0, temperature)
    calls = _head_inputs(model.get_output_embeddings())
    chunked = _run(model, 4, temperature)
    _assert_same(full, chunked)
    assert sorted(calls) == [(3, 16)] * 2 + [(4, 16)] * 6  # 4 chunks forward, each again in the backward
    assert model.get_output_embeddings() is model.lm_head and isinstance(model.lm_head, torch.nn.Linear)
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize(
    "arch, extra",
    [
        ("gemma2", {"final_logit_softcapping": 0.5}),  # tanh(z / .5) * .5: the logits capped at +-.5
        ("cohere", {"logit_scale": 3.0}),
        ("granite", {"logits_scaling": 2.0}),
    ],
)
def test_post_processed_logits_are_reproduced(arch, extra):
    """transformers 5.24's Gemma2/Cohere/Granite change lm_head's output in their forward: the chunks apply
    the same, so they still take the chunked path (the head sees chunks) and match the full one."""
    model = _tiny(arch, tied=False, **extra)
    full = _run(model, 0, 0.7)
    calls = _head_inputs(model.lm_head)
    _assert_same(full, _run(model, 4, 0.7))
    assert max(c[0] for c in calls) == 4


class DoubledQwen2(transformers.Qwen2ForCausalLM):
    """A forward that post-processes the logits in a way rredcot does not know of."""

    def forward(self, **kw):
        out = super().forward(**kw)
        out.logits = out.logits * 2
        return out


def test_an_unknown_post_processing_falls_back_to_the_full_logits(monkeypatch):
    monkeypatch.setattr(logprobs, "_FULL_ONLY", set())
    model = _tiny("qwen2", tied=True)
    model.__class__ = DoubledQwen2
    full = _run(model, 0, 1.0)
    with pytest.warns(UserWarning, match="DoubledQwen2's forward changes"):
        first = _run(model, 4, 1.0)
    _assert_same(full, first)
    calls = _head_inputs(model.lm_head)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # remembered: no second warning, no second forward
        _assert_same(full, _run(model, 4, 1.0))
    assert calls == [(3, 6, 16)]  # the one full projection: 3 rows x (T + 1) positions


def test_a_model_with_a_logit_setting_takes_the_full_path():
    # Qwen2 ignores final_logit_softcapping, but an unlisted model that has one may use it: full path
    model = _tiny("qwen2", tied=True)
    model.config.final_logit_softcapping = 30.0
    calls = _head_inputs(model.lm_head)
    _run(model, 4, 1.0)
    assert calls == [(3, 6, 16)]


class InnerAutocast(torch.nn.Module):
    """A wrapper like accelerate's mixed precision or DDP: `.module`, bf16 autocast inside its forward only."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, **kw):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.module(**kw)


def test_a_wrapper_is_called_and_its_autocast_reaches_the_chunks():
    model = _tiny("qwen2", tied=False)
    wrapped = InnerAutocast(model)
    dtypes = []
    model.lm_head.register_forward_hook(lambda mod, args, out: dtypes.append(out.dtype))
    full = _run(wrapped, 0, 1.0)
    chunked = _run(wrapped, 4, 1.0)
    assert set(dtypes) == {torch.bfloat16} and len(dtypes) == 1 + 8  # the chunks computed in bf16 too
    assert torch.allclose(full[0], chunked[0], atol=1e-5)  # measured: the same log-probs ...
    _assert_same(full, chunked, atol=5e-3)  # ... gradients summed in bf16 over other shapes: close (5e-4)
    assert not torch.allclose(full[0], _run(model, 4, 1.0)[0], atol=1e-4)  # without the wrapper: fp32


def test_lora_policy_and_its_adapter_off_reference():
    """peft: the forward goes through PeftModel; with an adapter on lm_head too, the reference (AdapterOff)
    projects its chunks with the adapter off, as its full forward does."""
    peft = pytest.importorskip("peft")
    from rredcot.lora import AdapterOff

    model = _tiny("qwen2", tied=False)
    with warnings.catch_warnings():  # peft reads transformers' renamed is_gradient_checkpointing (as in lora.wrap)
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "lm_head"])
        policy = peft.get_peft_model(model, config)
    for name, p in policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # a trained adapter (lora_B starts at zero)
    _assert_same(_run(policy, 0, 0.7), _run(policy, 4, 0.7))
    ref = AdapterOff(policy)
    batch = (*_batch(), 0.7, 2)
    a = no_grad_logprobs(ref, *batch, with_entropy=True, logit_chunk=0)
    b = no_grad_logprobs(ref, *batch, with_entropy=True, logit_chunk=4)
    on = no_grad_logprobs(policy, *batch, logit_chunk=4)[0]
    assert torch.allclose(a[0], b[0], atol=1e-5) and torch.allclose(a[1], b[1], atol=1e-5)
    assert not torch.allclose(a[0], on, atol=1e-3)  # the adapter matters: the reference really ran without it


def test_the_head_is_restored_when_the_forward_fails():
    model = _tiny("qwen2", tied=True)
    head = model.lm_head
    prompt, pmask, completion, cmask = _batch()
    with pytest.raises(IndexError):
        completion_logprobs(model, prompt, pmask, completion + V, cmask, logit_chunk=4)  # ids out of range
    assert model.lm_head is head


def _update_step(model) -> dict[str, float]:
    from accelerate import Accelerator

    from rredcot.optim import build_optimizer
    from rredcot.stages.update import Learner, update_policy
    from rredcot.types import Rollout

    prompt, pmask, completion, cmask = _batch()
    n = prompt.shape[0]
    ro = Rollout(prompt, pmask, completion, cmask, torch.zeros(n, 5), torch.zeros(n, 5), torch.zeros(n, dtype=bool),
                 [""] * n, [], 1)  # fmt: skip
    credit = types.SimpleNamespace(valid=torch.ones(n, dtype=torch.bool), advantages=torch.tensor([1.0, -0.5, 0.25]))
    optim = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.99, "weight_decay": 0.0, "adam_eps": 1e-8}
    optim |= {"warmup_steps": 0, "warmup_ratio": 0.0, "schedule": "constant"}
    opt, sched = build_optimizer(model, OmegaConf.create(optim), 2)
    upd = {"loss_type": "dapo", "eps_low": 0.2, "eps_high": 0.2, "beta": 0.0, "num_iterations": 2}
    upd |= {"steps_per_generation": 1, "micro_batch_size": 3, "mask_truncated_completions": False, "max_grad_norm": 1.0}
    learner = Learner(model, opt, sched, Accelerator(cpu=True))
    return update_policy(learner, ro, credit, OmegaConf.create(upd), temperature=0.7, max_completion_length=5)


def test_an_update_step_gives_the_same_loss(monkeypatch):
    """update_policy (num_iterations=2: old log-probs from no_grad_logprobs, then two steps whose second loss
    reads the weights the first one set) with the default chunks and with logit_chunk=0."""
    monkeypatch.setattr(logprobs, "LOGIT_CHUNK", 4)  # 15 tokens: 4 chunks
    chunked = _update_step(_tiny("qwen2", tied=True))
    monkeypatch.setattr(logprobs, "LOGIT_CHUNK", 0)
    full = _update_step(_tiny("qwen2", tied=True))
    assert chunked["loss"] == pytest.approx(full["loss"], abs=1e-6)
    assert chunked["grad_norm"] == pytest.approx(full["grad_norm"], rel=1e-5)
