"""The launcher and preflight treat URLs as URLs (a loopback S3 server, moto): dataset.json must be
reachable, shard sizes are checked from one listing, no local folder is made from a URL, and the
store's location (never its secrets) is carried to the ranks of other nodes."""

from __future__ import annotations

import pytest

from launch import environment, preflight
from launch.local import check_local_datasets, needs_demo_data
from mmtrain import storage
from mmtrain.config import RunConfig
from tests.remote_servers import make_bucket, s3_server


@pytest.fixture(scope="module")
def s3_dataset(demo_corpus):
    with s3_server():
        make_bucket("launch")
        for path in sorted((demo_corpus / "train").iterdir()):
            if path.is_file():
                storage.put_file(path, f"s3://launch/train/{path.name}")
        yield "s3://launch/train"


def cfg_with(**data) -> RunConfig:
    cfg = RunConfig()
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return cfg


def test_preflight_reads_a_url_as_a_url(s3_dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    note = preflight.check_dataset(s3_dataset, "data.train")
    assert "sizes match" in note and s3_dataset in note
    with pytest.raises(ValueError, match=r"data.train.*s3://launch/nope/dataset.json does not"):
        preflight.check_dataset("s3://launch/nope", "data.train")

    cfg = cfg_with(train=s3_dataset, synth_if_missing=True)
    assert not needs_demo_data(cfg)  # never fills a URL with the demo corpus
    check_local_datasets(cfg)  # reachable: no error
    with pytest.raises(ValueError, match="data.train='s3://launch/typo'"):
        check_local_datasets(cfg_with(train="s3://launch/typo"))
    assert not list(tmp_path.iterdir()), "a local folder was made from the URL"


def test_preflight_finds_a_missing_or_changed_shard_object(s3_dataset, demo_corpus):
    name = sorted(p.name for p in (demo_corpus / "train").glob("*.tar"))[-1]
    url = f"{s3_dataset}/{name}"
    data = storage.read_bytes(url)
    try:
        storage.write_bytes(url, data[:-512])
        with pytest.raises(ValueError, match=f"{name} is not of the size"):
            preflight.check_dataset(s3_dataset, "data.train")
        storage.remove(url)
        with pytest.raises(ValueError, match=f"{name} listed in dataset.json is missing"):
            preflight.check_dataset(s3_dataset, "data.train")
    finally:
        storage.write_bytes(url, data)


def test_the_store_location_is_carried_to_other_nodes_but_not_secrets():
    env = {"AWS_ENDPOINT_URL": "http://minio:9000", "AWS_DEFAULT_REGION": "eu-west-1",
           "AWS_SECRET_ACCESS_KEY": "s3cr3t", "AWS_ACCESS_KEY_ID": "AKIA",
           "GOOGLE_APPLICATION_CREDENTIALS": "/etc/gcs.json"}
    carried = environment.carried(env)
    assert carried["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert carried["GOOGLE_APPLICATION_CREDENTIALS"] == "/etc/gcs.json"
    assert "AWS_SECRET_ACCESS_KEY" not in carried and "AWS_ACCESS_KEY_ID" not in carried
