"""Checks that run before any rank starts: each failure is one clear line; all take seconds.

A multi-node job that dies after ten minutes of rendezvous because of a typo is the most expensive
way to find the typo. Every check here names what is wrong and what to do; `run_checks` runs them
all and reports every failure at once.

`python -m launch.preflight --node-check --gpus N [--rdzv-host H --port P]` is the part that must
run on each node itself (the SLURM script runs it with srun before torchrun).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from mmtrain.config import RunConfig


class Report:
    """Collects the outcome of every check: notes for the user, failures that stop the launch."""

    def __init__(self) -> None:
        self.notes: list[str] = []
        self.warnings: list[str] = []
        self.failures: list[str] = []

    def check(self, fn: Callable[[], str | None]) -> None:
        try:
            note = fn()
        except ValueError as e:
            self.failures.append(str(e))
        else:
            if note:
                self.notes.append(note)

    @property
    def ok(self) -> bool:
        return not self.failures

    def print(self, out=sys.stderr) -> None:
        for note in self.notes:
            print(f"preflight: {note}", file=out)
        for warning in self.warnings:
            print(f"preflight: warning: {warning}", file=out)
        if self.failures:
            print(f"preflight failed ({len(self.failures)} problem"
                  f"{'s' if len(self.failures) > 1 else ''}; no rank was started):", file=out)
            for failure in self.failures:
                print(f"  - {failure}", file=out)
        out.flush()


# ------------------------------------------------------------------------------------ config, data


def check_tokenizer(spec: str) -> str | None:
    if spec != "bytes" and not Path(spec).is_file():
        raise ValueError(f"data.tokenizer={spec!r}: no such file (train one with "
                         "`mmtrain data train-tokenizer`, or use 'bytes')")
    return None


def check_dataset(directory: str, key: str) -> str:
    """dataset.json readable; every shard it lists present, readable and of the recorded size.
    A URL is read as a URL (never a local folder): its dataset.json must be reachable."""
    from mmtrain import storage
    from mmtrain.data.index import read_dataset_index

    try:
        index = read_dataset_index(directory)
    except ValueError as e:
        raise ValueError(f"{key}={directory!r}: {e}") from None
    shards = index["shards"]
    if storage.is_url(directory):
        return _check_remote_shards(directory, key, index)
    missing, wrong = [], []
    for shard in shards:
        path = Path(directory) / shard["name"]
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            missing.append(shard["name"])
            continue
        except OSError as e:
            raise ValueError(f"{key}: shard {path} cannot be read: {e.strerror}") from None
        if not os.access(path, os.R_OK):
            raise ValueError(f"{key}: shard {path} is not readable by this user")
        if size != int(shard["bytes"]):
            wrong.append(f"{shard['name']} has {size} bytes, dataset.json says {shard['bytes']}")
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"{key}: shard {Path(directory) / missing[0]} listed in dataset.json is "
                         f"missing{more}; copy it back, or rebuild with `mmtrain data build`")
    if wrong:
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise ValueError(f"{key}: {Path(directory)}/{wrong[0]}{more}: the shards changed since "
                         "dataset.json was written; check with `mmtrain data verify`")
    totals = index["totals"]
    samples = sum(int(s["samples"]) for s in shards)
    if int(totals["shards"]) != len(shards) or int(totals["samples"]) != samples:
        raise ValueError(f"{key}: {directory}/dataset.json totals ({totals['shards']} shards, "
                         f"{totals['samples']} samples) do not match its shard list ({len(shards)} "
                         f"shards, {samples} samples); rebuild the index")
    return f"{key}: {len(shards)} shards, {samples} samples, sizes match dataset.json"


def _check_remote_shards(directory: str, key: str, index: dict) -> str:
    """Shards at a URL: one listing gives every object's size (s3://, gs://); an http(s) server
    cannot be listed, so its first and last shards are checked (a HEAD request each)."""
    from mmtrain import storage

    shards = index["shards"]
    try:
        if directory.startswith("http"):
            picked = shards[:1] + shards[-1:] if len(shards) > 1 else shards
            sizes = {s["name"]: storage.size(storage.join(directory, s["name"])) for s in picked}
        else:
            fs, path = storage.filesystem(directory)
            sizes = {e["name"].rstrip("/").rsplit("/", 1)[-1]: e.get("size")
                     for e in fs.ls(path.rstrip("/"), detail=True, refresh=True)}
            picked = shards
    except FileNotFoundError as e:
        raise ValueError(f"{key}: shard {e} listed in {directory}/dataset.json is "
                         "missing") from None
    except storage.io_errors() as e:
        raise ValueError(f"{key}: {directory} cannot be read: {type(e).__name__}: {e}") from None
    missing = [s["name"] for s in picked if s["name"] not in sizes]
    wrong = [s["name"] for s in picked if s["name"] in sizes and sizes[s["name"]] != s["bytes"]]
    if missing:
        raise ValueError(f"{key}: shard {storage.join(directory, missing[0])} listed in "
                         f"dataset.json is missing ({len(missing)} missing)")
    if wrong:
        raise ValueError(f"{key}: shard {storage.join(directory, wrong[0])} is not of the size "
                         "dataset.json records: the shards changed; check with `mmtrain data "
                         "verify`")
    samples = sum(int(s["samples"]) for s in shards)
    checked = "sizes match" if len(picked) == len(shards) else \
        f"{len(picked)} of them checked (http cannot be listed)"
    return f"{key}: {directory}: {len(shards)} shards, {samples} samples, {checked}"


def check_layout(*, num_shards: int, num_streams: int, world: int, workers: int, what: str) -> None:
    """The loader's own rule, with its message: shards >= logical streams >= ranks × workers."""
    from mmtrain.data.loader import check_layout as loader_layout

    loader_layout(num_shards, num_streams, world * max(1, workers), what)


