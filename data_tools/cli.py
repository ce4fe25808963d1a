"""`mmtrain data ...`: the shard tools' command line (mmtrain/cli.py hands over argv)."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import textwrap

from data_tools.errors import REJECT_CODES

PROG = "mmtrain data"


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ValueError as e:  # user and data errors: one clear line, no traceback
        print(f"{PROG} {args.command}: error: {e}", file=sys.stderr)
        return 2


def parse_size(text: str) -> int:
    """'512M', '1.5G', '100k', '4096' → bytes (powers of 1024)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)i?[bB]?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 512M or 1G")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def _parser(sub: argparse._SubParsersAction, name: str, summary: str, details: str,
            example: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=summary, formatter_class=argparse.RawDescriptionHelpFormatter,
                          description=summary + "\n\n" + textwrap.dedent(details).strip(),
                          epilog="example:\n" + textwrap.indent(textwrap.dedent(example).strip(),
                                                                "  "))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Build, check and transform "
                                     "WebDataset shards (dataset.json + manifest.parquet).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_build(sub)
    _add_synth(sub)
    _add_verify(sub)
    _add_stats(sub)
    _add_inspect(sub)
    _add_dedup(sub)
    _add_split(sub)
    _add_train_tokenizer(sub)
    _add_train_media_tokenizer(sub)
    _add_tokenize_media(sub)
    return parser


def _add_shard_limits(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-samples", type=int, default=10_000, help="samples per shard at most "
                   "(default 10000)")
    p.add_argument("--max-bytes", type=parse_size, default=512 << 20, help="bytes per shard at "
                   "most, e.g. 256M, 1G (default 512M); a larger sample gets a shard of its own")


# ------------------------------------------------------------------------------------- build

