"""Crash-safe checkpoints (ARCHITECTURE.md §5).

    checkpoints/step_00000100/   DeepSpeed files + loader/rank_K.json + rng/rank_K.pt
                                 + config.json + MANIFEST.json + COMMITTED
    checkpoints/latest           name of the newest committed step, replaced atomically

Commit protocol: every rank writes its part → barrier → rank 0 writes MANIFEST.json (sha256 of
every file) → COMMITTED → `latest` (atomic rename) → prune old ones → barrier. A directory without
COMMITTED is not a checkpoint. Before anything is unpickled, every file's hash is checked against
the manifest; our own torch loads use weights_only=True.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from mmtrain.fileio import atomic_write_bytes, sha256_file

log = logging.getLogger("mmtrain.checkpoint")
STEP_DIR = re.compile(r"^step_(\d{8})$")
COMMITTED, MANIFEST, LATEST = "COMMITTED", "MANIFEST.json", "latest"


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def verify(ckpt: Path) -> None:
    """Raise ValueError unless `ckpt` is committed and every file matches its manifest hash."""
    if not (ckpt / COMMITTED).is_file():
        raise ValueError(f"{ckpt} is not committed (no {COMMITTED} marker)")
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{ckpt}/{MANIFEST} unreadable: {e}") from None
    for rel, expected in manifest["files"].items():
        path = ckpt / rel
        if not path.is_file():
            raise ValueError(f"{ckpt}: file {rel} listed in {MANIFEST} is missing")
        if sha256_file(path) != expected:
            raise ValueError(f"{ckpt}: file {rel} fails its sha256 check (corrupt or changed)")


def committed_steps(root: Path) -> list[Path]:
    """Committed checkpoint directories, newest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / COMMITTED).is_file()]
    return sorted(found, key=lambda p: p.name, reverse=True)


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


class Checkpointer:
    """Saves and restores everything with state: engine, loader, RNG, config."""

    def __init__(self, root: Path, *, rank: int, world_size: int, keep_last: int,
                 barrier: Callable[[], None]) -> None:
        self.root, self.rank, self.world_size = Path(root), rank, world_size
        self.keep_last, self.barrier = keep_last, barrier

    # ------------------------------------------------------------------------------ saving
    def save(self, step: int, *, save_engine: Callable[[str, str], None],
             loader_state: dict[str, Any], config: dict[str, Any]) -> Path:
        name = step_name(step)
        ckpt = self.root / name
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if ckpt.exists():  # a partial directory from a crashed save of the same step
                shutil.rmtree(ckpt)
        self.barrier()
        save_engine(str(self.root), name)  # every rank: its DeepSpeed shard
        for sub in ("loader", "rng"):
            (ckpt / sub).mkdir(parents=True, exist_ok=True)
        atomic_write_text(ckpt / "loader" / f"rank_{self.rank}.json",
                      json.dumps(loader_state, indent=1, sort_keys=True))
        torch.save(rng_state(), ckpt / "rng" / f"rank_{self.rank}.pt")
        self.barrier()
        if self.rank == 0:
            atomic_write_text(ckpt / "config.json", json.dumps(config, indent=2, sort_keys=True))
            paths = [p for p in sorted(ckpt.rglob("*"))
                     if p.is_file() and p.name not in (MANIFEST, COMMITTED)]
            with ThreadPoolExecutor(max(1, os.cpu_count() or 1)) as pool:  # hashlib frees the GIL
                files = dict(zip((str(p.relative_to(ckpt)) for p in paths), pool.map(sha256_file, paths)))
            atomic_write_text(ckpt / MANIFEST, json.dumps(
                {"step": step, "world_size": self.world_size, "files": files}, indent=1))
            atomic_write_text(ckpt / COMMITTED, f"{step}\n")
            atomic_write_text(self.root / LATEST, name + "\n")
            self._prune()
        self.barrier()
        return ckpt

    def _prune(self) -> None:
        """Keep the newest `keep_last` committed checkpoints; remove stale partial ones."""
        committed = committed_steps(self.root)
        for old in committed[self.keep_last:]:
            shutil.rmtree(old, ignore_errors=True)
        newest = committed[0].name if committed else ""
        for p in self.root.iterdir():
            if STEP_DIR.match(p.name) and not (p / COMMITTED).exists() and p.name < newest:
                shutil.rmtree(p, ignore_errors=True)

    # ----------------------------------------------------------------------------- loading
    def find_resume(self, explicit: str | None = None) -> Path | None:
        """The checkpoint to resume from: `explicit` (must be valid), else the newest valid one."""
        if explicit:
            ckpt = Path(explicit) if "/" in explicit else self.root / explicit
            if not ckpt.is_dir():
                raise ValueError(f"checkpoint {ckpt} does not exist")
            verify(ckpt)
            return ckpt
        for ckpt in committed_steps(self.root):
            try:
                verify(ckpt)
                return ckpt
            except ValueError as e:
                log.warning("refusing checkpoint: %s; trying an older one", e)
        return None

    def load(self, ckpt: Path, *, load_engine: Callable[[str, str, int], None],
             load_loader: Callable[[list[dict[str, Any]]], None]) -> int:
        verify(ckpt)  # hashes first: nothing is unpickled from an unchecked file
        manifest = json.loads((ckpt / MANIFEST).read_text())
        load_engine(str(ckpt.parent), ckpt.name, int(manifest["world_size"]))
        states = [json.loads(p.read_text()) for p in sorted((ckpt / "loader").glob("rank_*.json"))]
        load_loader(states)
        rng = ckpt / "rng" / f"rank_{self.rank}.pt"
        if manifest["world_size"] == self.world_size and rng.is_file():
            set_rng_state(torch.load(rng, weights_only=True))
        return int(manifest["step"])
