"""Tasks: where problems, tokenizers and starting models come from (built-in or hub)."""
