"""Output folders that are never lost: written beside the destination, swapped in, old one removed.

:class:`AtomicFolder` is how every export reaches its destination (``ModelExporter`` and
``quark-quantize``):

* the new output is written into a temporary folder ``.{name}.quark-tmp-{pid}-{random}`` beside
  the destination (same filesystem), created with the user's umask;
* :meth:`AtomicFolder.publish` swaps it with the destination in one ``renameat2(RENAME_EXCHANGE)``
  call where Linux and the filesystem allow it, so at every instant the destination holds the old
  or the new complete output. Elsewhere the old folder is first renamed aside to
  ``.{name}.quark-old-{pid}-{random}``, the new one renamed in, and the old one removed; a failed
  second rename puts the old folder back;
* the next export into the same place finds what an interrupted run left (see
  :func:`clean_leftovers`): a folder moved aside while the destination is missing is renamed back,
  other temporaries of processes that no longer run are removed, those of running processes are
  left alone and reported.

Only a folder that is empty or holds a previous output (``marker``) is ever replaced, and never
one that is, or contains, the current directory, a filesystem root or a ``protected`` input.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import re
import secrets
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

TMP_TAG = "quark-tmp"
OLD_TAG = "quark-old"
Marker = Callable[[Path], "str | None"]
# temporary folders of exports still under way in this process (the others of this process are stale)
_ACTIVE: set[Path] = set()
_ACTIVE_LOCK = threading.Lock()


def quark_export_marker(folder: Path) -> str | None:
    """What shows that ``folder`` holds an earlier ``ModelExporter`` output, or ``None``.

    The marker of each export format: ``config.json`` with a ``quantization_config`` (hf_format, every
    ``custom_mode``), ``quark_model.onnx`` (ONNX) or a ``*.gguf`` file (GGUF).
    """
    config = folder / "config.json"
    if config.is_file():
        try:
            data = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            data = None
        if isinstance(data, dict) and isinstance(data.get("quantization_config"), dict):
            return "config.json with a quantization_config"
    if (folder / "quark_model.onnx").is_file():
        return "quark_model.onnx"
    gguf = sorted(folder.glob("*.gguf"))
    return gguf[0].name if gguf else None


# ---------------------------------------------------------------------------------------------
# where an output may go
# ---------------------------------------------------------------------------------------------
def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_destination(dest: str | Path, what: str = "export_dir",
                      protected: Mapping[str, str | Path] | None = None) -> Path:
    """``dest`` resolved, or ``ValueError`` when replacing it could delete something that is not an output.

    Refused: a filesystem root, the current directory or one of its parents, and any folder that is
    or contains a ``protected`` path (``{description: path}``, e.g. the model folder).
    """
    resolved = Path(dest).expanduser().resolve()
    if resolved.parent == resolved:
        raise ValueError(f"{what}={str(dest)!r} is a filesystem root; choose a new folder for the output")
    cwd = Path.cwd().resolve()
    if _is_within(cwd, resolved):
        raise ValueError(f"{what}={str(dest)!r} is or contains the current directory ({cwd}); choose a new "
                         "folder for the output")
    for description, path in (protected or {}).items():
        target = Path(path).expanduser().resolve()
        if _is_within(target, resolved):
            raise ValueError(f"{what}={str(dest)!r} is or contains {description} ({target}); choose a new "
                             "folder for the output")
    return resolved


def check_replaceable(dest: Path, overwrite: bool, what: str = "export_dir",
                      marker: Marker = quark_export_marker, marker_name: str | None = None) -> None:
    """``ValueError`` unless ``dest`` is absent, an empty folder, or (``overwrite``) a previous output."""
    if not dest.exists() and not dest.is_symlink():
        return
    if not dest.is_dir():
        raise ValueError(f"{what}={str(dest)!r} exists and is not a folder")
    if not any(dest.iterdir()):
        return
    flag = "--overwrite" if what.startswith("--") else "overwrite=True"
    if not overwrite:
        raise ValueError(f"{what}={str(dest)!r} exists and is not empty; pass {flag} to replace a previous "
                         "output, or choose another folder")
    if marker(dest) is None:
        expected = marker_name or "config.json with a quantization_config, quark_model.onnx or a *.gguf file"
        raise ValueError(f"{what}={str(dest)!r} is not empty and does not hold a previous quark-torch output "
                         f"(recognised by {expected}); {flag} replaces only such folders: choose another folder")


# ---------------------------------------------------------------------------------------------
# what interrupted runs left
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Leftover:
    """A temporary folder of an export into ``dest``: ``tag`` is ``quark-tmp`` or ``quark-old``."""

    path: Path
    tag: str
    pid: int


def _leftover_patterns(name: str) -> tuple[re.Pattern[str], re.Pattern[str]]:
    """The temporaries of exports into ``name``, and those of an export into one of its staging
    folders (quark-quantize stages its output, then ``ModelExporter`` stages hf_format beside that)."""
    n = re.escape(name)
    own = re.compile(rf"^\.{n}\.(?P<tag>{TMP_TAG}|{OLD_TAG})-(?P<pid>\d+)(?:-[0-9a-f]+)?$")
    nested = re.compile(rf"^\.\.{n}\.{TMP_TAG}-(?P<pid>\d+)-[0-9a-f]+\.(?:{TMP_TAG}|{OLD_TAG})-\d+-[0-9a-f]+$")
    return own, nested


# AtomicFolder before quark-torch 0.13's naming: no process id, so never removed automatically
_LEGACY = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-[a-z0-9_]{8}$")


def find_leftovers(dest: Path) -> list[Leftover]:
    """Temporary folders beside ``dest`` made by exports into it (this process's included)."""
    if not dest.parent.is_dir():
        return []
    own, nested = _leftover_patterns(dest.name)
    found = []
    for entry in dest.parent.iterdir():
        if not entry.is_dir() or entry.is_symlink():
            continue
        match = own.match(entry.name)
        if match:
            found.append(Leftover(entry, match["tag"], int(match["pid"])))
        elif match := nested.match(entry.name):
            found.append(Leftover(entry, TMP_TAG, int(match["pid"])))
    return sorted(found, key=lambda item: item.path.name)


def _legacy_leftovers(dest: Path) -> list[Path]:
    if not dest.parent.is_dir():
        return []
    return sorted(p for p in dest.parent.iterdir()
                  if p.is_dir() and (m := _LEGACY.match(p.name)) is not None and m["name"] == dest.name)


def process_running(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (conservative: ``True`` when it cannot be told)."""
    if pid == os.getpid() or os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    try:  # a killed child its parent has not waited for yet is a zombie: it writes nothing more
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def _in_use(item: Leftover) -> bool:
    if item.pid == os.getpid():
        with _ACTIVE_LOCK:
            return any(item.path == active or item.path.name.startswith(f".{active.name}.") for active in _ACTIVE)
    return process_running(item.pid)


def clean_leftovers(dest: str | Path) -> list[str]:
    """Finish what interrupted exports into ``dest`` left; return one line per action.

    When ``dest`` is missing, the newest folder moved aside by an export no longer running
    (``quark-old``) is renamed back: it is the complete previous output. Every other temporary
    folder of an export no longer running is removed; those of other running processes are
    reported and kept.
    """
    dest = Path(dest)
    done: list[str] = []
    dead: list[Leftover] = []
    for item in find_leftovers(dest):
        if not _in_use(item):
            dead.append(item)
        elif item.pid != os.getpid():
            done.append(f"kept {item.path.name}: process {item.pid}, which is exporting there, still runs")
    if not dest.exists() and not dest.is_symlink():
        aside = [item for item in dead if item.tag == OLD_TAG]
        if aside:
            newest = max(aside, key=lambda item: item.path.stat().st_mtime_ns)
            os.rename(newest.path, dest)
            dead.remove(newest)
            done.append(f"restored the previous output {dest} from {newest.path.name} (an export was "
                        f"interrupted while replacing it)")
    for item in dead:
        shutil.rmtree(item.path)
        done.append(f"removed {item.path.name}, left by an interrupted export (process {item.pid})")
    for path in _legacy_leftovers(dest):
        done.append(f"found {path}, probably left by an interrupted export of an earlier quark-torch version; "
                    "remove it by hand when no export into the same place is running")
    for line in done:
        logger.warning("%s", line)
    return done


# ---------------------------------------------------------------------------------------------
# publishing
# ---------------------------------------------------------------------------------------------
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_NO_EXCHANGE = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV}


def _renameat2() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # libc without renameat2 (glibc < 2.28, some musl)
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _renameat2()


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); ``False`` where unsupported."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _NO_EXCHANGE:
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


@contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGINT/SIGTERM received inside the block take effect at its end (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def record(signum: int, frame: object) -> None:
        received.append(signum)

    previous = {sig: signal.signal(sig, record) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        for sig in dict.fromkeys(received):
            signal.raise_signal(sig)


def _new_temp_folder(dest: Path, tag: str) -> Path:
    while True:
        path = _temp_path(dest, tag)
        try:
            os.mkdir(path)  # mode 0o777 minus the umask, like any folder the user creates
        except FileExistsError:
            _release(path)
            continue
        except BaseException:
            _release(path)
            raise
        return path


def _temp_path(dest: Path, tag: str) -> Path:
    path = dest.parent / f".{dest.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}"
    with _ACTIVE_LOCK:
        _ACTIVE.add(path)
    return path


def _release(path: Path) -> None:
    with _ACTIVE_LOCK:
        _ACTIVE.discard(path)


class AtomicFolder:
    """A temporary folder beside ``dest`` that :meth:`publish` puts in its place.

    An existing non-empty ``dest`` is replaced only with ``overwrite=True`` and only when ``marker``
    recognises a previous output in it; see the module docstring for what happens when an export is
    interrupted. As a context manager it publishes on success and removes the temporary folder on any
    exception (``KeyboardInterrupt`` included).

    :param what: the name of the destination in error messages (``"export_dir"``, ``"--output_dir"``).
    :param protected: inputs the destination must not be or contain, ``{description: path}``.
    """

    def __init__(self, dest: str | Path, overwrite: bool = False, *, what: str = "export_dir",
                 marker: Marker = quark_export_marker, marker_name: str | None = None,
                 protected: Mapping[str, str | Path] | None = None) -> None:
        self.dest = check_destination(dest, what, protected)
        clean_leftovers(self.dest)
        check_replaceable(self.dest, overwrite, what, marker, marker_name)
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        self.path = _new_temp_folder(self.dest, TMP_TAG)
        self.published = False

    def publish(self) -> Path:
        """Put the temporary folder in ``dest``'s place; the previous output, if any, is removed."""
        if self.published:
            return self.dest
        with signals_deferred():
            old = self._swap_in()
            self.published = True
            _release(self.path)
            if old is not None:
                try:
                    shutil.rmtree(old)
                except OSError as exc:
                    logger.warning("could not remove the previous output moved to %s (%s); the next export "
                                   "into %s removes it", old, exc, self.dest)
                finally:
                    _release(old)
        return self.dest

    def _swap_in(self) -> Path | None:
        """Rename the new folder onto ``dest``; return where the previous ``dest`` now is."""
        if not self.dest.exists() and not self.dest.is_symlink():
            os.rename(self.path, self.dest)
            return None
        if exchange(self.path, self.dest):
            return self.path
        aside = _temp_path(self.dest, OLD_TAG)
        try:
            os.rename(self.dest, aside)
        except BaseException:
            _release(aside)
            raise
        try:
            os.rename(self.path, self.dest)
        except BaseException:
            try:
                os.rename(aside, self.dest)
            finally:
                _release(aside)
            raise
        return aside

    def discard(self) -> None:
        """Remove the temporary folder (nothing is published)."""
        if self.published:
            return
        try:
            shutil.rmtree(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.warning("could not remove the temporary folder %s (%s); the next export into %s removes it",
                           self.path, exc, self.dest)
        finally:
            _release(self.path)

    def __enter__(self) -> AtomicFolder:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.discard()
            return
        try:
            self.publish()
        except BaseException:
            self.discard()
            raise


__all__ = [
    "OLD_TAG",
    "TMP_TAG",
    "AtomicFolder",
    "Leftover",
    "check_destination",
    "check_replaceable",
    "clean_leftovers",
    "exchange",
    "find_leftovers",
    "process_running",
    "quark_export_marker",
    "signals_deferred",
]
