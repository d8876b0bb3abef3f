"""Answer-forcing probes: the packed path and the KV-cache path score every probe exactly like one
forward per probe, the probe is tokenized as the model would see its text, and only the rows that are
read go through the LM head."""

import pytest
import torch
from omegaconf import OmegaConf

from rredcot.stages.context import probe_blocks
from rredcot.stages.probes import (
    ProbeItem,
    probe_logprobs,
    probe_logprobs_batch,
    probe_logprobs_cached,
    probe_logprobs_reference,
    score_items,
)
from rredcot.task.model import build_tiny, load_tokenizer

TOK = load_tokenizer("builtin")


def _ids(text, tok=TOK):
    return torch.tensor(tok(text, add_special_tokens=False)["input_ids"])


def _model(arch, impl="sdpa", vocab=len(TOK)):
    cfg = OmegaConf.create(
        {"arch": arch, "hidden_size": 32, "intermediate_size": 64, "layers": 2, "heads": 2, "max_positions": 256}
    )
    m = build_tiny(cfg, vocab, seed=3).eval()
    m.set_attn_implementation(impl)
    return m


TRACE = _ids("a=3, b=a+4, c=b*2. c=?\n<think>\nb=3+4=7\nc=7*2=14\n</think>\n14</s>")
ANSWERS = [_ids(a) for a in ("14</s>", "13</s>", "140</s>")]
FORCE = _ids("</think>\n")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_and_cached_paths_equal_separate_forwards(arch, impl):
    model = _model(arch, impl)
    item = ProbeItem.from_parts(TRACE, [21, 30, 39], FORCE, ANSWERS)
    ref = probe_logprobs_reference(model, item)
    packed = probe_logprobs(model, TRACE, [21, 30, 39], FORCE, ANSWERS)
    assert packed.shape == (3, 3) and torch.allclose(packed, ref, atol=1e-4)
    assert torch.allclose(probe_logprobs_cached(model, item), ref, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_several_traces_with_padding_and_no_forcing_text(arch):
    model = _model(arch)
    empty = torch.zeros(0, dtype=torch.long)
    items = [
        ProbeItem.from_parts(TRACE, [21, 39], empty, ANSWERS),
        ProbeItem.from_parts(TRACE[:25], [5, 25], FORCE, ANSWERS[:2]),
    ]
    for item, got in zip(items, probe_logprobs_batch(model, items)):
        ref = probe_logprobs_reference(model, item)
        assert got.shape == ref.shape and torch.allclose(got, ref, atol=1e-4)
        assert torch.allclose(probe_logprobs_cached(model, item), ref, atol=1e-4)


def test_score_items_sends_long_traces_to_the_cache_path_and_keeps_order():
    model = _model("qwen2")
    items = [ProbeItem.from_parts(TRACE[: 20 + i], [10, 20], FORCE, ANSWERS) for i in range(4)]
    # packed lengths 52..55: with packed_max_tokens=53 the first two go packed (together), the rest cached
    got = list(score_items(model, items, max_batch_tokens=110, packed_max_tokens=53))
    assert [it.packed_tokens > 53 for it in items] == [False, False, True, True]
    for item, g in zip(items, got):
        assert torch.allclose(g, probe_logprobs_reference(model, item), atol=1e-4)


def test_temperature_scales_the_logits_like_the_update():
    model = _model("llama")
    item = ProbeItem.from_parts(TRACE, [21, 39], FORCE, ANSWERS)
    hot = probe_logprobs_batch(model, [item], temperature=2.0)[0]
    assert torch.allclose(hot, probe_logprobs_reference(model, item, temperature=2.0), atol=1e-4)
    assert torch.allclose(probe_logprobs_cached(model, item, temperature=2.0), hot, atol=1e-4)
    assert not torch.allclose(hot, probe_logprobs_reference(model, item), atol=1e-3)


def test_only_the_predictor_rows_reach_the_lm_head():
    model = _model("llama")
    seen = []
    model.lm_head.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape))
    item = ProbeItem.from_parts(TRACE, [21, 39], FORCE, ANSWERS)
    probe_logprobs_batch(model, [item])
    S = item.packed_tokens
    # answers 1 4 </s> | 1 3 </s> | 1 4 0 </s> share their "1", scored once per boundary: the predictors are
    # the forcing text's last token (-> 1), the shared 1 (-> 4, 3, 4), then 4 | 3 | 4, 0 of the branches:
    # 6 rows x 2 boundaries
    assert [len(a) for a in ANSWERS] == [3, 3, 4]
    rows = seen[0].numel() // seen[0][-1]  # the head's input: [12, H] hidden states (of the one packed row)
    assert len(seen) == 1 and rows == 12 < S  # not every packed position (the old path built S x V logits)


def test_probe_tokens_count():
    # 2 boundaries x ((F=2 + 3) + (2 + 4)) = 22
    item = ProbeItem.from_parts(TRACE, [5, 9], torch.tensor([1, 2]), [torch.zeros(3), torch.zeros(4)])
    assert item.probe_tokens == 22 and item.packed_tokens == len(TRACE) + 22


@pytest.fixture(scope="module")
def bpe():
    """A real byte-level BPE tokenizer (GPT-2/Qwen style), trained here on LaTeX answers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [f"The answer is \\boxed{{\\frac{{{i}}}{{{j}}}}}." for i in range(1, 30) for j in range(2, 12)] * 5
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>")


def test_the_probe_is_tokenized_as_the_model_sees_its_text(bpe):
    """After `\\boxed{` a BPE model writes `{\\` + `frac`: separately tokenized forcing text and answer
    ([... `{`] + [`\\`, `frac` ...]) is a token sequence the model never produces."""
    force, answer = "The answer is \\boxed{", "\\frac{1}{2}}."
    separate = torch.cat([_ids(force, bpe), _ids(answer, bpe)])
    joint = _ids(force + answer, bpe)
    assert not torch.equal(separate, joint)  # the premise: the boundary merges
    (block,), (start,) = probe_blocks(bpe, force, [answer])
    assert torch.equal(block, joint)
    assert torch.equal(block[:start], _ids(force, bpe)[:start]) and start < len(_ids(force, bpe))
    assert bpe.decode(block[start:]).endswith(answer)  # the scored tokens cover the whole answer


def test_bpe_probe_scores_equal_a_forward_over_the_text(bpe):
    model = _model("qwen2", vocab=len(bpe))
    trace = _ids("Let me think. 1/2 it is.", bpe)
    force = " The answer is \\boxed{"
    blocks, starts = probe_blocks(bpe, force, ["\\frac{1}{2}}</s>", "\\frac{1}{3}}</s>"])
    item = ProbeItem(trace, [3, len(trace)], blocks, starts)
    got = probe_logprobs_batch(model, [item])[0]
    for k, b in enumerate(item.boundaries):
        for j, (blk, s0) in enumerate(zip(blocks, starts)):
            seq = torch.cat([trace[:b], blk])  # exactly the tokens of the text prefix + force + answer
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=seq[None]).logits[0].float(), -1)
            want = sum(logp[i - 1, seq[i]] for i in range(b + s0, len(seq)))
            assert got[k, j] == pytest.approx(float(want), abs=1e-4)
