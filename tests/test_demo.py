"""The embedded demo exactly as a user runs it: `mmtrain train` with no arguments, in a fresh
directory. It builds the corpus, trains both media tokenizers, trains the model with generation
losses on 2 CPU ranks, and ends with the evaluation and the judged generations (issue 15).

The one test that runs the whole demo (several minutes on 2 cores); everything else trains the
`tiny` settings of tests/conftest.py for a few steps.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time

import pytest

from tests.conftest import cli_env

pytestmark = pytest.mark.slow


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p)."""
    return sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k, n + 1))


def test_the_demo_learns_to_understand_and_to_generate_pictures_and_sounds(tmp_path):
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "mmtrain", "train"], cwd=tmp_path, env=cli_env(),
                          capture_output=True, text=True, timeout=1800)
    minutes = (time.monotonic() - t0) / 60
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:] + proc.stderr[-4000:]
    print(f"demo took {minutes:.1f} min")  # the budget: 8 min on 2 quiet cores

    def gain(name: str) -> float:
        found = re.findall(rf"{name} gain ([+-][0-9.]+)", out)
        assert found, f"no '{name} gain' in the output:\n{out[-3000:]}"
        return float(found[-1])

    # Measured on 2 quiet cores: media +0.23, image +0.75, audio +0.17 (240 steps); README has
    # the figures of the shipped 280 steps. ~0 would mean the media / captions are ignored.
    assert gain("media") > 0.1, out[-3000:]
    assert gain("image-generation") > 0.3, out[-3000:]
    assert gain("audio-generation") > 0.08, out[-3000:]

    # Generated pictures show the named colours in the named places, generated sounds the named
    # number of beeps at the named pitch, more often than chance (judged by data_tools/synth_judge).
    run = tmp_path / "runs" / "tiny"
    judged = json.loads((run / "samples" / "judged.json").read_text())["results"]
    captions = json.loads((run / "samples" / "captions.json").read_text())
    # Chance for a judge that is right about the real media (tests/data_tools/test_synth_judge.py):
    # the probability that a random demo caption matches, measured there below these rates.
    chance = {"image": 0.08, "audio": 0.10}
    for kind in ("image", "audio"):
        n = len(captions[kind])
        hits = round(judged[kind]["match"] * n)
        p_value = binomial_tail(hits, n, max(chance[kind], judged[kind]["chance"]))
        assert p_value < 0.01, (kind, judged[kind], hits, n, p_value)
    assert (run / "samples" / "image_sheet.png").is_file()
    assert len(list((run / "samples").glob("audio-*.wav"))) == len(captions["audio"])
    assert "generated pictures" in out and "generated sounds" in out
