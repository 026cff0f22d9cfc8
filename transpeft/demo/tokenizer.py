"""The demo family's tokenizer: byte-level BPE with no merges, built in code with `tokenizers`.

One token per byte (so any text round-trips) plus <pad>, <s> and </s>. Saved with ``save_pretrained``
it loads with ``AutoTokenizer.from_pretrained(dir)`` as a fast tokenizer, like a hub model's; like
Llama's it puts <s> in front of every encoded text.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
SPECIALS = (PAD, BOS, EOS)  # ids 0, 1, 2


def byte_level_tokenizer() -> Tokenizer:
    """A `tokenizers` Tokenizer with one token per byte and no merges."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # the 256 printable stand-ins for bytes
    vocab = {tok: i for i, tok in enumerate(SPECIALS + tuple(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.add_special_tokens(list(SPECIALS))
    # No regex split: with no merges, words do not matter and one piece per text is faster.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B:1", special_tokens=[(BOS, vocab[BOS])])
    return tok


def demo_tokenizer() -> PreTrainedTokenizerFast:
    """The transformers wrapper that ``save_pretrained`` writes and AutoTokenizer reads back."""
    return PreTrainedTokenizerFast(tokenizer_object=byte_level_tokenizer(),
                                   bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   model_max_length=256, padding_side="right")
