"""`mmtrain generate CKPT --prompt TEXT [--image F] [--audio F]`: continue a prompt (one process).

The prompt is one document, tokenized exactly as in training (mmtrain.data.packing): the text,
then the image, then the audio clip, without the closing <eos>. With `--prompts-file` every line
is such a prompt (the same --image/--audio for each), decoded as one batch.

Decoding uses a KV cache (mmtrain/model/kv_cache.py): the prompts, media included, go through the
model once (prefill), then each step feeds one token per prompt and attends to the cached keys and
values. `kv_cache=False` keeps the old path, re-running the whole sequence per token with
`logits_at`; the tests check that both give the same tokens. Decoding is greedy (--temperature 0,
the default) or sampled (temperature, optionally top-k), until <eos>, --max-new-tokens or the
model's context. Each prompt has its own sampling generator seeded with --seed, so a prompt's
continuation does not depend on the other prompts of the batch.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

from mmtrain import kernels
from mmtrain.data.batch import Batch, collate_rows
from mmtrain.data.config import MediaSpec
from mmtrain.data.packing import IGNORE, Row, TokenizedDoc, tokenize_document
from mmtrain.data.schema import Document, Segment
from mmtrain.data.tokenizer import SPECIAL_TOKENS, Tokenizer, build_tokenizer
from mmtrain.export import load_checkpoint_model
from mmtrain.model import FusionTransformer
from mmtrain.model.kv_cache import decode_step, prefill

DEVICES = ("auto", "cpu", "cuda")


def prompt_document(text: str, image: bytes | None, audio: bytes | None) -> Document:
    segments = [Segment(type="text", text=text)] if text else []
    if image is not None:
        segments.append(Segment(type="image", data=image, member="prompt.img"))
    if audio is not None:
        segments.append(Segment(type="audio", data=audio, member="prompt.wav"))
    if not segments:
        raise ValueError("nothing to continue: give --prompt, --image or --audio")
    return Document(key="prompt", segments=segments, source="generate")


def packed_batch(docs: list[TokenizedDoc], token_lists: list[list[int]], spec: MediaSpec,
                 tok: Tokenizer) -> Batch:
    """A batch of one row packing the given sequences as documents (positions restart, no
    attention across them), each with its prompt's media."""
    lens = [len(tokens) for tokens in token_lists]
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(int)
    ids = np.concatenate([np.asarray(t, np.int64) for t in token_lists])
    media = [(kind, int(start) + at, values) for doc, start in zip(docs, starts)
             for kind, at, values in doc.media]
    row = Row(tokens=ids, targets=np.full(len(ids), IGNORE, np.int64),
              positions=np.concatenate([np.arange(n) for n in lens]), doc_lens=lens,
              caption=np.zeros(len(ids), bool), media=media, real_tokens=len(ids))
    return collate_rows([row], spec, image_token=tok.image, audio_token=tok.audio)


def one_row_batch(doc: TokenizedDoc, tokens: list[int], spec: MediaSpec, tok: Tokenizer) -> Batch:
    """A batch of one row holding one document: the prompt (with its media) + generated tokens."""
    return packed_batch([doc], [tokens], spec, tok)


def banned_ids(tok: Tokenizer, vocab_size: int) -> torch.Tensor:
    """Ids never to emit: special tokens other than <eos>, and model ids past the tokenizer."""
    special = [tok.special[name] for name in SPECIAL_TOKENS if name != "<|eos|>"]
    return torch.tensor(sorted(set(special) | set(range(tok.vocab_size, vocab_size))), dtype=torch.long)


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: the whole vocabulary
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"--temperature={self.temperature} must be >= 0")
        if self.top_k < 0:
            raise ValueError(f"--top-k={self.top_k} must be >= 0 (0: no limit)")


class Sampler:
    """Picks the next token of each row from its logits; one seeded generator per row."""

    def __init__(self, sampling: Sampling, rows: int, banned: torch.Tensor) -> None:
        self.sampling, self.banned = sampling, banned
        self.generators = [torch.Generator().manual_seed(sampling.seed) for _ in range(rows)]

    def __call__(self, logits_BV: torch.Tensor) -> list[int]:
        logits = logits_BV.float().cpu()  # sync: the host decides what to feed next
        logits[:, self.banned] = float("-inf")
        s = self.sampling
        if s.temperature == 0:
            return logits.argmax(dim=-1).tolist()
        if 0 < s.top_k < logits.shape[-1]:
            kth = logits.topk(s.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits / s.temperature, dim=-1)
        return [int(torch.multinomial(p, 1, generator=g)) for p, g in zip(probs, self.generators)]


