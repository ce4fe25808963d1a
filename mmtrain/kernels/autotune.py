"""Per-case choice of the attention backend behind set_backend("auto") on CUDA.

The first time attention meets a case (device, dtype, head dim, GQA ratio, causal, packed or one
document per row, bucket of the longest document), every candidate that can express it runs one
forward + backward on the call's own q/k/v. Its output and gradients are compared with the fp32
PyTorch reference (reference.attention) within the tolerance of the inputs' dtype; a candidate that
disagrees, or fails, is out. The fastest remaining one (median of a few timed forward + backward
runs) wins, is cached for the process, and the choice is logged once. If no candidate agrees, the
reference itself runs (slow but right) and a warning says so.

Candidates: "triton" (ours), "varlen_attn" (FlashAttention-2 inside PyTorch), and, only when every
document has the same length, "sdpa_flash" / "sdpa_cudnn" (F.scaled_dot_product_attention forced to
one kernel). Ranks choose independently: two ranks may pick different, equally correct kernels.

Shape legend: N = packed tokens, H = query heads, K = key/value heads, D = head dim.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
from typing import Callable

import torch

logger = logging.getLogger("mmtrain.kernels")

# max |got - want| <= FACTOR * (atol + rtol * max |want|), want = the fp32 reference on the same
# inputs. Outputs use FACTOR 1, gradients GRAD_FACTOR (two more matmuls with rounded inputs).
# bf16 keeps 8 bits of mantissa (2**-8 = 3.9e-3 per rounding), fp16 11 bits.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {  # dtype: (atol, rtol)
    torch.float32: (1e-5, 1e-4),
    torch.float16: (1e-3, 5e-3),
    torch.bfloat16: (1e-3, 2e-2),
}
GRAD_FACTOR = 2.5

AttentionFn = Callable[..., torch.Tensor]  # fn(q, k, v, cu_seqlens, causal, max_seqlen) -> out


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    if dtype not in TOLERANCES:
        raise ValueError(f"no attention tolerance for {dtype}; known: {list(TOLERANCES)}")
    return TOLERANCES[dtype]


def error_ratio(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, *, grad: bool = False) -> float:
    """max |got - want| divided by the allowed error for dtype: <= 1 agrees (nan never does)."""
    atol, rtol = tolerance(dtype)
    diff = (got.float() - want.float()).abs().max().item()  # sync
    scale = want.float().abs().max().item()  # sync
    allowed = (GRAD_FACTOR if grad else 1.0) * (atol + rtol * scale)
    return diff / allowed if diff == diff else float("inf")


@dataclasses.dataclass(frozen=True)
class AttentionCase:
    """What the choice depends on; one entry of the cache."""

    device: str  # e.g. "NVIDIA H200"
    dtype: str
    head_dim: int
    gqa: int  # n_heads // n_kv_heads
    causal: bool
    packed: bool  # False: every document has the same length (one per row), SDPA can express it
    seq_bucket: int  # next power of two >= the longest document

    def describe(self) -> str:
        return (f"{self.device} {self.dtype} D={self.head_dim} GQA={self.gqa} "
                f"{'causal' if self.causal else 'full'} {'packed' if self.packed else 'dense'} "
                f"S<={self.seq_bucket}")


def seq_bucket(max_seqlen: int) -> int:
    return 1 << max(4, (max(1, max_seqlen) - 1).bit_length())


@dataclasses.dataclass
class Trial:
    """One candidate on one case: fwd+bwd time, worst error ratio (<= 1 agrees), or why not."""

    name: str
    ms: float | None = None
    error: float | None = None
    failure: str | None = None

    @property
    def usable(self) -> bool:
        return self.failure is None and self.ms is not None and self.error is not None and self.error <= 1.0


def choose(trials: list[Trial], fallback: str) -> str:
    """The fastest usable trial's name; `fallback` when none is usable."""
    usable = [t for t in trials if t.usable]
    return min(usable, key=lambda t: t.ms).name if usable else fallback


def cuda_time_ms(fn: Callable[[], object], reps: int = 5) -> float:
    """Median of reps timed calls (CUDA events), after one untimed call."""
    fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()  # sync
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _fwd_bwd(fn: AttentionFn, qkv: list[torch.Tensor], do: torch.Tensor, cu, causal, max_seqlen):
    out = fn(*qkv, cu, causal, max_seqlen)
    grads = torch.autograd.grad(out, qkv, do)
    return out, grads


