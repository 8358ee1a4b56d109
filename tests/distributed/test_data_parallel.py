"""Data-parallel calibration: 2 gloo ranks on a tiny Llama give the one-process result, bit for bit.

Every rank passes the same 6 calibration batches and quantizes its share (3 each); the frozen
state dict of each rank is compared with a one-process run on all 6 batches (this process). A rank
that dies makes the other fail within the process group's timeout, and mismatched jobs are refused
before any work. Ranks are spawned processes with hard timeouts, so a failure never hangs CI.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed import workers
from tests.distributed.conftest import spawn_ranks


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.is_floating_point() and t.element_size() == 1 else t


def assert_same_state(expected: dict, actual: dict, what: str) -> None:
    assert expected.keys() == actual.keys(), what
    differ = [k for k in expected if expected[k].dtype != actual[k].dtype
              or not torch.equal(_bits(expected[k]), _bits(actual[k]))]
    assert not differ, f"{what}: {len(differ)} tensors differ, e.g. {differ[:4]}"


TIMEOUT_S = 20.0


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Both ranks' reports: every case, then the faults (one spawn for all of them)."""
    out = tmp_path_factory.mktemp("ranks")
    reports = spawn_ranks(workers.every_case, out, timeout_s=TIMEOUT_S, wait_s=240)
    reports[0]["out"] = out
    return reports


def _value(reports: list[dict], rank: int) -> dict:
    assert "error" not in reports[rank], f"rank {rank} failed: {reports[rank].get('trace')}"
    return reports[rank]["value"]


#: A state-dict key each case must hold (the statistics it checks exist).
MARKERS = {"fp8_attention": "self_attn.softmax_quantizer.scale", "fp8_kv_post_rope": "self_attn.key_quantizer.scale",
           "fp8_kv": "k_proj.output_quantizer.scale"}


@pytest.mark.parametrize("case", list(workers.CASES))
def test_two_ranks_equal_one_process(two_ranks, case):
    one = workers.quantized_state(case)
    assert case not in MARKERS or any(key.endswith(MARKERS[case]) for key in one)
    rank0, rank1 = _value(two_ranks, 0)[case], _value(two_ranks, 1)[case]
    assert_same_state(rank0, rank1, f"{case}: rank 0 against rank 1")
    assert_same_state(one, rank0, f"{case}: one process against 2 ranks")


def test_awq_ranks_take_the_scale_candidates_in_turns(two_ranks):
    """One candidate per batch: each rank computes half of them, and the result is one process's."""
    one = workers.awq_split_state()
    for rank in (0, 1):
        got = _value(two_ranks, rank)["int4_awq:split"]
        assert got["computed"] * 2 == one["computed"], (got["computed"], one["computed"])
        assert_same_state(one["state"], got["state"], f"rank {rank}")


def test_layer_by_layer_placement_on_two_ranks_equals_one_process(two_ranks):
    one = workers.quantized_state("fp8_kv")
    for rank in (0, 1):
        assert_same_state(one, _value(two_ranks, rank)["fp8_kv:layer_by_layer"], f"rank {rank}")


def test_gptq_on_the_same_statistics_is_one_process_gptq(two_ranks):
    """Each rank passing all 6 batches as its own share: the reduced Hessians are one process's exactly."""
    one = workers.quantized_state("int4_gptq")
    for rank in (0, 1):
        assert_same_state(one, _value(two_ranks, rank)["int4_gptq:duplicated"], f"rank {rank}")


def test_observers_reduce_to_one_process_ranges(two_ranks):
    one = workers.observer_ranges(None)
    alone = workers.minmax_qparams(workers.observer_data(0))
    bin_width = 2 * float(torch.cat(workers.observer_data(None)).abs().max()) / 2048
    for rank in (0, 1):
        got = _value(two_ranks, rank)["observers"]
        for name in ("minmax", "per_channel"):
            assert torch.equal(got[name][0], one[name][0]) and torch.equal(got[name][1], one[name][1]), name
        # fed on rank 0 only: rank 1 contributed empty statistics
        assert torch.equal(got["only_rank0"][0], alone[0]) and torch.equal(got["only_rank0"][1], alone[1])
        # histograms are re-binned once per rank instead of batch by batch: the range agrees within two bins
        for name in ("percentile", "mse"):
            assert abs(float(got[name][0] - one[name][0])) * 255 <= 2 * bin_width, name


def test_mismatched_jobs_are_refused_before_any_work(two_ranks):
    for rank in (0, 1):
        refused = _value(two_ranks, rank)["mismatched"]
        assert refused is not None and refused["type"] == "ValueError", refused
        message = refused["error"]
        assert "disagree before any work" in message and "config differs (rank 0:" in message
        assert "calibration batches differs (rank 0: 4, rank 1: 5)" in message


def test_a_dead_rank_makes_the_other_fail_within_the_timeout(two_ranks):
    assert two_ranks[1]["exitcode"] == 3 and "dead" not in _value(two_ranks, 1)
    failed = _value(two_ranks, 0)["dead"]
    assert failed is not None and failed["type"] == "RankFailure", failed
    assert "another rank died" in failed["error"]
    assert _value(two_ranks, 0)["dead:seconds"] < TIMEOUT_S + 10
    assert not (two_ranks[0]["out"] / "written").exists()
