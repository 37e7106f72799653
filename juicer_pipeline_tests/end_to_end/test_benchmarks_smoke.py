"""Every benchmark script still runs: each once, at the smallest size, printing what it measures."""
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
CASES = {
    "celery_vs_serial.py": (["--samples", "8"], "celery (2 workers) / serial wall time"),
    "ingest_throughput.py": (["--samples", "50", "--repeats", "1", "--workers", "2"],
                             ("throughput ratio stage/bare PIL, 2 worker(s)", "per-round ratio", "per round, in order")),
    "recipes.py": (["--drops", "1", "--samples", "120", "--budget", "4", "--wallclock", "1", "--seeds", "0",
                    "--recipes", "raw", "datajuicer", "--eval-points", "1", "--eval-samples", "100"],
                   ("precision native: a training step takes fp32 ", "preset cpu (student world-s), device cpu ",
                    "juiced 1 drops x 120 samples",
                    "EQUAL VISION TOKENS", "EQUAL WALL-CLOCK (1.0 s)", "EQUAL VISION TOKENS, DENSE", "seg_blocks_miou",
                    "(c) the paper's claim", "dense: seg probe mIoU",
                    "INFERENCE on full images vs governor-salient")),
    "scale_ceiling.py": (["--sizes", "40", "60"], "patch_saliency: peak RSS from 40 to 60 samples"),
    "train_step.py": (["--steps", "1", "--batch-size", "8"], ("ratio kept/full", "whole step (fwd+bwd)", "stem fwd")),
    "student_arch.py": (["--samples", "300", "--eval-samples", "40", "--budget", "2", "--batch-size", "32",
                         "--eval-points", "1", "--probe-samples", "40", "--patches", "saliency", "--precision", "bf16",
                         "--size-jitter", "0.7", "1.3"],
                        ("linear probe top-1", "zero-shot top-1 by object size", "final top1", "on the governor-salient",
                         "schedule cosine, bf16", "size jitter (0.7, 1.3)")),
    "vision_throughput.py": (["--samples", "64", "--repeats", "1"], "ratio"),
}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(CASES))
def test_benchmark_runs(script, tmp_path):
    args, expected = CASES[script]
    out = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=600,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    for text in (expected,) if isinstance(expected, str) else expected:
        assert text in out.stdout