def _add_build(sub: argparse._SubParsersAction) -> None:
    codes = "\n".join(f"  {code:<19}{why}" for code, why in REJECT_CODES.items())
    p = _parser(sub, "build", "Build WebDataset shards from tables, tars or text.", """
        KIND is one of:
          image-text   table (parquet/CSV/TSV/JSONL) of image (path, bytes or URL) + caption
          audio-text   table of audio (WAV/FLAC/MP3/Ogg/Opus path, bytes or URL) + transcript
          interleaved  parquet/JSONL with aligned lists `texts` and `images`, exactly one of each
                       pair null (OBELICS); images as paths, bytes or URLs
          mmc4         MMC4 JSONL: `text_list` + `image_info` (each image goes before the sentence
                       at its matched_text_index; image_name under --media-root, or raw_url
                       with --download)
          text         JSONL (or any table) with a `text` field
          wds          WebDataset tars: KEY.jpg|png|webp|gif + KEY.txt [+ KEY.json]
                       (img2dataset), KEY.wav|flac|mp3|ogg|opus + KEY.txt (or the text in
                       KEY.json with --text-field), KEY.txt, or mmtrain's own layout (re-shard);
                       suffixes in any case, members in folders (dir/KEY.jpg: key dir/KEY)
        INPUT: files, directories (their matching files, sorted) or globs, read in that order.
        CSV is read by RFC 4180 (quoted fields), TSV without any quoting; --header names the
        columns of a file without a header line (raw CC3M: --header caption,url).
        Columns default to the public datasets' names (caption/TEXT, image/path/url,
        texts/images, audio/audio_filepath, text/transcript/sentence, key); set them with
        --*-column. Other columns go to the sample's metadata. Media paths are relative to
        --media-root (default: the table's folder) and may not leave it; http(s) URLs are
        fetched only with --download; pipe: media are never run.

        Writes to OUT: shard-NNNNNN.tar (pairs as KEY.jpg + KEY.txt + KEY.json, as open_clip
        reads them; documents as KEY.json with ordered segments + KEY.0.jpg, ...),
        manifest.parquet (one row per sample), dataset.json (sha256 per shard, totals),
        rejected.jsonl (one line per skipped row: source_row, code, reason) and .build/ (resume
        records). Shards are written under a temporary name, fsynced and renamed. Rerunning the
        same command keeps the complete shards and builds only what is missing.

        A bad row never stops the build; it is skipped with one of these codes:
        """ + codes.replace("\n", "\n        "), """
        mmtrain data build image-text cc3m/Train_GCC-training.tsv -o shards/cc3m \\
            --header caption,url --download --image-max-side 512 --image-format jpeg
        mmtrain data build wds laion/{00000..00099}.tar -o shards/laion --min-image-side 64
        mmtrain data build wds laion-audio/ -o shards/audio --text-field text
        mmtrain data build audio-text cv/train.tsv -o shards/speech --media-root cv/clips \\
            --audio-mono --audio-sample-rate 16000 --audio-max-seconds 30
    """)
    p.add_argument("kind", metavar="KIND",
                   choices=("image-text", "audio-text", "interleaved", "mmc4", "text", "wds"))
    p.add_argument("inputs", nargs="+", metavar="INPUT")
    p.add_argument("-o", "--out", required=True, help="output directory, or an s3:// / gs:// URL "
                   "(staged locally, uploaded file by file, dataset.json last)")
    _add_shard_limits(p)
    g = p.add_argument_group("columns (tables)")
    g.add_argument("--key-column", default="key", help="column with the sample key (default: "
                   "key; samples without one, or with --key-column '', are numbered by row)")
    for role, what in (("text", "caption / transcript / text"), ("image", "image path or bytes"),
                       ("audio", "audio path or bytes"), ("texts", "list of texts (interleaved)"),
                       ("images", "list of images (interleaved)")):
        g.add_argument(f"--{role}-column", help=what)
    g.add_argument("--media-root", default="", help="folder that media paths are relative to "
                   "(default: each table's folder); paths may not leave it")
    g.add_argument("--header", default="", metavar="NAME,NAME", help="column names of CSV/TSV "
                   "files that have no header line (raw CC3M: caption,url)")
    g.add_argument("--text-field", default="", metavar="PATH", help="wds: take the text from "
                   "this field of KEY.json when there is no KEY.txt; dotted for nested fields "
                   "(caption.en); a list of strings gives its first")
    g = p.add_argument_group("download (media URLs)")
    g.add_argument("--download", action="store_true", help="fetch http(s) media URLs (tables, "
                   "OBELICS image lists, MMC4 raw_url); failures go to rejected.jsonl")
    g.add_argument("--download-workers", type=int, default=16, help="concurrent downloads "
                   "(default 16)")
    g.add_argument("--download-timeout", type=float, default=20.0, help="seconds per attempt "
                   "(default 20)")
    g.add_argument("--download-retries", type=int, default=2, help="retries after a timeout, "
                   "connection error, HTTP 429 or 5xx, with backoff 0.5 s, 1 s, ... (default 2)")
    g.add_argument("--download-max-bytes", type=parse_size, default=32 << 20, help="refuse "
                   "larger media (default 32M)")
    g = p.add_argument_group("filters and media")
    g.add_argument("--min-text-chars", type=int, default=0, help="skip samples with less text")
    g.add_argument("--max-text-chars", type=int, default=1_000_000, help="reject samples with "
                   "more text characters (text_too_long; default 1000000)")
    g.add_argument("--min-image-side", type=int, default=0, help="skip images smaller than this")
    g.add_argument("--max-image-pixels", type=int, default=50_000_000, help="reject images whose "
                   "header declares more pixels, before decoding (default 50000000)")
    g.add_argument("--image-max-side", type=int, default=0, help="resize larger images to fit")
    g.add_argument("--image-format", default="", choices=("", "jpeg", "png", "webp"),
                   help="re-encode images into this format (default: keep)")
    g.add_argument("--image-quality", type=int, default=90)
    g.add_argument("--audio-mono", action="store_true", help="down-mix audio to one channel")
    g.add_argument("--audio-sample-rate", type=int, default=0, help="resample audio to this rate")
    g.add_argument("--audio-max-seconds", type=float, default=0.0, help="clip longer audio")
    g.add_argument("--audio-format", default="", choices=("", "wav", "flac"),
                   help="re-encode audio into this format (default: keep)")
    g = p.add_argument_group("run")
    g.add_argument("--workers", type=int, default=0, help="worker processes (default: cores, "
                   "at most 8; 1: none)")
    g.add_argument("--limit", type=int, default=0, help="read only the first N rows")
    g.add_argument("--allow-pipe", action="store_true", help="follow pipe:CMD inputs (runs CMD "
                   "in a shell); refused otherwise")
    g.add_argument("--overwrite", action="store_true", help="start over if OUT holds another build")
    g.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=_run_build)


