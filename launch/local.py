"""`mmtrain train`: N ranks on this machine through torchrun (torch.distributed.run).

(`mmtrain launch`, in launch/cli.py, is the multi-node sibling with preflight and restarts.)

Everything that can fail fast happens here, before any rank starts: the config is validated, the
demo corpus is built if it is missing, and the resolved config is written to the run directory.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from mmtrain import storage
from launch.environment import flight_recorder
from mmtrain.config import RunConfig, save_config
from mmtrain.distributed.deepspeed import resolve_backend


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_datasets(cfg: RunConfig) -> list[tuple[str, str]]:
    """(location, config key) of every dataset the run trains on: data.mix's (it replaces
    data.train), else data.train."""
    if cfg.data.mix:
        return [(name, f"data.mix.{name}") for name in cfg.data.mix]
    return [(cfg.data.train, "data.train")]


def needs_demo_data(cfg: RunConfig) -> bool:
    """The embedded demo (data.synth_if_missing, set by configs/tiny.yaml) builds its shards."""
    return (cfg.data.synth_if_missing and not cfg.data.mix  # never for a URL: no local folder
            and not storage.is_url(cfg.data.train)
            and not (Path(cfg.data.train) / "dataset.json").is_file())


def check_local_datasets(cfg: RunConfig) -> None:
    """A missing dataset is an error naming its path, before any rank starts; for a URL, its
    dataset.json must be reachable (with the credentials of this environment)."""
    from mmtrain.data.index import read_dataset_index

    for location, key in train_datasets(cfg):
        if storage.is_url(location):
            try:
                read_dataset_index(location)
            except ValueError as e:
                raise ValueError(f"{key}={location!r}: {e}") from None
            continue
        if not (Path(location) / "dataset.json").is_file():
            raise ValueError(f"{key}={location!r}: no dataset.json in {Path(location).resolve()}; "
                             "build the shards with `mmtrain data build`, or fix the path (only "
                             "the embedded demo builds its data when missing)")


def ensure_demo_data(cfg: RunConfig) -> None:
    """Build the embedded demo corpus through data_tools if it is wanted and absent; then every
    local dataset of the run must exist."""
    if needs_demo_data(cfg):
        build_demo_data(cfg)
    if cfg.data.synth_if_missing:
        build_demo_tokenizers(cfg)
    check_local_datasets(cfg)
    check_media_tokenizers(cfg)


def check_media_tokenizers(cfg: RunConfig) -> None:
    """Configured media tokenizers exist, are intact (fingerprint) and fit the model's codes:
    checked here, before any rank starts, as each rank checks again (mmtrain/data/media_codes.py)."""
    if cfg.data.image_tokenizer or cfg.data.audio_tokenizer:
        from mmtrain.data.media_codes import MediaCodes

        MediaCodes(cfg.data, cfg.model.media())


def build_demo_data(cfg: RunConfig) -> None:
    train_dir = Path(cfg.data.train)
    if not cfg.data.val or Path(cfg.data.val).parent != train_dir.parent:
        raise ValueError("data.synth_if_missing builds ROOT/train and ROOT/val: set data.train and "
                         "data.val to two sibling directories, or build the shards yourself")
    from data_tools.synth import synth_corpus

    print(f"building the demo corpus ({cfg.data.synth_samples} samples) in {train_dir.parent} ...",
          flush=True)
    train, val = synth_corpus(train_dir.parent, samples=cfg.data.synth_samples,
                              seed=cfg.data.synth_seed, shards=max(8, cfg.data.num_streams))
    print(f"  train: {train['totals']['samples']} samples in {train['totals']['shards']} shards; "
          f"val: {val['totals']['samples']} samples", flush=True)


def build_demo_tokenizers(cfg: RunConfig) -> None:
    """Train the demo's media tokenizers (data.image_tokenizer / data.audio_tokenizer) that are
    absent, both at once (one process and one thread each), through the same command a user runs:
    `mmtrain data train-media-tokenizer KIND TRAIN --val VAL -o DIR`."""
    missing = [(kind, directory) for kind, directory in (("image", cfg.data.image_tokenizer),
                                                         ("audio", cfg.data.audio_tokenizer))
               if directory and not (Path(directory) / "config.json").is_file()]
    if not missing:
        return
    if not cfg.data.val:
        raise ValueError("data.synth_if_missing trains the demo's media tokenizers on data.train, "
                         "measured on data.val: set data.val")
    print(f"training the demo's {' and '.join(k for k, _ in missing)} tokenizer"
          f"{'s' if len(missing) > 1 else ''} ...", flush=True)
    procs = []
    for kind, directory in missing:
        log = Path(directory).parent / f"{kind}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "mmtrain", "data", "train-media-tokenizer", kind,
               cfg.data.train, "--val", cfg.data.val, "-o", directory, "--overwrite"]
        with open(log, "wb") as out:
            procs.append((kind, directory, log, subprocess.Popen(cmd, stdout=out,
                                                                 stderr=subprocess.STDOUT)))
    for kind, directory, log, proc in procs:
        if proc.wait() != 0:
            raise RuntimeError(f"training the demo's {kind} tokenizer failed; see {log}")
        quality = json.loads((Path(directory) / "config.json").read_text())["quality"]
        shown = {k: v for k, v in quality.items() if k not in ("held_out",)}
        print(f"  {kind} tokenizer -> {directory}: {shown}", flush=True)


def device_kind(cfg: RunConfig) -> str:
    if cfg.launch.device != "auto":
        return cfg.launch.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def run_local(cfg: RunConfig, *, fresh: bool = False, resume: str | None = None) -> int:
    resolve_backend(cfg.engine, cfg.launch.device)  # e.g. launch.device=cuda without a GPU: stop now
    ensure_demo_data(cfg)
    run_dir = cfg.train.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "config.json"
    save_config(cfg, config_path)
    nproc = cfg.launch.nproc
    kind = device_kind(cfg)
    if kind == "cuda" and torch.cuda.device_count() < nproc:
        raise ValueError(f"launch.nproc={nproc} but only {torch.cuda.device_count()} GPUs are visible")
    threads = cfg.launch.threads_per_rank or max(1, (os.cpu_count() or 1) // nproc)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    if kind == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    else:  # NCCL flight recorder, as `mmtrain launch` sets it (unless set in this shell)
        env.update(flight_recorder(str(run_dir.resolve() / "logs"), dict(os.environ)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
           "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "mmtrain.train",
           "--config-json", str(config_path)]
    if fresh:
        cmd.append("--fresh")
    if resume:
        cmd += ["--resume", resume]
    print(f"{cfg.global_batch_summary(nproc)}\nstarting {nproc} {kind.upper()} ranks; run directory "
          f"{run_dir}", flush=True)
    from launch.supervise import run_child  # forwards SIGTERM/SIGINT to torchrun, hence the ranks

    code = run_child(cmd, env).returncode
    if code == 0 and cfg.data.synth_if_missing and (cfg.data.image_tokenizer or
                                                    cfg.data.audio_tokenizer):
        show_demo_generations(cfg)
    return code


def show_demo_generations(cfg: RunConfig, count: int = 48) -> None:
    """The demo's last word: pictures and sounds its model generates for demo captions, judged
    against their captions and against chance (data_tools/synth_showcase.py)."""
    from data_tools.synth_showcase import showcase, summary

    results = showcase(cfg.train.run_dir, count=count)
    print(summary(results, count), flush=True)
    print(f"samples:       {cfg.train.run_dir / 'samples'} (image_sheet.png: generated above real)",
          flush=True)


def resolved_summary(cfg: RunConfig) -> str:
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True)
