"""Attribution baselines: weights are a distribution over segments; batching changes nothing."""

import torch

from rredcot.stages.attribution import attention_weights, gradient_weights
from rredcot.stages.context import PolicyContext
from rredcot.stages.rollout import sample_rollout
from rredcot.stages.segment import PieceDecoder, run_segment
from rredcot.stages.verify import BuiltinVerifier
from rredcot.types import Sample


def _setup(tiny_model):
    model, tok = tiny_model
    torch.manual_seed(0)
    samples = [Sample("a=3, b=a+4. b=?\n", "7"), Sample("x=12, y=x-3, z=y*2. z=?\n", "18")]
    ro = sample_rollout(model, tok, samples, group_size=3, max_new_tokens=20)
    seg = run_segment(ro, lambda t: [0, 3, 7, t.end] if t.end > 7 else [0, t.end], PieceDecoder(tok))
    ctx = PolicyContext(model, tok, BuiltinVerifier(), "</think>\n", "</s>")
    return ro, seg, ctx


def test_gradient_weights_batched_equal_one_by_one(tiny_model):
    ro, seg, ctx = _setup(tiny_model)
    batched, single = gradient_weights(ro, seg, ctx, chunk=64), gradient_weights(ro, seg, ctx, chunk=1)
    assert any(len(b) >= 2 for b in seg.boundaries)
    for a, b, bounds in zip(batched, single, seg.boundaries):
        assert a.shape == (len(bounds) - 1,) and torch.allclose(a, b, atol=1e-5)
        if len(bounds) < 2:
            continue  # one segment, the correction segment of a trace without a marker: no weights
        assert abs(float(a.sum()) - 1) < 1e-5 and torch.all(a >= 0)


def test_attention_weights_are_a_distribution_and_restore_sdpa(tiny_model):
    ro, seg, ctx = _setup(tiny_model)
    before = ctx.model.config._attn_implementation
    for w, bounds in zip(attention_weights(ro, seg, ctx), seg.boundaries):
        assert w.shape == (len(bounds) - 1,) and (len(bounds) < 2 or abs(float(w.sum()) - 1) < 1e-5)
    assert ctx.model.config._attn_implementation == before
