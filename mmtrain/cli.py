"""The `mmtrain` command: train, data …, eval, … (each subcommand's code lives with its concern)."""

from __future__ import annotations

import argparse
import sys

from mmtrain.config import add_config_args, load_config
from mmtrain.errors import exit_code

USAGE = """mmtrain <command> [options]

commands:
  train      train (no arguments: the tiny text+image+audio demo on 2 CPU ranks)
  data       shard tools: build, synth, verify, stats, inspect, dedup, split, train-tokenizer
  launch     multi-node jobs: torchrun, DeepSpeed hostfile, SLURM; preflight; restarts
  eval       evaluate a checkpoint (val loss, media gain, caption accuracy, generation gains)
  generate   continue a prompt (with --image / --audio), or draw a picture / a sound for a caption
             (--image-out / --audio-out) from a checkpoint
  export     consolidated safetensors + config from a checkpoint

`mmtrain <command> --help` explains each.
"""


def cmd_train(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mmtrain train", description=(
        "Train on this machine's ranks. Resumes from the run's checkpoints/latest (what it last "
        "saved or resumed from) unless --fresh. The demo corpus is built first if it is missing."))
    add_config_args(p)
    p.add_argument("--fresh", action="store_true", help="ignore existing checkpoints")
    p.add_argument("--resume", help="resume from this checkpoint (step_XXXXXXXX or a path)")
    p.add_argument("--dry-run", action="store_true", help="validate and print the resolved config")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    from launch.local import resolved_summary, run_local

    if args.dry_run:
        print(resolved_summary(cfg))
        return 0
    return run_local(cfg, fresh=args.fresh, resume=args.resume)


def cmd_data(argv: list[str]) -> int:
    from data_tools.cli import main as data_main

    return data_main(argv)


def cmd_launch(argv: list[str]) -> int:
    from launch.cli import main as launch_main

    return launch_main(argv)


def cmd_eval(argv: list[str]) -> int:
    from mmtrain.eval_cli import main as eval_main

    return eval_main(argv)


def cmd_generate(argv: list[str]) -> int:
    from mmtrain.generate import main as generate_main

    return generate_main(argv)


def cmd_export(argv: list[str]) -> int:
    from mmtrain.export import main as export_main

    return export_main(argv)


COMMANDS = {"train": cmd_train, "data": cmd_data, "launch": cmd_launch, "eval": cmd_eval,
            "generate": cmd_generate, "export": cmd_export}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"mmtrain: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return exit_code(f"mmtrain {command}", COMMANDS[command], rest)


if __name__ == "__main__":
    sys.exit(main())
