"""A config section as a registry entry's keyword arguments (pure OmegaConf; every layer may use it)."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

SAMPLING_KEYS = ("group_size", "max_new_tokens", "temperature", "top_p", "top_k")  # rollout.*: how, for every backend


def rollout_options(section: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """rollout.* split into (sampling settings every backend honours, the chosen backend's own options)."""
    opts = stage_options(section)
    return {k: opts.pop(k) for k in SAMPLING_KEYS if k in opts}, opts


def stage_options(section: DictConfig) -> dict[str, Any]:
    """A stage section minus its `name`: the keyword arguments of the registry entry."""
    opts = OmegaConf.to_container(section, resolve=True)
    opts.pop("name", None)
    return opts
