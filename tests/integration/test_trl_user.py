"""A TRL user's script as it is: a reward-function module of their own (sync and async, TRL's signature) and a
conversational dataset file, through the real `rredcot train` with the documented config (task=trl,
docs/training.md), then `eval` on the run, which imports their module only when they name it again."""

import json
import textwrap

import pytest

from .conftest import cli

REWARDS = '''
import asyncio, json
from pathlib import Path

def accuracy_reward(completions, solution, **kwargs):
    """open-r1's shape: conversational completions are lists of messages."""
    calls = Path(__file__).with_name("calls.jsonl")
    with calls.open("a") as f:
        f.write(json.dumps({"prompt": kwargs["prompts"][0] if "prompts" in kwargs else None,
                            "completion": completions[0], "solution": solution[0], "level": kwargs["level"][0],
                            "ids": kwargs["completion_ids"][0], "step": kwargs["trainer_state"].global_step}) + "\\n")
    return [1.0 if sol in c[0]["content"] else 0.0 for c, sol in zip(completions, solution)]

async def short_reward(prompts, completions, level, **kwargs):
    await asyncio.sleep(0)
    return [None if lv == 2 else -len(c[0]["content"]) / 100 for c, lv in zip(completions, level)]
'''


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("trl_user")
    (d / "my_rewards.py").write_text(textwrap.dedent(REWARDS))
    rows = [
        {
            "prompt": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": f"{i}+{i}=?"}],
            "solution": str(2 * i),
            "level": i % 3,
        }
        for i in range(40)
    ]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def _funcs(d):
    return f"verify.reward_funcs=[{d / 'my_rewards.py'}:accuracy_reward,{d / 'my_rewards.py'}:short_reward]"


def test_a_trl_reward_module_and_conversational_dataset_train_unchanged(user_dir, hub_shaped_model, tmp_path):
    run = tmp_path / "trl"
    proc = cli(
        "train",
        "debug=fast",
        "task=trl",
        f"task.path={user_dir / 'train.jsonl'}",
        "task.dev_size=8",
        "eval.split=dev",
        f"model.name={hub_shaped_model}",
        "model.dtype=float32",
        _funcs(user_dir),
        "verify.reward_weights=[1.0,0.5]",
        "verify.weight=0",
        "rollout.max_new_tokens=12",
        *("train.steps=2", "train.eval_every=0", "eval.n_prompts=2", "eval.n_samples=1", "eval.ks=[1]"),  # seconds
        f"run_dir={run}",
        "logging.progress=false",
    )
    said = " ".join((proc.stdout + proc.stderr).split())
    assert "the reward is verify.reward_funcs alone (accuracy_reward, short_reward" in said
    calls = [json.loads(line) for line in (user_dir / "calls.jsonl").read_text().splitlines()]
    # step 0: tried once at start-up; then once per step (held-out evaluation calls none of them)
    assert [c["step"] for c in calls] == [0, 1, 2]
    first = calls[1]
    assert first["prompt"][1]["role"] == "user" and first["completion"][0]["role"] == "assistant"
    assert first["level"] in (0, 1, 2) and all(isinstance(t, int) for t in first["ids"])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward/accuracy_reward/mean" in r]
    assert len(steps) == 2 and all("reward/short_reward/mean" in r for r in steps)
    sample = json.loads(sorted((run / "samples").glob("*.jsonl"))[0].read_text().splitlines()[0])
    assert sample["prompt"].startswith("<|system|>Answer briefly.\n<|user|>") and sample["prompt"].endswith(
        "<|assistant|>"
    )
    # a run directory is data: eval imports the module only when the user's own command line names it
    refused = cli("eval", f"checkpoint={run}", "eval.n_prompts=2", check=False)
    assert refused.returncode == 2 and "verify.reward_funcs=[" in " ".join(refused.stderr.split())
    cli("eval", f"checkpoint={run}", "eval.n_prompts=2", _funcs(user_dir))
    assert json.loads(next((run / "evals").glob("*.json")).read_text())["n_prompts"] == 2
