"""What the GPU benchmark's stages need, checked before any stage runs (gpu_bench.py calls it;
a stage that lacks something is not run and counts as failed, the others still run).

The kernel stages need torch and Triton. The `train` stage imports the model package. The `e2e`
stage runs `mmtrain train`, so it needs every runtime dependency in pyproject.toml (imported in a
child process, so a missing one is named rather than failing mid-run), and, on CUDA, DeepSpeed's
FusedAdam: either prebuilt into the DeepSpeed install, or JIT-compiled on first use, which needs
nvcc (a CUDA toolkit) and ninja. gpu.sh installs wheels from REPO/.whl/ first, if that folder exists.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# distribution name -> module name, where they differ
IMPORT_NAMES = {"pillow": "PIL", "pyyaml": "yaml"}
KERNEL_MODULES = ("torch", "triton")
TRAIN_MODULES = ("numpy", "PIL", "yaml")  # what mmtrain.model pulls in through mmtrain.data
# DeepSpeed's own requirements that its import does not always touch
DEEPSPEED_EXTRAS = ("hjson", "pydantic", "msgpack", "psutil", "cpuinfo")
# Runtime dependencies that `mmtrain train` never imports: the media tokenizers (librosa pulls
# numba/llvmlite/scikit-learn, more than the 64 MiB a device run may carry).
NOT_USED_BY_TRAIN = ("librosa",)


def runtime_modules() -> list[str]:
    """Module names of pyproject.toml's [project] dependencies."""
    text = (REPO / "pyproject.toml").read_text()
    block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M)
    if block is None:
        raise ValueError("pyproject.toml: no [project] dependencies list")
    names = re.findall(r'^\s*"([A-Za-z0-9_.\-]+)', block.group(1), re.M)
    return [IMPORT_NAMES.get(n.lower(), n.lower().replace("-", "_")) for n in names]


def missing_modules(modules: list[str]) -> dict[str, str]:
    """module -> error, importing each in a child process (no side effects on this one)."""
    code = ("import importlib, json, sys\nmissing = {}\nfor m in sys.argv[1:]:\n    try:\n"
            "        importlib.import_module(m)\n    except Exception as e:\n"
            "        missing[m] = f'{type(e).__name__}: {e}'[:200]\nprint(json.dumps(missing))\n")
    proc = subprocess.run([sys.executable, "-c", code, *modules], capture_output=True, text=True, timeout=300)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"(import check)": proc.stderr.strip()[-500:] or f"exited {proc.returncode}"}
    return json.loads(lines[-1])


def fused_adam_problem() -> str | None:
    """Why DeepSpeed's FusedAdam (the engine's optimizer on CUDA) cannot be built here, or None."""
    code = "import deepspeed.git_version_info as g; print(bool(g.installed_ops.get('fused_adam')))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    if proc.stdout.strip().endswith("True"):
        return None  # prebuilt
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    nvcc = shutil.which("nvcc") or (str(Path(cuda_home) / "bin" / "nvcc") if (Path(cuda_home) / "bin" / "nvcc").exists() else None)
    ninja = shutil.which("ninja") or shutil.which("ninja", path=str(Path(sys.executable).parent))
    lacking = [name for name, found in (("nvcc (CUDA toolkit; set CUDA_HOME)", nvcc), ("ninja", ninja)) if not found]
    if lacking:
        return ("DeepSpeed's FusedAdam is not prebuilt and its JIT build needs " + " and ".join(lacking)
                + ": not found")
    return None


def check(stages: list[str], dry_run: bool) -> dict[str, list[str]]:
    """stage -> problems that would make it fail (one line each); stages with none are left out."""
    kernel = [f"cannot import {m}: {err}" for m, err in missing_modules(list(KERNEL_MODULES)).items()]
    if kernel:
        return {stage: kernel for stage in stages}
    problems: dict[str, list[str]] = {}
    if "train" in stages or "e2e" in stages:
        train = [f"cannot import {m}: {err}" for m, err in missing_modules(list(TRAIN_MODULES)).items()]
        for stage in ("train", "e2e"):
            if stage in stages and train:
                problems[stage] = list(train)
    if "e2e" in stages:
        modules = [m for m in dict.fromkeys(runtime_modules() + list(DEEPSPEED_EXTRAS)) if m not in TRAIN_MODULES + NOT_USED_BY_TRAIN]
        e2e = [f"cannot import {m}: {err}" for m, err in missing_modules(modules).items()]
        if not dry_run and not e2e:
            problem = fused_adam_problem()
            e2e += [problem] if problem else []
        if e2e:
            problems.setdefault("e2e", []).extend(e2e)
    return problems
