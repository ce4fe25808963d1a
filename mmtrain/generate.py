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

Media output (`--image-out x.png`, `--audio-out y.wav`; `generate_media` + `media_bytes`): the
prompt is a caption, laid out as in training, `<bos> caption <|image_begin|>`; the model then
samples exactly the tokenizer's number of codes (16 for a 4x4 image, 25 for audio) among that
kind's code ids only, batched over prompts with the KV cache, optionally with classifier-free
guidance (--cfg) against the caption-dropped prompt `<bos> <|image_begin|>` in the same batch.
The run's media tokenizer (checked against the fingerprint the checkpoint recorded) decodes the
codes to a PNG or a WAV. Text generation never emits code ids.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
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
from mmtrain.fileio import atomic_write_bytes
from mmtrain.media_tokenizers import (AudioTokenizer, ImageTokenizer, MediaTokenizer, Vocoder,
                                      load_tokenizer)
from mmtrain.model import FusionTransformer, ModelConfig
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


def banned_ids(tok: Tokenizer, total_vocab: int) -> torch.Tensor:
    """Ids text generation never emits: special tokens other than <eos>, and every model id past
    the tokenizer (the model's unused text rows and its image/audio codes, up to
    model.total_vocab)."""
    special = [tok.special[name] for name in SPECIAL_TOKENS if name != "<|eos|>"]
    return torch.tensor(sorted(set(special) | set(range(tok.vocab_size, total_vocab))), dtype=torch.long)


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
    banned = banned_ids(tok, cfg.total_vocab)
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


# ------------------------------------------------------------------ media output (issue 15)
# A generated media item is laid out as in training (docs/architecture.md, "Any-to-any"):
# `<bos> caption <|image_begin|> c_1 … c_n <|image_end|>`, code c at token id first + c, where
# [first, stop) = model.cfg.code_range(kind). Generation feeds the prompt up to the begin token and
# samples exactly n = prod(code_shape) tokens among that kind's codes.

MEDIA_KINDS = ("image", "audio")
_NO_BAN = torch.zeros(0, dtype=torch.long)  # media logits are sliced to the code range instead


def media_prompt_ids(tok: Tokenizer, kind: str, text: str) -> list[int]:
    """`<bos> + tok.encode(text) + <|image_begin|>` (or `<|audio_begin|>`): the training layout of
    a caption before its generated item. An empty text is the caption-dropped (unconditional)
    prompt `<bos> <|image_begin|>` that classifier-free guidance contrasts with."""
    begin = tok.image_begin if kind == "image" else tok.audio_begin
    return [tok.bos, *tok.encode(text), begin]


def check_media_model(model_cfg: ModelConfig, kind: str, media_tokenizer: MediaTokenizer) -> None:
    """Refuse a kind the model has no codes for, or a tokenizer whose codebook size is not the
    model's."""
    if kind not in MEDIA_KINDS:
        raise ValueError(f"media kind {kind!r} is unknown (known: {', '.join(MEDIA_KINDS)})")
    if media_tokenizer.kind != kind:
        raise ValueError(f"a {media_tokenizer.kind} tokenizer cannot decode {kind} codes")
    codes = model_cfg.image_codes if kind == "image" else model_cfg.audio_codes
    if codes == 0:
        raise ValueError(f"this model was trained without {kind} generation "
                         f"(model.{kind}_codes=0)")
    if media_tokenizer.codebook_size != codes:
        raise ValueError(f"the {kind} tokenizer has {media_tokenizer.codebook_size} codes; the "
                         f"model was trained with model.{kind}_codes={codes}")