@torch.no_grad()
def generate_batch(model: FusionTransformer, tok: Tokenizer, docs: list[Document], *,
                   max_new_tokens: int, sampling: Sampling = Sampling(), kv_cache: bool = True,
                   max_image_pixels: int = 50_000_000) -> list[list[int]]:
    """The generated token ids of every prompt, in order (without the prompt and without <eos>).
    The model's device is where it runs."""
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens={max_new_tokens} must be >= 1")
    spec, cfg = model.cfg.media(), model.cfg
    tokenized = [tokenize_document(doc, tok, spec, max_image_pixels=max_image_pixels) for doc in docs]
    prompts = [t.tokens[:-1].tolist() for t in tokenized]  # drop <eos>: the document continues
    for i, tokens in enumerate(prompts):
        if len(tokens) >= cfg.max_seq_len:
            raise ValueError(f"prompt {i + 1} is {len(tokens)} tokens (media included); the model's "
                             f"context is model.max_seq_len={cfg.max_seq_len}")
    banned = banned_ids(tok, cfg.vocab_size)
    if not kv_cache:  # the reference: each prompt alone, the whole sequence per token
        return [_decode_full(model, tok, doc, tokens, max_new_tokens, Sampler(sampling, 1, banned))
                for doc, tokens in zip(tokenized, prompts)]
    device = model.tok_embeddings.weight.device
    batch = packed_batch(tokenized, prompts, spec, tok).to(device)
    capacity = max(len(t) for t in prompts) + max_new_tokens
    logits, cache = prefill(model, batch, capacity)
    sampler = Sampler(sampling, len(prompts), banned)
    out: list[list[int]] = [[] for _ in prompts]
    active = [True] * len(prompts)
    while True:
        next_ids = sampler(logits)
        for b, next_id in enumerate(next_ids):
            if active[b]:
                active[b] = _accept(out[b], next_id, len(prompts[b]), tok.eos, max_new_tokens,
                                    cfg.max_seq_len)
        if not any(active):
            return out
        # Finished rows are fed too (their output is no longer read): the batch keeps its shape.
        logits = decode_step(model, cache, torch.tensor(next_ids, device=device))


def _accept(out: list[int], next_id: int, prompt_len: int, eos: int, max_new_tokens: int,
            max_seq_len: int) -> bool:
    """Append next_id to a row's output unless it is <eos>; whether the row goes on."""
    if next_id == eos:
        return False
    out.append(next_id)
    return len(out) < max_new_tokens and prompt_len + len(out) < max_seq_len


def _decode_full(model: FusionTransformer, tok: Tokenizer, doc: TokenizedDoc, prompt: list[int],
                 max_new_tokens: int, sampler: Sampler) -> list[int]:
    device = model.tok_embeddings.weight.device
    spec, tokens, out = model.cfg.media(), list(prompt), []
    while True:
        batch = one_row_batch(doc, tokens, spec, tok).to(device)
        logits = model.logits_at(batch, torch.tensor([len(tokens) - 1], device=device))
        next_id = sampler(logits)[0]
        if not _accept(out, next_id, len(prompt), tok.eos, max_new_tokens, model.cfg.max_seq_len):
            return out
        tokens.append(next_id)


def generate(model: FusionTransformer, tok: Tokenizer, doc: Document, *, max_new_tokens: int,
             temperature: float, seed: int, top_k: int = 0, kv_cache: bool = True,
             max_image_pixels: int = 50_000_000) -> list[int]:
    """The generated token ids of one prompt (without the prompt and without <eos>)."""
    return generate_batch(model, tok, [doc], max_new_tokens=max_new_tokens,
                          sampling=Sampling(temperature=temperature, top_k=top_k, seed=seed),
                          kv_cache=kv_cache, max_image_pixels=max_image_pixels)[0]


