"""Prompts as TRL datasets hold them: plain text, or a conversation (TRL's conversational format, a list of
chat messages such as [{"role": "system", "content": ...}, {"role": "user", "content": ...}]).

    render([{"role": "user", "content": "2+2?"}], cfg, tok)   -> the model's chat template, ready for the reply
    render(..., tokenizer without a template)                -> "2+2?\n" (the messages' text, one per line)

A conversation is rendered through the model's chat template (add_generation_prompt, or continue_final_message
when it ends with an assistant message, as TRL does); the reward functions get the messages themselves.
"""

from __future__ import annotations

from typing import Any

from rredcot.errors import UserError


def is_conversational(value: Any) -> bool:
    """TRL's test (TRL 1.16.0 trl/data_utils.py, is_conversational): a list whose first item is a mapping
    with a role."""
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and "role" in value[0]


def _text(content: Any) -> str | None:
    """A message's text: a string, or the text parts of a list of content blocks; None if it holds none."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [b.get("text") for b in content if isinstance(b, dict) and b.get("type") == "text"]
        return "\n".join(p for p in parts if isinstance(p, str)) if parts else None
    return None


def well_formed(value: Any) -> bool:
    """Every message has a role (text) and content with text in it."""
    return is_conversational(value) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and _text(m.get("content")) is not None for m in value
    )


def plain(messages: list[dict[str, Any]]) -> str:
    """The conversation as plain text (no chat template): each message's text on its own line."""
    return "\n".join(_text(m["content"]).strip() for m in messages).strip()


def apply_template(messages: list[dict[str, Any]], cfg: Any, tokenizer: Any) -> str:
    """The model's chat template on `messages`, ready for the assistant's reply (errors: a UserError with the fix)."""
    kwargs = dict(cfg.get("chat_template_kwargs") or {})  # e.g. Qwen3's enable_thinking
    last_is_reply = messages[-1].get("role") == "assistant"  # TRL 1.16 (data_utils.apply_chat_template) continues it
    try:
        out = tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=not last_is_reply,
            continue_final_message=last_is_reply,
            **kwargs,
        )
    except Exception as e:  # a template's raise_exception(...), a syntax error, a variable it lacks
        roles = "/".join(str(m.get("role")) for m in messages)
        what = f"a one-message prompt (role {roles}" if len(messages) == 1 else f"a prompt of roles ({roles}"
        raise UserError(
            f"The chat template of {tokenizer.name_or_path!r} fails on {what}"
            f"{', with ' + str(kwargs) if kwargs else ''}): {type(e).__name__}: {' '.join(str(e).split())[:200]}. "
            "Use plain-text prompts with task.chat_template=false, or fix the template (chat_template in the "
            "model's tokenizer_config.json or chat_template.jinja); its arguments are model.chat_template_kwargs."
        ) from None
    if not isinstance(out, str):
        raise UserError(
            f"The chat template of {tokenizer.name_or_path!r} gave a {type(out).__name__}, not the prompt text. "
            "Use task.chat_template=false, or a template that renders one conversation to text."
        )
    return out


def render(messages: list[dict[str, Any]], cfg: Any, tokenizer: Any) -> str:
    """The prompt text the model sees for a conversation: its chat template when it has one (and
    task.chat_template is on), else the messages' text."""
    if cfg.chat_template and getattr(tokenizer, "chat_template", None):
        return apply_template(messages, cfg, tokenizer)
    return plain(messages) + "\n"
