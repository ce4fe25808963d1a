"""`mmtrain generate CKPT --prompt TEXT [--image F] [--audio F]`: continue a prompt (one CPU process).

The prompt is one document, tokenized exactly as in training (mmtrain.data.packing): the text,
then the image, then the audio clip, without the closing <eos>. Decoding is greedy
(--temperature 0, the default) or sampled, one token at a time with the model's `logits_at`
(no KV cache: the demo models are small), until <eos>, --max-new-tokens or the model's context.
"""

from __future__ import annotations

import argparse
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


def prompt_document(text: str, image: bytes | None, audio: bytes | None) -> Document:
    segments = [Segment(type="text", text=text)] if text else []
    if image is not None:
        segments.append(Segment(type="image", data=image, member="prompt.img"))
    if audio is not None:
        segments.append(Segment(type="audio", data=audio, member="prompt.wav"))
    if not segments:
        raise ValueError("nothing to continue: give --prompt, --image or --audio")
    return Document(key="prompt", segments=segments, source="generate")


def one_row_batch(doc: TokenizedDoc, tokens: list[int], spec: MediaSpec, tok: Tokenizer) -> Batch:
    """A batch of one row holding one document: the prompt (with its media) + generated tokens."""
    ids = np.asarray(tokens, np.int64)
    n = len(ids)
    row = Row(tokens=ids, targets=np.full(n, IGNORE, np.int64), positions=np.arange(n),
              doc_lens=[n], caption=np.zeros(n, bool), media=list(doc.media), real_tokens=n)
    return collate_rows([row], spec, image_token=tok.image, audio_token=tok.audio)


def banned_ids(tok: Tokenizer, vocab_size: int) -> torch.Tensor:
    """Ids never to emit: special tokens other than <eos>, and model ids past the tokenizer."""
    special = [tok.special[name] for name in SPECIAL_TOKENS if name != "<|eos|>"]
    return torch.tensor(sorted(set(special) | set(range(tok.vocab_size, vocab_size))), dtype=torch.long)


@torch.no_grad()
def generate(model: FusionTransformer, tok: Tokenizer, doc: Document, *, max_new_tokens: int,
             temperature: float, seed: int, max_image_pixels: int = 50_000_000) -> list[int]:
    """The generated token ids (without the prompt and without <eos>)."""
    spec = model.cfg.media()
    tokenized = tokenize_document(doc, tok, spec, max_image_pixels=max_image_pixels)
    tokens = tokenized.tokens[:-1].tolist()  # drop <eos>: the document continues
    if len(tokens) >= model.cfg.max_seq_len:
        raise ValueError(f"the prompt is {len(tokens)} tokens (media included); the model's "
                         f"context is model.max_seq_len={model.cfg.max_seq_len}")
    banned = banned_ids(tok, model.cfg.vocab_size)
    generator = torch.Generator().manual_seed(seed)
    out: list[int] = []
    while len(out) < max_new_tokens and len(tokens) < model.cfg.max_seq_len:
        batch = one_row_batch(tokenized, tokens, spec, tok)
        logits = model.logits_at(batch, torch.tensor([len(tokens) - 1]))[0]
        logits[banned] = float("-inf")
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)
            next_id = int(torch.multinomial(probs, 1, generator=generator))
        else:
            next_id = int(logits.argmax())
        if next_id == tok.eos:
            break
        out.append(next_id)
        tokens.append(next_id)
    return out


def _read(path: str | None, what: str) -> bytes | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--{what} {path}: file does not exist")
    return p.read_bytes()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mmtrain generate", description=(
        "Continue a prompt (text, then an optional image and audio clip) with a checkpoint, "
        "on one CPU process."))
    p.add_argument("checkpoint", help="a step_XXXXXXXX directory, or a run / checkpoints directory")
    p.add_argument("--prompt", default="", help="prompt text")
    p.add_argument("--image", help="image file (jpg/png/webp) placed after the prompt text")
    p.add_argument("--audio", help="audio file (wav/flac) placed after the prompt (and image)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (temperature > 0)")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens={args.max_new_tokens} must be >= 1")
    if args.temperature < 0:
        raise ValueError(f"--temperature={args.temperature} must be >= 0")

    kernels.set_backend("auto")  # CPU: the reference kernels
    doc = prompt_document(args.prompt, _read(args.image, "image"), _read(args.audio, "audio"))
    model, cfg, _ = load_checkpoint_model(args.checkpoint)
    tok = build_tokenizer(cfg.data.tokenizer)
    ids = generate(model, tok, doc, max_new_tokens=args.max_new_tokens,
                   temperature=args.temperature, seed=args.seed,
                   max_image_pixels=cfg.data.max_image_pixels)
    print(tok.decode(ids), flush=True)
    return 0


if __name__ == "__main__":  # same as `mmtrain generate` (which does not come through here)
    from mmtrain.errors import exit_code

    sys.exit(exit_code("mmtrain generate", main, sys.argv[1:]))
