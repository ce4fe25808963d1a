"""`mmtrain data build` reads its inputs from object storage (a loopback S3 server, moto).

A table at a URL is streamed; its media paths resolve against the table's own URL folder, and may
not leave it. Tars (`build wds`) at URLs are streamed too, globs included. The result equals the
same build from local files.
"""

from __future__ import annotations

import pytest

from mmtrain import storage
from mmtrain.data.index import read_dataset_index
from tests.remote_servers import make_bucket, s3_server


@pytest.fixture(scope="module")
def s3():
    with s3_server() as env:
        make_bucket("raw")
        yield env


def upload_tree(root, url):
    for path in sorted(root.rglob("*")):
        if path.is_file():
            storage.put_file(path, f"{url}/{path.relative_to(root).as_posix()}")


def test_build_streams_tables_and_media_from_s3(s3, fx, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MMTRAIN_STAGING_DIR", str(tmp_path / "staging"))
    src = tmp_path / "src"
    src.mkdir()
    rows = fx.image_table(src, 12)
    rows[3]["image"] = "../outside.png"  # may not leave the table's folder
    fx.write_parquet(src / "pairs.parquet", rows)
    upload_tree(src, "s3://raw/pairs")

    args = ["image-text", "--text-column", "caption", "--image-column", "image",
            "--workers", "1", "--no-progress"]
    rc, out, err = fx.run(capsys, "build", args[0], "s3://raw/pairs/pairs.parquet", "-o",
                          tmp_path / "from-s3", *args[1:])
    assert rc == 0, err
    rc, _, err = fx.run(capsys, "build", args[0], src / "pairs.parquet", "-o",
                        tmp_path / "local", *args[1:])
    assert rc == 0, err
    remote, local = read_dataset_index(tmp_path / "from-s3"), read_dataset_index(tmp_path / "local")
    assert remote["totals"]["samples"] == local["totals"]["samples"] == 11
    assert [s["sha256"] for s in remote["shards"]] == [s["sha256"] for s in local["shards"]]
    rejected = fx.read_jsonl(tmp_path / "from-s3" / "rejected.jsonl")
    assert [r["code"] for r in rejected] == ["unsafe_path"]


def test_build_wds_reads_tars_at_urls_and_globs(s3, demo_corpus, tmp_path, capsys, fx):
    upload_tree(demo_corpus / "train", "s3://raw/tars")
    rc, out, err = fx.run(capsys, "build", "wds", "s3://raw/tars/shard-*.tar", "-o",
                          tmp_path / "out", "--workers", "1", "--no-progress")
    assert rc == 0, err
    expected = read_dataset_index(demo_corpus / "train")["totals"]["samples"]
    assert read_dataset_index(tmp_path / "out")["totals"]["samples"] == expected
