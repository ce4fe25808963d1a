"""What the user is told when the job fails: the first failing rank, its last error, its log."""

from __future__ import annotations

import time

from launch.supervise import Outcome, last_error, run_child, torchrun_failure

TAIL = """[default1]:[rank1]: Traceback (most recent call last):
[default1]:[rank1]: ValueError: kernel backend 'triton' was forced for tensors on cpu
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
mmtrain.train FAILED
------------------------------------------------------------
Failures:
[1]:
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 11)  (SIGTERM)
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-28_19:17:14
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : 1 (pid: 12)
  error_file: <N/A>
============================================================""".splitlines()


def test_last_error_strips_rank_prefixes_and_reads_cxx_aborts():
    assert last_error(TAIL) == "ValueError: kernel backend 'triton' was forced for tensors on cpu"
    assert last_error(["terminate called after throwing an instance of 'gloo::EnforceNotMet'",
                       "  what():  [enforce fail at pair.cc:456] size mismatch"]) == \
        "C++ exception: [enforce fail at pair.cc:456] size mismatch"
    assert last_error(["nothing to see"]) == ""


def test_torchrun_failure_names_the_root_cause_and_its_log(tmp_path):
    started = time.time()
    run = tmp_path / "job_abc"
    for attempt in (0, 1):
        (run / f"attempt_{attempt}" / "1").mkdir(parents=True)
        (run / f"attempt_{attempt}" / "1" / "stderr.log").write_text(
            f"RuntimeError: attempt {attempt} failed\n")
    failure = torchrun_failure(Outcome(1, None, TAIL, started), tmp_path)
    assert (failure.attempts, failure.rank, failure.exitcode) == (2, "rank 1 (local rank 1)", "1")
    assert failure.error == "RuntimeError: attempt 1 failed"
    assert failure.log == str(run / "attempt_1" / "1" / "stderr.log")


def test_run_child_passes_stderr_through_and_keeps_its_tail(capsys):
    outcome = run_child(["bash", "-c", "echo out; for i in 1 2 3; do echo err$i >&2; done; exit 3"],
                        {"PATH": "/usr/bin:/bin"}, tail_lines=2)
    assert outcome.returncode == 3 and outcome.signal is None
    assert outcome.tail == ["err2", "err3"]
    assert "err1\nerr2\nerr3\n" in capsys.readouterr().err


def test_every_start_of_the_ranks_gets_its_own_attempt_folder(tmp_path):
    """A restart caused by another node keeps torchrun's restart count (0 here, twice): the
    folders are still attempt_0 then attempt_1, the first one untouched; the ranks are told the
    attempt (MMTRAIN_ATTEMPT) and keep torchrun's own count."""
    from torch.distributed.elastic.multiprocessing import Std

    from launch.elastic_run import NumberedAttemptLogs

    logs = NumberedAttemptLogs(log_dir=str(tmp_path), redirects=Std.ALL, tee=Std.NONE)
    seen = []
    for _ in range(2):
        envs = {0: {"TORCHELASTIC_RUN_ID": "job", "TORCHELASTIC_RESTART_COUNT": "0"}}
        dest = logs.reify(envs)
        seen.append((envs[0]["MMTRAIN_ATTEMPT"], envs[0]["TORCHELASTIC_RESTART_COUNT"]))
        with open(dest.stderrs[0], "w") as f:
            f.write(f"attempt {len(seen) - 1}\n")
    assert seen == [("0", "0"), ("1", "0")]
    (run,) = tmp_path.iterdir()
    assert sorted(p.name for p in run.iterdir()) == ["attempt_0", "attempt_1"]
    assert (run / "attempt_0" / "0" / "stderr.log").read_text() == "attempt 0\n"
