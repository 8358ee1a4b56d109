"""quark-quantize and its output folder: never deleted by mistake, never lost when a run is killed or
interrupted; one error line (no traceback) for interrupts, pickles, truncated files, missing packages."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from quark.torch.export.output_folder import clean_leftovers
from quark.torch.export.safetensors_io import read_checkpoint
from quark.torch.llm import export_step
from quark.torch.llm.cli import Terminated, main
from quark.torch.llm.summary import SUMMARY_FILE

REPO = Path(__file__).resolve().parents[2]
# the signals of the random-moment kills (a handful, to keep the test short)
KILLS = (signal.SIGKILL, signal.SIGTERM, signal.SIGKILL, signal.SIGINT)
KILL_SEED = 15


def small(model_dir: Path, calib: Path) -> list[str]:
    return ["--model_dir", str(model_dir), "--device", "cpu", "--dataset", str(calib), "--num_calib_data", "2",
            "--seq_len", "32", "--skip_evaluation", "--log_severity_level", "3"]


def one_error_line(capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("quark-quantize:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def check_complete_output(out: Path) -> dict:
    """``out`` holds a whole quark-quantize hf_format export: summary, config and readable tensors."""
    summary = json.loads((out / SUMMARY_FILE).read_text())
    # the written summary holds paths relative to the output folder (no local paths in exports)
    assert summary["mode"] == "quantize" and summary["exports"] == {"hf_format": "."}
    assert "quantization_config" in json.loads((out / "config.json").read_text())
    tensors, _ = read_checkpoint(out)
    assert any(name.endswith("weight_scale") for name in tensors)
    return summary


@pytest.mark.parametrize("where", [".", "..", "model", "dataset_folder"])
def test_output_dir_holding_an_input_is_refused(where: str, tiny_llama_dir: Path, calib_text: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("the user's file")
    (work / SUMMARY_FILE).write_text("{}")  # even a folder that looks like an earlier output
    corpus = tmp_path / "data" / "corpus.txt"
    corpus.parent.mkdir()
    corpus.write_text(calib_text.read_text())
    monkeypatch.chdir(work)
    output = {".": ".", "..": "..", "model": str(tiny_llama_dir), "dataset_folder": str(corpus.parent)}[where]
    before = {p: p.stat().st_mtime_ns for p in (*work.iterdir(), corpus, *tiny_llama_dir.iterdir())}
    args = [*small(tiny_llama_dir, corpus), "--output_dir", output, "--overwrite"]
    assert main(args) == 2
    one_error_line(capsys, "--output_dir", "is or contains")
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_pickle_only_model_dir(tmp_path: Path, tiny_llama_dir: Path, calib_text: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "pickled"
    folder.mkdir()
    for name in ("config.json", "tokenizer.model"):
        (folder / name).write_bytes((tiny_llama_dir / name).read_bytes())
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    assert main([*small(folder, calib_text), "--output_dir", str(tmp_path / "out")]) == 2
    one_error_line(capsys, "pytorch_model.bin", "only safetensors")
    assert not (tmp_path / "out").exists()


def test_truncated_safetensors(tmp_path: Path, tiny_llama_dir: Path, calib_text: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "truncated"
    folder.mkdir()
    for p in tiny_llama_dir.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert main([*small(folder, calib_text), "--output_dir", str(tmp_path / "out")]) == 2
    one_error_line(capsys, "model.safetensors", "truncated")


@pytest.mark.parametrize("fmt", ["onnx", "gguf"])
def test_missing_export_package_is_named_before_any_work(fmt: str, tmp_path: Path, tiny_llama_dir: Path,
                                                         calib_text: Path, capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, fmt, None)  # import fails as if not installed

    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the missing package was reported")

    monkeypatch.setattr("quark.torch.llm.pipeline.load_model", no_model)
    assert main([*small(tiny_llama_dir, calib_text), "--output_dir", str(tmp_path / "out"),
                 "--model_export", fmt]) == 2
    one_error_line(capsys, f"needs the Python package(s) {fmt}", f"pip install {fmt}")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize(("interrupt", "status", "name"), [(KeyboardInterrupt, 130, "SIGINT"),
                                                           (Terminated, 143, "SIGTERM")])
def test_interrupt_during_export_keeps_previous_output(interrupt: type[BaseException], status: int, name: str,
                                                       tmp_path: Path, tiny_llama_dir: Path, calib_text: Path,
                                                       capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    args = [*small(tiny_llama_dir, calib_text), "--output_dir", str(out), "--model_export", "hf_format"]
    assert main(args) == 0
    previous = check_complete_output(out)
    real_export = export_step.export_model

    def export_then_interrupt(*a: object, **k: object) -> dict[str, str]:
        real_export(*a, **k)  # the staging folder is full when the signal comes
        raise interrupt()

    monkeypatch.setattr(export_step, "export_model", export_then_interrupt)
    capsys.readouterr()
    assert main([*args, "--overwrite"]) == status
    one_error_line(capsys, f"interrupted by {name}")
    assert check_complete_output(out) == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_sigterm_handler_is_restored(tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGTERM)
    assert main(["--quant_scheme", "bogus", "--output_dir", str(tmp_path / "o")]) == 2
    assert signal.getsignal(signal.SIGTERM) is before


def test_killed_at_random_moments_never_loses_the_output(tmp_path: Path, tiny_llama_dir: Path,
                                                         calib_text: Path) -> None:
    """quark-quantize --overwrite killed (SIGKILL, SIGTERM, SIGINT) at seeded random moments: the
    output folder always holds the previous or the new complete output, and the next run finds and
    removes what the killed one left."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "quark.torch.llm", *small(tiny_llama_dir, calib_text), "--output_dir", str(out),
               "--model_export", "hf_format", "--overwrite"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    umask = os.umask(0o022)
    os.umask(umask)
    start = time.monotonic()
    subprocess.run(command, cwd=tmp_path, env=env, check=True, capture_output=True, timeout=300)
    duration = time.monotonic() - start
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    summaries = {json.dumps(check_complete_output(out), sort_keys=True)}
    rng = random.Random(KILL_SEED)
    for sig in KILLS:
        moment = rng.uniform(0.2, 1.0) * duration
        proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
        try:
            proc.wait(timeout=moment)
        except subprocess.TimeoutExpired:
            proc.send_signal(sig)
        _, err = proc.communicate(timeout=300)
        if sig != signal.SIGKILL:
            assert "Traceback" not in err, err
            expected = {0, 128 + sig, -sig}  # -sig: killed before quark-quantize had started
            assert proc.returncode in expected, (sig, proc.returncode, err)
        summary = check_complete_output(out)
        summaries.add(json.dumps(summary, sort_keys=True))
        clean_leftovers(out)  # what the next run does first
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], (sig, moment)
    print(f"{len(KILLS)} kills at random moments, outputs lost: 0, {len(summaries) - 1} runs completed")
