"""Generation with the KV cache ÷ full recomputation (`mmtrain generate`, one process).

* ours:     mmtrain.generate.generate_batch(kv_cache=True): the prompt goes through the model once
            (prefill, varlen attention), then one token per step against the cached keys/values.
* baseline: the same function with kv_cache=False: the whole sequence (prompt + generated so far)
            through FusionTransformer.logits_at for every new token — what `mmtrain generate` did
            before the cache.

Same model (the `tiny` preset, randomly initialised with init_std 0.1 so that greedy decoding does
not collapse into one repeated byte), same prompt, greedy, up to --new-tokens new tokens (both
stop early at <eos>; the count is printed). Check: both must produce the same tokens, or the
benchmark fails. Rounds alternate; medians of tokens/s. Runs on CPU unless
--device cuda.

    python benchmarks/bench_generate.py [--prompt-tokens 256] [--new-tokens 64] [--rounds 3]
                                        [--device cpu|cuda] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from mmtrain import kernels  # noqa: E402
from mmtrain.data.tokenizer import ByteTokenizer  # noqa: E402
from mmtrain.generate import generate_batch, prompt_document  # noqa: E402
from mmtrain.model import FusionTransformer, preset  # noqa: E402


def timed(model, tok, doc, new_tokens: int, kv_cache: bool, device) -> tuple[list[int], float]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = generate_batch(model, tok, [doc], max_new_tokens=new_tokens, kv_cache=kv_cache)[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    kernels.set_backend("auto")
    torch.manual_seed(0)
    cfg = dataclasses.replace(preset("tiny"), init_std=0.1)
    if args.prompt_tokens + args.new_tokens > cfg.max_seq_len:
        raise ValueError(f"--prompt-tokens + --new-tokens must be <= {cfg.max_seq_len} (tiny preset)")
    model = FusionTransformer(cfg).eval().to(device)
    tok = ByteTokenizer()
    text = ("the quick brown fox jumps over the lazy dog " * 40)[:args.prompt_tokens - 1]  # + <bos>
    doc = prompt_document(text, None, None)
    timed(model, tok, doc, 4, True, device)  # warm-up both paths
    timed(model, tok, doc, 4, False, device)
    rates = {"cached": [], "full": []}
    outputs = {}
    for _ in range(args.rounds):
        for name, kv in (("cached", True), ("full", False)):
            out, seconds = timed(model, tok, doc, args.new_tokens, kv, device)
            outputs.setdefault(name, out)
            if out != outputs[name]:
                raise SystemExit(f"FAIL: {name} decoding is not deterministic across rounds")
            rates[name].append(len(out) / seconds)
    if outputs["cached"] != outputs["full"]:
        raise SystemExit("FAIL: cached and full recomputation produced different tokens")
    cached, full = statistics.median(rates["cached"]), statistics.median(rates["full"])
    result = {"device": device.type, "prompt_tokens": args.prompt_tokens,
              "new_tokens": len(outputs["cached"]), "cached_tokens_per_s": round(cached, 1),
              "full_tokens_per_s": round(full, 1), "speedup": round(cached / full, 2),
              "threads": torch.get_num_threads()}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"generate on {device.type}: prompt {args.prompt_tokens} tokens, "
              f"{result['new_tokens']} new tokens (same tokens both ways)")
        print(f"  KV cache:            {cached:8.1f} tokens/s  (rounds: "
              + ", ".join(f"{r:.1f}" for r in rates["cached"]) + ")")
        print(f"  full recomputation:  {full:8.1f} tokens/s  (rounds: "
              + ", ".join(f"{r:.1f}" for r in rates["full"]) + ")")
        print(f"  ratio (cached ÷ full): {cached / full:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