def global_batch_tokens(cfg: RunConfig, world: int, *, fewer: tuple[int, ...] = ()) -> str:
    """Tokens per optimizer step on `world` ranks (grad_accum derived from
    engine.global_batch_tokens when set; a ValueError naming the keys when it does not divide).
    `fewer`: the smaller world sizes an elastic restart may have; the global batch must divide
    on each of them too (the ranks derive grad_accum again at every start)."""
    for smaller in fewer:
        try:
            cfg.engine_for(smaller)
        except ValueError as e:
            raise ValueError(f"{e} (an elastic restart may run on {smaller} ranks)") from None
    return cfg.global_batch_summary(world)


def global_batch_accum(global_batch: int, *, world: int, micro_batch: int) -> int:
    """--global-batch N → engine.grad_accum, or a clear error when N does not split evenly."""
    if global_batch % world:
        raise ValueError(f"--global-batch {global_batch} is not divisible by the world size "
                         f"{world} (nodes × ranks per node); use a multiple of {world}")
    per_rank = global_batch // world
    if per_rank % micro_batch:
        raise ValueError(f"--global-batch {global_batch} gives {per_rank} rows per rank, not a "
                         f"multiple of data.micro_batch_size={micro_batch}; use a multiple of "
                         f"{world * micro_batch}")
    return per_rank // micro_batch


# ------------------------------------------------------------------------------------ run dir


def check_writable(directory: Path, *, create: bool = True) -> str | None:
    """Create the directory and a probe file in it; `create=False` (dry run) only looks."""
    try:
        if create:
            directory.mkdir(parents=True, exist_ok=True)
            probe = directory / f".preflight-{socket.gethostname()}-{os.getpid()}"
            probe.write_text("ok\n")
            probe.unlink()
            return None
        existing = directory
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, f"{existing} is not a writable directory")
    except OSError as e:
        raise ValueError(f"checkpoint directory {directory} is not writable: "
                         f"{e.strerror or e}") from None
    return None


def check_resume(root: Path, *, resume: str | None, fresh: bool, world: int,
                 report: Report) -> str:
    """The checkpoint the ranks will resume from is committed and hashes fine; another world size
    is converted by the ranks (mmtrain.distributed.deepspeed.load_checkpoint), so it is a note."""
    from mmtrain.checkpoint import MANIFEST, committed_steps, resume_candidates, verify

    if fresh:
        if committed_steps(root) or (root.is_dir() and any(root.iterdir())):
            return (f"--fresh: {root} will be moved to {root.parent}/set-aside-<time>/ "
                    "(nothing is deleted); training starts at step 0")
        return "--fresh: training starts at step 0"
    if resume:
        ckpt = Path(resume) if "/" in resume else root / resume
        if not ckpt.is_dir():
            raise ValueError(f"--resume {resume}: checkpoint {ckpt} does not exist")
        try:
            verify(ckpt)
        except ValueError as e:
            raise ValueError(f"--resume {resume}: {e}") from None
    else:
        ckpt = None
        for candidate in resume_candidates(root):  # `latest`, then its ancestors
            try:
                verify(candidate)
            except ValueError as e:
                report.warnings.append(f"the ranks will refuse {candidate.name}: {e}")
                continue
            ckpt = candidate
            break
        if ckpt is None:
            return "no committed checkpoint: training starts at step 0"
    manifest = json.loads((ckpt / MANIFEST).read_text())
    saved_world = int(manifest["world_size"])
    note = f"resumes from {ckpt} (committed, {len(manifest['files'])} files pass their sha256)"
    if saved_world != world:  # e.g. relaunched on fewer nodes after losing one
        note += (f"; it was saved by {saved_world} ranks and this launch has {world}: the ranks "
                 "convert it (DeepSpeed universal checkpoint) when they load it, the data "
                 "position included")
    return note


