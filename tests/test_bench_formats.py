"""bench/bench_formats.py runs end to end on small tensors (the script itself is tested; no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_formats.py"


def test_bench_formats_prints_one_row_per_step_with_ratios_to_the_baseline():
    done = subprocess.run([sys.executable, str(BENCH), "--rows", "64", "--repeats", "1", "--steps", "12,10",
                           "--baseline", "12"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["step_elements"] for r in rows] == [4096, 1024]
    assert rows[0]["weight_shape"] == [64, 128]
    for key in ("int4_g128_quantize", "int4_g128_fake_quantize", "fp8_activation_fake_quantize"):
        assert rows[0][f"{key}_over_baseline"] == 1.0 and rows[1][f"{key}_s"] > 0


def test_bench_formats_refuses_a_baseline_it_does_not_run():
    done = subprocess.run([sys.executable, str(BENCH), "--steps", "20", "--baseline", "24"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "--baseline" in done.stderr
