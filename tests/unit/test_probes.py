"""One packed forward scores every answer-forcing probe exactly like separate forwards."""
import pytest
import torch
from omegaconf import OmegaConf

from rredcot.stages.probes import ProbeItem, probe_logprobs, probe_logprobs_batch, probe_logprobs_reference
from rredcot.task.model import build_tiny, load_tokenizer

TOK = load_tokenizer("builtin")


def _ids(text):
    return torch.tensor(TOK(text, add_special_tokens=False)["input_ids"])


def _model(arch, impl="sdpa"):
    cfg = OmegaConf.create({"arch": arch, "hidden_size": 32, "intermediate_size": 64, "layers": 2, "heads": 2,
                            "max_positions": 256})
    m = build_tiny(cfg, len(TOK), seed=3).eval()
    m.set_attn_implementation(impl)
    return m


TRACE = _ids("a=3, b=a+4, c=b*2. c=?\n<think>\nb=3+4=7\nc=7*2=14\n</think>\n14</s>")
ANSWERS = [_ids(a) for a in ("14</s>", "13</s>", "140</s>")]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_equals_separate_forwards(arch, impl):
    model = _model(arch, impl)
    bounds = [21, 30, 39]
    force = _ids("</think>\n")
    packed = probe_logprobs(model, TRACE, bounds, force, ANSWERS)
    assert packed.shape == (3, 3)
    assert torch.allclose(packed, probe_logprobs_reference(model, TRACE, bounds, force, ANSWERS), atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_several_traces_with_padding_and_no_forcing_text(arch):
    model = _model(arch)
    empty = torch.zeros(0, dtype=torch.long)
    short = TRACE[:25]
    items = [ProbeItem(TRACE, [21, 39], empty, ANSWERS), ProbeItem(short, [5, 25], _ids("</think>\n"), ANSWERS[:2])]
    out = probe_logprobs_batch(model, items)
    for item, got in zip(items, out):
        ref = probe_logprobs_reference(model, item.trace_ids, item.boundaries, item.force_ids, item.answers)
        assert got.shape == ref.shape and torch.allclose(got, ref, atol=1e-4)


def test_probe_tokens_count():
    # 2 boundaries x ((F=2 + 3) + (2 + 4)) = 22
    item = ProbeItem(TRACE, [5, 9], torch.tensor([1, 2]), [torch.zeros(3), torch.zeros(4)])
    assert item.probe_tokens == 22