def _run_build(args: argparse.Namespace) -> int:
    from data_tools.build import BuildOptions, build
    from data_tools.download import DownloadOptions
    from data_tools.media import MediaOptions
    from data_tools.samples import SampleSpec

    roles = ("text", "image", "audio", "texts", "images")
    columns = {r: getattr(args, f"{r}_column") for r in roles if getattr(args, f"{r}_column")}
    media = MediaOptions(
        max_image_pixels=args.max_image_pixels, min_image_side=args.min_image_side,
        image_max_side=args.image_max_side, image_format=args.image_format,
        image_quality=args.image_quality, audio_mono=args.audio_mono,
        audio_sample_rate=args.audio_sample_rate, audio_max_seconds=args.audio_max_seconds,
        audio_format=args.audio_format, max_text_chars=args.max_text_chars)
    spec = SampleSpec(kind=args.kind, columns=columns, key_column=args.key_column, media=media,
                      min_text_chars=args.min_text_chars, text_field=args.text_field,
                      download=args.download)
    download = DownloadOptions(
        workers=args.download_workers, timeout=args.download_timeout,
        retries=args.download_retries, max_bytes=args.download_max_bytes) \
        if args.download else None
    header = tuple(name.strip() for name in args.header.split(",")) if args.header else ()
    summary = build(BuildOptions(
        out=args.out, inputs=tuple(args.inputs), spec=spec, max_samples=args.max_samples,
        max_bytes=args.max_bytes, media_root=args.media_root, limit=args.limit,
        allow_pipe=args.allow_pipe, overwrite=args.overwrite, workers=args.workers,
        progress=not args.no_progress, header=header, download=download))
    print("\n".join(summary.lines()))
    return 0


# ------------------------------------------------------------------------------------- synth

def _add_synth(sub: argparse._SubParsersAction) -> None:
    p = _parser(sub, "synth", "Write the procedural demo corpus (no download).", """
        Writes OUT_DIR/train and OUT_DIR/val, each with shards, manifest.parquet and dataset.json:
        pure text, image-caption, audio-caption and interleaved documents whose captions describe
        the media (coloured shapes, beeps). Deterministic from --seed.
        """, "mmtrain data synth data/demo --samples 4000 --seed 0")
    p.add_argument("out", metavar="OUT_DIR")
    p.add_argument("--samples", type=int, default=4000, help="training samples (default 4000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.1, help="val samples per train sample")
    p.add_argument("--shards", type=int, default=8, help="training shards (default 8)")
    p.add_argument("--workers", type=int, default=2)
    p.set_defaults(run=_run_synth)


def _run_synth(args: argparse.Namespace) -> int:
    from data_tools.synth import synth_corpus

    if args.samples < 1 or args.shards < 1 or not 0 < args.val_fraction < 1:
        raise ValueError("--samples and --shards must be >= 1, --val-fraction in (0, 1)")
    train, val = synth_corpus(args.out, samples=args.samples, seed=args.seed,
                              val_fraction=args.val_fraction, shards=args.shards,
                              workers=args.workers)
    for name, index in (("train", train), ("val", val)):
        t = index["totals"]
        print(f"{args.out}/{name}: {t['samples']} samples in {t['shards']} shards, "
              f"{t['bytes'] / 1e6:.1f} MB")
    return 0


# ------------------------------------------------------------------------------------ verify

def _add_verify(sub: argparse._SubParsersAction) -> None:
    p = _parser(sub, "verify", "Check a dataset against its dataset.json and manifest.", """
        For every shard listed in DIR/dataset.json: present, size and sha256 as recorded, sample
        count and keys as in manifest.parquet, every sample readable by the loader's schema and
        every image / audio member decodable (skip that with --no-decode). Shard files that
        dataset.json does not list are reported too. Prints each problem; exits 1 if any, 0 if
        none, and reports the throughput.
        """, "mmtrain data verify shards/cc3m --workers 8")
    p.add_argument("directory", metavar="DIR")
    p.add_argument("--no-decode", action="store_true", help="check hashes and structure only")
    p.add_argument("--workers", type=int, default=0, help="shards checked in parallel "
                   "(default: cores, at most 8)")
    p.add_argument("--max-image-pixels", type=int, default=50_000_000)
    p.set_defaults(run=_run_verify)


def _run_verify(args: argparse.Namespace) -> int:
    from data_tools.verify import verify

    workers = args.workers or min(8, os.cpu_count() or 1)
    r = verify(args.directory, decode=not args.no_decode, workers=workers,
               max_pixels=args.max_image_pixels)
    for problem in r.problems:
        print(f"PROBLEM {problem}")
    rate = r.bytes / max(r.seconds, 1e-9) / 1e6
    print(f"{'FAILED' if r.problems else 'OK'}: {args.directory}: {r.shards} shards, "
          f"{r.samples} samples, {r.bytes / 1e6:.1f} MB checked in {r.seconds:.1f} s "
          f"({rate:.0f} MB/s), {len(r.problems)} problems")
    return 1 if r.problems else 0


# ------------------------------------------------------------------------------------- stats

def _add_stats(sub: argparse._SubParsersAction) -> None:
    p = _parser(sub, "stats", "Summarise a dataset per modality.", """
        From DIR/manifest.parquet: per modality (text, image, audio) the samples that hold it,
        items (text characters, images, clips), estimated tokens and their distribution per
        sample (mean/p50/p90/p99/max), sizes per sample and the modality mix. --scan also reads
        the shards for image resolutions and formats, audio durations and rates, and the bytes
        each modality takes. --json prints the same as JSON.
        """, "mmtrain data stats shards/cc3m --scan")
    p.add_argument("directory", metavar="DIR")
    p.add_argument("--scan", action="store_true", help="also read media headers in the shards")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=_run_stats)