@torch.no_grad()
def generate_media(model: FusionTransformer, tok: Tokenizer, media_tokenizer: MediaTokenizer,
                   kind: str, prompts: list[str], *, sampling: Sampling = Sampling(),
                   cfg_scale: float = 1.0, kv_cache: bool = True) -> list[np.ndarray]:
    """The codes of one generated image (or audio clip) per prompt, int64 arrays of
    `media_tokenizer.code_shape` (image 8x8 row-major, audio 25), in [0, codebook_size).

    All prompts decode as one KV-cached batch; each has its own generator seeded with
    sampling.seed (as for text), so its result does not depend on the other prompts.
    cfg_scale: classifier-free guidance. 1.0 (the default) is no guidance: only the conditional
    prompts run. Otherwise each prompt gets an unconditional row `<bos> <|begin|>` in the same
    batch, the logits are uncond + cfg_scale·(cond − uncond) (0: unconditional only; > 1:
    stronger adherence to the caption), and the sampled code is fed to both rows.
    kv_cache=False is the reference: every step recomputes each whole sequence (tests only)."""
    check_media_model(model.cfg, kind, media_tokenizer)
    if not (math.isfinite(cfg_scale) and cfg_scale >= 0):
        raise ValueError(f"--cfg={cfg_scale} must be a finite number >= 0 (1: no guidance)")
    if not prompts:
        raise ValueError("no prompts to generate media for")
    shape = tuple(media_tokenizer.code_shape)
    n_codes = math.prod(shape)
    cond = [media_prompt_ids(tok, kind, text) for text in prompts]
    for i, ids in enumerate(cond):
        if len(ids) + n_codes > model.cfg.max_seq_len:
            raise ValueError(f"prompt {i + 1} is {len(ids)} tokens; with its {n_codes} {kind} "
                             f"codes it exceeds the model's context "
                             f"model.max_seq_len={model.cfg.max_seq_len}")
    uncond = media_prompt_ids(tok, kind, "") if cfg_scale != 1.0 else None
    decode = _media_cached if kv_cache else _media_full
    codes = decode(model, tok, cond, uncond, cfg_scale, n_codes, model.cfg.code_range(kind),
                   sampling)
    return [np.asarray(row, np.int64).reshape(shape) for row in codes]


def _guided(logits_BV: torch.Tensor, uncond_BV: torch.Tensor | None, scale: float) -> torch.Tensor:
    return logits_BV if uncond_BV is None else uncond_BV + scale * (logits_BV - uncond_BV)


def _token_batch(token_lists: list[list[int]], model: FusionTransformer, tok: Tokenizer) -> Batch:
    """Token-only sequences (no media inputs) packed as documents of one row, on the model's
    device."""
    docs = [TokenizedDoc(np.asarray(t, np.int64), np.zeros(len(t), bool), []) for t in token_lists]
    batch = packed_batch(docs, token_lists, model.cfg.media(), tok)
    return batch.to(model.tok_embeddings.weight.device)


