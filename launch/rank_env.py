"""Rank entry for the DeepSpeed hostfile mode: apply RUN/launch/env.json, then run the rank program.

    python -m launch.rank_env --env-json RUN/launch/env.json --run-module mmtrain.train ARGS…

The DeepSpeed pdsh runner would carry environment variables by writing `export K="V";` into the
shell command it runs on every node, where a value holding `$(…)` runs. This wrapper carries them
in a JSON file instead, set with no shell in between, before torch is imported (so OMP_* and
NCCL_* apply). Variables the launcher sets per rank (RANK, LOCAL_RANK, CUDA_VISIBLE_DEVICES, …)
are left as the launcher set them.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys

PER_RANK = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "CROSS_RANK", "CROSS_SIZE",
            "MASTER_ADDR", "MASTER_PORT"}


def apply(env: dict[str, str]) -> None:
    for name, value in env.items():
        if name in PER_RANK:
            continue
        if name == "CUDA_VISIBLE_DEVICES" and value != "":
            continue  # the DeepSpeed launcher picked this node's slots; "" (CPU ranks) is ours
        os.environ[name] = value
    for entry in reversed(env.get("PYTHONPATH", "").split(os.pathsep)):
        if entry and entry not in sys.path:
            sys.path.insert(0, entry)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m launch.rank_env", add_help=False)
    p.add_argument("--env-json", required=True)
    p.add_argument("--run-module", required=True)
    args, rest = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    with open(args.env_json) as f:
        apply(json.load(f))
    sys.argv = [args.run_module, *rest]
    runpy.run_module(args.run_module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