def _run_stats(args: argparse.Namespace) -> int:
    from data_tools.stats import compute_stats, format_stats

    s = compute_stats(args.directory, scan=args.scan)
    print(json.dumps(s, indent=2) if args.json else format_stats(s))
    return 0


# ----------------------------------------------------------------------------------- inspect

def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = _parser(sub, "inspect", "Print samples of a dataset.", """
        Prints the first N samples of DIR (or the sample --key): key, shard, source row,
        metadata, and each segment in order (text, or image size/format, or audio duration/rate).
        --contact-sheet writes the images of those samples as a grid PNG, labelled by key.
        """, "mmtrain data inspect shards/cc3m -n 16 --contact-sheet sheet.png")
    p.add_argument("directory", metavar="DIR")
    p.add_argument("-n", type=int, default=5, help="how many samples (default 5)")
    p.add_argument("--key", default="", help="print this sample only")
    p.add_argument("--contact-sheet", default="", metavar="PNG", help="write the images here")
    p.set_defaults(run=_run_inspect)


def _run_inspect(args: argparse.Namespace) -> int:
    from data_tools.inspect import inspect

    inspect(args.directory, n=args.n, key=args.key, contact_sheet=args.contact_sheet,
            out=sys.stdout)
    return 0


# ------------------------------------------------------------------------------------- dedup

def _add_dedup(sub: argparse._SubParsersAction) -> None:
    p = _parser(sub, "dedup", "Write a new dataset without duplicate samples.", """
        Reads the datasets INPUT... in order and keeps the first occurrence of each sample:
        exact duplicates have the same content hash (ordered texts + media bytes; keys and
        metadata ignored). With --near-images, a sample whose images (same count, same order) are
        each within --max-distance bits of an earlier kept sample's (64-bit dHash) is a near
        duplicate. Writes OUT with shards, manifest.parquet, dataset.json and removed.jsonl
        (each dropped sample: input, key, reason, duplicate_of). Inputs are not changed. With
        several inputs, keys are prefixed with the input's position ("0-KEY", "1-KEY").
        """, "mmtrain data dedup shards/cc3m shards/laion -o shards/mix --near-images")
    p.add_argument("inputs", nargs="+", metavar="INPUT")
    p.add_argument("-o", "--out", required=True)
    p.add_argument("--near-images", action="store_true", help="also drop near-duplicate images")
    p.add_argument("--max-distance", type=int, default=4, help="Hamming distance (bits of 64) "
                   "for near duplicates (default 4)")
    _add_shard_limits(p)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=_run_dedup)


def _run_dedup(args: argparse.Namespace) -> int:
    from data_tools.dedup import dedup

    r = dedup(args.inputs, args.out, near_images=args.near_images,
              max_distance=args.max_distance, max_samples=args.max_samples,
              max_bytes=args.max_bytes, overwrite=args.overwrite)
    print(f"{args.out}: kept {r['kept']} of {r['read']} samples in {r['shards']} shards; removed "
          f"{r['exact']} exact and {r['near']} near duplicates, {r['unreadable']} unreadable")
    return 0


