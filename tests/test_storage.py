"""mmtrain/storage.py: URLs are joined as URLs, writes are atomic, retries back off and give up
clearly, running out of file descriptors is recognised; and against a loopback S3 server the
same calls read, list, write and delete objects."""

from __future__ import annotations

import errno
import os

import pytest

from mmtrain import storage
from tests.remote_servers import make_bucket, s3_server


def test_urls_are_joined_and_split_as_urls():
    assert storage.join("s3://b/ds", "shard-000001.tar") == "s3://b/ds/shard-000001.tar"
    assert storage.join("s3://b/ds/", "dataset.json") == "s3://b/ds/dataset.json"
    assert storage.join("https://h:8/d/x?sig=1", "a.tar") == "https://h:8/d/x/a.tar?sig=1"
    assert storage.join("data/x", "a.tar") == os.path.join("data/x", "a.tar")
    assert storage.join("file:///tmp/x", "a.tar") == "/tmp/x/a.tar"
    assert storage.parent("gs://b/ds/train") == "gs://b/ds"
    assert storage.name("s3://b/ds/train/") == "train"
    assert storage.is_url("s3://b") and storage.is_url("HTTPS://h/x")
    assert not storage.is_url("data/demo") and not storage.is_url("file:///tmp/x")
    with pytest.raises(ValueError, match="unsupported URL scheme 'ftp'"):
        storage.is_url("ftp://host/x")


def test_local_writes_are_atomic_and_leave_no_temporary_file(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 1000)
    storage.put_file(src, tmp_path / "out" / "a.bin")
    storage.write_bytes(tmp_path / "out" / "b.bin", b"hello")
    assert (tmp_path / "out" / "a.bin").read_bytes() == b"x" * 1000
    assert storage.read_bytes(tmp_path / "out" / "b.bin") == b"hello"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.bin", "b.bin"]
    assert storage.read_range(tmp_path / "out" / "a.bin", 10, 20) == b"x" * 10
    with pytest.raises(ValueError, match="read-only"):
        storage.write_bytes("https://example.invalid/x", b"")


def test_retries_back_off_then_raise_and_fd_exhaustion_is_named(monkeypatch):
    sleeps, calls = [], []
    monkeypatch.setattr(storage.time, "sleep", sleeps.append)

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("reset by peer")
        return "ok"

    assert storage.with_retries(flaky, what="x", retries=3, backoff=1.0) == "ok"
    assert len(sleeps) == 2 and 0.75 <= sleeps[0] <= 1.25 and 1.5 <= sleeps[1] <= 2.5

    def always():
        raise TimeoutError("slow")

    with pytest.raises(TimeoutError):
        storage.with_retries(always, what="x", retries=2, backoff=0.0)

    def emfile():
        raise OSError(errno.EMFILE, "Too many open files")

    with pytest.raises(RuntimeError, match="x: out of file descriptors.*ulimit -n"):
        storage.with_retries(emfile, what="x", retries=5, backoff=0.0)


def test_the_same_calls_work_on_an_s3_compatible_server(tmp_path):
    src = tmp_path / "a.bin"
    src.write_bytes(bytes(range(256)) * 100)
    with s3_server():
        make_bucket("store")
        storage.put_file(src, "s3://store/d/a.bin")
        storage.write_bytes("s3://store/d/b.json", b"{}")
        assert storage.exists("s3://store/d/a.bin") and not storage.exists("s3://store/d/c")
        assert storage.size("s3://store/d/a.bin") == 25600
        assert storage.listdir("s3://store/d") == ["a.bin", "b.json"]
        assert storage.read_range("s3://store/d/a.bin", 256, 260) == bytes(range(4))
        assert storage.glob("s3://store/d/*.bin") == ["s3://store/d/a.bin"]
        with storage.open_read("s3://store/d/a.bin") as f:
            f.seek(25599)
            assert f.read() == bytes([255])
        storage.remove("s3://store/d/a.bin")
        storage.remove("s3://store/d/a.bin")  # absent: no error
        assert storage.listdir("s3://store/d") == ["b.json"]
        assert storage.listdir("s3://store/none") == []
