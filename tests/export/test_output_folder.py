"""Output folders: never lost, never a folder the exporter did not write, leftovers of interrupted runs
cleaned by the next export; and a fault injected at every filesystem call of an export."""

from __future__ import annotations

import builtins
import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

from quark.torch import ModelExporter
from quark.torch.export import output_folder, safetensors_io
from quark.torch.export.config.config import ExporterConfig
from quark.torch.export.output_folder import AtomicFolder, clean_leftovers, find_leftovers, signals_deferred
from quark.torch.export.safetensors_io import read_checkpoint
from tests.export.helpers import frozen_model


def fingerprint(folder: Path) -> dict[str, str]:
    """Every file of ``folder`` (relative path) and the hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def export(model_and_config: tuple, dest: Path, overwrite: bool = True) -> Path:
    model, config = model_and_config
    return ModelExporter(ExporterConfig(), dest).export_safetensors_model(model, config, overwrite=overwrite)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    """Two different exports (int8, fp8) and the fingerprints of their complete folders."""
    root = tmp_path_factory.mktemp("outputs")
    result = {}
    for scheme in ("int8", "fp8"):
        frozen = frozen_model(scheme)
        folder = export(frozen, root / scheme)
        again = export(frozen, root / f"{scheme}-again")
        assert fingerprint(folder) == fingerprint(again), "an export must be byte-identical when repeated"
        result[scheme] = (frozen, fingerprint(folder), folder)
    return result


def sibling_names(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.parent.iterdir())


# ---------------------------------------------------------------------------------------------
# fault injection: every filesystem call of an export fails in turn
# ---------------------------------------------------------------------------------------------
class InjectedFault(OSError):
    """The failure raised at the chosen filesystem call."""


_WRITE_MODES = set("wax+")


def _writes(args: tuple, kwargs: dict) -> bool:
    mode = args[1] if len(args) > 1 else kwargs.get("mode", "r")
    return bool(_WRITE_MODES & set(str(mode)))


@contextmanager
def filesystem_faults(fail_at: int | None) -> Iterator[list[str]]:
    """Count the filesystem calls that change something; raise ``InjectedFault`` at call ``fail_at``."""
    calls: list[str] = []
    targets: list[tuple[object, str, Callable[[tuple, dict], bool] | None]] = [
        (os, "rename", None), (os, "replace", None), (os, "mkdir", None), (os, "unlink", None),
        (os, "rmdir", None), (shutil, "rmtree", None), (shutil, "copy2", None), (shutil, "copyfile", None),
        (output_folder, "exchange", None), (safetensors_io, "save_file", None),
        (Path, "write_text", None), (Path, "write_bytes", None), (builtins, "open", _writes),
    ]

    def wrap(owner: object, name: str, original: Callable, counts: Callable[[tuple, dict], bool] | None):
        def faulty(*args, **kwargs):
            if counts is None or counts(args, kwargs):
                calls.append(name)
                if len(calls) == fail_at:
                    raise InjectedFault(errno.EIO, f"injected fault at call {fail_at} ({name})")
            return original(*args, **kwargs)
        return faulty

    with pytest.MonkeyPatch.context() as mp:
        for owner, name, counts in targets:
            mp.setattr(owner, name, wrap(owner, name, getattr(owner, name), counts))
        yield calls


@pytest.mark.parametrize("swap", ["exchange", "rename_aside"])
def test_fault_at_every_filesystem_call(swap: str, outputs: dict, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Replace an int8 export by an fp8 one, failing the k-th filesystem call for every k: the
    destination always holds one of the two complete outputs, and the next export cleans up."""
    if swap == "rename_aside":
        monkeypatch.setattr(output_folder, "exchange", lambda a, b: False)
    elif not output_folder.exchange(*_two_folders(tmp_path)):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here")
    _old_model, old_print, old_folder = outputs["int8"]
    new_model, new_print, _ = outputs["fp8"]
    dest = tmp_path / "dest"

    def reset() -> None:
        for p in tmp_path.iterdir():
            shutil.rmtree(p)
        shutil.copytree(old_folder, dest)

    reset()
    with filesystem_faults(None) as calls:
        export(new_model, dest)
    assert fingerprint(dest) == new_print
    total = len(calls)
    assert total >= 6, calls  # folder, tensors, config, ..., swap, removal of the old output
    outcomes = {"old": 0, "new": 0}
    for k in range(1, total + 1):
        reset()
        with filesystem_faults(k) as calls, suppress(InjectedFault):
            export(new_model, dest)
        state = fingerprint(dest)
        assert state in (old_print, new_print), f"fault at call {k} ({calls[k - 1]}): {sorted(state)}"
        outcomes["new" if state == new_print else "old"] += 1
        read_checkpoint(dest)  # complete and readable
        # the next export into the same place removes whatever the failed one left
        export(new_model, dest)
        assert fingerprint(dest) == new_print
        assert sibling_names(dest) == ["dest"], f"fault at call {k} ({calls[k - 1]})"
    assert outcomes["old"] >= 1 and outcomes["new"] >= 1, outcomes
    print(f"{swap}: {total} fault points, outputs lost: 0, {outcomes}")


