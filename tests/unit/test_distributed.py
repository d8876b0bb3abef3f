"""Data-parallel building blocks in one process: keyed sampling, rank blocks, the config-time checks."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from rredcot import collectives
from rredcot.checks import check_data_parallel
from rredcot.errors import UserError
from rredcot.stages.rollout import sample_rollout
from rredcot.stages.sampling import draw, keyed_uniforms, prefix_seeds, row_seed, row_seeds
from rredcot.types import Sample


@pytest.mark.parametrize("u, expect", [(0.0, 0), (0.1, 0), (0.2, 2), (0.69, 2), (0.71, 3), (0.95, 3), (0.9999, 3)])
def test_draw_is_the_inverse_cdf_and_never_picks_a_zero(u, expect):
    # probs [.2, 0, .5, .3]: cdf [.2, .2, .7, 1.0]; token i when cdf[i-1] <= u < cdf[i] (token 1 has no mass)
    probs = torch.tensor([[0.2, 0.0, 0.5, 0.3]])
    assert int(draw(probs, torch.tensor([u]))) == expect


def test_draw_unnormalised_rows_and_a_filtered_head():
    # mass [0, 0, 2, 2] (top-k filtered head, not normalised): u < .5 -> 2, else 3
    probs = torch.tensor([[0.0, 0.0, 2.0, 2.0]] * 3)
    assert draw(probs, torch.tensor([0.0, 0.49, 0.5])).tolist() == [2, 2, 3]


def test_row_seeds_are_keyed_by_what_is_sampled():
    assert row_seeds(0, "train", 3, [5, 6]) == [row_seed(0, "train", 3, 5), row_seed(0, "train", 3, 6)]
    seeds = row_seeds(0, "train", 1, range(1000))
    assert len(set(seeds)) == 1000 and all(0 <= s < 2**63 for s in seeds)
    assert row_seed(0, "train", 1, 0) != row_seed(1, "train", 1, 0) != row_seed(0, "train", 2, 0)
    assert row_seed(0, "train", 1, 0) != row_seed(0, "eval", 1, 0)
    # Monte Carlo: by the prefix's tokens; the same prefix (wherever it sits) gets the same draws
    a, b = prefix_seeds(0, 1, [[1, 2], [3]], 2), prefix_seeds(0, 1, [[3], [1, 2]], 2)
    assert a[:2] == b[2:] and a[2:] == b[:2] and len(set(a)) == 4
    assert torch.equal(keyed_uniforms(a, 5), keyed_uniforms(a, 5)) and keyed_uniforms(a, 5).shape == (4, 5)


def test_a_keyed_completion_does_not_depend_on_its_batch(tiny_model):
    """World-size invariance at the sampler: rows sampled together (one process) or in two halves (two ranks),
    with different prompt widths and chunks, give the same tokens."""
    model, tok = tiny_model
    samples = [
        Sample("a=1, b=a+2. b=?\n", "3"),
        Sample("x=4. x=?\n", "4"),
        Sample("p=2, q=p*3, r=q-1. r=?\n", "5"),
        Sample("k=7. k=?\n", "7"),
    ]
    seeds = row_seeds(0, "train", 1, range(8))
    opts = {"group_size": 2, "max_new_tokens": 12}
    whole = sample_rollout(model, tok, samples, seeds=seeds, **opts)
    halves = [
        sample_rollout(model, tok, samples[:2], seeds=seeds[:4], **opts),
        sample_rollout(model, tok, samples[2:], seeds=seeds[4:], **opts),
    ]
    assert whole.texts == halves[0].texts + halves[1].texts
    assert len(set(whole.texts)) > 2  # sampled, not a constant
    other = sample_rollout(model, tok, samples, seeds=row_seeds(1, "train", 1, range(8)), **opts)
    assert other.texts != whole.texts


@pytest.mark.parametrize(
    "n, world, blocks", [(4, 1, [(0, 4)]), (4, 2, [(0, 2), (2, 2)]), (5, 2, [(0, 3), (3, 2)]), (1, 2, [(0, 1), (1, 0)])]
)
def test_shard_blocks(monkeypatch, n, world, blocks):
    items = list(range(n))
    for r, (offset, length) in enumerate(blocks):
        monkeypatch.setattr(collectives, "size", lambda: world)
        monkeypatch.setattr(collectives, "rank", lambda r=r: r)
        lo, mine = collectives.shard(items, strict=False)
        assert (lo, mine) == (offset, items[offset : offset + length])
    if n % world:
        with pytest.raises(ValueError):
            collectives.shard(items)


def test_single_process_collectives_are_the_plain_values():
    assert collectives.size() == 1 and collectives.is_main()
    assert collectives.gather({"a": 1}) == [{"a": 1}]
    assert collectives.total(3.0) == 3.0 and collectives.any_rank(False) is False
    x = torch.tensor([1.0, 2.0])
    assert collectives.pooled(x) is x
    assert collectives.reduce_scalars({"b": 2.0, "a": 1.0}, {"t": 3.0}) == ({"a": 1.0, "b": 2.0}, {"t": 3.0})


def _cfg(n=128, g=8, spg=1, micro=64):
    return OmegaConf.create(
        {
            "rollout": {"group_size": g},
            "train": {"generation_batch_size": n},
            "update": {"steps_per_generation": spg, "micro_batch_size": micro},
        }
    )


@pytest.mark.parametrize(
    "world, cfg, said",
    [
        # 5 prompts a rank would be 40 completions: micro-batches of 64 do not fit, so 120 needs micro 40;
        # 4, 8 or 16 ranks would split the prompts but not the micro-batches (tests/unit/test_batch_fit.py)
        (
            3,
            _cfg(),
            [
                "3 processes",
                "16 prompts",
                "train.generation_batch_size=120 with update.micro_batch_size=40",
                "(1 or 2)",
            ],
        ),
        # 128 / 4 ranks / 1 step = 32 rows per rank and step: micro-batches of 64 do not fit
        (4, _cfg(), ["128 / 4 = 32 completions", "update.micro_batch_size=32"]),
        # 128 / 2 / 4 = 16 rows a step: 12 does not divide them; the largest divisor under 12 is 8
        (2, _cfg(spg=4, micro=12), ["128 / 2 = 64 completions", "update.micro_batch_size=8"]),
    ],
)
def test_data_parallel_config_errors_say_what_to_change(world, cfg, said):
    with pytest.raises(UserError) as e:
        check_data_parallel(cfg, world)
    for text in said:
        assert text in str(e.value), str(e.value)


def test_the_default_batch_fits_the_usual_world_sizes():
    for world in (1, 2, 4, 8, 16):
        check_data_parallel(_cfg(micro=8), world)


@pytest.mark.parametrize(
    "name, lag, refused",
    [("rredcot", 0, None), ("uniform", 0, None), ("gradient", 0, "backward pass"), ("rredcot", 5, "critic_lag=5")],
)
def test_what_sharded_training_refuses_at_start_up(name, lag, refused):
    import rredcot.stages.redistribute  # noqa: F401  (registers the estimators)
    from rredcot.checks import check_shardable

    cfg = OmegaConf.create({"train": {"critic_lag": lag}, "redistribute": {"name": name}})
    if refused is None:
        check_shardable(cfg)
        return
    with pytest.raises(UserError) as e:
        check_shardable(cfg)
    assert refused in str(e.value) and "DDP" in str(e.value)