def resolve_device(name: str) -> torch.device:
    """--device: auto is cuda when a GPU is visible, else cpu; cuda without a GPU is an error."""
    if name not in DEVICES:
        raise ValueError(f"--device must be one of {DEVICES}, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is visible to torch "
                         "(torch.cuda.is_available() is False); use --device cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def read_prompts(path: str) -> list[str]:
    """One prompt per line: lines end at \n (or \r\n); a final newline adds no prompt."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--prompts-file {path}: file does not exist")
    try:
        text = p.read_bytes().decode("utf-8")  # no universal newlines: a lone \r stays in its prompt
    except UnicodeDecodeError as e:
        raise ValueError(f"--prompts-file {path}: not UTF-8 text ({e})") from None
    # Not str.splitlines: it also splits at \x0b, \x0c, \u2028 ..., which may be in a prompt.
    lines = [line.removesuffix("\r") for line in text.removesuffix("\n").split("\n")] if text else []
    if not lines:
        raise ValueError(f"--prompts-file {path}: no prompts (the file is empty)")
    return lines


def one_line(text: str) -> str:
    """A continuation on one output line: backslash, newline and carriage return escaped."""
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


def _read(path: str | None, what: str) -> bytes | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--{what} {path}: file does not exist")
    return p.read_bytes()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmtrain generate", description=(
        "Continue a prompt (text, then an optional image and audio clip) with a checkpoint, "
        "with a KV cache, on a GPU when one is present."))
    p.add_argument("checkpoint", help="a step_XXXXXXXX directory, or a run / checkpoints directory")
    p.add_argument("--prompt", default="", help="prompt text")
    p.add_argument("--prompts-file", help="one prompt per line, decoded as a batch; prints one "
                   "continuation per line, in order (newlines in it escaped as \\n)")
    p.add_argument("--image", help="image file (jpg/png/webp) placed after the prompt text")
    p.add_argument("--audio", help="audio file (wav/flac) placed after the prompt (and image)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens "
                   "(0: all; needs --temperature > 0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (temperature > 0)")
    p.add_argument("--device", default="auto", choices=DEVICES,
                   help="auto (default): cuda when a GPU is present, else cpu")
    return p


def prompt_documents(texts: list[str], image: bytes | None, audio: bytes | None,
                     prompts_file: str | None = None) -> list[Document]:
    """One prompt document per text, each with the same media (--prompts-file: the file's lines)."""
    docs = []
    for i, text in enumerate(texts):
        if prompts_file is not None and not text and image is None and audio is None:
            raise ValueError(f"--prompts-file {prompts_file} line {i + 1} is empty (and no "
                             "--image/--audio): nothing to continue")
        docs.append(prompt_document(text, image, audio))
    return docs


def output_lines(tok: Tokenizer, outputs: list[list[int]], one_per_line: bool) -> list[str]:
    """What the command prints: the decoded continuations, escaped to one line each for a batch."""
    texts = [tok.decode(ids) for ids in outputs]
    return [one_line(t) for t in texts] if one_per_line else texts


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens={args.max_new_tokens} must be >= 1")
    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    if args.top_k and args.temperature == 0:
        print("mmtrain generate: warning: --top-k has no effect with --temperature 0 (greedy)",
              file=sys.stderr, flush=True)
    if args.prompts_file is not None and args.prompt:
        raise ValueError("give --prompt or --prompts-file, not both")
    device = resolve_device(args.device)
    image, audio = _read(args.image, "image"), _read(args.audio, "audio")
    texts = [args.prompt] if args.prompts_file is None else read_prompts(args.prompts_file)
    docs = prompt_documents(texts, image, audio, args.prompts_file)

    kernels.set_backend("auto")  # CPU: the reference kernels; CUDA: the per-case choice
    model, cfg, _ = load_checkpoint_model(args.checkpoint)
    model = model.to(device)  # fp32, as the checkpoint's weights are gathered
    tok = build_tokenizer(cfg.data.tokenizer)
    outputs = generate_batch(model, tok, docs, max_new_tokens=args.max_new_tokens,
                             sampling=sampling, max_image_pixels=cfg.data.max_image_pixels)
    for line in output_lines(tok, outputs, one_per_line=args.prompts_file is not None):
        print(line, flush=True)
    return 0


if __name__ == "__main__":  # same as `mmtrain generate` (which does not come through here)
    from mmtrain.errors import exit_code

    sys.exit(exit_code("mmtrain generate", main, sys.argv[1:]))
