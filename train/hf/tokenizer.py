"""Our tokenizers as transformers fast tokenizers (tokenizer.json), so AutoTokenizer loads them offline.

The byte tokenizer (id = byte value) becomes a byte-level BPE with no merges whose vocabulary lists the
256 bytes in id order; the BPE tokenizer is already a `tokenizers` Tokenizer and is wrapped as it is.
"""

from __future__ import annotations

from moe_playground.train.data import BPETokenizer, PretrainedTokenizer, Tokenizer


def byte_symbols() -> list[str]:
    """The printable character byte-level BPE writes for each byte 0..255: a byte that is a visible
    Latin-1 character stands for itself, every other byte for the next unused code point from 256 on."""
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, spare = {}, 256
    for b in range(256):
        if b in visible:
            symbols[b] = chr(b)
        else:
            symbols[b], spare = chr(spare), spare + 1
    return [symbols[b] for b in range(256)]


def byte_level_tokenizer():
    """A `tokenizers` Tokenizer whose ids are the UTF-8 bytes of the text, as ByteTokenizer's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    tok = Tokenizer(models.BPE(vocab={s: i for i, s in enumerate(byte_symbols())}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def to_fast_tokenizer(tokenizer: Tokenizer, max_length: int):
    """A PreTrainedTokenizerFast that encodes and decodes exactly as `tokenizer` (a pretrained one: itself)."""
    from transformers import PreTrainedTokenizerFast
    if isinstance(tokenizer, PretrainedTokenizer):
        return tokenizer.tok
    tok = tokenizer.tok if isinstance(tokenizer, BPETokenizer) else byte_level_tokenizer()
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_length, clean_up_tokenization_spaces=False)
