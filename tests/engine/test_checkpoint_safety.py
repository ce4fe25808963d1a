"""A pickle planted in a checkpoint never runs.

The planted file is a torch.save'd object whose __reduce__ would create a marker directory.
1. Only the file is replaced: the hash check (`verify`) refuses the checkpoint before anything is
   loaded (Checkpointer.load, find_resume, export).
2. The MANIFEST is rewritten to match: our own torch.load (rng state, weights_only=True) refuses
   it, and so do DeepSpeed's reads of its files (forced to weights_only=True by
   mmtrain.distributed.safe_load) and the export path.
In every case the marker is never created.
"""

import hashlib
import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from mmtrain import export
from mmtrain.checkpoint import MANIFEST, Checkpointer, verify
from mmtrain.distributed.safe_load import weights_only_loads


class Planted:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def plant(path: Path, marker: Path) -> None:
    torch.save({"module": Planted(marker)}, path)


def make_checkpoint(root: Path) -> Path:
    """A committed checkpoint through the real commit protocol, with a ZeRO-0-like engine file."""
    from mmtrain.config import RunConfig

    def save_engine(ckpt_root: str, tag: str):
        path = Path(ckpt_root) / tag / "mp_rank_00_model_states.pt"
        state = {"module": {"w": torch.ones(2)}}
        return lambda: (torch.save(state, path), [path])[1]  # the background writer

    cp = Checkpointer(root, rank=0, world_size=1, keep_last=2)
    cfg = RunConfig().to_dict()
    ckpt = cp.save(5, save_engine=save_engine, loader_state={"v": 1}, config=cfg)
    cp.wait()
    return ckpt


def rewrite_manifest(ckpt: Path, rel: str) -> None:
    manifest = json.loads((ckpt / MANIFEST).read_text())
    manifest["files"][rel] = hashlib.sha256((ckpt / rel).read_bytes()).hexdigest()
    (ckpt / MANIFEST).write_text(json.dumps(manifest))


def test_the_planted_pickle_is_live(tmp_path):
    """Sanity: unpickled without our guards, the planted file does run code."""
    marker = tmp_path / "ran"
    plant(tmp_path / "x.pt", marker)
    torch.load(tmp_path / "x.pt", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("rel", ["rng/rank_0.pt", "mp_rank_00_model_states.pt"])
def test_hash_mismatch_refuses_before_loading(tmp_path, rel):
    ckpt = make_checkpoint(tmp_path / "ckpts")
    marker = tmp_path / "ran"
    plant(ckpt / rel, marker)
    called = []
    cp = Checkpointer(tmp_path / "ckpts", rank=0, world_size=1, keep_last=2)
    with pytest.raises(ValueError, match="sha256"):
        cp.load(ckpt, load_engine=lambda *a: called.append(a), load_loader=called.append)
    assert called == []  # nothing was handed to DeepSpeed or the loader
    assert cp.find_resume() is None  # the only checkpoint is refused
    with pytest.raises(ValueError, match="sha256"):
        export.export(ckpt, tmp_path / "out")
    assert not marker.exists()


def test_rewritten_manifest_our_loads_refuse(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpts")
    marker = tmp_path / "ran"
    plant(ckpt / "rng" / "rank_0.pt", marker)
    rewrite_manifest(ckpt, "rng/rank_0.pt")
    verify(ckpt)  # the forged manifest matches
    cp = Checkpointer(tmp_path / "ckpts", rank=0, world_size=1, keep_last=2)
    with pytest.raises(pickle.UnpicklingError):
        cp.load(ckpt, load_engine=lambda *a: None, load_loader=lambda s: None)
    assert not marker.exists()


def test_rewritten_manifest_deepspeed_reads_refuse(tmp_path):
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    ckpt = make_checkpoint(tmp_path / "ckpts")
    marker = tmp_path / "ran"
    plant(ckpt / "mp_rank_00_model_states.pt", marker)
    rewrite_manifest(ckpt, "mp_rank_00_model_states.pt")
    verify(ckpt)
    original_load = torch.load
    # DeepSpeed's engine reads its files with weights_only=False; inside our guard it cannot.
    with weights_only_loads(), pytest.raises(pickle.UnpicklingError):
        TorchCheckpointEngine().load(str(ckpt / "mp_rank_00_model_states.pt"), map_location="cpu")
    with pytest.raises(pickle.UnpicklingError):
        export.consolidated_state_dict(ckpt)
    assert torch.load is original_load and not marker.exists()  # the guard is lifted
    # a clean DeepSpeed-style file still loads inside the guard
    torch.save({"module": {"w": torch.ones(2)}, "ds_version": "0.19.8"}, tmp_path / "ok.pt")
    with weights_only_loads():
        assert torch.equal(TorchCheckpointEngine().load(str(tmp_path / "ok.pt"))["module"]["w"],
                           torch.ones(2))
