"""The `auto` attention dispatch: the per-case chooser picks the fastest candidate that agrees with
the reference, never one that disagrees or fails, caches it, and stays the reference on CPU.
Timings are injected: this tests the selection logic, not GPU speed."""

import torch

import mmtrain.kernels as kernels
from mmtrain.kernels import reference
from mmtrain.kernels.attention_backends import _varlen_keywords, is_dense, sdpa_attention, varlen_unavailable
from mmtrain.kernels.autotune import AttentionAutotuner, AttentionCase, Trial, choose, error_ratio, seq_bucket

CASE = AttentionCase(device="test", dtype="float32", head_dim=16, gqa=2, causal=True, packed=True, seq_bucket=32)


def _inputs(lens, heads=4, kv_heads=2, head_dim=16):
    gen = torch.Generator().manual_seed(0)
    n = sum(lens)
    q, k, v = (torch.randn(n, h, head_dim, generator=gen) for h in (heads, kv_heads, kv_heads))
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    return q, k, v, cu, max(lens)


def test_choose_takes_the_fastest_usable_and_never_a_wrong_one():
    trials = [Trial("wrong_fastest", ms=0.1, error=3.0), Trial("right", ms=2.0, error=0.2),
              Trial("right_faster", ms=1.0, error=0.9), Trial("broken", failure="RuntimeError: no kernel"),
              Trial("nan", ms=0.05, error=float("nan"))]
    assert choose(trials, "reference") == "right_faster"
    assert choose([Trial("wrong", ms=0.1, error=1.5)], "reference") == "reference"


def test_autotuner_times_only_agreeing_candidates_and_caches_the_winner():
    timed = []
    fake_ms = {"right_slow": 5.0, "right_fast": 1.0, "wrong_fast": 0.01}

    def timer(name, fn):
        timed.append(name)
        fn()  # the candidate's fwd+bwd really runs
        return fake_ms[name]

    def wrong_fast(q, k, v, cu, causal, max_seqlen):
        return reference.attention(q, k, v, cu, causal, max_seqlen) * 1.01  # 1% off: beyond fp32 tolerance

    def broken(*args):
        raise RuntimeError("no kernel for this head dim")

    tuner = AttentionAutotuner(
        {"wrong_fast": wrong_fast, "right_slow": reference.attention, "broken": broken,
         "dense_only": reference.attention, "right_fast": reference.attention},
        reference=reference.attention, timer=timer, applies={"dense_only": lambda case: not case.packed},
    )  # fmt: skip
    q, k, v, cu, max_len = _inputs([5, 11, 16])
    assert tuner.pick(CASE, q, k, v, cu, True, max_len) == "right_fast"
    assert sorted(timed) == ["right_fast", "right_slow"]  # the wrong and the broken are never timed
    trials = {t["name"]: t for t in tuner.table()[0]["trials"]}
    assert "disagrees" in trials["wrong_fast"]["failure"]
    assert trials["broken"]["failure"].startswith("RuntimeError")
    assert trials["dense_only"]["failure"] == "does not apply"
    # cached: no second round of trials for the same case
    assert tuner.pick(CASE, q, k, v, cu, True, max_len) == "right_fast" and len(timed) == 2


def test_autotuner_falls_back_to_the_reference_when_nothing_agrees():
    tuner = AttentionAutotuner({"wrong": lambda q, k, v, cu, c, m: torch.zeros_like(q)},
                               reference=reference.attention, timer=lambda name, fn: 1.0)
    q, k, v, cu, max_len = _inputs([8, 8])
    assert tuner.pick(CASE, q, k, v, cu, True, max_len) == "reference"


def test_error_ratio_uses_the_dtype_tolerance():
    want = torch.tensor([1.0, -2.0])
    assert error_ratio(want + 1e-6, want, torch.float32) < 1
    assert error_ratio(want + 1e-2, want, torch.float32) > 1
    assert error_ratio(want + 1e-2, want, torch.bfloat16) < 1  # 1e-3 + 2e-2 * 2 allowed
    assert error_ratio(want * float("nan"), want, torch.bfloat16) == float("inf")
    assert seq_bucket(1) == 16 and seq_bucket(100) == 128 and seq_bucket(128) == 128


def test_sdpa_candidate_matches_the_reference_on_rows_of_one_document():
    q, k, v, cu, max_len = _inputs([32, 32, 32])
    assert is_dense(q.shape[0], cu, max_len)
    for causal in (True, False):
        torch.testing.assert_close(sdpa_attention(q, k, v, cu, causal, max_len),
                                   reference.attention(q, k, v, cu, causal), atol=1e-5, rtol=1e-4)
    q, k, v, cu, max_len = _inputs([30, 34])
    assert not is_dense(q.shape[0], cu, max_len)
    try:
        sdpa_attention(q, k, v, cu, True, max_len)
    except ValueError as e:
        assert "one length" in str(e)
    else:
        raise AssertionError("SDPA accepted documents of different lengths")


def test_auto_on_cpu_stays_the_reference_and_chooses_nothing():
    assert kernels.get_backend("cpu") == "reference"
    q, k, v, cu, max_len = _inputs([5, 11])
    torch.testing.assert_close(kernels.attention(q, k, v, cu), reference.attention(q, k, v, cu))
    assert kernels.attention_choices() == []


def test_varlen_candidate_reports_why_it_cannot_run_and_adapts_to_the_signature():
    assert varlen_unavailable("cpu") is not None
    if varlen_unavailable("cpu").startswith("varlen_attn runs"):  # torch >= 2.10 installed
        kwargs = _varlen_keywords(causal=True, grouped=True)
        assert kwargs.get("is_causal") is True or kwargs.get("window_size") == (-1, 0)


def test_autotuner_runs_inside_activation_checkpointing():
    """The first call of a case can happen inside a checkpointed block (configs/1b.yaml): the
    trials' own forward/backward must not disturb the block's recomputation."""
    from torch.utils.checkpoint import checkpoint

    tuner = AttentionAutotuner({"ours": reference.attention}, reference=reference.attention, timer=lambda n, fn: 1.0)
    q, k, v, cu, max_len = _inputs([5, 11, 16])
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def block(q, k, v):
        name = tuner.pick(CASE, q, k, v, cu, True, max_len)
        return {"ours": reference.attention, "reference": reference.attention}[name](q, k, v, cu, True, max_len)

    out = checkpoint(block, q, k, v, use_reentrant=False)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    want = torch.autograd.grad(reference.attention(q, k, v, cu, True).square().sum(), (q, k, v))
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w)
    assert tuner.winners[CASE] == "ours"
