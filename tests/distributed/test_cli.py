"""``torchrun --nproc-per-node 2 -m quark.torch.llm``: the export equals one process's; faults write nothing.

The embedded stories260K model (fp8 W8A8 + fp8 KV cache, 4 calibration samples) on gloo. The fault
runs launch the two ranks by hand with torchrun's environment variables (torchrun itself would kill
the surviving rank as soon as one fails, before it can report).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from quark.torch.llm.cli import main
from tests.distributed.conftest import free_port

WORKTREE = Path(__file__).resolve().parents[2]
RANK_SCRIPT = Path(__file__).with_name("cli_rank.py")
FLAGS = ["--device", "cpu", "--model_export", "hf_format", "--skip_evaluation", "--log_severity_level", "2"]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(WORKTREE), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def _launch(argvs: list[list[str]], timeout_s: float = 180, **extra: str) -> list[subprocess.CompletedProcess]:
    """Start one process per rank (argvs[r]) with torchrun's variables; wait for all (killed past the timeout)."""
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, str(RANK_SCRIPT), *argv], cwd=WORKTREE, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(len(argvs)),
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **extra))
             for r, argv in enumerate(argvs)]
    done = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if "quark-tmp" in p.name]


def test_torchrun_export_equals_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*FLAGS, "--output_dir", str(one)]) == 0
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(free_port()), "-m", "quark.torch.llm", *FLAGS,
                           "--output_dir", str(two)], cwd=WORKTREE, env=_env(), capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("model                       |") == 1  # rank 0 alone prints the table
    for name in ("model.safetensors", "config.json"):
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    assert "over 2 ranks" in (two / "quark_summary.json").read_text()


def test_a_dead_rank_fails_the_run_and_nothing_is_written(tmp_path):
    out = tmp_path / "out"
    rank0, rank1 = _launch([[*FLAGS, "--output_dir", str(out), "--dist_timeout", "30"]] * 2, QUARK_TEST_DIE_RANK="1")
    assert rank1.returncode == 3
    assert rank0.returncode == 1, rank0.stderr[-3000:]
    error = [line for line in rank0.stderr.splitlines() if line.startswith("quark-quantize: error:")]
    assert len(error) == 1 and "another rank died" in error[0] and "nothing is written" in error[0]
    assert not out.exists() and not _leftovers(tmp_path)


def test_ranks_with_different_flags_are_refused_before_any_work(tmp_path):
    out = tmp_path / "out"
    argv = [*FLAGS, "--output_dir", str(out)]
    done = _launch([argv, [*argv, "--quant_scheme", "w_int8_a_int8_per_tensor_sym"]])
    for rank in done:
        assert rank.returncode == 2, rank.stderr[-3000:]
        assert "disagree before any work" in rank.stderr and "config differs" in rank.stderr
    assert not out.exists() and not _leftovers(tmp_path)