# ------------------------------------------------------------------------------------ network


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as TCPStore does
        try:
            s.bind(("", port))
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def check_port_free(port: int, what: str) -> str | None:
    if not port_is_free(port):
        raise ValueError(f"{what}: port {port} is already in use on this machine (another job's "
                         "rendezvous?); choose another port")
    return None


def resolve(host: str, what: str) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ValueError(f"{what}: host {host!r} does not resolve ({e.strerror}); check the name, "
                         "or use the node's IP address") from None
    return sorted({info[4][0] for info in infos})


def is_local_host(host: str) -> bool:
    """True when `host` names an address of this machine (binding to it succeeds)."""
    try:
        addresses = resolve(host, "host")
    except ValueError:
        return False
    for address in addresses:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((address, 0))
                return True
            except OSError:
                continue
    return False


def check_rendezvous_host(host: str, port: int, what: str) -> str | None:
    """On node rank 0: the endpoint is this machine, and its port is free."""
    if not is_local_host(host):
        raise ValueError(f"{what} {host}:{port}: node rank 0 hosts the rendezvous, but {host} "
                         f"({', '.join(resolve(host, what))}) is not an address of this machine; "
                         "start node rank 0 on that host, or point the endpoint at this one")
    return check_port_free(port, f"{what} {host}:{port}")


def check_reachable(host: str, port: int, what: str, *, wait: float) -> str:
    """On the other nodes: the endpoint resolves and accepts connections (node 0 may be later)."""
    address = resolve(host, what)[0]
    deadline, said = time.monotonic() + wait, False
    while True:
        try:
            with socket.create_connection((address, port), timeout=3):
                return f"rendezvous {host}:{port} is reachable"
        except OSError as e:
            if time.monotonic() >= deadline:
                raise ValueError(
                    f"{what} {host}:{port} is not reachable after {wait:.0f} s "
                    f"({e.strerror or e}): is node rank 0 started, and is the port open between "
                    "the nodes? "
                    "See docs/multinode.md, 'When the rendezvous times out'") from None
            if not said:
                print(f"preflight: waiting for the rendezvous {host}:{port} (node rank 0) ...",
                      file=sys.stderr, flush=True)
                said = True
            time.sleep(0.5)


# ------------------------------------------------------------------------------------ GPUs


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_gpus(wanted: int, where: str) -> str:
    have = visible_gpus()
    if have < wanted:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        extra = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
        raise ValueError(f"{where} is asked for {wanted} GPUs but {have} are visible there{extra}")
    return f"{where}: {have} GPUs visible, {wanted} used"


# ------------------------------------------------------------------------------------ per node


def node_check(argv: list[str] | None = None) -> int:
    """The checks that must run on each node of a SLURM job (one task per node)."""
    p = argparse.ArgumentParser(prog="python -m launch.preflight")
    p.add_argument("--node-check", action="store_true", required=True)
    p.add_argument("--gpus", type=int, default=0)
    p.add_argument("--rdzv-host", default="")
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args(argv)
    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    report = Report()
    if args.gpus:
        report.check(lambda: check_gpus(args.gpus, f"node {node}"))
    hosts_rdzv = os.environ.get("SLURM_NODEID") == "0" or args.rdzv_host in (
        node, socket.gethostname(), socket.getfqdn())
    if args.port and hosts_rdzv:
        report.check(lambda: check_port_free(args.port, f"rendezvous on {node}"))
    report.print(sys.stderr)
    return 0 if report.ok else 2


if __name__ == "__main__":
    sys.exit(node_check())
