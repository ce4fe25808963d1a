"""A killed build leaves no partial final-named shard; a rerun completes it bit-identically."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from data_tools.shards import read_dataset_index, sha256_file

REPO = Path(__file__).resolve().parents[2]


def shard_hashes(out: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(out.glob("shard-*.tar"))}


def build_args(table: Path, out: Path) -> list[str]:
    return ["build", "image-text", str(table), "-o", str(out), "--max-samples", "15",
            "--workers", "2", "--no-progress"]


def test_sigkill_mid_build_then_rerun_equals_uninterrupted(tmp_path, fx, capsys):
    rows = fx.image_table(tmp_path, 600)
    rows[7]["image"] = "media/missing.png"  # a rejected row, so rejected.jsonl is resumed too
    table = fx.write_parquet(tmp_path / "pairs.parquet", rows)
    killed = tmp_path / "killed"

    proc = subprocess.Popen([sys.executable, "-m", "data_tools", *build_args(table, killed)],
                            cwd=REPO, start_new_session=True,  # its own group: workers die too
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not (killed / "shard-000002.tar").exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "build produced no shards"
        time.sleep(0.001)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "dataset.json").exists(), "the build finished before it was killed"
    after_kill = shard_hashes(killed)

    rc, out, _ = fx.run(capsys, *build_args(table, killed))  # rerun: completes what is missing
    assert rc == 0 and "kept from an earlier run" in out
    rc, _, _ = fx.run(capsys, *build_args(table, tmp_path / "clean"))  # uninterrupted
    assert rc == 0

    clean = shard_hashes(tmp_path / "clean")
    assert len(clean) == 40
    for name, digest in after_kill.items():  # every final-named shard was complete
        assert clean[name] == digest, name
    assert shard_hashes(killed) == clean
    assert read_dataset_index(killed) == read_dataset_index(tmp_path / "clean")
    for name in ("manifest.parquet", "rejected.jsonl"):
        assert (killed / name).read_bytes() == (tmp_path / "clean" / name).read_bytes()
    assert not [p for p in killed.iterdir() if p.name.startswith(".shard-")]  # temp files gone


def test_rerun_keeps_complete_shards_and_rebuilds_damaged_ones(tmp_path, fx, capsys):
    table = fx.write_parquet(tmp_path / "pairs.parquet", fx.image_table(tmp_path, 50))
    out = tmp_path / "out"
    assert fx.run(capsys, *build_args(table, out))[0] == 0
    reference = shard_hashes(out)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")}

    rc, stdout, _ = fx.run(capsys, *build_args(table, out))
    assert rc == 0 and "4 shards kept" in stdout and "this run: 0 samples" in stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")} == mtimes

    (out / "shard-000002.tar").unlink()
    with open(out / "shard-000001.tar", "r+b") as f:  # damage: the content no longer matches
        f.seek(700)
        f.write(b"X")
    rc, stdout, _ = fx.run(capsys, *build_args(table, out))
    assert rc == 0 and "1 shards kept" in stdout
    assert shard_hashes(out) == reference


def test_rerun_with_other_options_is_refused_unless_overwrite(tmp_path, fx, capsys):
    table = fx.write_parquet(tmp_path / "pairs.parquet", fx.image_table(tmp_path, 20))
    out = tmp_path / "out"
    assert fx.run(capsys, *build_args(table, out))[0] == 0
    other = [*build_args(table, out)[:-5], "--max-samples", "7", "--no-progress"]
    rc, _, err = fx.run(capsys, *other)
    assert rc == 2 and "max_samples" in err and "--overwrite" in err
    assert len(shard_hashes(out)) == 2  # untouched
    rc, stdout, _ = fx.run(capsys, *other, "--overwrite")
    assert rc == 0 and "20 samples in 3 shards" in stdout
    assert sorted(shard_hashes(out)) == [f"shard-{i:06d}.tar" for i in range(3)]
