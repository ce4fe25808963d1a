"""Shard tools throughput (CPU, one process for the ratio).

1. Write path, as a ratio: our `write_shard` + `write_dataset_index` (temporary name, fsync,
   rename, sha256 of every shard, content hash and manifest row of every sample) ÷ plain
   `webdataset.ShardWriter`, both writing the same pre-encoded samples (a JPEG + KEY.json).
   Goal: >= 0.8x.
2. `mmtrain data build wds` end to end from an img2dataset tar of those samples (every image
   decoded to check it, the work a real build does), for reference.
3. `mmtrain data verify` throughput: hashes + structure only, and with every image decoded.

    python benchmarks/bench_shards.py [--samples 2000] [--repeat 3] [--dir /fast/disk]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_tools.build import BuildOptions, build  # noqa: E402
from data_tools.samples import SampleSpec  # noqa: E402
from data_tools.shards import write_dataset_index, write_shard  # noqa: E402
from data_tools.verify import verify  # noqa: E402
from mmtrain.data.schema import segments_json  # noqa: E402

PER_SHARD = 500


def make_samples(n: int) -> list[tuple[str, dict[str, bytes]]]:
    """n samples of one ~40 KB JPEG (256x256) and a caption, pre-encoded."""
    rng = np.random.default_rng(0)
    jpegs = []
    for _ in range(32):
        pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        img = Image.fromarray(pixels).resize((256, 256), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        jpegs.append(buf.getvalue())
    samples = []
    for i in range(n):
        segments = [{"type": "image", "member": "0.jpg"},
                    {"type": "text", "text": f"a photo of sample number {i}, " * 3}]
        samples.append((f"{i:09d}", {"json": segments_json(segments, source="bench"),
                                     "0.jpg": jpegs[i % len(jpegs)]}))
    return samples


def write_plain(out: Path, samples) -> None:
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=PER_SHARD, verbose=0) as sink:
        for key, members in samples:
            sink.write({"__key__": key, **members})


def write_ours(out: Path, samples) -> None:
    shards, rows = [], []
    for n, start in enumerate(range(0, len(samples), PER_SHARD)):
        chunk = ((k, m, f"bench:{k}") for k, m in samples[start:start + PER_SHARD])
        info, shard_rows = write_shard(out / f"shard-{n:06d}.tar", chunk)
        shards.append(info)
        rows.extend(shard_rows)
    write_dataset_index(out, shards, rows)


def timed(fn, out: Path, samples) -> tuple[float, float]:
    """(wall seconds, CPU seconds) to write `samples` into the new folder `out`."""
    out.mkdir()
    wall, cpu = time.perf_counter(), time.process_time()
    fn(out, samples)
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args()

    samples = make_samples(args.samples)
    # Throughput of sample bytes (the same for both writers; ShardWriter's tar is larger: it
    # adds a PAX header per member for its float mtimes).
    payload_mb = sum(len(d) for _, members in samples for d in members.values()) / 1e6
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        plain, ours = [], []
        for r in range(args.repeat):  # interleaved, best of N: less noise from other load
            plain.append(timed(write_plain, root / f"plain{r}", samples))
            ours.append(timed(write_ours, root / f"ours{r}", samples))

        src = root / "img2dataset.tar"
        with wds.TarWriter(str(src)) as sink:
            for key, members in samples:
                caption = json.loads(members["json"])["segments"][1]["text"]
                sink.write({"__key__": key, "jpg": members["0.jpg"], "txt": caption})
        t0 = time.perf_counter()
        summary = build(BuildOptions(out=str(root / "built"), inputs=(str(src),),
                                     spec=SampleSpec(kind="wds"), max_samples=PER_SHARD,
                                     workers=2, progress=False))
        build_mbps = summary.bytes / (time.perf_counter() - t0) / 1e6

        v_hash = verify(root / "ours0", decode=False)
        v_decode = verify(root / "ours0", decode=True)
        v_decode2 = verify(root / "ours0", decode=True, workers=2)
        assert v_hash.ok and v_decode.ok and v_decode2.ok, v_hash.problems + v_decode.problems

    best_plain, best_ours = min(plain), min(ours)
    print(f"samples: {args.samples} ({payload_mb:.0f} MB), best of {args.repeat}, MB/s of sample "
          "bytes (wall clock; CPU seconds in brackets)")
    print(f"write  webdataset.ShardWriter        {payload_mb / best_plain[0]:8.0f} MB/s "
          f"({best_plain[1]:.2f} s CPU)")
    print(f"write  write_shard + manifest/sha256 {payload_mb / best_ours[0]:8.0f} MB/s "
          f"({best_ours[1]:.2f} s CPU, + fsync)")
    print(f"ratio  ours / ShardWriter            {best_plain[0] / best_ours[0]:8.2f}x   "
          "(goal >= 0.8x)")
    print(f"build  wds -> shards, 2 workers      {build_mbps:8.0f} MB/s (every image decoded)")
    for name, r in (("hashes + structure", v_hash), ("+ decode, 1 worker", v_decode),
                    ("+ decode, 2 workers", v_decode2)):
        print(f"verify {name:<29} {r.bytes / r.seconds / 1e6:8.0f} MB/s of shard")


if __name__ == "__main__":
    main()
