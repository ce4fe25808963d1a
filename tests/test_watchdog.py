"""Hang diagnosis in one process: the progress timer and SIGUSR2 write every thread's stacks."""

from __future__ import annotations

import os
import signal
import threading
import time

from mmtrain.watchdog import Watchdog


def test_a_stall_dumps_every_threads_stacks_then_rearms(tmp_path):
    release = threading.Event()
    helper = threading.Thread(target=release.wait, name="blocked-helper", daemon=True)
    helper.start()
    dog = Watchdog(tmp_path / "logs", rank=3, hang_seconds=0.3).start(step=7)
    try:
        deadline = time.monotonic() + 10
        while not list((tmp_path / "logs").glob("stacks_rank_3_2*.txt")):
            assert time.monotonic() < deadline, "no stack dump after the stall"
            time.sleep(0.05)
        (dump,) = (tmp_path / "logs").glob("stacks_rank_3_2*.txt")
        text = dump.read_text()
        assert text.startswith("rank 3 (pid ") and "no step completed for" in text
        assert "after step 7" in text
        # all threads: this test (the "main" thread here) and the blocked helper's wait
        assert "test_a_stall_dumps_every_threads_stacks_then_rearms" in text and "in wait" in text
        dog.beat(8)  # progress: a new stall starts counting from here
        assert dog.dumps == 0
    finally:
        dog.stop()
        release.set()
    assert not dog._thread.is_alive()


def test_sigusr2_appends_stacks_even_without_the_timer(tmp_path):
    dog = Watchdog(tmp_path, rank=0, hang_seconds=0).start(step=0)  # 0: no timer thread
    try:
        assert dog._thread is None
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(0.2)
        text = (tmp_path / "stacks_rank_0_sigusr2.txt").read_text()
        assert "most recent call first" in text and "test_sigusr2_appends_stacks" in text
    finally:
        dog.stop()
    assert not list(tmp_path.glob("stacks_rank_0_2*.txt"))


def test_starts_under_a_captured_stderr(tmp_path, capsys):
    dog = Watchdog(tmp_path, rank=0, hang_seconds=60).start(step=0)  # sys.stderr has no fileno
    try:
        assert dog._thread is not None and dog._thread.is_alive()
        assert (tmp_path / "stacks_rank_0_sigusr2.txt").is_file()  # SIGUSR2 is wired to a file
    finally:
        dog.stop()
    assert not dog._thread.is_alive()