def _media_cached(model: FusionTransformer, tok: Tokenizer, cond: list[list[int]],
                  uncond: list[int] | None, scale: float, n_codes: int,
                  code_range: tuple[int, int], sampling: Sampling) -> list[list[int]]:
    """Rows of the cache: the P conditional prompts, then (with guidance) P unconditional ones."""
    first, stop = code_range
    P, device = len(cond), model.tok_embeddings.weight.device
    rows = cond + ([uncond] * P if uncond is not None else [])
    # The last code is sampled, never fed: n_codes - 1 decode steps after the prompt.
    logits, cache = prefill(model, _token_batch(rows, model, tok),
                            capacity=max(map(len, rows)) + n_codes - 1)
    sampler = Sampler(sampling, P, _NO_BAN)
    out: list[list[int]] = [[] for _ in cond]
    for step in range(n_codes):
        guided = _guided(logits[:P], logits[P:] if uncond is not None else None, scale)
        picked = sampler(guided[:, first:stop])  # sync; the code range only: others are -inf
        for codes, code in zip(out, picked):
            codes.append(code)
        if step == n_codes - 1:
            return out
        ids_P = torch.tensor(picked, device=device) + first
        logits = decode_step(model, cache, ids_P.repeat(len(rows) // P))


def _media_full(model: FusionTransformer, tok: Tokenizer, cond: list[list[int]],
                uncond: list[int] | None, scale: float, n_codes: int,
                code_range: tuple[int, int], sampling: Sampling) -> list[list[int]]:
    """The reference: each prompt alone, the whole sequence (and the unconditional one) per code."""
    first, stop = code_range
    device = model.tok_embeddings.weight.device
    out = []
    for prompt in cond:
        seqs = [prompt] + ([uncond] if uncond is not None else [])
        sampler, codes = Sampler(sampling, 1, _NO_BAN), []
        for _ in range(n_codes):
            ends = torch.tensor(np.cumsum([len(s) for s in seqs]) - 1, device=device)
            logits = model.logits_at(_token_batch(seqs, model, tok), ends)
            guided = _guided(logits[:1], logits[1:] if uncond is not None else None, scale)
            code = sampler(guided[:, first:stop])[0]
            codes.append(code)
            seqs = [s + [first + code] for s in seqs]
        out.append(codes)
    return out


def media_bytes(media_tokenizer: MediaTokenizer, codes: list[np.ndarray], *,
                vocoder: Vocoder | None = None) -> list[bytes]:
    """Codes (from generate_media) → one file's bytes each: PNG for images, 16-bit WAV at the
    tokenizer's sample rate for audio (mel → sound by `vocoder`, Griffin-Lim by default). The
    tokenizer decodes on its own device."""
    if not codes:
        return []
    device = next(media_tokenizer.parameters()).device
    decoded = media_tokenizer.decode(torch.as_tensor(np.stack(codes), device=device))
    if media_tokenizer.kind == "image":
        return [ImageTokenizer.to_png(pixels) for pixels in decoded]
    rate = media_tokenizer.config.sample_rate
    return [AudioTokenizer.to_wav(media_tokenizer.to_wave(mel, vocoder), rate) for mel in decoded]


def recorded_media_fingerprints(ckpt: Path) -> dict[str, str] | None:
    """The media tokenizer fingerprints a checkpoint recorded with its loader state
    (`loader/rank_0.json` key "media_tokenizers"), or None when it records none."""
    path = ckpt / "loader" / "rank_0.json"
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    recorded = state.get("media_tokenizers") if isinstance(state, dict) else None
    return recorded if isinstance(recorded, dict) else None


def check_fingerprint(kind: str, directory: str, fingerprint: str,
                      recorded: dict[str, str] | None, where: str) -> str | None:
    """Refuse a tokenizer other than the one the checkpoint was trained with. Returns a warning
    when the checkpoint (`where`) recorded nothing to compare with, else None."""
    if recorded is None or kind not in recorded:
        return (f"{where} records no {kind} tokenizer fingerprint: cannot check that {directory} "
                f"is the {kind} tokenizer the model was trained with")
    if recorded[kind] != fingerprint:
        raise ValueError(f"the {kind} tokenizer {directory} has fingerprint {fingerprint}, but the "
                         f"checkpoint was trained with {recorded[kind]} (recorded in {where}): "
                         f"its codes would mean other {kind}s; give the run's tokenizer with "
                         f"--{kind}-tokenizer")
    return None


def load_media_tokenizer(kind: str, directory: str, *, model_cfg: ModelConfig,
                         recorded: dict[str, str] | None, where: str,
                         device: torch.device | str = "cpu") -> tuple[MediaTokenizer, str | None]:
    """The tokenizer in `directory`, checked against the model (codes, codebook size) and the
    checkpoint's recorded fingerprint; returns it and a warning (or None)."""
    if not Path(directory).is_dir():
        raise ValueError(f"{kind} tokenizer {directory}: no such directory (relative paths in the "
                         f"run's data.{kind}_tokenizer are read from the current directory; give "
                         f"--{kind}-tokenizer DIR)")
    media_tokenizer = load_tokenizer(directory, kind=kind, device=device)
    check_media_model(model_cfg, kind, media_tokenizer)
    return media_tokenizer, check_fingerprint(kind, directory, media_tokenizer.fingerprint,
                                              recorded, where)


def media_output_paths(value: str, kind: str, count: int, numbered: bool) -> list[Path]:
    """Where --image-out / --audio-out VALUE writes `count` items.

    VALUE is a file (`x.png`; `.wav` for audio) or a directory (one that exists, or a path ending
    in `/`: then DIR/image.png or DIR/audio.wav). `numbered` (--prompts-file) inserts the prompt's
    line number before the suffix: x-001.png, x-002.png, … (at least 3 digits)."""
    suffix = ".png" if kind == "image" else ".wav"
    path = Path(value)
    if value.endswith(("/", os.sep)) or path.is_dir():
        stem = path / kind
    elif path.suffix.lower() == suffix:
        stem = path.with_suffix("")
    else:
        raise ValueError(f"--{kind}-out {value}: must name a {suffix} file or a directory "
                         f"(ending in /); {kind}s are written as {suffix[1:].upper()}")
    if not numbered:
        return [stem.parent / (stem.name + suffix)]
    width = max(3, len(str(count)))
    return [stem.parent / f"{stem.name}-{i:0{width}d}{suffix}" for i in range(1, count + 1)]


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
        "with a KV cache, on a GPU when one is present. With --image-out / --audio-out, generate "
        "an image / audio clip for the prompt (its caption) instead of text."))
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
    media = p.add_argument_group("media output", (
        "The prompt is a caption: the model samples the 64 image codes (25 audio codes) that "
        "follow `<bos> caption <|image_begin|>`, and the run's media tokenizer decodes them to a PNG (a "
        "16 kHz WAV). --temperature, --top-k and --seed apply; --max-new-tokens does not. Prints "
        "the paths written, one per line. With --prompts-file, PATH x.png becomes x-001.png, "
        "x-002.png, ... (one per line of the file, numbered from 1); a directory (existing, or "
        "ending in /) gets DIR/image.png, or DIR/image-001.png, ... (audio: audio*.wav)."))
    media.add_argument("--image-out", metavar="PATH", help="write a generated image (.png or a "
                       "directory)")
    media.add_argument("--audio-out", metavar="PATH", help="write a generated audio clip (.wav or "
                       "a directory)")
    media.add_argument("--cfg", type=float, default=1.0, metavar="SCALE", help=(
        "classifier-free guidance scale: logits = uncond + SCALE·(cond - uncond), uncond being "
        "the caption-dropped prompt; 1 (default): no guidance, 0: unconditional, > 1: follow the "
        "caption more closely"))
    media.add_argument("--image-tokenizer", metavar="DIR", help="image tokenizer directory "
                       "(default: the run's data.image_tokenizer); its fingerprint must be the "
                       "one the checkpoint recorded")
    media.add_argument("--audio-tokenizer", metavar="DIR", help="audio tokenizer directory "
                       "(default: the run's data.audio_tokenizer)")
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
    texts = [args.prompt] if args.prompts_file is None else read_prompts(args.prompts_file)
    outs = {kind: getattr(args, f"{kind}_out") for kind in MEDIA_KINDS}
    if any(outs.values()):
        return _main_media(args, texts, outs, sampling, device)
    if args.cfg != 1.0:
        _warn("--cfg applies to --image-out / --audio-out only")
    image, audio = _read(args.image, "image"), _read(args.audio, "audio")
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


