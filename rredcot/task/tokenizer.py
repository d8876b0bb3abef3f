"""The built-in tokenizer: one token per character, a real `transformers` fast tokenizer.

It covers printable ASCII and newline (so GSM8K-style text also tokenizes), plus the
end-of-thinking markers as single tokens, as they are in real reasoning models' vocabularies.
Saved with `save_pretrained`, it loads back with `AutoTokenizer.from_pretrained`.
"""

from __future__ import annotations

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from rredcot.task.arith import THINK_CLOSE, THINK_OPEN

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    vocab = {tok: i for i, tok in enumerate([PAD, EOS, UNK, THINK_OPEN, THINK_CLOSE] + chars)}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()  # concatenate characters back without spaces
    # Non-special added tokens: matched before splitting, and kept by decode(skip_special_tokens=True).
    core.add_tokens([AddedToken(t, special=False, normalized=False) for t in (THINK_OPEN, THINK_CLOSE)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token=EOS, pad_token=PAD, unk_token=UNK, padding_side="left"
    )
    tok.padding_side = "left"  # prompts are left-padded so generation appends on the right
    return tok
