"""`mmtrain export CKPT OUT`: a checkpoint → one safetensors file + the model config, for use
without DeepSpeed on one device.

    OUT/model.safetensors   every parameter of FusionTransformer, whole, fp32
    OUT/config.json         the ModelConfig (build with `FusionTransformer(ModelConfig(**json))`)
    OUT/tokenizer.json      only when the run used a trained BPE tokenizer

`load_exported(OUT)` rebuilds the model (strict load). `load_checkpoint_model(CKPT)` does the same
straight from a checkpoint (used by `mmtrain eval` and `mmtrain generate`).

The weights are the optimizer's fp32 master weights, gathered from the ZeRO partitions by
DeepSpeed's `get_fp32_state_dict_from_zero_checkpoint` (ZeRO 1–3; ZeRO-0 checkpoints hold the
module whole). The checkpoint's hashes are verified first, and DeepSpeed's reads run with
weights_only=True (mmtrain.distributed.safe_load).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import torch

from mmtrain.checkpoint import COMMITTED, LATEST, verify
from mmtrain.config import RunConfig, from_dict
from mmtrain.model import FusionTransformer, ModelConfig

log = logging.getLogger("mmtrain.export")
WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.json"


def resolve_checkpoint(path: str | Path) -> Path:
    """A committed step directory, from itself, a checkpoints/ directory or a run directory
    (following `latest`)."""
    path = Path(path)
    for candidate in (path, path / "checkpoints"):
        if (candidate / COMMITTED).is_file():
            return candidate
        if (candidate / LATEST).is_file():
            return candidate / (candidate / LATEST).read_text().strip()
    if not path.exists():
        raise ValueError(f"checkpoint {path} does not exist")
    raise ValueError(f"{path} is not a committed checkpoint, nor a checkpoints/ or run directory "
                     "with a `latest` file")


def run_config(ckpt: Path) -> RunConfig:
    """The resolved run config saved with the checkpoint (hash-checked by `verify`)."""
    return from_dict(RunConfig, json.loads((ckpt / CONFIG).read_text()))


def consolidated_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """Whole fp32 parameters from a verified checkpoint directory, keyed like the model's."""
    from mmtrain.distributed.safe_load import weights_only_loads

    zero_files = list(ckpt.glob("*zero_pp_rank_*_optim_states.pt"))
    with weights_only_loads():
        if zero_files:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            quiet = io.StringIO()  # it prints its progress (and a tqdm bar)
            with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
                state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
        else:  # ZeRO-0: the module is stored whole in the (single) model-states file
            model_file = ckpt / "mp_rank_00_model_states.pt"
            if not model_file.is_file():
                raise ValueError(f"{ckpt}: neither ZeRO partitions nor {model_file.name} found")
            state = torch.load(model_file, map_location="cpu", weights_only=True)["module"]
    return {name: t.detach().to(torch.float32).contiguous() for name, t in state.items()}


def _match_model(state: dict[str, torch.Tensor], model_cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Keep exactly the model's parameter names; a tied model has no `output.weight`."""
    with torch.device("meta"):
        expected = {k: v.shape for k, v in FusionTransformer(model_cfg).state_dict().items()}
    state = dict(state)
    if model_cfg.tie_embeddings and "output.weight" in state:
        # Only a checkpoint that recorded the tied weight under both names would hold it.
        if not torch.equal(state["output.weight"], state["tok_embeddings.weight"]):
            raise ValueError("model.tie_embeddings is true but the checkpoint's output.weight "
                             "differs from tok_embeddings.weight")
        del state["output.weight"]
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    for name, shape in expected.items():
        if state[name].shape != shape:
            raise ValueError(f"{name}: checkpoint shape {tuple(state[name].shape)} != model "
                             f"{tuple(shape)}")
    return state


def build_model(model_cfg: ModelConfig, state: dict[str, torch.Tensor]) -> FusionTransformer:
    """A FusionTransformer on CPU holding exactly `state` (strict load, no random init)."""
    with torch.device("meta"):
        model = FusionTransformer(model_cfg)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def load_checkpoint_model(ckpt: str | Path) -> tuple[FusionTransformer, RunConfig, Path]:
    """Verify a checkpoint, gather its weights and build the model (one process, CPU)."""
    ckpt = resolve_checkpoint(ckpt)
    verify(ckpt)  # hashes first: nothing is unpickled from an unchecked file
    cfg = run_config(ckpt)
    state = _match_model(consolidated_state_dict(ckpt), cfg.model)
    return build_model(cfg.model, state), cfg, ckpt


def export(ckpt: str | Path, out: str | Path) -> Path:
    """Write OUT/model.safetensors + OUT/config.json (+ tokenizer.json) from a checkpoint."""
    from safetensors.torch import save_file

    ckpt = resolve_checkpoint(ckpt)
    verify(ckpt)
    cfg = run_config(ckpt)
    state = _match_model(consolidated_state_dict(ckpt), cfg.model)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    step = json.loads((ckpt / "MANIFEST.json").read_text())["step"]
    metadata = {"format": "pt", "step": str(step), "source": str(ckpt.resolve()),
                "tokenizer": "bytes" if cfg.data.tokenizer == "bytes" else TOKENIZER}
    tmp = out / f".{WEIGHTS}.tmp-{os.getpid()}"
    save_file(state, str(tmp), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # a normal file, not the temp file's 0600
    os.replace(tmp, out / WEIGHTS)
    (out / CONFIG).write_text(json.dumps(dataclasses.asdict(cfg.model), indent=2, sort_keys=True)
                              + "\n")
    if cfg.data.tokenizer != "bytes":
        shutil.copyfile(cfg.data.tokenizer, out / TOKENIZER)
    return out


def load_exported(out: str | Path) -> FusionTransformer:
    """The exported model on CPU, without DeepSpeed: strict load of model.safetensors."""
    from safetensors.torch import load_file

    out = Path(out)
    if not (out / WEIGHTS).is_file() or not (out / CONFIG).is_file():
        raise ValueError(f"{out} is not an export (needs {WEIGHTS} and {CONFIG})")
    model_cfg = from_dict(ModelConfig, json.loads((out / CONFIG).read_text()), "model")
    return build_model(model_cfg, load_file(str(out / WEIGHTS)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mmtrain export", description=(
        "Export a checkpoint to OUT/model.safetensors + OUT/config.json, loadable into "
        "FusionTransformer without DeepSpeed (mmtrain.export.load_exported)."))
    p.add_argument("checkpoint", help="a step_XXXXXXXX directory, or a run / checkpoints directory "
                                      "(its latest checkpoint)")
    p.add_argument("out", help="output directory")
    args = p.parse_args(argv)
    out = export(args.checkpoint, args.out)
    model = load_exported(out)  # the export must load back, strictly
    n = sum(p.numel() for p in model.parameters())
    print(f"exported {n / 1e6:.2f}M parameters to {out / WEIGHTS} (+ {CONFIG})")
    return 0


if __name__ == "__main__":  # same as `mmtrain export` (which does not come through here)
    from mmtrain.errors import exit_code

    sys.exit(exit_code("mmtrain export", main, sys.argv[1:]))
