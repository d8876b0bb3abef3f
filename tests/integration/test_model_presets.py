"""Every reasoning-model preset trains debug=fast end to end on a tiny random model of its real
architecture class, with a byte-level BPE tokenizer whose chat template has the real model's shape
(written here, not downloaded): ChatML for Qwen2.5 / Qwen3 (Qwen3 with `enable_thinking`), and the
R1-distill template that opens `<think>` itself. The preset's own keys (marker, template arguments)
are what is under test; its hub name is replaced by the local folder."""

from __future__ import annotations

import json

import pytest

from .conftest import ASSETS_DIR, cli

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen3: thinking unless enable_thinking is false, which pre-fills an empty thinking block.
QWEN3 = CHATML.replace(
    "<|im_start|>assistant\n{% endif %}",
    "<|im_start|>assistant\n{% if enable_thinking is defined and "
    "not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}",
)
# R1-distill: the generation prompt opens the thinking part, so completions start inside it.
R1 = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<\uff5cUser\uff5c>{{ m['content'] }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<\uff5cAssistant\uff5c><think>\n{% endif %}"
)
SPECIAL = {
    "chatml": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    "r1": [
        "<\uff5cbegin\u2581of\u2581sentence\uff5c>",
        "<\uff5cend\u2581of\u2581sentence\uff5c>",
        "<\uff5cUser\uff5c>",
        "<\uff5cAssistant\uff5c>",
        "<|endoftext|>",
    ],
}  # R1-distill keeps Qwen's vocabulary
PRESETS = {  # preset -> (architecture, template, special tokens, eos token, thinks)
    "qwen2.5-1.5b-instruct": ("qwen2", CHATML, "chatml", "<|im_end|>", False),
    "qwen2.5-math-1.5b-instruct": ("qwen2", CHATML, "chatml", "<|im_end|>", False),
    "r1-distill-qwen-1.5b": ("qwen2", R1, "r1", "<\uff5cend\u2581of\u2581sentence\uff5c>", True),
    "qwen3-1.7b": ("qwen3", QWEN3, "chatml", "<|im_end|>", True),
}
GSM8K = [
    f"task.sources.train.path={ASSETS_DIR / 'gsm8k_train.jsonl'}",
    f"task.sources.test.path={ASSETS_DIR / 'gsm8k_test.jsonl'}",
    "task.dev_size=4",
]


def _tokenizer(template: str, family: str, eos: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [
        line for f in ("gsm8k_train.jsonl", "gsm8k_test.jsonl") for line in (ASSETS_DIR / f).read_text().splitlines()
    ]
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=SPECIAL[family], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus * 3, trainer)
    tok.add_tokens(["<think>", "</think>"])  # plain added tokens, as in the real vocabularies
    bos = SPECIAL[family][0] if family == "r1" else None
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=eos, pad_token="<|endoftext|>" if family == "chatml" else eos, bos_token=bos
    )
    out.chat_template = template
    return out


