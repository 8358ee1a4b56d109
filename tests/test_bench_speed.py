"""bench/bench_speed.py runs end to end on a tiny shape (the script itself is tested; no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_speed.py"


def test_bench_speed_prints_one_json_row_per_run():
    done = subprocess.run([sys.executable, str(BENCH), "--shape", "tiny", "--device", "cpu", "--runs",
                           "fp8_kv:cpu,int4_rtn:cpu", "--samples", "2", "--seq", "16"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(r["scheme"], r["placement"]) for r in rows] == [("fp8_kv", "cpu"), ("int4_rtn", "cpu")]
    for row in rows:
        assert "error" not in row, row
        # a tiny weight-only run can take under 0.1 ms: the time is reported, not asserted
        assert row["layers"] == 2 and row["quantize_s"] >= 0 and row["peak_host_gib"] > 0


def test_bench_speed_refuses_an_unknown_run():
    done = subprocess.run([sys.executable, str(BENCH), "--runs", "fp9:gpu"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "SCHEME:PLACEMENT" in done.stderr


def test_bench_speed_disk_placement_reads_a_checkpoint_written_first(tmp_path):
    done = subprocess.run([sys.executable, str(BENCH), "--shape", "tiny", "--device", "cpu", "--runs", "fp8_kv:disk",
                           "--samples", "2", "--seq", "16", "--disk_dir", str(tmp_path / "model")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    (row,) = [json.loads(line) for line in done.stdout.splitlines()]
    assert "error" not in row, row
    assert row["placement"] == "disk" and row["layers"] == 2 and row["peak_host_gib"] > 0
    index = json.loads((tmp_path / "model" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3  # one shard per decoder layer, one for the rest


def test_bench_speed_runs_data_parallel_ranks():
    """--nproc 2: torchrun with two gloo ranks; rank 0 alone prints its row."""
    done = subprocess.run([sys.executable, str(BENCH), "--shape", "tiny", "--device", "cpu", "--runs", "gptq:cpu",
                           "--samples", "2", "--seq", "16", "--nproc", "2"], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(rows) == 1 and "error" not in rows[0], rows
    assert rows[0]["nproc"] == 2 and rows[0]["quantize_s"] > 0


def test_bench_speed_refuses_a_bad_process_count():
    done = subprocess.run([sys.executable, str(BENCH), "--nproc", "0"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--nproc" in done.stderr


def test_the_transfer_benchmark_names_what_it_needs_without_a_gpu() -> None:
    import os

    import torch

    if torch.cuda.is_available():
        pytest.skip("runs on the device machine")
    script = Path(__file__).resolve().parents[1] / "bench" / "bench_transfer.py"
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(script.parents[1])})
    assert done.returncode == 2 and "needs a CUDA device" in done.stderr


def test_bench_speed_profiles_named_stages_and_reports_layers_and_host_memory(tmp_path):
    """--profile writes the named stage ranges (from the second decoder layer with --profile_layers 1:2);
    the row carries each layer's seconds and the host memory before and during the run."""
    done = subprocess.run([sys.executable, str(BENCH), "--shape", "tiny", "--device", "cpu", "--runs", "gptq:cpu",
                           "--samples", "2", "--seq", "16", "--profile", str(tmp_path), "--profile_layers", "1:2"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    (row,) = [json.loads(line) for line in done.stdout.splitlines()]
    assert "error" not in row, row
    assert len(row["layer_seconds"]) == len(row["layer_host_gib"]) == 2
    assert all(resident > 0 and pinned == 0 for resident, pinned, _, _ in row["layer_host_gib"])  # no CUDA here
    # anonymous and file-backed memory split the resident (each rounded to 0.01 GiB)
    assert all(abs(anon + file - resident) <= 0.03 and anon > 0 for resident, _, anon, file in row["layer_host_gib"])
    assert all(v > 0 for v in row["host_split_before_gib"] + row["host_split_after_gib"])
    assert {"swap_linears", "algorithms", "finalize"} <= set(row["stage_seconds"])
    assert len(row["capture_seconds"]) == 1  # GPTQ's runner captured the decoder inputs once
    assert 0 < row["host_before_quantize_gib"] <= row["peak_host_during_quantize_gib"]
    table = (tmp_path / "gptq_cpu_rank0.txt").read_text()
    assert "quark.apply.GptqStep" in table and "gptq.solve" in table
    assert "quark.capture" not in table  # the capture comes before layer 1: not recorded


def test_gpu_gaps_charges_each_idle_gap_to_the_cpu_operator_running_then():
    sys.path.insert(0, str(BENCH.parent))
    from gpu_gaps import gap_summary

    def span(cat, ts, dur, name="", tid=1):
        return {"ph": "X", "cat": cat, "ts": ts, "dur": dur, "name": name, "tid": tid}

    trace = {"traceEvents": [
        span("kernel", 0, 10), span("kernel", 110, 10), span("gpu_memcpy", 200, 5), span("kernel", 215, 5),
        span("user_annotation", 0, 300, "awq.search_group"), span("user_annotation", 100, 150, "quark.backup"),
        span("cpu_op", 20, 80, "aten::item"), span("cpu_op", 130, 60, "aten::copy_"),
        span("cpu_op", 0, 1, "other thread", tid=2)]}
    table = gap_summary(trace, min_us=20).splitlines()
    assert table[0].startswith("GPU window 0.000 s") and "2 gaps >= 20 us" in table[0]  # the 10 us one is not
    rows = {tuple(line.split()[:2]): line.split()[-1] for line in table[2:]}
    assert rows == {("aten::item", "awq.search_group"): "0.0001", ("aten::copy_", "quark.backup"): "0.0001"}
    # within the runner's layers: idle time per layer, and the layers after the first on their own
    trace["traceEvents"] += [span("user_annotation", 5, 90, "quark.layer"), span("user_annotation", 100, 200,
                                                                                 "quark.layer")]
    table = gap_summary(trace, min_us=20).splitlines()
    assert table[1] == "idle seconds per decoder layer (quark.layer ranges, in order): 0.000, 0.000"
    assert table[-3] == "the decoder layers after the first:"
    assert table[-1].split() == ["aten::copy_", "quark.backup", "1", "0.0001"]
