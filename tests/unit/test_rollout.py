"""Rollout: filtering examples, EOS handling, and the log-probs it keeps equal the update's."""

import math

import pytest
import torch

from rredcot.evaluate import pass_at_k
from rredcot.logprobs import completion_logprobs, selective_log_softmax
from rredcot.stages.rollout import sample_rollout
from rredcot.stages.sampling import filter_logits
from rredcot.types import Sample


def test_filter_top_k():
    # top_k=2 on [2, 1, 0] keeps the two largest
    out = filter_logits(torch.tensor([[2.0, 1.0, 0.0]]), top_k=2)
    assert out[0, :2].tolist() == [2.0, 1.0] and out[0, 2] == -math.inf


def test_filter_top_p():
    # softmax([2, 1, 0]) = [.665, .245, .090]: top_p .6 keeps only the first (its mass already reaches .6);
    # top_p .8 keeps two (.665 < .8 so the second is needed)
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    assert torch.isinf(filter_logits(logits, top_p=0.6)).tolist() == [[False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.8)).tolist() == [[False, False, True]]


def test_filter_top_p_respects_vocab_order():
    logits = torch.tensor([[0.0, 2.0, 1.0]])  # the most likely token is in the middle
    assert torch.isinf(filter_logits(logits, top_p=0.6)).tolist() == [[True, False, True]]


def test_selective_log_softmax_example():
    # logits [0, log 3], index 1: log(3 / 4) = -.28768
    out = selective_log_softmax(torch.tensor([[[0.0, math.log(3)]]]), torch.tensor([[1]]))
    assert out.item() == pytest.approx(math.log(0.75))


@pytest.mark.parametrize("n, c, k, expect", [(4, 1, 2, 0.5), (4, 0, 2, 0.0), (4, 3, 2, 1.0), (5, 2, 1, 0.4)])
def test_pass_at_k(n, c, k, expect):
    # n=4, c=1, k=2: 1 - C(3,2)/C(4,2) = 1 - 3/6; n=4, c=3, k=2: n-c < k -> 1
    assert pass_at_k(n, c, k) == pytest.approx(expect)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_rollout_logprobs_match_the_update_forward(tiny_model, arch):
    """The KV-cache sampling loop and the full forward the update uses give the same log-probs."""
    from omegaconf import OmegaConf

    from rredcot.task.model import build_tiny

    _, tok = tiny_model
    cfg = OmegaConf.create(
        {"arch": arch, "hidden_size": 32, "intermediate_size": 64, "layers": 2, "heads": 2, "max_positions": 128}
    )
    model = build_tiny(cfg, len(tok), seed=1).eval()
    samples = [Sample("a=1, b=a+2. b=?\n", "3"), Sample("x=10, y=x*2, z=y-3. z=?\n", "17")]
    torch.manual_seed(0)
    ro = sample_rollout(model, tok, samples, group_size=3, max_new_tokens=12, temperature=0.7)
    assert ro.completion_ids.shape[0] == 6 and ro.prompt_ids.shape[0] == 6
    with torch.no_grad():
        logp, ent = completion_logprobs(
            model,
            ro.prompt_ids,
            ro.prompt_mask,
            ro.completion_ids,
            ro.completion_mask,
            temperature=0.7,
            with_entropy=True,
        )
    m = ro.completion_mask.bool()
    assert torch.allclose(logp[m], ro.logprobs[m], atol=1e-4)
    assert torch.allclose(ent[m], ro.entropies[m], atol=1e-4)


def test_rollout_stops_at_eos_and_masks_after_it(tiny_model):
    model, tok = tiny_model
    # Make EOS overwhelmingly likely after the first sampled token by biasing the output layer.
    with torch.no_grad():
        model.lm_head.weight[tok.eos_token_id] += 5.0 * model.model.norm.weight.sign()
    ro = sample_rollout(model, tok, [Sample("a=1. a=?\n", "1")], group_size=4, max_new_tokens=20)
    for row in range(4):
        n = int(ro.completion_mask[row].sum())
        ids = ro.completion_ids[row].tolist()
        assert ids[n - 1] == tok.eos_token_id or ro.truncated[row]
        assert all(t == tok.pad_token_id for t in ids[n:])
    assert ro.completion_ids.shape[1] < 20  # everyone stopped early, so the loop ended early


def test_greedy_is_deterministic(tiny_model):
    model, tok = tiny_model
    s = [Sample("a=2, b=a*3. b=?\n", "6")]
    a = sample_rollout(model, tok, s, group_size=2, max_new_tokens=10, greedy=True)
    b = sample_rollout(model, tok, s, group_size=2, max_new_tokens=10, greedy=True)
    assert torch.equal(a.completion_ids, b.completion_ids) and a.texts[0] == a.texts[1]


def test_generation_stops_on_every_eos_id_of_the_model(tiny_model):
    """Qwen models end a turn with <|im_end|> and end text with <|endoftext|> (generation_config lists
    both); a completion must stop at either, not run on to max_new_tokens after the first."""
    from rredcot.stages.rollout import generate, stop_ids

    model, tok = tiny_model
    second = tok.convert_tokens_to_ids("7")
    model.generation_config.eos_token_id = [tok.eos_token_id, second]
    assert stop_ids(model, tok) == sorted({tok.eos_token_id, second})
    # force the model to write "7" first: a huge bias on that token's logit
    with torch.no_grad():
        model.lm_head.bias = torch.nn.Parameter(torch.zeros(len(tok)))
        model.lm_head.bias[second] = 1e4
    prompt = tok(["a=1. a=?\n"], return_tensors="pt")
    ids, mask, _, _, truncated = generate(
        model,
        prompt["input_ids"],
        prompt["attention_mask"],
        eos_id=stop_ids(model, tok),
        pad_id=tok.pad_token_id,
        max_new_tokens=10,
    )
    assert ids[0, 0] == second and mask[0].tolist() == [1] and not truncated[0]