def _two_folders(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "probe-a", tmp_path / "probe-b"
    a.mkdir()
    b.mkdir()
    return a, b


# ---------------------------------------------------------------------------------------------
# leftovers of interrupted runs
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dead_pid() -> int:
    """The id of a process that has exited (and been waited for)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _leftover(dest: Path, tag: str, pid: int, content: str) -> Path:
    path = dest.parent / f".{dest.name}.{tag}-{pid}-0123abcd"
    path.mkdir()
    (path / "config.json").write_text(content)
    return path


def test_folder_moved_aside_is_restored_when_destination_is_missing(tmp_path: Path, dead_pid: int) -> None:
    # killed between "rename the old output aside" and "rename the new one in"
    dest = tmp_path / "out"
    _leftover(dest, "quark-old", dead_pid, "previous")
    _leftover(dest, "quark-tmp", dead_pid, "unfinished")
    actions = clean_leftovers(dest)
    assert (dest / "config.json").read_text() == "previous"
    assert sibling_names(dest) == ["out"]
    assert any("restored" in a for a in actions) and any("removed" in a for a in actions)


def test_leftovers_removed_by_the_next_export(tmp_path: Path, dead_pid: int, outputs: dict) -> None:
    frozen, new_print, _ = outputs["fp8"]
    dest = tmp_path / "out"
    export(frozen, dest)
    _leftover(dest, "quark-old", dead_pid, "old output, after the new one was renamed in")
    _leftover(dest, "quark-tmp", dead_pid, "partial")
    nested = tmp_path / f"..out.quark-tmp-{dead_pid}-00ff.quark-tmp-{dead_pid}-11ee"  # quark-quantize's hf_format
    nested.mkdir()
    legacy = tmp_path / f".out.quark-tmp-{dead_pid}"  # quark-quantize before this naming
    legacy.mkdir()
    assert len(find_leftovers(dest)) == 4
    export(frozen, dest)
    assert sibling_names(dest) == ["out"]
    assert fingerprint(dest) == new_print


def test_leftovers_of_similar_names_are_not_taken(tmp_path: Path, dead_pid: int) -> None:
    hidden = tmp_path / ".out"  # its aside copy must never be restored as "out"
    aside = _leftover(hidden, "quark-old", dead_pid, "the hidden folder's output")
    other = _leftover(tmp_path / "out2", "quark-tmp", dead_pid, "another destination")
    legacy = tmp_path / ".out.tmp-ab12cd34"  # an AtomicFolder before process ids were in the name
    legacy.mkdir()
    actions = clean_leftovers(tmp_path / "out")
    assert not (tmp_path / "out").exists() and aside.is_dir() and other.is_dir() and legacy.is_dir()
    assert actions == [f"found {legacy}, probably left by an interrupted export of an earlier quark-torch version; "
                       "remove it by hand when no export into the same place is running"]


def test_leftovers_of_a_running_process_are_kept(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        busy = _leftover(dest, "quark-tmp", proc.pid, "being written")
        actions = clean_leftovers(dest)
        assert busy.is_dir() and any(f"process {proc.pid}" in a and "still runs" in a for a in actions)
    finally:
        proc.kill()
        proc.wait()
    clean_leftovers(dest)
    assert not busy.exists()


def test_own_finished_temporaries_are_stale(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    with AtomicFolder(dest) as folder:
        running = folder.path
        assert clean_leftovers(dest) == [] and running.is_dir()  # an export under way in this process
        stale = _leftover(dest, "quark-tmp", os.getpid(), "failed earlier in this process")
        clean_leftovers(dest)
        assert running.is_dir() and not stale.exists()
    assert sibling_names(dest) == ["out"]


# ---------------------------------------------------------------------------------------------
# what may be replaced
# ---------------------------------------------------------------------------------------------
def test_overwrite_replaces_only_a_previous_export(tmp_path: Path, outputs: dict) -> None:
    frozen, new_print, _ = outputs["fp8"]
    dest = tmp_path / "mine"
    dest.mkdir()
    (dest / "notes.txt").write_text("not an export")
    (dest / "config.json").write_text(json.dumps({"model_type": "llama"}))  # a float model folder
    with pytest.raises(ValueError, match=r"export_dir=.*does not hold a previous quark-torch output.*quantization"):
        export(frozen, dest, overwrite=True)
    assert sorted(p.name for p in dest.iterdir()) == ["config.json", "notes.txt"]
    assert sibling_names(dest) == ["mine"]
    empty = tmp_path / "empty"
    empty.mkdir()
    export(frozen, empty, overwrite=False)  # an empty folder needs no overwrite
    assert fingerprint(empty) == new_print


@pytest.mark.parametrize("where", ["cwd", "parent_of_cwd", "root", "protected"])
def test_destinations_that_contain_inputs_are_refused(where: str, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "precious.txt").write_text("keep")
    monkeypatch.chdir(work)
    dest, protected = {"cwd": (".", None), "parent_of_cwd": ("..", None), "root": ("/", None),
                       "protected": (str(tmp_path), {"the model folder": work / "model"})}[where]
    with pytest.raises(ValueError, match=r"export_dir=.*(current directory|filesystem root|the model folder)"):
        AtomicFolder(dest, overwrite=True, protected=protected)
    assert (work / "precious.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]


def test_output_folder_follows_the_umask(tmp_path: Path, outputs: dict) -> None:
    frozen, _, _ = outputs["int8"]
    previous = os.umask(0o027)
    try:
        folder = export(frozen, tmp_path / "out")
    finally:
        os.umask(previous)
    assert folder.stat().st_mode & 0o777 == 0o750


# ---------------------------------------------------------------------------------------------
# publishing
# ---------------------------------------------------------------------------------------------
def test_failed_second_rename_puts_the_old_folder_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "config.json").write_text(json.dumps({"quantization_config": {}}))
    monkeypatch.setattr(output_folder, "exchange", lambda a, b: False)
    folder = AtomicFolder(dest, overwrite=True)
    (folder.path / "config.json").write_text(json.dumps({"quantization_config": {"new": 1}}))
    real_rename = os.rename

    def rename(src, dst):
        if Path(src) == folder.path:
            raise OSError(errno.EIO, "injected")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="injected"):
        folder.publish()
    folder.discard()
    assert json.loads((dest / "config.json").read_text()) == {"quantization_config": {}}
    assert sibling_names(dest) == ["out"]


def test_signals_wait_for_the_end_of_publishing() -> None:
    # Python's own SIGINT handler for the test (a library imported by earlier tests may have put another)
    outside = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        reached_end = False
        with pytest.raises(KeyboardInterrupt), signals_deferred():
            # raised in this thread (os.kill lets the kernel pick any thread of the process)
            signal.raise_signal(signal.SIGINT)
            reached_end = True
        assert reached_end
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, outside)
