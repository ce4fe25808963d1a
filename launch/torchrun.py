"""torchrun command lines: one per node, c10d or static rendezvous.

Restarts are torchrun's own: with `--max-restarts R` its elastic agent stops every worker of the
group when one dies, re-rendezvouses (with c10d, the agents on the other nodes notice and do the
same) and starts them again; the ranks then resume from the newest committed checkpoint. With
`--nnodes MIN:MAX` (c10d) the group re-forms with the nodes that are left, down to MIN.

The command runs torchrun through `launch.elastic_run` (same options, same agent) so that every
start of the ranks keeps its own log folder.
"""

from __future__ import annotations

import dataclasses

# torchrun forwards these to the ranks (SIGUSR1: SLURM's warning before the time limit).
FORWARDED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rendezvous:
    backend: str  # "c10d" (dynamic; needed for restarts across nodes) | "static" (--master-addr)
    host: str  # a name, or a shell expression in the SLURM script ("$RDZV_HOST")
    port: str
    run_id: str
    join_timeout: int = 600  # seconds a node waits for the others (c10d)
    last_call: int | None = None  # elastic: seconds to wait for more nodes once MIN joined
    local_addr: str = ""


def torchrun_argv(*, python: str, nnodes: str, node_rank: int | None, nproc_per_node: int,
                  rdzv: Rendezvous, max_restarts: int, monitor_interval: float,
                  shutdown_timeout: int, log_dir: str, rank_argv: list[str]) -> list[str]:
    """`node_rank=None`: the same command on every node (SLURM); the rendezvous host is then found
    by torchrun from the host name, and ranks are assigned by the c10d rendezvous. `nnodes` is
    "N" or "MIN:MAX" (elastic, c10d only)."""
    argv = [python, "-m", "launch.elastic_run", "--nnodes", nnodes,
            "--nproc-per-node", str(nproc_per_node)]
    if rdzv.backend == "c10d":
        conf = f"join_timeout={rdzv.join_timeout}"
        if rdzv.last_call is not None:
            conf += f",last_call_timeout={rdzv.last_call}"
        if node_rank is not None:  # say who hosts the store instead of guessing from host names
            conf += f",is_host={1 if node_rank == 0 else 0}"
        argv += ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"{rdzv.host}:{rdzv.port}",
                 "--rdzv-id", rdzv.run_id, "--rdzv-conf", conf]
    else:
        assert node_rank is not None, "static rendezvous needs a node rank"
        argv += ["--rdzv-backend", "static", "--node-rank", str(node_rank),
                 "--master-addr", rdzv.host, "--master-port", rdzv.port]
    if rdzv.local_addr:
        argv += ["--local-addr", rdzv.local_addr]
    argv += ["--max-restarts", str(max_restarts), "--monitor-interval", f"{monitor_interval:g}",
             "--shutdown-timeout", str(shutdown_timeout), "--signals-to-handle", FORWARDED_SIGNALS,
             "--log-dir", log_dir, "--tee", "3", "-m", *rank_argv]
    return argv
