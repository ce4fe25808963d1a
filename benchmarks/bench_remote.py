"""Loader on object storage against local disk, measured side by side on the same shards.

    python benchmarks/bench_remote.py [--samples 2000] [--shards 4] [--batches 30] [--reps 3]

An S3-compatible server (moto's server mode, a separate process on loopback) holds a copy of a
local dataset; our ShardLoader reads both.

S   samples/s from S3 ÷ samples/s from local disk (same config, one consumer, decode in the
    reading process): medians of alternating runs. Both sides must deliver the same documents
    (keys) in the same order: the benchmark fails otherwise. Goal ≥ 0.8×.
R   time to the first batch after a resume in the middle of a shard (deep in a shuffle group),
    from S3: seek (the manifest's byte offsets; replayed draws) against re-read (the same
    dataset with a manifest without offsets, as built before offsets were recorded: the shards
    are read from their start). Both must give the batch an uninterrupted run gives.
Absolute numbers on shared machines mean little; the ratios are the claim.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_tools.shards import write_dataset_index, write_shard  # noqa: E402
from data_tools.synth import make_sample  # noqa: E402
from mmtrain import storage  # noqa: E402
from mmtrain.data.config import DataConfig  # noqa: E402
from mmtrain.data.loader import ShardLoader  # noqa: E402
from mmtrain.data.shard_io import ShardIO  # noqa: E402
from mmtrain.data.tokenizer import ByteTokenizer  # noqa: E402
from mmtrain.model import ModelConfig  # noqa: E402

TOK = ByteTokenizer()
SPEC = ModelConfig().media()


@contextlib.contextmanager
def s3_server() -> Iterator[None]:
    """moto's S3 server in its own process (not competing with the loader for the GIL)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.2)
        yield
    finally:
        proc.terminate()
        proc.wait()


def upload(local: Path, url: str, *, drop_offsets: bool = False) -> None:
    for path in sorted(local.iterdir()):
        if not path.is_file():
            continue
        if path.name == "manifest.parquet" and drop_offsets:
            stripped = path.with_name("manifest-no-offsets.parquet")
            pq.write_table(pq.read_table(path).drop(["offset"]), stripped)
            storage.put_file(stripped, storage.join(url, path.name))
            stripped.unlink()
        else:
            storage.put_file(path, storage.join(url, path.name))


def make_dataset(out: Path, samples: int, shards: int, unique: int = 200) -> None:
    """`samples` demo samples (text, images, audio; `unique` distinct contents, fresh keys) in
    `shards` shards: big shards, quickly."""
    out.mkdir(parents=True)
    contents = [make_sample(0, "train", i)[1] for i in range(unique)]
    per = -(-samples // shards)
    infos, rows = [], []
    for s in range(shards):
        indices = range(s * per, min(samples, (s + 1) * per))
        items = ((f"rep-{i:07d}", contents[i % unique], "") for i in indices)
        info, shard_rows = write_shard(out / f"shard-{s:06d}.tar", items)
        infos.append(info)
        rows += shard_rows
    write_dataset_index(out, infos, rows)


def cfg_for(train: str, args) -> DataConfig:
    return DataConfig(train=train, num_workers=0, num_streams=1, seq_len=512, micro_batch_size=8,
                      shuffle_shards=args.shards, shuffle_buffer=64, io_block_mb=args.block_mb)


def read(train: str, args, n: int) -> tuple[float, list]:
    ld = ShardLoader(cfg_for(train, args), spec=SPEC, tokenizer=TOK, rank=0, world_size=1)
    ld.next_batch()  # warm: first shard opened
    keys, docs = [], 0
    t0 = time.perf_counter()
    for _ in range(n):
        b = ld.next_batch()
        keys += b.doc_keys
        docs += b.counts["docs"]
    seconds = time.perf_counter() - t0
    ld.close()
    return docs / seconds, keys


def first_batch_after_resume(train: str, args, state: dict) -> tuple[float, list, int]:
    fetched = ShardIO.fetched_total
    t0 = time.perf_counter()
    ld = ShardLoader(cfg_for(train, args), spec=SPEC, tokenizer=TOK, rank=0, world_size=1)
    ld.load_state_dict([state])
    batch = ld.next_batch()
    seconds = time.perf_counter() - t0
    ld.close()
    return seconds, batch.doc_keys, ShardIO.fetched_total - fetched


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=4000)
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--resume-at", type=int, default=3000, help="draw of the shuffle group at "
                   "which the loader resumes")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--block-mb", type=int, default=DataConfig().io_block_mb,
                   help="data.io_block_mb")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp, s3_server():
        local = Path(tmp) / "train"
        make_dataset(local, args.samples, args.shards)
        storage.filesystem("s3://x")[0].mkdir("bench")
        upload(local, "s3://bench/seek")
        upload(local, "s3://bench/reread", drop_offsets=True)
        size = sum(p.stat().st_size for p in local.glob("*.tar")) / 1e6
        print(f"{args.samples} samples in {args.shards} shards ({size:.0f} MB) on local disk and "
              f"on a loopback S3 server (moto)")

        rates: dict[str, list[float]] = {"local": [], "s3": []}
        for _ in range(args.reps):  # alternating
            for side, train in (("local", str(local)), ("s3", "s3://bench/seek")):
                rate, keys = read(train, args, args.batches)
                rates[side].append(rate)
                if side == "local":
                    expected = keys
                elif keys != expected:
                    raise SystemExit("FAIL: S3 and local disk delivered different documents")
        local_rate, s3_rate = (statistics.median(rates[s]) for s in ("local", "s3"))
        print(f"S   docs/s  local {local_rate:8.1f}   s3 {s3_rate:8.1f}   ratio "
              f"{s3_rate / local_rate:.2f}x (goal >= 0.8x; same documents, same order)")

        # A checkpoint at draw --resume-at of the first shuffle group; the batch after it, read
        # from local disk, is what both S3 variants must give.
        ld = ShardLoader(cfg_for(str(local), args), spec=SPEC, tokenizer=TOK, rank=0,
                         world_size=1)
        state = ld.state_dict()
        state["streams"]["0"].update(group=0, sample=args.resume_at, rows=1)
        ld.load_state_dict([state])
        expected = ld.next_batch().doc_keys
        ld.close()
        st = state["streams"]["0"]
        times: dict[str, list[float]] = {"seek": [], "reread": []}
        fetched: dict[str, int] = {}
        for _ in range(args.reps):
            for side in ("seek", "reread"):
                seconds, keys, fetched[side] = first_batch_after_resume(f"s3://bench/{side}",
                                                                         args, state)
                if keys != expected:
                    raise SystemExit(f"FAIL: the first batch after a resume ({side}) differs "
                                     "from the uninterrupted run's")
                times[side].append(seconds)
        seek, reread = (statistics.median(times[s]) for s in ("seek", "reread"))
        print(f"R   first batch after a resume at group {st['group']}, draw {st['sample']} "
              f"(from S3): seek {seek:.2f} s and {fetched['seek'] / 1e6:.1f} MB fetched, "
              f"re-read {reread:.2f} s and {fetched['reread'] / 1e6:.1f} MB: "
              f"{reread / seek:.2f}x the time, {fetched['reread'] / max(1, fetched['seek']):.1f}x "
              "the bytes (same batch as the uninterrupted run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
