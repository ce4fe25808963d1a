"""Run configuration: one typed dataclass per component, composed into `RunConfig`.

Each component owns its config class next to its code (`mmtrain.data.config.DataConfig`,
`mmtrain.model.config.ModelConfig`, `mmtrain.distributed.config.EngineConfig`); this module only
composes them, reads YAML with a safe loader, applies dotted overrides (`train.lr=3e-4`) and
validates. Every error names the exact key, so a bad run dies in a second on one host.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from mmtrain.data.config import DataConfig
from mmtrain.distributed.config import EngineConfig
from mmtrain.model.config import ModelConfig, preset

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"
DEMO_CONFIG = CONFIG_DIR / "tiny.yaml"  # the embedded demo: what runs when no --config is given


@dataclasses.dataclass(kw_only=True)
class TrainConfig:
    """The training loop: how long, how often to log / evaluate / checkpoint, where to write."""

    name: str = "tiny"  # run name: runs/NAME/
    runs_dir: str = "runs"
    steps: int = 140  # total optimizer steps (the LR schedule spans them)
    stop_after: int = 0  # >0: stop after this many steps in this invocation (checkpointed), e.g.
    #                      to fit a time-limited allocation; the next start resumes
    seed: int = 1234
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only at the end
    eval_batches: int = 8
    ckpt_every: int = 50
    ckpt_minutes: float = 0.0  # >0: also save when this many minutes passed since the last save
    keep_last: int = 3
    max_skipped_steps: int = 5  # consecutive non-finite steps before the run stops (exit code 3)
    spike_z: float = 6.0  # flag a loss above mean + spike_z·std (0 disables)
    peak_tflops: float = 0.0  # per device, for MFU; 0: detect (known GPUs), not reported on CPU
    compile: bool = False  # torch.compile each Transformer block (ZeRO 0-2); kernels stay custom ops
    # Hang diagnosis (mmtrain/watchdog.py): when no step completes for this long, every rank writes
    # its Python stacks to RUN/logs/stacks_rank_K_<time>.txt. Must be below engine.timeout_minutes
    # (the collective timeout ends the hang). Also longer than a step and a checkpoint save, or a
    # slow save leaves a (harmless) dump. 0 disables the timer; SIGUSR2 always dumps.
    hang_dump_minutes: float = 5.0

    def __post_init__(self) -> None:
        _require(self.steps > 0, "train.steps", self.steps, "must be > 0")
        _require(self.stop_after >= 0, "train.stop_after", self.stop_after, "must be >= 0")
        _require(self.log_every > 0, "train.log_every", self.log_every, "must be > 0")
        _require(self.eval_every >= 0, "train.eval_every", self.eval_every, "must be >= 0")
        _require(self.eval_batches >= 0, "train.eval_batches", self.eval_batches, "must be >= 0")
        _require(self.ckpt_every >= 0, "train.ckpt_every", self.ckpt_every, "must be >= 0")
        _require(self.ckpt_minutes >= 0, "train.ckpt_minutes", self.ckpt_minutes, "must be >= 0")
        _require(self.max_skipped_steps >= 1, "train.max_skipped_steps", self.max_skipped_steps,
                 "must be >= 1")
        _require(self.spike_z >= 0, "train.spike_z", self.spike_z, "must be >= 0")
        _require(self.peak_tflops >= 0, "train.peak_tflops", self.peak_tflops, "must be >= 0")
        _require(self.hang_dump_minutes >= 0, "train.hang_dump_minutes", self.hang_dump_minutes,
                 "must be >= 0 (0 disables the hang timer)")
        _require(self.keep_last >= 2, "train.keep_last", self.keep_last, "must be >= 2")
        _require(bool(self.name) and "/" not in self.name and not self.name.startswith("."),
                 "train.name", self.name, "must be a plain directory name")

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name


@dataclasses.dataclass(kw_only=True)
class LaunchConfig:
    """How many ranks `mmtrain train` starts on this machine (multi-node: `mmtrain launch`)."""

    nproc: int = 2
    device: str = "auto"  # auto | cpu | cuda
    threads_per_rank: int = 0  # 0: cores // nproc

    def __post_init__(self) -> None:
        _require(self.nproc >= 1, "launch.nproc", self.nproc, "must be >= 1")
        _require(self.device in ("auto", "cpu", "cuda"), "launch.device", self.device,
                 "must be one of auto, cpu, cuda")
        _require(self.threads_per_rank >= 0, "launch.threads_per_rank", self.threads_per_rank,
                 "must be >= 0")


@dataclasses.dataclass(kw_only=True)
class RunConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    engine: EngineConfig = dataclasses.field(default_factory=EngineConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    launch: LaunchConfig = dataclasses.field(default_factory=LaunchConfig)

    def __post_init__(self) -> None:
        for section in dataclasses.fields(self):  # nan/inf pass every `x > 0` style range check
            _check_finite(getattr(self, section.name), section.name)
        # Cross-component checks: the only place that sees two components at once.
        hang, timeout = self.train.hang_dump_minutes, self.engine.timeout_minutes
        if hang and hang >= timeout:
            raise ValueError(f"train.hang_dump_minutes={hang:g} must be below "
                             f"engine.timeout_minutes={timeout:g}: the collective timeout ends a "
                             "hang (and the ranks) before the stacks would be dumped")
        if self.data.seq_len > self.model.max_seq_len:
            raise ValueError(f"data.seq_len={self.data.seq_len} exceeds "
                             f"model.max_seq_len={self.model.max_seq_len}")
        if self.train.compile and self.engine.zero_stage == 3:
            raise ValueError("train.compile=true needs engine.zero_stage <= 2: ZeRO-3 gathers "
                             "parameters in module hooks, which compiled blocks are not tested with")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def engine_for(self, world_size: int) -> EngineConfig:
        """The engine config on `world_size` ranks, grad_accum derived from
        engine.global_batch_tokens when set (a ValueError naming the keys if it doesn't divide)."""
        return self.engine.resolved(world_size=world_size, micro_batch_size=self.data.micro_batch_size,
                                    seq_len=self.data.seq_len)

    def tokens_per_global_batch(self, world_size: int) -> int:
        """Token positions per optimizer step over all ranks (padding included)."""
        accum = self.engine_for(world_size).grad_accum
        return world_size * self.data.micro_batch_size * accum * self.data.seq_len

    def global_batch_summary(self, world_size: int) -> str:
        """One line for preflight and the train start log."""
        accum = self.engine_for(world_size).grad_accum
        ranks = f"{world_size} rank{'s' if world_size != 1 else ''}"
        return (f"global batch {self.tokens_per_global_batch(world_size):,} tokens = {ranks} "
                f"× {self.data.micro_batch_size} (data.micro_batch_size) × {accum} "
                f"(grad_accum) × {self.data.seq_len} (data.seq_len)")


def _require(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ValueError(f"{key}={value!r} {why}")


def _check_finite(component: Any, prefix: str) -> None:
    """Every float of a component config (and of its float mappings) is finite."""
    for f in dataclasses.fields(component):
        value = getattr(component, f.name)
        items = value.items() if isinstance(value, dict) else [("", value)]
        for sub, v in items:
            if isinstance(v, float) and not math.isfinite(v):
                key = f"{prefix}.{f.name}" + (f".{sub}" if sub else "")
                raise ValueError(f"{key}={v!r} must be a finite number")


# ---------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts, with errors that name the key.


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass `cls` from a dict, checking keys and value types recursively."""
    where = prefix or "config"
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ValueError(f"unknown config key {key!r} (known: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(hints[name], value, key)
    try:
        return cls(**kwargs)
    except TypeError as e:  # e.g. a missing required field
        raise ValueError(f"{where}: {e}") from None


def _coerce(tp: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ValueError(f"{key}={value!r} must be a list")
        return [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{key}={value!r} must be a mapping")
        _, vt = typing.get_args(tp)
        return {str(k): _coerce(vt, v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key}={value!r} must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key}={value!r} must be an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `3e-4` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key}={value!r} must be a number")
        if not math.isfinite(value):
            raise ValueError(f"{key}={value!r} must be a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{key}={value!r} must be a string")
        return value
    if tp is Any:
        return value
    raise TypeError(f"config field {key} has an unsupported type {tp}")  # our own bug


# ---------------------------------------------------------------------------------------------
# YAML + overrides.


class UniqueKeyLoader(yaml.SafeLoader):
    """The safe loader, refusing a mapping that repeats a key (YAML would keep the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: SafeLoader's own error follows
                    continue
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (line {line}; first set on line "
                        f"{first}): remove one of them", key_node.start_mark)
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def safe_load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML file with the safe loader: `!!python/...` tags are an error, never executed;
    a repeated key is an error naming it and its line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    try:
        data = safe_load_yaml(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"config file {path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping at the top level")
    return data


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one `a.b.c=value` override in place; the value is parsed as YAML (safely)."""
    if "=" not in override:
        raise ValueError(f"override {override!r} must look like key.sub=value")
    dotted, raw = override.split("=", 1)
    parts = dotted.strip().split(".")
    if not all(parts):
        raise ValueError(f"override {override!r} has an empty key part")
    try:
        value = safe_load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ValueError(f"override {override!r}: value is not valid YAML: {e}") from None
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"override {override!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults <- YAML file (none given: the embedded demo, configs/tiny.yaml) <- dotted
    overrides; validated. Only the demo builds its data when missing (data.synth_if_missing)."""
    data = read_yaml(path if path is not None else DEMO_CONFIG)
    for override in overrides or []:
        apply_override(data, override)
    model = data.get("model")
    if isinstance(model, dict) and "preset" in model:  # a preset's values, under explicit ones
        data["model"] = {**dataclasses.asdict(preset(str(model["preset"]))), **model}
    return from_dict(RunConfig, data)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")


def add_config_args(p: argparse.ArgumentParser) -> None:
    """`--config FILE` and repeatable `--set key=value`: the same in every command that runs."""
    p.add_argument("--config", help="YAML recipe (default: the embedded tiny demo = configs/tiny.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, e.g. --set engine.lr=3e-4 (repeatable)")
