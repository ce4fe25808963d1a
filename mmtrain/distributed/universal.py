"""Resuming a ZeRO checkpoint on another world size, through DeepSpeed's universal checkpoint.

A ZeRO-1/2/3 checkpoint holds one optimizer (and, under ZeRO-3, parameter) partition per rank,
cut for the world size that saved it; DeepSpeed refuses to load it on another one. DeepSpeed's
universal checkpoint is the layout that does not depend on it: one folder per parameter with its
whole fp32 value, exp_avg, exp_avg_sq and step. So, on a world-size change:

    rank 0:     ds_to_universal(CKPT_ROOT/step_X)  →  CKPT_ROOT/.universal-step_X.partial/step_X
                rename  .universal-step_X.partial  →  .universal-step_X        (atomic)
    barrier
    every rank: engine.load_checkpoint(.universal-step_X, step_X) with load_universal on: each rank
                cuts its own partition; the LR schedule and step counters come from the copied
                model-states file
    barrier
    rank 0:     remove .universal-step_X

The committed checkpoint is never touched (its MANIFEST stays valid), the converted copy lives
beside it under a dot-name that `Checkpointer` ignores, and it is removed once loaded: nothing
unhashed is left to be unpickled by a later run. The conversion reads only files whose hashes
the ranks agreed on just before (each rank hashed its share, `mmtrain.checkpoint.hashed_by`), and
DeepSpeed's reads run inside mmtrain.distributed.safe_load's weights-only guard.

ZeRO-0 checkpoints hold whole tensors (one model-states file, optimizer included) and load on any
world size directly.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from mmtrain.distributed.collectives import Collectives

log = logging.getLogger("mmtrain.engine")


def client_state_marker() -> dict[str, Any]:
    """What `ds_to_universal` requires in a checkpoint's client state (plain model: no TP/PP
    patterns, only the format version)."""
    from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO,
                                                UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                                UNIVERSAL_CHECKPOINT_VERSION_VALUE)

    return {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY:
                                        UNIVERSAL_CHECKPOINT_VERSION_VALUE}}


def is_partitioned(ckpt: Path) -> bool:
    """Whether the checkpoint holds per-rank ZeRO partitions (stages 1–3, or the bf16 optimizer)."""
    return any(ckpt.glob("*zero_pp_rank_*_optim_states.pt"))


def universal_dir(root: Path, tag: str) -> Path:
    return root / f".universal-{tag}"


def convert(root: Path, tag: str) -> Path:
    """Write the universal form of root/tag to root/.universal-TAG/TAG (rank 0 only); returns the
    directory to pass to `engine.load_checkpoint` as load_dir."""
    from deepspeed.checkpoint import ds_to_universal

    final, partial = universal_dir(root, tag), root / f".universal-{tag}.partial"
    for stale in (final, partial):  # from an earlier or crashed resume: never trusted, redone
        shutil.rmtree(stale, ignore_errors=True)
    args = argparse.Namespace(input_folder=str(root / tag), output_folder=str(partial / tag),
                              num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                              strict=True, inject_missing_state=False)
    out = io.StringIO()
    try:
        # The converter prints its progress (and tqdm bars); keep it for the log, off the console.
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            ds_to_universal.main(args)
    except Exception as e:
        shutil.rmtree(partial, ignore_errors=True)
        raise ValueError(f"converting {root / tag} to a universal checkpoint failed: {e}\n"
                         f"{out.getvalue()[-2000:]}") from e
    log.debug("ds_to_universal output:\n%s", out.getvalue())
    os.replace(partial, final)
    return final


def load_resharded(engine: Any, root: Path, tag: str) -> dict[str, Any]:
    """Convert on rank 0, load on every rank, clean up. Returns the client state."""
    coll = Collectives(engine.device)  # on the engine's device: NCCL serves no CPU tensor
    error = None
    if coll.rank == 0:
        try:
            convert(root, tag)
        except ValueError as e:
            error = str(e)
    error = coll.broadcast_json(error)  # every rank fails, not only rank 0
    if error is not None:
        raise ValueError(error)
    load_dir = universal_dir(root, tag)
    groups_before = _group_hyperparameters(engine)
    engine._config.load_universal_checkpoint = True  # DeepSpeed's switch ("checkpoint.load_universal")
    try:
        path, client_state = engine.load_checkpoint(str(load_dir), tag=tag,
                                                    load_optimizer_states=True,
                                                    load_lr_scheduler_states=True)
    finally:
        engine._config.load_universal_checkpoint = False  # later loads of same-size checkpoints
    if path is None:
        raise ValueError(f"DeepSpeed could not load the universal form of {root / tag}")
    if engine.zero_optimization_stage() == 3:
        _repair_zero3_load(engine, load_dir / tag, groups_before)
    coll.barrier()
    if coll.rank == 0:
        shutil.rmtree(load_dir, ignore_errors=True)
    return client_state or {}


def _group_hyperparameters(engine: Any) -> list[dict[str, Any]]:
    return [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups]


def _repair_zero3_load(engine: Any, folder: Path, before: list[dict[str, Any]]) -> None:
    """Undo two slips of DeepSpeed 0.19's ZeRO-3 universal loader (each caught by
    tests/engine/test_resharding.py as a loss that drifts from the uninterrupted run):

    * it gives every sub-group's Adam state the *same* `step` tensor; torch's Adam increments it
      in place once per group, so the second group's bias correction ran a step ahead;
    * it copies the hyperparameters of the *first* saved param group onto every group, which put
      weight decay on norms, biases and embeddings. Each group's saved values are put back, from
      the converted optimizer_state.pt written seconds ago.
    """
    inner = engine.optimizer.optimizer
    for state in inner.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
    _restore_group_hyperparameters(engine, folder, before)


def _restore_group_hyperparameters(engine: Any, folder: Path,
                                   before: list[dict[str, Any]]) -> None:
    saved = torch.load(folder / "zero" / "optimizer_state.pt", map_location="cpu", weights_only=True)
    saved_groups = (saved.get("param_groups")
                    or saved.get("optimizer_state_dict", {}).get("param_groups"))
    groups = engine.optimizer.param_groups
    if not saved_groups or len(saved_groups) != len(groups):
        log.warning("universal load: cannot restore per-group hyperparameters (saved %s groups, "
                    "have %d); using this run's configured weight decay per group",
                    len(saved_groups or []), len(groups))
        saved_groups = [{"weight_decay": values["weight_decay"]} for values in before]
    for group, values in zip(groups, saved_groups):
        for key, value in values.items():
            if key != "params":
                group[key] = value
