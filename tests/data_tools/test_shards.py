"""The shard writer's tar bytes, and reading tars that stop early."""

from __future__ import annotations

import io
import tarfile

import pytest

from data_tools.shards import content_hash, iter_tar_groups, split_member_name, write_shard
from data_tools.synth import make_sample


def test_write_shard_bytes_equal_tarfile_ustar(tmp_path):
    samples = [make_sample(0, "train", i) for i in range(20)]
    info, rows = write_shard(tmp_path / "a.tar", iter(samples))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
        for key, members, _ in samples:
            for suffix in sorted(members, key=lambda s: (s != "json", s)):
                ti = tarfile.TarInfo(f"{key}.{suffix}")
                ti.size, ti.mtime, ti.mode = len(members[suffix]), 0, 0o644
                ti.uname = ti.gname = ""
                tar.addfile(ti, io.BytesIO(members[suffix]))
    assert (tmp_path / "a.tar").read_bytes() == buf.getvalue()
    assert info.samples == 20 and [r["key"] for r in rows] == [s[0] for s in samples]


def test_content_hash_ignores_key_and_metadata():
    _, members, _ = make_sample(0, "train", 3)
    other = dict(members, json=members["json"].replace(b'"source"', b'"meta": {"x": 1}, "source"'))
    assert content_hash(members) == content_hash(other)
    assert content_hash(members) != content_hash(make_sample(0, "train", 4)[1])


def test_tar_cut_at_a_member_boundary_is_an_error():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in ("a.txt", "b.txt"):
            ti = tarfile.TarInfo(name)
            ti.size = 3
            tar.addfile(ti, io.BytesIO(b"abc"))
    data = buf.getvalue()
    assert [k for k, _ in iter_tar_groups(io.BytesIO(data))] == ["a", "b"]
    for cut in (1024, 1024 + 100, 2048):  # plain tarfile reads these as a valid, shorter tar
        with pytest.raises(tarfile.ReadError, match="truncated"):
            list(iter_tar_groups(io.BytesIO(data[:cut])))


def test_member_names_group_like_webdataset():
    assert split_member_name("000001.0.jpg") == ("000001", "0.jpg")
    assert split_member_name("./000001.txt") == ("000001", "txt")
    assert split_member_name("dir/k.json") == ("dir/k", "json")
