"""`mmtrain data train-tokenizer`: a byte-level BPE on the datasets' text, with the model's
special tokens, saved as a HF `tokenizers` tokenizer.json that `BPETokenizer` loads.

Byte-level: every string encodes (no unknown token) and decode(encode(text)) == text. The
special tokens (SPECIAL_TOKENS) get the first ids and are never split or merged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from data_tools.dataset import iter_samples
from data_tools.shards import atomic_write_bytes
from mmtrain.data.schema import SampleError, parse_sample
from mmtrain.data.tokenizer import SPECIAL_TOKENS


def iter_texts(directories: list[str], max_samples: int = 0) -> Iterator[str]:
    """The text segments of the datasets' samples, in order (at most max_samples samples)."""
    n = 0
    for directory in directories:
        for _, key, members in iter_samples(directory):
            if max_samples and n >= max_samples:
                return
            n += 1
            try:
                doc = parse_sample(key, members)
            except SampleError:
                continue  # `verify` reports these
            for seg in doc.segments:
                if seg.type == "text" and seg.text:
                    yield seg.text


def train_tokenizer(directories: list[str], out: str, *, vocab_size: int = 8192,
                    min_frequency: int = 2, max_samples: int = 0) -> int:
    """Train and write `out` (tokenizer.json); returns the vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    minimum = 256 + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ValueError(f"--vocab-size={vocab_size} must be >= {minimum} (256 bytes + "
                         f"{len(SPECIAL_TOKENS)} special tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(iter_texts(directories, max_samples), trainer=trainer)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(Path(out), tok.to_str(pretty=True).encode("utf-8"))
    return tok.get_vocab_size()
