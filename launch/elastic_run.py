"""torchrun whose per-attempt logs are kept: `python -m launch.elastic_run <torchrun options>`.

The same options and behaviour as `python -m torch.distributed.run`, with one difference. torchrun
writes each start of the ranks to `<log-dir>/<run id>_<random>/attempt_<restart count>/` and empties
that folder first. On a multi-node job, a node whose ranks are restarted because *another* node
failed (a rendezvous membership change) keeps its restart count, so its `attempt_0/` — holding the
first traceback — was wiped by the restart. Here every start of the ranks on this node gets the
next number, `attempt_0`, `attempt_1`, …: nothing is overwritten.

The ranks also get `MMTRAIN_ATTEMPT` (that number): `mmtrain.train` applies a `--resume X` only on
attempt 0, on every node alike (torchrun's TORCHELASTIC_RESTART_COUNT stays 0 on such a node).
"""

from __future__ import annotations

import sys

from torch.distributed import run as torchrun
from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
from torch.distributed.elastic.multiprocessing.errors import record
from torch.distributed.launcher.api import elastic_launch

ATTEMPT_ENV = "MMTRAIN_ATTEMPT"


class NumberedAttemptLogs(DefaultLogsSpecs):
    """torchrun's log layout with attempts numbered by start on this node, never emptied."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.starts = 0

    def reify(self, envs):
        attempt, self.starts = self.starts, self.starts + 1
        # torch names (and empties) the folder after TORCHELASTIC_RESTART_COUNT: show it ours for
        # the naming, then give the ranks torch's value back (its meaning is torch's).
        restart_counts = {rank: env.get("TORCHELASTIC_RESTART_COUNT") for rank, env in envs.items()}
        for env in envs.values():
            env["TORCHELASTIC_RESTART_COUNT"] = str(attempt)
        try:
            dest = super().reify(envs)
        finally:
            for rank, env in envs.items():
                env["TORCHELASTIC_RESTART_COUNT"] = restart_counts[rank] or "0"
                env[ATTEMPT_ENV] = str(attempt)
        return dest


@record
def main(argv: list[str] | None = None) -> None:
    args = torchrun.parse_args(sys.argv[1:] if argv is None else argv)
    if args.master_port is None:  # as torchrun's own run()
        args.master_port = 29500
    config, entrypoint, entry_args = torchrun.config_from_args(args)
    config.logs_specs = NumberedAttemptLogs(log_dir=args.log_dir,
                                            redirects=Std.from_str(args.redirects),
                                            tee=Std.from_str(args.tee))
    elastic_launch(config=config, entrypoint=entrypoint)(*entry_args)


if __name__ == "__main__":
    main()
