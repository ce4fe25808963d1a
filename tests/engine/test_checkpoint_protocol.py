"""The checkpoint protocol (mmtrain/checkpoint.py) without DeepSpeed or processes: `latest` and
its lineage through a rollback, verification split over 64 ranks, the asynchronous commit, and
the refusal/fallback agreed by all ranks. Several ranks are simulated by threads sharing one
directory, with collectives built on a threading.Barrier (the Checkpointer only ever calls
barrier / max / broadcast_json, on its caller's thread)."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from mmtrain import checkpoint as ck
from mmtrain.checkpoint import COMMITTED, LATEST, MANIFEST, Checkpointer, step_name


class ThreadGroup:
    """Collectives for `n` ranks running as threads of this process."""

    def __init__(self, n: int) -> None:
        self.n, self.sync, self.slots = n, threading.Barrier(n, timeout=60), [None] * n

    def member(self, rank: int) -> "Member":
        return Member(self, rank)


class Member:
    def __init__(self, group: ThreadGroup, rank: int) -> None:
        self.group, self.rank = group, rank

    def barrier(self) -> None:
        self.group.sync.wait()

    def max(self, values):
        self.group.slots[self.rank] = list(values)
        self.group.sync.wait()
        out = [max(col) for col in zip(*self.group.slots)]
        self.group.sync.wait()
        return out

    def broadcast_json(self, obj=None, src=0):
        if self.rank == src:
            self.group.slots[src] = json.dumps(obj)
        self.group.sync.wait()
        out = json.loads(self.group.slots[src])
        self.group.sync.wait()
        return out


def on_ranks(n: int, fn) -> list:
    """fn(rank, comm) on n threads; returns results (re-raises the first exception)."""
    group = ThreadGroup(n)
    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(fn, r, group.member(r)) for r in range(n)]
        return [f.result(timeout=120) for f in futures]


def fake_engine(rank: int, step: int, gate: threading.Event | None = None, fail: bool = False):
    """save_engine for Checkpointer.save: DeepSpeed-like files of `rank`, written by the returned
    function (in the background thread), optionally held until `gate` is set or failing."""
    def save_engine(root: str, tag: str):
        state = {"w": torch.full((4,), float(step)), "rank": rank}

        def write() -> list[Path]:
            if gate is not None:
                assert gate.wait(60)
            if fail:
                raise OSError(28, "No space left on device")
            paths = [Path(root) / tag / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"]
            if rank == 0:
                paths.append(Path(root) / tag / "mp_rank_00_model_states.pt")
            for p in paths:
                torch.save(state, p)
            return paths
        return write
    return save_engine


def save(cp: Checkpointer, step: int, **kw) -> Path:
    return cp.save(step, save_engine=fake_engine(cp.rank, step, **kw),
                   loader_state={"step": step, "rank": cp.rank}, config={"c": 1})


def names(root: Path) -> list[str]:
    return sorted(p.name for p in ck.committed_steps(root))


def latest(root: Path) -> str:
    return (root / LATEST).read_text().strip()


def restart(root: Path, **kw) -> Checkpointer:
    return Checkpointer(root, rank=0, world_size=1, keep_last=kw.pop("keep_last", 2), **kw)


def resume(cp: Checkpointer, explicit: str | None = None) -> int | None:
    ckpt = cp.find_resume(explicit)
    if ckpt is None:
        return None
    states = []
    step = cp.load(ckpt, load_engine=lambda *a: None, load_loader=states.append)
    assert states[0][0]["step"] == step  # the loader state of that checkpoint
    return step


# ----------------------------------------------------------------------------------- latest
def test_rollback_is_kept_by_restarts_and_pruning(tmp_path):
    root = tmp_path / "ckpts"
    cp = restart(root)
    for step in (2, 4, 6):
        save(cp, step)
    cp.wait()
    assert names(root) == [step_name(4), step_name(6)] and latest(root) == step_name(6)

    # A loss spike after step 4: roll back (`--resume step_00000004`).
    cp = restart(root)
    assert resume(cp, step_name(4)) == 4
    assert latest(root) == step_name(4)  # a restart now, before any save, resumes the rollback
    assert resume(restart(root)) == 4
    save(cp, 5)
    cp.wait()
    assert latest(root) == step_name(5)
    # step 4 (where the rollback started) is kept: it is on the lineage of latest; step 6 is on
    # an abandoned branch and is left alone.
    assert names(root) == [step_name(4), step_name(5), step_name(6)]
    assert json.loads((root / step_name(5) / MANIFEST).read_text())["parent"] == step_name(4)

    # The next restart resumes from step 5, not from the higher-numbered step 6.
    cp = restart(root)
    assert resume(cp) == 5
    save(cp, 7)
    cp.wait()
    assert latest(root) == step_name(7)
    assert [p.name for p in ck.lineage(root / step_name(7))] == [step_name(7), step_name(5)]
    assert names(root) == [step_name(5), step_name(6), step_name(7)]  # keep_last=2 of the lineage
    assert resume(restart(root)) == 7

    # `mmtrain launch`'s preflight and its summary name the same checkpoint, not the newest name
    from launch.preflight import Report, check_resume

    (root / LATEST).write_text(step_name(5) + "\n")  # as after another rollback, to step 5
    note = check_resume(root, resume=None, fresh=False, world=1, report=Report())
    assert note.startswith(f"resumes from {root / step_name(5)} ")
    assert ck.resume_candidates(root)[0] == root / step_name(5)


def test_resuming_another_runs_checkpoint_survives_a_restart(tmp_path):
    """`--resume /other/run/checkpoints/step_X`: `latest` holds that path until the first save, so
    a restart before it resumes from there too (not from scratch); the other run is never pruned."""
    other, root = tmp_path / "A" / "checkpoints", tmp_path / "B" / "checkpoints"
    cp = restart(other)
    for step in (3, 6):
        save(cp, step)
    cp.wait()
    cp = restart(root)
    assert resume(cp, str(other / step_name(3))) == 3
    assert latest(root) == str((other / step_name(3)).resolve())
    assert resume(restart(root)) == 3  # the restart
    save(cp, 4)
    cp.wait()
    assert latest(root) == step_name(4)
    assert json.loads((root / step_name(4) / MANIFEST).read_text())["parent"] is None
    for step in (5, 6):
        save(cp, step)
    cp.wait()
    assert latest(root) == step_name(6) and names(root) == [step_name(5), step_name(6)]
    assert names(other) == [step_name(3), step_name(6)]  # untouched


def test_without_latest_or_parent_entries_the_newest_name_is_used(tmp_path):
    """Checkpoints from before lineage was recorded (no `parent` in MANIFEST), and a deleted
    `latest`: resume and pruning fall back to name order."""
    root = tmp_path / "ckpts"
    cp = restart(root, keep_last=3)
    for step in (1, 2, 3):
        save(cp, step)
    cp.wait()
    for name in names(root):
        manifest = json.loads((root / name / MANIFEST).read_text())
        del manifest["parent"]
        (root / name / MANIFEST).write_text(json.dumps(manifest))
    assert [p.name for p in ck.lineage(root / step_name(3))] == names(root)[::-1]
    (root / LATEST).unlink()
    assert resume(restart(root)) == 3


# ----------------------------------------------------------------------- split verification
def synthetic_checkpoint(root: Path, world: int, zero3: bool) -> tuple[Path, dict]:
    """A committed checkpoint directory laid out like DeepSpeed's for `world` ranks."""
    ckpt = root / step_name(10)
    sizes = {"config.json": 300}
    for r in range(world):
        sizes[f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"] = 3000 + r
        sizes[f"rng/rank_{r}.pt"] = 100
        sizes[f"loader/rank_{r}.json"] = 50
        if zero3:
            sizes[f"zero_pp_rank_{r}_mp_rank_00_model_states.pt"] = 1000 + r
    if not zero3:
        sizes["mp_rank_00_model_states.pt"] = 20000  # every rank reads it (ZeRO 0-2)
    files = {}
    for rel, size in sizes.items():
        path = ckpt / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        data = os.urandom(size)
        path.write_bytes(data)
        files[rel] = hashlib.sha256(data).hexdigest()
    manifest = {"step": 10, "world_size": world, "parent": None, "files": files}
    (ckpt / MANIFEST).write_text(json.dumps(manifest))
    (ckpt / COMMITTED).write_text("10\n")
    return ckpt, manifest


def hashed_bytes_per_rank(ckpt: Path, manifest: dict, world: int, monkeypatch) -> list[dict]:
    """Run each rank's verification of `ckpt` on `world` ranks; the files (and bytes) it hashed."""
    seen: list[dict[str, int]] = []
    real = ck.sha256_file

    def counting(path: Path, *a) -> str:
        seen[-1][str(Path(path).relative_to(ckpt))] = Path(path).stat().st_size
        return real(path, *a)

    monkeypatch.setattr(ck, "sha256_file", counting)
    for rank in range(world):
        seen.append({})
        assert ck.check_share(ckpt, manifest, rank, world) is None
    return seen


@pytest.mark.parametrize("zero3", [True, False], ids=["zero3", "zero2"])
def test_64_ranks_each_hash_their_own_share_once(tmp_path, monkeypatch, zero3):
    ckpt, manifest = synthetic_checkpoint(tmp_path, 64, zero3)
    seen = hashed_bytes_per_rank(ckpt, manifest, 64, monkeypatch)
    everything = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file()
                     and p.name not in (MANIFEST, COMMITTED))
    # every file hashed exactly once over all ranks
    assert sorted(rel for share in seen for rel in share) == sorted(manifest["files"])
    assert sum(sum(share.values()) for share in seen) == everything
    for rank, share in enumerate(seen):
        own = {f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", f"rng/rank_{rank}.pt"}
        if zero3:
            own.add(f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt")
        if rank == 0:  # what rank 0 alone reads (loader states, broadcast) or reads like all
            own |= {f"loader/rank_{r}.json" for r in range(64)} | {"config.json"}
            if not zero3:
                own.add("mp_rank_00_model_states.pt")
        assert set(share) == own, rank
    per_rank = [sum(s.values()) for s in seen]
    assert max(per_rank[1:]) * 40 < everything  # about 1/64 of the checkpoint each, not all of it


def test_world_size_change_spreads_the_hashing(tmp_path, monkeypatch):
    """Resumed by 48 ranks, a 64-rank checkpoint is still hashed exactly once (rank K's files by
    rank K mod 48); rank 0's converter reads the others' files after the agreed verdict."""
    ckpt, manifest = synthetic_checkpoint(tmp_path, 64, zero3=True)
    seen = hashed_bytes_per_rank(ckpt, manifest, 48, monkeypatch)
    assert sorted(rel for share in seen for rel in share) == sorted(manifest["files"])
    assert "zero_pp_rank_50_mp_rank_00_optim_states.pt" in seen[2]


def test_find_resume_then_load_hashes_each_file_once(tmp_path, monkeypatch):
    root = tmp_path / "ckpts"
    cp = restart(root)
    save(cp, 3)
    cp.wait()
    calls = []
    real = ck.sha256_file
    monkeypatch.setattr(ck, "sha256_file", lambda p, *a: calls.append(Path(p).name) or real(p, *a))
    assert resume(restart(root)) == 3
    files = json.loads((root / step_name(3) / MANIFEST).read_text())["files"]
    assert sorted(calls) == sorted(Path(rel).name for rel in files)


def test_a_refusal_on_one_rank_moves_every_rank_to_the_parent(tmp_path):
    root = tmp_path / "ckpts"

    def two_saves(rank, comm):
        cp = Checkpointer(root, rank=rank, world_size=2, keep_last=3, comm=comm)
        save(cp, 2)
        save(cp, 4)
        cp.wait()

    on_ranks(2, two_saves)
    # rank 1's own optimizer file of the newest checkpoint is damaged: only rank 1 hashes it
    bad = root / step_name(4) / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    bad.write_bytes(bad.read_bytes()[:-1] + b"x")

    def find(rank, comm):
        cp = Checkpointer(root, rank=rank, world_size=2, keep_last=3, comm=comm)
        return cp.find_resume()

    assert on_ranks(2, find) == [root / step_name(2)] * 2
    assert latest(root) == step_name(2)

    def explicit(rank, comm):
        cp = Checkpointer(root, rank=rank, world_size=2, keep_last=3, comm=comm)
        with pytest.raises(ValueError) as e:
            cp.find_resume(step_name(4))
        return str(e.value)

    errors = on_ranks(2, explicit)
    assert "fails its sha256 check" in errors[1]
    assert "rank 1 found a file that fails its check" in errors[0]


# ------------------------------------------------------------------------- asynchronous save
def test_commit_waits_for_every_rank_and_training_does_not(tmp_path):
    root = tmp_path / "ckpts"
    gate = threading.Event()
    returned = threading.Barrier(2, timeout=60)

    def run(rank, comm):
        cp = Checkpointer(root, rank=rank, world_size=2, keep_last=2, comm=comm)
        save(cp, 2)
        cp.wait()
        comm.barrier()
        save(cp, 4, gate=gate if rank == 1 else None)  # rank 1's writer is slow
        returned.wait()  # both ranks are back in the training loop...
        if rank == 0:  # ...while rank 1's files are still being written: nothing committed
            assert not (root / step_name(4) / COMMITTED).exists()
            assert latest(root) == step_name(2)
            gate.set()
        cp.wait()
        comm.barrier()
        return cp

    run_results = on_ranks(2, run)
    assert latest(root) == step_name(4) and (root / step_name(4) / COMMITTED).is_file()
    manifest = json.loads((root / step_name(4) / MANIFEST).read_text())
    assert {"zero_pp_rank_1_mp_rank_00_optim_states.pt", "rng/rank_1.pt",
            "loader/rank_1.json"} <= set(manifest["files"]) and manifest["world_size"] == 2
    assert not (root / step_name(4) / ck.PENDING).exists()
    ck.verify(root / step_name(4))
    assert len(run_results) == 2


def test_a_failed_background_write_leaves_the_previous_checkpoint_latest(tmp_path):
    root = tmp_path / "ckpts"

    def run(rank, comm):
        cp = Checkpointer(root, rank=rank, world_size=2, keep_last=2, comm=comm)
        save(cp, 2)
        cp.wait()
        save(cp, 4, fail=rank == 1)  # rank 1 runs out of disk while writing
        with pytest.raises(RuntimeError, match="No space left on device"):
            cp.wait()

    on_ranks(2, run)
    assert latest(root) == step_name(2) and names(root) == [step_name(2)]
    assert not (root / step_name(4) / COMMITTED).exists()
    assert ck.resume_candidates(root) == [root / step_name(2)]
    assert resume(restart(root)) == 2


def test_a_rank_that_dies_mid_write_blocks_the_commit(tmp_path):
    """A rank killed during its background write never publishes its marker: rank 0 gives up
    after peer_timeout_s, and the previous checkpoint stays `latest`."""
    root = tmp_path / "ckpts"
    gate = threading.Event()

    def run(rank, comm):
        cp = Checkpointer(root, rank=rank, world_size=2, keep_last=2, comm=comm, peer_timeout_s=1)
        save(cp, 2)
        cp.wait()
        save(cp, 4, gate=gate if rank == 1 else None)
        if rank == 0:
            with pytest.raises(RuntimeError, match="did not finish writing"):
                cp.wait()
            gate.set()
        return cp

    cps = on_ranks(2, run)
    cps[1]._thread.join()  # the "dead" rank's writer, released only after rank 0 gave up
    assert latest(root) == step_name(2)
    assert not (root / step_name(4) / COMMITTED).exists()


def test_the_host_copy_is_taken_at_save_time(tmp_path):
    """What HostCopyEngine writes is the state when DeepSpeed handed it over, in DeepSpeed's own
    format, even if training changes the live tensors before the write."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from mmtrain.distributed.snapshot import HostCopyEngine

    flat = torch.arange(10.0)
    live = {"module": {"a": flat[:4], "tied": flat[4:]}, "step": [3]}
    live["module"]["also_tied"] = live["module"]["tied"]
    TorchCheckpointEngine().save(live, str(tmp_path / "sync.pt"))
    host = HostCopyEngine()
    host.save(live, str(tmp_path / "async.pt"))
    flat.add_(100.0)  # the next optimizer step
    live["step"][0] = 4
    assert host.write(host.take()) == [tmp_path / "async.pt"]
    got = torch.load(tmp_path / "async.pt", weights_only=True)
    want = torch.load(tmp_path / "sync.pt", weights_only=True)
    assert got["step"] == want["step"] == [3]
    for key in ("a", "tied", "also_tied"):
        assert torch.equal(got["module"][key], want["module"][key]), key
    assert torch.equal(got["module"]["a"], torch.arange(4.0))
    assert got["module"]["tied"] is got["module"]["also_tied"]  # sharing kept
    assert got["module"]["a"].untyped_storage().nbytes() == 16  # a compact copy, not the buffer


def test_host_buffers_are_reused_by_the_next_save(tmp_path):
    """The same file of the next checkpoint reuses the host buffers once the previous one is
    written; what was written is unaffected."""
    from mmtrain.distributed.snapshot import HostCopyEngine

    live = {"w": torch.zeros(3)}
    host = HostCopyEngine()
    first, second = tmp_path / "step_1" / "model.pt", tmp_path / "step_2" / "model.pt"
    first.parent.mkdir()
    second.parent.mkdir()
    host.save(live, str(first))
    files = host.take()
    buffer = files[0][1]["w"]
    host.write(files)
    live["w"].add_(1.0)
    host.save(live, str(second))
    files = host.take()
    assert files[0][1]["w"] is buffer  # no new allocation
    host.write(files)
    assert torch.equal(torch.load(first, weights_only=True)["w"], torch.zeros(3))
    assert torch.equal(torch.load(second, weights_only=True)["w"], torch.ones(3))