def _main_media(args: argparse.Namespace, texts: list[str], outs: dict[str, str | None],
                sampling: Sampling, device: torch.device) -> int:
    """--image-out / --audio-out: one generated item per prompt and kind, written to files."""
    if args.image is not None or args.audio is not None:
        raise ValueError("--image/--audio (media in the prompt) cannot be combined with "
                         "--image-out/--audio-out: media generation takes a text prompt")
    if not (math.isfinite(args.cfg) and args.cfg >= 0):
        raise ValueError(f"--cfg={args.cfg} must be a finite number >= 0 (1: no guidance)")
    # Checked before the model loads: a bad path fails in a second.
    paths = {kind: media_output_paths(value, kind, len(texts), args.prompts_file is not None)
             for kind, value in outs.items() if value}

    kernels.set_backend("auto")
    model, cfg, ckpt = load_checkpoint_model(args.checkpoint)
    model = model.to(device)
    tok = build_tokenizer(cfg.data.tokenizer)
    recorded = recorded_media_fingerprints(ckpt)
    where = str(ckpt / "loader" / "rank_0.json")
    for kind, kind_paths in paths.items():
        directory = getattr(args, f"{kind}_tokenizer") or getattr(cfg.data, f"{kind}_tokenizer")
        if not directory:
            raise ValueError(f"--{kind}-out: the run's config has no data.{kind}_tokenizer; "
                             f"give --{kind}-tokenizer DIR")
        media_tokenizer, warning = load_media_tokenizer(kind, directory, model_cfg=cfg.model,
                                                        recorded=recorded, where=where,
                                                        device=device)
        if warning:
            _warn(warning)
        codes = generate_media(model, tok, media_tokenizer, kind, texts, sampling=sampling,
                               cfg_scale=args.cfg)
        for path, data in zip(kind_paths, media_bytes(media_tokenizer, codes)):
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, data)
            print(path, flush=True)
    return 0


def _warn(message: str) -> None:
    print(f"mmtrain generate: warning: {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":  # same as `mmtrain generate` (which does not come through here)
    from mmtrain.errors import exit_code

    sys.exit(exit_code("mmtrain generate", main, sys.argv[1:]))