# ------------------------------------------------------------------------------------- split

def _add_split(sub: argparse._SubParsersAction) -> None:
    p = _parser(sub, "split", "Split a dataset into train/ and val/ by key hash.", """
        A sample goes to OUT/val when the hash of (--seed, key) falls below --val-fraction,
        otherwise to OUT/train: the same split every time, whatever the shard order. Samples are
        copied byte for byte; each side gets shards, manifest.parquet and dataset.json.
        """, "mmtrain data split shards/cc3m -o shards/cc3m-split --val-fraction 0.01")
    p.add_argument("directory", metavar="INPUT")
    p.add_argument("-o", "--out", required=True)
    p.add_argument("--val-fraction", type=float, required=True)
    p.add_argument("--seed", type=int, default=0)
    _add_shard_limits(p)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=_run_split)


def _run_split(args: argparse.Namespace) -> int:
    from data_tools.split import split

    r = split(args.directory, args.out, val_fraction=args.val_fraction, seed=args.seed,
              max_samples=args.max_samples, max_bytes=args.max_bytes, overwrite=args.overwrite)
    for name in ("train", "val"):
        print(f"{args.out}/{name}: {r[name]['totals']['samples']} samples in "
              f"{r[name]['totals']['shards']} shards")
    return 0


# --------------------------------------------------------------------------- train-tokenizer

def _add_train_tokenizer(sub: argparse._SubParsersAction) -> None:
    p = _parser(sub, "train-tokenizer", "Train a byte-level BPE tokenizer on the shards' text.", """
        Reads the text segments of the datasets DIR..., trains a byte-level BPE (HF tokenizers)
        that reserves the model's special tokens (<|pad|>, <|bos|>, <|image|>, ...), and writes
        a tokenizer.json. Use it with `--set data.tokenizer=PATH` instead of raw bytes.
        """, "mmtrain data train-tokenizer shards/cc3m -o tokenizer.json --vocab-size 32000")
    p.add_argument("directories", nargs="+", metavar="DIR")
    p.add_argument("-o", "--out", required=True, help="tokenizer.json to write")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--min-frequency", type=int, default=2)
    p.add_argument("--max-samples", type=int, default=0, help="read at most this many samples")
    p.set_defaults(run=_run_train_tokenizer)


def _run_train_tokenizer(args: argparse.Namespace) -> int:
    from data_tools.tokenizer_train import train_tokenizer

    n = train_tokenizer(args.directories, args.out, vocab_size=args.vocab_size,
                        min_frequency=args.min_frequency, max_samples=args.max_samples)
    print(f"{args.out}: byte-level BPE, {n} tokens")
    return 0


# --------------------------------------------------------------------- media tokenizers

def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers")


