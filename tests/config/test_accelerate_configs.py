"""conf/accelerate/: every launcher config loads the way `accelerate launch --config_file` loads it, says what
it shards, and is not mistaken for a Hydra config group."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file

from rredcot.compose import groups

CONF = Path(__file__).resolve().parents[2] / "conf" / "accelerate"
EXPECT = {  # file: (distributed_type, what decides the sharding)
    "ddp.yaml": ("MULTI_GPU", {}),
    "fsdp2.yaml": ("FSDP", {"fsdp_version": 2, "fsdp_state_dict_type": "FULL_STATE_DICT"}),
    "zero2.yaml": ("DEEPSPEED", {"zero_stage": 2, "gradient_accumulation_steps": 1}),
    "zero3.yaml": ("DEEPSPEED", {"zero_stage": 3, "gradient_accumulation_steps": 1, "zero3_save_16bit_model": True}),
}


def test_the_shipped_set():
    assert sorted(p.name for p in CONF.glob("*.yaml")) == sorted(EXPECT)


@pytest.mark.parametrize("name", sorted(EXPECT))
def test_accelerate_loads_each_config(name):
    cfg = load_config_from_file(str(CONF / name))  # raises on keys accelerate does not know
    kind, keys = EXPECT[name]
    assert str(cfg.distributed_type).endswith(kind) and cfg.mixed_precision == "no" and not cfg.use_cpu
    section = cfg.fsdp_config if kind == "FSDP" else cfg.deepspeed_config if kind == "DEEPSPEED" else {}
    for k, v in keys.items():
        assert section[k] == v, (name, k)
    text = (CONF / name).read_text()
    assert "accelerate launch --config_file conf/accelerate/" + name in text  # says how it is used
    header = "".join(line for line in text.splitlines() if line.startswith("#"))
    assert re.search(r"~\d+(\.\d+)?B", header), name  # ... and which model sizes it is for (e.g. ~1.5B-8B)


def test_launcher_configs_are_not_a_hydra_group():
    assert "accelerate" not in groups() and "algo" in groups()