def _model_dir(root, preset: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    arch, template, family, eos, _ = PRESETS[preset]
    tok = _tokenizer(template, family, eos)
    cfg = AutoConfig.for_model(
        arch,
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    # Qwen models stop on <|im_end|> and <|endoftext|>; generation must honour both
    stops = [tok.convert_tokens_to_ids(t) for t in SPECIAL[family][:3] if t in (eos, "<|endoftext|>")]
    model.generation_config.eos_token_id = sorted(set(stops))
    path = root / preset
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_trains_end_to_end_with_its_chat_template(preset, tmp_path):
    model_dir, run = _model_dir(tmp_path, preset), tmp_path / "run"
    thinks = PRESETS[preset][4]
    proc = cli(
        "train",
        "debug=fast",
        "task=gsm8k",
        f"model={preset}",
        f"model.name={model_dir}",
        "warmstart.enabled=false",
        *GSM8K,
        "rollout.max_new_tokens=24",
        "train.steps=2",
        f"run_dir={run}",
        "logging.progress=false",
    )
    config = json.loads(json.dumps(__import__("yaml").safe_load((run / "config.yaml").read_text())))
    assert config["model"]["think_end"] == ("</think>" if thinks else "")
    assert config["task"]["forcing_text"].startswith("\n</think>" if thinks else "\n\n")
    prompt = json.loads(sorted((run / "samples").glob("*.jsonl"))[0].read_text().splitlines()[0])["prompt"]
    if preset.startswith("r1"):
        assert prompt.endswith("<\uff5cAssistant\uff5c><think>\n")  # the template opens the thinking part
    else:
        assert prompt.endswith("<|im_start|>assistant\n")  # Qwen3: enable_thinking=true, no empty block
    final = json.loads((run / "eval.json").read_text())["final"]
    assert (final["unclosed_think_frac"] is None) == (not thinks)
    said = " ".join(proc.stderr.split())
    assert ("answers without thinking" in said) == (not thinks)


def test_qwen3_without_thinking_gets_the_empty_thinking_block(tmp_path):
    """chat_template_kwargs reach the template: enable_thinking=false pre-fills <think>\\n\\n</think>."""
    from rredcot.compose import load_config
    from rredcot.startup import task_sets
    from rredcot.task.model import load_tokenizer

    model_dir = _model_dir(tmp_path, "qwen3-1.7b")
    cfg = load_config(
        [
            "task=gsm8k",
            "model=qwen3-1.7b",
            f"model.name={model_dir}",
            *GSM8K,
            "model.chat_template_kwargs={enable_thinking: false}",
        ]
    )
    train, _ = task_sets(cfg, load_tokenizer(str(model_dir)))
    assert train[0].prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


@pytest.mark.parametrize("exp", ["r1_open_rs", "qwen3_numina"])
def test_reasoning_exp_presets_train_on_local_files_of_their_datasets_shape(exp, tmp_path):
    """open-rs rows (problem, solution, answer, level) and NuminaMath-CoT rows (problem, solution with a
    final \\boxed{}, messages) train; MATH-500-shaped rows test. The exp's own settings are kept except
    what debug=fast shrinks."""
    rows = [json.loads(line) for line in (ASSETS_DIR / "math_train.jsonl").read_text().splitlines()]
    data = tmp_path / "train.jsonl"
    with data.open("w") as f:
        for r in rows:
            answer = r["solution"].rsplit("\\boxed{", 1)[1].rsplit("}", 1)[0]
            shaped = (
                {"problem": r["problem"], "solution": r["solution"], "answer": answer, "level": r["level"]}
                if exp == "r1_open_rs"
                else {"source": "synthetic", "problem": r["problem"], "solution": r["solution"], "messages": []}
            )
            f.write(json.dumps(shaped) + "\n")
    preset = "r1-distill-qwen-1.5b" if exp == "r1_open_rs" else "qwen3-1.7b"
    model_dir, run = _model_dir(tmp_path, preset), tmp_path / "run"
    cli(
        "train",
        "debug=fast",
        f"+exp={exp}",
        f"model.name={model_dir}",
        f"task.sources.train.path={data}",
        f"task.sources.test.path={ASSETS_DIR / 'math500_test.jsonl'}",
        "task.dev_size=4",
        "rollout.max_new_tokens=24",
        "train.steps=2",
        f"run_dir={run}",
        "logging.progress=false",
    )
    config = __import__("yaml").safe_load((run / "config.yaml").read_text())
    assert config["verify"]["name"] == "math" and config["update"]["gradient_checkpointing"] is True
    sample = json.loads(sorted((run / "samples").glob("*.jsonl"))[0].read_text().splitlines()[0])
    assert sample["gold"] in {r["solution"].rsplit("\\boxed{", 1)[1].rsplit("}", 1)[0] for r in rows}