def _add_train_media_tokenizer(sub: argparse._SubParsersAction) -> None:
    p = _parser(sub, "train-media-tokenizer", "Train an image or audio tokenizer (media → codes).",
                """
        Reads the image (KIND image) or audio (KIND audio) members of the datasets DIR..., trains
        a small convolutional autoencoder with a finite scalar quantizer (FSQ; codebook size =
        product of --levels) and writes OUT/weights.safetensors and OUT/config.json (format
        version, sha256 fingerprint, code shape, and the held-out reconstruction quality: PSNR in
        dB for images, mel distance in dB for audio). Held out: --val datasets, or else the
        samples whose key hashes into 10 %. Images are decoded as the loader decodes them, at
        --image-size; audio becomes librosa log-mel frames (--n-mels, --clip-seconds).
        """, """
        mmtrain data train-media-tokenizer image data/demo/train --val data/demo/val -o tok/image
        mmtrain data train-media-tokenizer audio data/demo/train --val data/demo/val -o tok/audio
    """)
    p.add_argument("kind", metavar="KIND", choices=("image", "audio"))
    p.add_argument("directories", nargs="+", metavar="DIR")
    p.add_argument("-o", "--out", required=True, help="tokenizer directory to write")
    p.add_argument("--val", action="append", default=[], metavar="DIR",
                   help="held-out dataset for the quality figure (repeatable)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: image "
                   "400, audio 300)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--levels", type=_int_list, default=None, metavar="L,L,...",
                   help="FSQ levels per latent channel (default 8,5,5,5: 1000 codes)")
    p.add_argument("--channels", type=_int_list, default=None, metavar="C,C,...",
                   help="encoder widths per stage; each stage halves the resolution (default: "
                   "image 32,64 → 8×8 codes for 32 px; audio 64,128 → 4 frames per code)")
    p.add_argument("--image-size", type=int, default=None, help="image side in pixels "
                   "(default 32, the demo's)")
    p.add_argument("--n-mels", type=int, default=None, help="mel bins (default 40)")
    p.add_argument("--clip-seconds", type=float, default=None, help="audio clip length "
                   "(default 1.0)")
    p.add_argument("--max-items", type=int, default=20000, help="training items read at most")
    p.add_argument("--eval-items", type=int, default=512, help="held-out items measured at most")
    p.add_argument("--device", default="cpu", help="torch device to train on (e.g. cuda)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default 1: "
                   "these small convolutions gain little from more, and extra threads spin "
                   "when other jobs share the cores; 0: torch's default)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=_run_train_media_tokenizer)


def _run_train_media_tokenizer(args: argparse.Namespace) -> int:
    import torch

    from data_tools.media_tokenizer import DEFAULT_STEPS, train_media_tokenizer
    from mmtrain.media_tokenizers import FitConfig

    if args.threads < 0:
        raise ValueError(f"--threads={args.threads} must be >= 0")
    config = {"levels": args.levels, "channels": args.channels}
    if args.kind == "image":
        config["image_size"] = args.image_size
    else:
        config.update(n_mels=args.n_mels, clip_seconds=args.clip_seconds)
    steps = DEFAULT_STEPS[args.kind] if args.steps is None else args.steps
    fit_config = FitConfig(steps=steps,
                           batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or threads)
    try:
        info = train_media_tokenizer(
            args.kind, args.directories, args.out, val=args.val, fit_config=fit_config,
            max_items=args.max_items, eval_items=args.eval_items, overwrite=args.overwrite,
            device=args.device, **{k: v for k, v in config.items() if v is not None})
    finally:
        torch.set_num_threads(threads)  # main() may run inside another program (tests)
    q, t = info["quality"], info["training"]
    figure = (f"PSNR {q['psnr_db']:.2f} dB (at init {q['at_init']:.2f})" if args.kind == "image"
              else f"mel distance {q['mel_distance_db']:.2f} dB (at init {q['at_init']:.2f})")
    print(f"{args.out}: {args.kind} tokenizer, {info['codebook_size']} codes, code shape "
          f"{info['code_shape']}, fingerprint {info['fingerprint'][:12]}; held-out {figure} "
          f"on {q['items']} items; {t['steps']} steps in {t['seconds']} s")
    return 0


def _add_tokenize_media(sub: argparse._SubParsersAction) -> None:
    p = _parser(sub, "tokenize-media", "Store media codes in a copy of a dataset.", """
        Writes OUT: the shards of DIR (same names, same samples, members byte for byte) plus,
        for each image or audio member KEY.M of a kind with a --tokenizer, a member
        KEY.M.codes.npy holding its codes (uint16 .npy of the tokenizer's code shape).
        dataset.json's media_codes records each tokenizer's fingerprint. A sample whose media do
        not decode is left out and listed in OUT/rejected.jsonl. Shards are written under a
        temporary name and renamed; dataset.json is written last.
        """, """
        mmtrain data tokenize-media data/demo/train --tokenizer tok/image --tokenizer tok/audio \\
            -o data/demo-codes/train
    """)
    p.add_argument("directory", metavar="DIR")
    p.add_argument("--tokenizer", action="append", required=True, metavar="TOKENIZER_DIR",
                   help="a media tokenizer directory (repeatable: one per kind)")
    p.add_argument("-o", "--out", required=True)
    p.add_argument("--batch-size", type=int, default=64, help="samples encoded together")
    p.add_argument("--device", default="cpu", help="torch device for encoding (e.g. cuda)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=_run_tokenize_media)


def _run_tokenize_media(args: argparse.Namespace) -> int:
    from data_tools.media_tokenizer import tokenize_media

    index = tokenize_media(args.directory, args.tokenizer, args.out, batch=args.batch_size,
                           device=args.device, overwrite=args.overwrite)
    kinds = ", ".join(f"{k} ({v['fingerprint'][:12]})" for k, v in index["media_codes"].items())
    print(f"{args.out}: {index['totals']['samples']} samples in {index['totals']['shards']} "
          f"shards with {kinds} codes; {index['rejected']} samples rejected")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