class AttentionAutotuner:
    """Cache of case -> winning backend, filled by timing the candidates once per case.

    candidates: name -> attention fn; applies: name -> predicate on the case (default: always);
    timer(name, fn) -> ms (default: CUDA events); reference: the ground truth, run in fp32.
    """

    def __init__(self, candidates: dict[str, AttentionFn], *, reference: AttentionFn,
                 applies: dict[str, Callable[[AttentionCase], bool]] | None = None,
                 timer: Callable[[str, Callable[[], object]], float] | None = None,
                 fallback: str = "reference") -> None:
        self.candidates = candidates
        self.reference = reference
        self.applies = applies or {}
        self.timer = timer or (lambda name, fn: cuda_time_ms(fn))
        self.fallback = fallback
        self.winners: dict[AttentionCase, str] = {}
        self.trials: dict[AttentionCase, list[Trial]] = {}

    def pick(self, case: AttentionCase, q, k, v, cu_seqlens, causal: bool, max_seqlen: int) -> str:
        if case in self.winners:
            return self.winners[case]
        if torch.compiler.is_compiling():  # no timing inside a trace; the compiled graph keeps ours
            return "triton"
        trials = self.run_trials(case, q, k, v, cu_seqlens, causal, max_seqlen)
        winner = choose(trials, self.fallback)
        self.winners[case], self.trials[case] = winner, trials
        summary = "; ".join(_describe(t) for t in trials)
        if winner == self.fallback:
            logger.warning("attention %s: no candidate agreed with the reference (%s); using %s",
                           case.describe(), summary, winner)
        else:
            logger.info("attention %s: %s (%s)", case.describe(), winner, summary)
        return winner

    def run_trials(self, case, q, k, v, cu_seqlens, causal, max_seqlen) -> list[Trial]:
        # The trials build and run their own small autograd graphs, detached from the caller's.
        # Identity saved-tensor hooks: inside activation checkpointing (non-reentrant), the caller's
        # hooks would otherwise drop the trials' saved tensors and try to recompute them.
        keep = (lambda t: t, lambda t: t)
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(q.device.type, enabled=False), \
                torch.autograd.graph.saved_tensors_hooks(*keep):
            qkv = [t.detach().clone().requires_grad_() for t in (q, k, v)]
            gen = torch.Generator(device=q.device).manual_seed(0)
            do = torch.randn(q.shape, generator=gen, device=q.device, dtype=q.dtype)
            qkv32 = [t.detach().float().requires_grad_() for t in qkv]
            ref_out, ref_grads = _fwd_bwd(self.reference, qkv32, do.float(), cu_seqlens, causal, max_seqlen)
            trials = []
            for name, fn in self.candidates.items():
                trial = Trial(name)
                trials.append(trial)
                if not self.applies.get(name, lambda c: True)(case):
                    trial.failure = "does not apply"
                    continue
                try:
                    out, grads = _fwd_bwd(fn, qkv, do, cu_seqlens, causal, max_seqlen)
                    trial.error = max([error_ratio(out, ref_out, q.dtype)]
                                      + [error_ratio(g, g32, q.dtype, grad=True) for g, g32 in zip(grads, ref_grads)])
                    if not trial.error <= 1.0:
                        trial.failure = f"disagrees with the reference ({trial.error:.3g}x the tolerance)"
                        continue
                    del out, grads
                    trial.ms = self.timer(name, lambda: _fwd_bwd(fn, qkv, do, cu_seqlens, causal, max_seqlen))
                except Exception as e:  # a kernel that cannot run this case is simply not chosen
                    trial.failure = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        return trials

    def table(self) -> list[dict]:
        """Every case seen so far, its winner and its trials (plain data, for logs and benchmarks)."""
        return [{"case": dataclasses.asdict(case), "winner": self.winners[case],
                 "trials": [dataclasses.asdict(t) for t in self.trials[case]]} for case in self.winners]


def _describe(t: Trial) -> str:
    if t.failure is not None:
        return f"{t.name}: {t.failure}"
    return f"{t.name} {t.ms:.3g} ms"
