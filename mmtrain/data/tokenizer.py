"""Text tokenizers with the model's special tokens.

`ByteTokenizer` (the default) maps UTF-8 bytes to ids 0..255 and puts the special tokens after
them. `BPETokenizer` wraps a HF `tokenizers` file written by `mmtrain data train-tokenizer`, which
reserves the same special tokens. Both expose the same small interface.

Text is data, never markup: a document that spells `<|image|>` or `<|eos|>` is encoded as those
characters, so web text cannot inject a media placeholder or end a document early. Special ids
come only from the packer (`tok.image`, `tok.eos`, ...).
"""

from __future__ import annotations

from pathlib import Path

# The model's special tokens, in id order after the base vocabulary.
SPECIAL_TOKENS = (
    "<|pad|>", "<|bos|>", "<|eos|>",
    "<|image|>", "<|image_begin|>", "<|image_end|>",
    "<|audio|>", "<|audio_begin|>", "<|audio_end|>",
)


class ByteTokenizer:
    name = "bytes"

    def __init__(self) -> None:
        self.special = {tok: 256 + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self.vocab_size = 256 + len(SPECIAL_TOKENS)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def __getattr__(self, name: str) -> int:  # tok.pad, tok.image_begin, ...
        special = self.__dict__.get("special", {})
        token = f"<|{name}|>"
        if token in special:
            return special[token]
        raise AttributeError(name)


class BPETokenizer:
    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer  # local import: only needed for BPE runs

        path = Path(path)
        if not path.is_file():
            raise ValueError(f"data.tokenizer={str(path)!r}: file does not exist")
        self._tok = Tokenizer.from_file(str(path))
        # Added (special) tokens are matched in the input text before BPE unless told otherwise;
        # `add_special_tokens=False` only turns off the post-processor's template. Splitting them
        # makes `<|image|>` in a web page plain text.
        self._tok.encode_special_tokens = True
        self.name = str(path)
        self.special = {}
        for tok in SPECIAL_TOKENS:
            tid = self._tok.token_to_id(tok)
            if tid is None:
                raise ValueError(f"tokenizer {path} lacks the special token {tok}; "
                                 "train it with `mmtrain data train-tokenizer`")
            self.special[tok] = tid
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)

    def __getattr__(self, name: str) -> int:
        special = self.__dict__.get("special", {})
        token = f"<|{name}|>"
        if token in special:
            return special[token]
        raise AttributeError(name)


Tokenizer = ByteTokenizer | BPETokenizer


def build_tokenizer(spec: str) -> Tokenizer:
    """`spec` is "bytes" or the path of a tokenizer.json."""
    return ByteTokenizer() if spec == "bytes" else BPETokenizer(spec)
