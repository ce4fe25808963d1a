"""`mmtrain eval CKPT`: evaluate a checkpoint in one CPU process, without DeepSpeed.

Prints the val loss, the caption loss with real and with shuffled media, the media gain (see
mmtrain/evaluate.py) and next-token accuracy on caption tokens and on all text targets, over the
held-out shards of the run's config (data.val, or --val); for a run that generates media, also the
code loss with true and shuffled captions and the image- / audio-generation gains.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

import torch

from mmtrain import kernels
from mmtrain.data.batch import Batch
from mmtrain.data.loader import eval_batches, generation_eval_batches, media_codes_for
from mmtrain.data.tokenizer import build_tokenizer
from mmtrain.evaluate import evaluate, generation_gains
from mmtrain.export import load_checkpoint_model

ROWS_PER_CHUNK = 4096  # logits are [rows, V]: bounded memory for large vocabularies


@torch.no_grad()
def accuracy(logits_at: Callable[[Batch, torch.Tensor], torch.Tensor],
             batches: list[Batch]) -> dict[str, float]:
    """Greedy next-token accuracy on caption tokens and on all text targets."""
    hits = torch.zeros(4, dtype=torch.float64)  # caption hits, caption n, text hits, text n
    for batch in batches:
        targets = batch.targets.reshape(-1)
        valid = (targets != -100).nonzero().squeeze(1)
        caption = batch.caption_mask.reshape(-1)[valid]
        correct = torch.cat([logits_at(batch, idx).argmax(-1) == targets[idx]
                             for idx in valid.split(ROWS_PER_CHUNK)]) if valid.numel() else \
            torch.zeros(0, dtype=torch.bool)
        hits += torch.tensor([correct[caption].sum(), caption.sum(), correct.sum(), valid.numel()],
                             dtype=torch.float64)
    cap_hits, cap_n, text_hits, text_n = hits.tolist()
    return {"caption_accuracy": cap_hits / max(cap_n, 1.0),
            "text_accuracy": text_hits / max(text_n, 1.0)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mmtrain eval", description=(
        "Evaluate a checkpoint on held-out shards (one CPU process): loss, caption loss with real "
        "and shuffled media, media gain, caption-token accuracy."))
    p.add_argument("checkpoint", help="a step_XXXXXXXX directory, or a run / checkpoints directory")
    p.add_argument("--val", help="held-out shard directory (default: the run's data.val)")
    p.add_argument("--batches", type=int,
                   help="evaluation batches (default: the run's train.eval_batches)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON line")
    args = p.parse_args(argv)

    kernels.set_backend("auto")  # CPU: the reference kernels, whatever the run used
    model, cfg, ckpt = load_checkpoint_model(args.checkpoint)
    val = args.val or cfg.data.val
    if not val:
        raise ValueError("the run has no data.val: pass --val DIR")
    num_batches = args.batches or cfg.train.eval_batches or 8
    if num_batches < 1:
        raise ValueError(f"--batches={num_batches} must be >= 1")
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    codes = media_codes_for(cfg.data, cfg.model.media())  # the run's media tokenizers, read once
    batches = eval_batches(val, cfg.data, spec=cfg.model.media(), tokenizer=tokenizer, rank=0,
                           world_size=1, num_batches=num_batches, codes=codes)
    result = evaluate(model.token_losses, batches, torch.device("cpu"), None)
    result.update(accuracy(model.logits_at, batches))
    # Generation gains of the kinds the run generates (its media tokenizers, data.*_tokenizer).
    generation = generation_eval_batches(val, cfg.data, spec=cfg.model.media(), tokenizer=tokenizer,
                                         rank=0, world_size=1, items_per_kind=8 * num_batches,
                                         codes=codes)
    result.update(generation_gains(model.token_losses, generation,
                                   {kind: cfg.model.code_range(kind) for kind in generation},
                                   torch.device("cpu"), None))
    step = json.loads((ckpt / "MANIFEST.json").read_text())["step"]
    if args.json:
        print(json.dumps({"checkpoint": str(ckpt), "step": step, **result}))
        return 0
    print(f"checkpoint {ckpt} (step {step}), {num_batches} batches of {val}\n"
          f"  val loss               {result['loss']:.4f}\n"
          f"  caption loss           {result['caption_loss']:.4f} (shuffled media "
          f"{result['caption_loss_shuffled']:.4f}, {int(result['caption_tokens'])} caption tokens)\n"
          f"  media gain             {result['media_gain']:+.4f} nats/caption token\n"
          f"  caption-token accuracy {100 * result['caption_accuracy']:.2f}%\n"
          f"  text-token accuracy    {100 * result['text_accuracy']:.2f}%")
    for kind in sorted(generation):
        print(f"  {kind + '-generation gain':<22} {result[f'{kind}_generation_gain']:+.4f} nats/code "
              f"(code loss {result[f'{kind}_code_loss']:.4f}, shuffled captions "
              f"{result[f'{kind}_code_loss_shuffled']:.4f})")
    return 0


if __name__ == "__main__":  # same as `mmtrain eval` (which does not come through here)
    from mmtrain.errors import exit_code

    sys.exit(exit_code("mmtrain eval", main, sys.argv[1:]))
