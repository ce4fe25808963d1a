"""Crash-safe checkpoints (ARCHITECTURE.md §5, docs/checkpoints.md).

    checkpoints/step_00000100/   DeepSpeed files + loader/rank_K.json + rng/rank_K.pt
                                 + config.json + MANIFEST.json + COMMITTED
    checkpoints/latest           the checkpoint a resume starts from, replaced atomically

A directory without COMMITTED is not a checkpoint. MANIFEST.json holds the sha256 of every file
and the checkpoint's parent (the one its run resumed from or saved before it).

Save. Training is blocked only while the state is copied into host memory; the rest runs in a
background thread that issues no collective (the training loop owns the process group), so ranks
agree through the filesystem:
  main thread, every rank:  wait for its previous save · barrier · DeepSpeed state, loader state
                            and RNG state into host memory
  background, every rank:   write and fsync its own files, hash them, publish
                            .commit/rank_K.json (renamed into place: it appears whole)
  background, rank 0:       once every rank's marker is there: fsync each directory once,
                            MANIFEST.json, COMMITTED, `latest`, prune
A crash anywhere before COMMITTED leaves the previous checkpoint as `latest`.

Resume follows `latest`: what the user last resumed from or saved. `--resume X` (a rollback)
moves `latest` to X, so restarts keep the rollback. Pruning keeps the newest `keep_last`
checkpoints of the lineage of `latest` (it, its parent, ...); checkpoints on other branches
(after a rollback) are left alone.

Verification is split and done once: rank 0 picks the checkpoint and broadcasts it with its
manifest; every rank hashes only its share (`hashed_by`); one all-reduce agrees on the verdict,
and on a refusal every rank moves on to the parent together. Nothing is unpickled before the
verdict; our own torch loads use weights_only=True.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from mmtrain.fileio import atomic_write_bytes, fsync_dir, sha256_file

log = logging.getLogger("mmtrain.checkpoint")
STEP_DIR = re.compile(r"^step_(\d{8})$")
COMMITTED, MANIFEST, LATEST = "COMMITTED", "MANIFEST.json", "latest"
PENDING = ".commit"  # per-rank markers of a save in flight, removed before COMMITTED
# Files that only their own rank reads on resume: DeepSpeed's ZeRO partitions of data-parallel
# rank K (optimizer states; model states under ZeRO-3) and the RNG state of rank K.
OWN_FILE = re.compile(r"^(?:(?:bf16_)?zero_pp_rank_(\d+)_.*|rng/rank_(\d+)\.pt)$")
HASH_THREADS = 4


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def step_name(step: int) -> str:
    return f"step_{step:08d}"


class OneProcess:
    """The collectives of a world of one (tools, tests); the same calls as
    mmtrain.distributed.collectives.Collectives, which training passes."""

    def barrier(self) -> None:
        pass

    def max(self, values: list[float]) -> list[float]:
        return [float(v) for v in values]

    def broadcast_json(self, obj: Any = None, src: int = 0) -> Any:
        return json.loads(json.dumps(obj))


# --------------------------------------------------------------------------- reading, verifying
def read_manifest(ckpt: Path) -> dict[str, Any]:
    """The manifest of a committed checkpoint; ValueError if it is missing, uncommitted or
    unreadable."""
    if not ckpt.is_dir():
        raise ValueError(f"checkpoint {ckpt} does not exist")
    if not (ckpt / COMMITTED).is_file():
        raise ValueError(f"{ckpt} is not committed (no {COMMITTED} marker)")
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{ckpt}/{MANIFEST} unreadable: {e!r}") from None
    if not (isinstance(manifest, dict) and isinstance(manifest.get("files"), dict)
            and "world_size" in manifest and "step" in manifest):
        raise ValueError(f"{ckpt}/{MANIFEST} lacks files, world_size or step")
    return manifest


def check_files(ckpt: Path, files: dict[str, str], names: list[str]) -> str | None:
    """Hash `names` (manifest entries of `ckpt`) in parallel; the first failure, or None."""
    def check(rel: str) -> str | None:
        path = ckpt / rel
        if not path.is_file():
            return f"{ckpt}: file {rel} listed in {MANIFEST} is missing"
        if sha256_file(path) != files[rel]:
            return f"{ckpt}: file {rel} fails its sha256 check (corrupt or changed)"
        return None

    with ThreadPoolExecutor(HASH_THREADS) as pool:  # hashlib releases the GIL
        errors = [e for e in pool.map(check, names) if e]
    return errors[0] if errors else None


def verify(ckpt: Path) -> None:
    """Raise ValueError unless `ckpt` is committed and every file matches its manifest hash (one
    process hashes everything: tools such as export and preflight)."""
    files = read_manifest(ckpt)["files"]
    error = check_files(ckpt, files, sorted(files))
    if error:
        raise ValueError(error)


def hashed_by(rel: str, world_size: int) -> int:
    """The rank that hashes manifest entry `rel` on a resume by `world_size` ranks: a file of saved
    rank K that only its own rank reads (`OWN_FILE`) by rank K mod world_size (rank K itself on the
    same world size); every other file by rank 0, which reads it (the loader states, broadcast to
    all) or reads it as every rank does (DeepSpeed's mp_rank_00_model_states.pt under ZeRO 0-2).
    Every file is hashed exactly once, and the verdict is agreed before any rank unpickles one."""
    m = OWN_FILE.match(rel)
    return 0 if m is None else int(m.group(1) or m.group(2)) % world_size


def verification_share(files: dict[str, str], rank: int, world_size: int) -> list[str]:
    return [rel for rel in sorted(files) if hashed_by(rel, world_size) == rank]


def check_share(ckpt: Path, manifest: dict[str, Any], rank: int, world_size: int) -> str | None:
    """Hash this rank's share of a checkpoint: the first failure, or None."""
    files = manifest["files"]
    return check_files(ckpt, files, verification_share(files, rank, world_size))


# ------------------------------------------------------------------------------- latest, lineage
def committed_steps(root: Path) -> list[Path]:
    """Committed checkpoint directories, newest name first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / COMMITTED).is_file()]
    return sorted(found, key=lambda p: p.name, reverse=True)


def read_latest(root: Path) -> Path | None:
    """The committed checkpoint `latest` names, or None. It holds a step name of `root`, or the
    absolute path of another run's checkpoint this run resumed from (until its first save)."""
    try:
        ckpt = root / (root / LATEST).read_text().strip()  # an absolute path stays as it is
    except OSError:
        return None
    return ckpt if STEP_DIR.match(ckpt.name) and (ckpt / COMMITTED).is_file() else None


def parent_of(ckpt: Path) -> Path | None:
    """The committed checkpoint `ckpt` descends from. Manifests written before lineage was
    recorded have no parent entry: the next older committed checkpoint stands in."""
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if "parent" in manifest:
        parent = ckpt.parent / manifest["parent"] if manifest["parent"] else None
        return parent if parent is not None and (parent / COMMITTED).is_file() else None
    older = [p for p in committed_steps(ckpt.parent) if p.name < ckpt.name]
    return older[0] if older else None


def lineage(head: Path) -> list[Path]:
    """`head`, its parent, the parent's parent, ... while they are committed."""
    chain: list[Path] = []
    cur: Path | None = head
    while cur is not None and cur not in chain and (cur / COMMITTED).is_file():
        chain.append(cur)
        cur = parent_of(cur)
    return chain


def resume_candidates(root: Path) -> list[Path]:
    """The checkpoints a resume tries, in order: `latest` and its ancestors; without a valid
    `latest` (deleted by hand), every committed checkpoint, newest name first."""
    head = read_latest(root)
    return lineage(head) if head is not None else committed_steps(root)


# ------------------------------------------------------------------------------------ RNG state
def rng_state() -> dict[str, Any]:
    py = random.getstate()
    np_state = np.random.get_state()
    state = {"python_version": py[0], "python_state": torch.tensor(py[1], dtype=torch.int64),
             "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
             "numpy_pos": np_state[2], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate((state["python_version"], tuple(state["python_state"].tolist()), None))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32),
                         state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _publish(path: Path, text: str) -> None:
    """Make `path` appear whole (rename), without fsync: a marker for peers, not data."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_own(path: Path, data: Any) -> Path:
    """One of our own files (bytes, or a state for torch.save), fsync'd."""
    with open(path, "wb") as f:
        if isinstance(data, bytes):
            f.write(data)
        else:
            torch.save(data, f)
        f.flush()
        os.fsync(f.fileno())
    return path


class Checkpointer:
    """Saves (asynchronously) and restores everything with state: engine, loader, RNG, config.

    `comm` is the process group's collectives (mmtrain.distributed.collectives.Collectives, or
    OneProcess); only the calling (main) thread uses it.
    """

    def __init__(self, root: Path, *, rank: int, world_size: int, keep_last: int,
                 comm: Any = None, peer_timeout_s: float = 1800.0) -> None:
        self.root, self.rank, self.world_size = Path(root), rank, world_size
        self.keep_last, self.peer_timeout_s = keep_last, peer_timeout_s
        self.comm = comm if comm is not None else OneProcess()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._parent: str | None = None  # what the next save descends from
        self._verified: tuple[Path, dict[str, Any]] | None = None

    # ------------------------------------------------------------------------------ saving
    def save(self, step: int, *, save_engine: Callable[[str, str], Callable[[], list[Path]]],
             loader_state: dict[str, Any], config: dict[str, Any]) -> Path:
        """Collective. Returns once this rank's state is in host memory; the checkpoint is
        committed in the background (`wait`). `save_engine(root, tag)` snapshots the engine and
        returns the function that writes its files (returning their paths)."""
        self.wait()
        name = step_name(step)
        ckpt = self.root / name
        if self.rank == 0:
            if ckpt.exists():  # a crashed save of this step, or a branch abandoned by a rollback
                shutil.rmtree(ckpt)
            for sub in ("loader", "rng", PENDING):
                (ckpt / sub).mkdir(parents=True)
        self.comm.barrier()
        write_engine = save_engine(str(self.root), name)
        own: dict[str, Any] = {
            f"loader/rank_{self.rank}.json": json.dumps(loader_state, indent=1,
                                                        sort_keys=True).encode(),
            f"rng/rank_{self.rank}.pt": rng_state()}
        if self.rank == 0:
            own["config.json"] = json.dumps(config, indent=2, sort_keys=True).encode()
        parent, self._parent = self._parent, name
        self._thread = threading.Thread(target=self._write, name=f"checkpoint-{name}", daemon=True,
                                        args=(step, ckpt, parent, write_engine, own))
        self._thread.start()
        return ckpt

    def wait(self) -> None:
        """Until this rank's last save is on disk (rank 0: committed); raises if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"saving a checkpoint failed on rank {self.rank}: "
                               f"{type(error).__name__}: {error}") from error

    def _write(self, step: int, ckpt: Path, parent: str | None,
               write_engine: Callable[[], list[Path]], own: dict[str, Any]) -> None:
        """Background thread: this rank's files, its marker; on rank 0 the commit."""
        marker = ckpt / PENDING / f"rank_{self.rank}"
        try:
            t0 = time.monotonic()
            paths = [Path(p) for p in write_engine()]
            paths += [_write_own(ckpt / rel, data) for rel, data in own.items()]
            with ThreadPoolExecutor(HASH_THREADS) as pool:  # hashlib releases the GIL
                hashes = dict(zip((str(p.relative_to(ckpt)) for p in paths),
                                  pool.map(sha256_file, paths)))
            _publish(marker.with_suffix(".json"), json.dumps(hashes))
            if self.rank == 0:
                self._commit(step, ckpt, parent, t0)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread by wait()
            self._error = e
            try:
                _publish(marker.with_suffix(".failed"), f"{type(e).__name__}: {e}")
            except OSError:
                pass

    def _commit(self, step: int, ckpt: Path, parent: str | None, t0: float) -> None:
        files = self._gather_markers(ckpt)
        # Each directory once: every rank's files were fsync'd by their writer; their entries
        # (and the step directory's own in checkpoints/) become durable here.
        subdirs = sorted(p for p in ckpt.rglob("*") if p.is_dir() and PENDING not in p.parts)
        for directory in [*subdirs, ckpt, self.root]:
            fsync_dir(directory)
        shutil.rmtree(ckpt / PENDING)
        atomic_write_text(ckpt / MANIFEST, json.dumps({"step": step, "world_size": self.world_size,
                                                       "parent": parent, "files": files}, indent=1))
        atomic_write_text(ckpt / COMMITTED, f"{step}\n")
        atomic_write_text(self.root / LATEST, ckpt.name + "\n")
        log.info("committed %s (%d files) %.1f s after its snapshot", ckpt.name, len(files),
                 time.monotonic() - t0)
        self._prune(ckpt)

    def _gather_markers(self, ckpt: Path) -> dict[str, str]:
        """Every rank's file hashes, once all are published; raises if a rank failed or none came
        within peer_timeout_s (a rank died: the previous checkpoint stays `latest`)."""
        files: dict[str, str] = {}
        waiting = set(range(self.world_size))
        deadline, pause = time.monotonic() + self.peer_timeout_s, 0.01
        while waiting:
            for r in sorted(waiting):
                base = ckpt / PENDING / f"rank_{r}"
                if base.with_suffix(".failed").exists():
                    raise RuntimeError(f"rank {r} failed to write its part of {ckpt.name}: "
                                       f"{base.with_suffix('.failed').read_text()}")
                if base.with_suffix(".json").exists():
                    files.update(json.loads(base.with_suffix(".json").read_text()))
                    waiting.discard(r)
            if waiting:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"ranks {sorted(waiting)[:8]} did not finish writing "
                                       f"{ckpt.name} within {self.peer_timeout_s:.0f} s")
                time.sleep(pause)
                pause = min(1.0, pause * 2)
        return dict(sorted(files.items()))

    def _prune(self, head: Path) -> None:
        """Keep the newest `keep_last` checkpoints of the lineage of `head` (just committed, now
        `latest`); remove uncommitted step directories (no save is in flight now)."""
        for old in lineage(head)[self.keep_last:]:
            shutil.rmtree(old, ignore_errors=True)
        for p in self.root.iterdir():
            if STEP_DIR.match(p.name) and not (p / COMMITTED).exists():
                shutil.rmtree(p, ignore_errors=True)

    # ----------------------------------------------------------------------------- loading
    def find_resume(self, explicit: str | None = None) -> Path | None:
        """Collective. The checkpoint to resume from: `explicit` (must pass), else `latest` or,
        if refused, its nearest ancestor that passes. It becomes `latest` and the parent of the
        next save; `load` does not hash it again."""
        if explicit:
            return self._choose([Path(explicit) if "/" in explicit else self.root / explicit],
                                strict=True)
        return self._choose(resume_candidates(self.root) if self.rank == 0 else [], strict=False)

    def _choose(self, candidates: list[Path], *, strict: bool) -> Path | None:
        """Rank 0 offers `candidates` one by one (path + manifest); every rank hashes its share;
        one all-reduce per candidate agrees on the verdict."""
        pending = list(candidates)  # only rank 0's list counts
        while True:
            offer = None
            if self.rank == 0 and pending:
                ckpt = pending.pop(0)
                try:
                    offer = {"path": str(ckpt), "manifest": read_manifest(ckpt)}
                except ValueError as e:
                    offer = {"path": str(ckpt), "refused": str(e)}
            offer = self.comm.broadcast_json(offer)
            if offer is None:
                return None
            ckpt = Path(offer["path"])
            try:
                if "refused" in offer:
                    raise ValueError(offer["refused"])
                self._agree(ckpt, offer["manifest"])
            except ValueError as e:
                if strict:
                    raise
                log.warning("refusing checkpoint: %s; trying its parent", e)
                continue
            self._adopt(ckpt)
            return ckpt

    def _agree(self, ckpt: Path, manifest: dict[str, Any]) -> None:
        """Hash this rank's share; all ranks raise ValueError together if any share failed."""
        error = check_share(ckpt, manifest, self.rank, self.world_size)
        failed = int(self.comm.max([self.rank + 1 if error else 0])[0])
        if failed:
            raise ValueError(error or f"{ckpt}: rank {failed - 1} found a file that fails its "
                                      f"check (see logs/rank_{failed - 1}.log)")
        self._verified = (ckpt, manifest)

    def _adopt(self, ckpt: Path) -> None:
        """The checkpoint this run resumes from becomes `latest` (another run's by its absolute
        path) and, if it is one of ours, the parent of the next save."""
        ours = ckpt.parent.resolve() == self.root.resolve()
        self._parent = ckpt.name if ours else None
        target = self.root / ckpt.name if ours else ckpt.resolve()
        if self.rank == 0 and read_latest(self.root) != target:
            self.root.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.root / LATEST, f"{ckpt.name if ours else target}\n")
            log.info("`latest` now names %s, the checkpoint this run resumes from", target)

    def load(self, ckpt: Path, *, load_engine: Callable[[str, str, int], None],
             load_loader: Callable[[list[dict[str, Any]]], None]) -> int:
        """Collective. Restore `ckpt` (verified first unless `find_resume` just did); returns
        its step."""
        ckpt = Path(ckpt)
        if self._verified is None or self._verified[0] != ckpt:
            self._choose([ckpt], strict=True)
        manifest = self._verified[1]
        load_engine(str(ckpt.parent), ckpt.name, int(manifest["world_size"]))
        load_loader(self._loader_states(ckpt, manifest))
        rng = f"rng/rank_{self.rank}.pt"
        if manifest["world_size"] == self.world_size and rng in manifest["files"]:
            set_rng_state(torch.load(ckpt / rng, weights_only=True))
        return int(manifest["step"])

    def _loader_states(self, ckpt: Path, manifest: dict[str, Any]) -> list[dict[str, Any]]:
        """Rank 0 reads every rank's loader state (it hashed them) and broadcasts them."""
        states: Any = None
        if self.rank == 0:
            try:
                states = [json.loads((ckpt / rel).read_text())
                          for rel in sorted(manifest["files"]) if rel.startswith("loader/")]
            except (OSError, ValueError) as e:
                states = {"error": f"{ckpt}: loader state unreadable: {e!r}"}
        states = self.comm.broadcast_json(states)
        if isinstance(states, dict):
            raise ValueError(states["error"])
        return states
