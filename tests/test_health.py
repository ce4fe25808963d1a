"""Training health: non-finite steps are skipped (parameters untouched) and counted; M in a row
stop the run with exit code 3; SIGTERM saves a committed checkpoint and exits 0."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, cli_env, tiny_train_cmd
from tests.test_e2e import losses

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent("""
    import os, sys, torch
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    from mmtrain.data.batch import text_batch
    from mmtrain.distributed import deepspeed as ds
    from mmtrain.distributed.collectives import Collectives
    from mmtrain.distributed.config import EngineConfig
    from mmtrain.health import Diverged, LossMonitor, PreemptionFlag, StepFlags
    from mmtrain.model import FusionTransformer, ModelConfig
    from mmtrain.train import train_step

    grad_accum = int(sys.argv[3])
    cfg = EngineConfig(zero_stage=2, lr=1e-2, warmup_steps=0, grad_accum=grad_accum)
    ds.init_distributed(cfg)
    torch.manual_seed(0)
    model = FusionTransformer(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2))
    engine, _ = ds.build_engine(model, cfg, micro_batch_size=2, world_size=1, total_steps=10)

    class Batches:  # feeds real batches; the one at index NAN_AT has a poisoned embedding input
        i = 0
        def next_batch(self):
            self.i += 1
            return text_batch(torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(self.i)),
                              [[12, 20], [32]])

    nan_at = set(int(x) for x in sys.argv[2].split(","))
    weight = engine.module.tok_embeddings.weight
    flags = StepFlags(Collectives(torch.device("cpu")), 0.0)
    monitor = LossMonitor(max_consecutive=3, spike_z=0)
    loader = Batches()
    for step in range(1, 9):
        before = [p.detach().clone() for p in engine.module.parameters()]
        calls = []
        def poison(module, inputs, out):  # the step's last micro-batch (its only one at accum 1)
            calls.append(1)
            return out * float("nan") if len(calls) == grad_accum else out
        hook = engine.module.register_forward_hook(poison) if step in nan_at else None
        out = train_step(engine, loader, grad_accum, torch.device("cpu"), flags, PreemptionFlag())
        if hook:
            hook.remove()
        unchanged = all(torch.equal(a, b) for a, b in zip(before, engine.module.parameters()))
        print("STEP", step, out.skipped, unchanged, engine.global_steps, engine.skipped_steps,
              flush=True)
        if out.skipped:
            try:
                monitor.skipped(step)
            except Diverged as e:
                print("DIVERGED", e, flush=True)
                break
        else:
            monitor.observe(step, out.loss)
""")


def run_script(tmp_path, nan_at, grad_accum=1):
    from launch.local import free_port

    script = tmp_path / "nan.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(free_port()), nan_at, str(grad_accum)],
                          env=cli_env(),
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [line.split() for line in proc.stdout.splitlines() if line.startswith("STEP")]
    return {int(s[1]): (s[2] == "True", s[3] == "True", int(s[4])) for s in steps}, proc.stdout


def test_nonfinite_step_is_skipped_with_parameters_and_optimizer_untouched(tmp_path):
    steps, _ = run_script(tmp_path, "3")
    skipped, unchanged, global_steps = steps[3]
    assert skipped and unchanged
    assert steps[2][2] == global_steps  # no optimizer step was taken
    assert not steps[4][0] and not steps[4][1] and steps[4][2] == global_steps + 1


def test_nonfinite_later_micro_batch_skips_the_accumulated_step(tmp_path):
    """GPU recipes accumulate (grad_accum from engine.global_batch_tokens): a NaN in the second
    micro-batch, after the first one's gradients were accumulated, still only skips that step."""
    steps, out = run_script(tmp_path, "3", grad_accum=2)
    skipped, unchanged, _ = steps[3]
    assert skipped and unchanged, out
    assert "STEP 3 True True 3 1" in out  # DeepSpeed counted the step and skipped it
    assert not steps[4][0] and not steps[4][1]  # training goes on


def test_consecutive_nonfinite_steps_stop_the_run(tmp_path):
    steps, out = run_script(tmp_path, "2,3,4")
    assert "DIVERGED 3 consecutive non-finite steps" in out
    assert max(steps) == 4


def rank_pids(run_dir: Path) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"mmtrain.train" in cmd and str(run_dir / "config.json").encode() in cmd \
                    and b"torch.distributed.run" not in cmd:  # the ranks, not torchrun's agent
                pids.append(int(entry.name))
    return pids


def test_sigterm_saves_a_committed_checkpoint_and_exits_zero(demo_corpus, tmp_path):
    cmd = tiny_train_cmd(demo_corpus, tmp_path, "sig", {"data.num_workers": 0, "train.steps": 100000,
                                                        "train.ckpt_every": 0})
    proc = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    run_dir = tmp_path / "sig"
    deadline = time.time() + 240
    while time.time() < deadline:
        if (run_dir / "metrics.jsonl").is_file() and len(losses(run_dir)) >= 3:
            break
        time.sleep(0.5)
    pids = rank_pids(run_dir)
    if len(pids) != 2:
        proc.kill()
    assert len(pids) == 2
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out[-3000:]
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    step = int(latest.split("_")[1])
    assert step >= 3 and (run_dir / "checkpoints" / latest / "COMMITTED").is_file()
    assert max(losses(run_dir)) == step  # saved exactly where it stopped
