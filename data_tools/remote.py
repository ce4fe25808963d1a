"""Datasets written to object storage (`-o s3://…`, `-o gs://…`): staged locally, then uploaded.

An object store makes an object visible only once its upload is complete (one PUT, or one
multipart upload), and has no rename. So a dataset is written into a local staging folder with the
same crash-safe code as a local one, and each file is uploaded once it is complete: shards first
(each followed by its build record), then rejected.jsonl and manifest.parquet, and dataset.json
last — the commit. A reader that finds dataset.json finds every object it lists.

Resume (`mmtrain data build`): the build records (`OUT/.build/`, see build.py) go to the bucket
after each shard. A rerun — on this machine or another — pulls them, keeps every shard whose
object is there with the recorded size (a shard object exists only complete, and its record is
written after it), deletes the objects of shards after the last one kept, and continues: no
sample is written twice. A shard's local copy is deleted once uploaded, so the staging folder
holds at most one shard and the small records.

The staging folder is `$MMTRAIN_STAGING_DIR/<hash of the URL>` (default
`~/.cache/mmtrain/staging/…`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from mmtrain import storage
from mmtrain.data.index import DATASET_JSON, MANIFEST

STATE_DIR = ".build"
_SHARD = re.compile(r"shard-(\d{6})\.(tar|json)")


def staging_dir(url: str) -> Path:
    root = Path(os.environ.get("MMTRAIN_STAGING_DIR") or
                Path.home() / ".cache" / "mmtrain" / "staging")
    digest = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    path = root / f"{storage.name(url)}-{digest}"
    path.mkdir(parents=True, exist_ok=True)
    return path


class Publisher:
    """Mirror of a local staging folder to a dataset URL, file by file, dataset.json last."""

    def __init__(self, url: str, staging: Path | None = None) -> None:
        storage.check_writable(url)
        self.url = url.rstrip("/")
        self.staging = staging or staging_dir(self.url)

    def remote(self, *names: str) -> str:
        return storage.join(self.url, *names)

    # ---- resume
    def pull_state(self) -> None:
        """Make the staging folder's build records the bucket's (the bucket is the truth), and
        fetch dataset.json if the bucket has one (build refuses to mix with another dataset)."""
        state = self.staging / STATE_DIR
        shutil.rmtree(state, ignore_errors=True)
        state.mkdir(parents=True)
        for name in storage.listdir(self.remote(STATE_DIR)):
            if name == "config.json" or _SHARD.fullmatch(name):
                (state / name).write_bytes(storage.read_bytes(self.remote(STATE_DIR, name)))
        for name in (DATASET_JSON,):
            local = self.staging / name
            local.unlink(missing_ok=True)
            if storage.exists(self.remote(name)):
                local.write_bytes(storage.read_bytes(self.remote(name)))

    def shard_intact(self, record: dict) -> bool:
        """The shard's object exists with the recorded size (objects are never partial)."""
        try:
            return storage.size(self.remote(record["name"])) == record["bytes"]
        except FileNotFoundError:
            return False

    def remove_shards_from(self, first: int) -> None:
        """Delete shard objects and records numbered `first` and above (a stale tail)."""
        for folder in (self.url, self.remote(STATE_DIR)):
            for name in storage.listdir(folder):
                m = _SHARD.fullmatch(name)
                if m and int(m.group(1)) >= first:
                    storage.remove(storage.join(folder, name))

    def remove_dataset(self, names: list[str]) -> None:
        """--overwrite: withdraw dataset.json first (the old dataset stops being committed),
        then delete the other files a build wrote."""
        storage.remove(self.remote(DATASET_JSON))
        for name in names:
            storage.remove(self.remote(name))
        self.remove_shards_from(0)
        storage.remove(self.remote(STATE_DIR, "config.json"))

    # ---- publishing
    def put(self, relative: str, *, keep: bool = True) -> None:
        local = self.staging / relative
        storage.put_file(local, self.remote(*relative.split("/")))
        if not keep:
            local.unlink()

    def publish_shard(self, name: str, record: str) -> None:
        """A finished shard, then its record (the record says the shard is complete)."""
        self.put(name, keep=False)
        self.put(f"{STATE_DIR}/{record}")

    def publish_index(self, *others: str) -> None:
        """The other files, then manifest.parquet, then dataset.json: the commit."""
        for name in (*others, MANIFEST, DATASET_JSON):
            self.put(name)


@contextlib.contextmanager
def output(out: str, *, overwrite: bool, check_empty: bool = True) -> Iterator[Path]:
    """A local folder to write a whole dataset into (split, dedup). For a URL: a fresh staging
    folder; its shards, manifest and dataset.json (last) are uploaded when the writing is done,
    and nothing is uploaded if it fails. `check_empty`: refuse a URL that holds a dataset."""
    if not storage.is_url(out):
        yield storage.local(out)
        return
    pub = Publisher(out)
    if check_empty and storage.exists(pub.remote(DATASET_JSON)):
        if not overwrite:
            raise ValueError(f"{out} already holds a dataset; choose another location or pass "
                             "--overwrite")
    with tempfile.TemporaryDirectory(dir=pub.staging) as tmp:
        pub.staging = Path(tmp)
        yield pub.staging
        if overwrite:
            storage.remove(pub.remote(DATASET_JSON))
            pub.remove_shards_from(0)
        shards = sorted(p.name for p in pub.staging.iterdir() if _SHARD.fullmatch(p.name))
        for name in shards:
            pub.put(name, keep=False)
        others = [p.name for p in pub.staging.iterdir()
                  if p.is_file() and p.name not in (MANIFEST, DATASET_JSON) and
                  not p.name.startswith(".")]
        pub.publish_index(*sorted(others))
