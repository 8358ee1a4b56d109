"""Property-based tests (hypothesis) of the loaders on hostile files (issue 15).

(a) the config loader: ``config.json`` / ``quantization_config`` mutated anywhere, raw bytes, the
fp8/awq custom configs and ``condition`` strings; (b) the checkpoint importer: mutated safetensors
headers and bytes, index files, ``config.json``, poisoned tensors (NaN/Inf/overflow/zero) and path
tricks (``..``, absolute paths, links out of the folder). Every case must end in success or a
``ValueError`` (subclass) whose message names the file, field or tensor; never another exception,
never a read outside the model folder, never code run from a file (``eval``/``exec``/unpickling).

The default run checks 1000 cases per property; ``-m slow`` runs the 10x variants.
"""

from __future__ import annotations

import builtins
import contextlib
import copy
import io
import json
import os
import pickle
import shutil
import struct
import sys
import traceback
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from accelerate import init_empty_weights
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import quark.torch.export.safetensors_io as safetensors_io
from quark.torch import ModelExporter, ModelImporter
from quark.torch.algorithm.utils.condition import evaluate_condition
from quark.torch.export.config.config import ExporterConfig
from quark.torch.export.hf_format.reader import parse_config, read_quantization_config
from quark.torch.export.main_export.quant_config_parser import QuantConfigParser
from tests.export.helpers import frozen_model
from tests.helpers.tiny_models import tiny_model

_COMMON = {"deadline": None, "database": None, "derandomize": True,
           "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much]}
DEFAULT = settings(max_examples=1000, **_COMMON)
SLOW = settings(max_examples=10000, **_COMMON)

REPO = Path(__file__).resolve().parents[2]
CANARY = "quark_fuzz_canary"
PAYLOADS = [f"__import__('pathlib').Path('{CANARY}').touch()", "exec('1')", "eval('1')", "lambda: 0",
            "os.system('true')", "cos\nsystem\n(S'true'\ntR."]
PATH_TRICKS = ["../outside/secret.safetensors", "SECRET", "sub/../../outside/secret.safetensors", "link-out",
               "loop", "sub", "", ".", "..", "/", "model.safetensors\x00", "x" * 300, "x" * 5000,
               "model.safetensors", "sub/../model-00001-of-00003.safetensors", "~/x", "\\..\\x"]
SPECIAL_VALUES = [0, -1, 1, 2**31, 2**62, 2**63, 2**64, -(2**63), 10**400, -(10**400), 0.5, 1e308, 1e-320,
                  float("nan"), float("inf"), -float("inf"), "", "int8", "uint4", "fp8_e4m3", "per_group",
                  "per_channel", "per_tensor", "quarot", "reorder", "real_quantized", "quark", "fp8", "awq",
                  "0.1", "9.9", True, False, None, [], {}, *PATH_TRICKS[:3], *PAYLOADS]

json_scalars = (st.none() | st.booleans() | st.integers() | st.integers(-(10**450), 10**450)
                | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
                | st.sampled_from(SPECIAL_VALUES))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8) | st.sampled_from(["dtype", "weight", "scale"]),
                                             inner, max_size=4), max_leaves=8)


# -- guards: reads outside the folder and code run from files are counted ------------------------------------------
class Tally:
    """Cases, outcomes and forbidden events of one property (printed for the README figures)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.cases = 0
        self.ok = 0
        self.refused = 0
        self.outside_reads: list[str] = []
        self.code_runs: list[str] = []

    def report(self) -> None:
        print(f"\n[fuzz] {self.name}: {self.cases} cases, {self.ok} loaded, {self.refused} refused with a named "
              f"ValueError, {len(self.outside_reads)} files read outside the folder, {len(self.code_runs)} "
              "code executions")


def _library_path(path: Path) -> bool:
    roots = {Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve(), REPO}
    return any(path.is_relative_to(r) and not path.is_relative_to(REPO / "tmp") for r in roots)


def _library_code(filename: str) -> bool:
    return filename.startswith("<frozen ") or _library_path(Path(filename).resolve())


@contextlib.contextmanager
def guarded(tally: Tally, folder: Path) -> Iterator[None]:
    """Record every file opened outside ``folder`` and every eval/exec/unpickling while inside."""
    real_open, real_safe_open = builtins.open, safetensors_io.safe_open
    root = folder.resolve()

    def note(file: Any) -> None:
        if isinstance(file, (str, os.PathLike)):
            resolved = Path(os.fspath(file)).resolve()
            if not resolved.is_relative_to(root) and not _library_path(resolved):
                tally.outside_reads.append(str(resolved))

    def checked_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        note(file)
        return real_open(file, *args, **kwargs)

    def checked_safe_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        note(file)
        return real_safe_open(file, *args, **kwargs)

    def forbidden(what: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            if args and isinstance(args[0], types.CodeType) and _library_code(args[0].co_filename):
                return real(*args, **kwargs)  # the import system running a library module's code (lazy imports)
            caller = traceback.extract_stack(limit=2)[0]
            tally.code_runs.append(f"{what} from {caller.filename}:{caller.lineno} ({str(args)[:80]})")
            raise AssertionError(f"{what} called while loading a checkpoint")
        return run

    patches = [(builtins, "open", checked_open), (io, "open", checked_open),
               (safetensors_io, "safe_open", checked_safe_open), (builtins, "eval", forbidden("eval", builtins.eval)),
               (builtins, "exec", forbidden("exec", builtins.exec)),
               (pickle, "loads", forbidden("pickle.loads", pickle.loads)),
               (pickle, "load", forbidden("pickle.load", pickle.load)),
               (torch, "load", forbidden("torch.load", torch.load))]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    for obj, name, value in patches:
        setattr(obj, name, value)
    try:
        yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)


def outcome(tally: Tally, folder: Path, call: Callable[[], Any], names: tuple[str, ...]) -> bool:
    """Run ``call`` guarded; True when it succeeded. A failure must be a ValueError naming one of
    ``names`` (the file, field or tensor)."""
    tally.cases += 1
    try:
        with guarded(tally, folder):
            call()
    except ValueError as e:
        tally.refused += 1
        message = str(e)
        assert any(n in message for n in names), f"error names none of {names}: {message[:300]}"
        assert "SECRET-CONTENT" not in message
        assert len(message) < 20000
        return False
    finally:
        assert not tally.outside_reads, f"read outside the folder: {tally.outside_reads[:3]}"
        assert not tally.code_runs, f"code executed: {tally.code_runs[:3]}"
        assert not Path(CANARY).exists()
    tally.ok += 1
    return True


def mutate_json(data: st.DataObject, obj: Any) -> Any:
    """``obj`` with one place (chosen by walking down) replaced, deleted or given an extra key."""
    if isinstance(obj, (dict, list)) and obj and data.draw(st.integers(0, 3)) > 0:
        key = data.draw(st.sampled_from(sorted(obj) if isinstance(obj, dict) else range(len(obj))))
        new = copy.copy(obj)
        new[key] = mutate_json(data, obj[key])
        if data.draw(st.integers(0, 9)) == 0:  # sometimes drop the key instead
            del new[key]
        return new
    if isinstance(obj, dict) and data.draw(st.booleans()):
        return {**obj, data.draw(st.text(max_size=10)): data.draw(json_values)}
    return data.draw(json_values)


def raw_json_text(data: st.DataObject) -> bytes:
    """JSON-ish bytes no json.dumps writes: deep nesting, huge integers, bad UTF-8, truncations."""
    kind = data.draw(st.sampled_from(["nest", "digits", "bytes", "truncated"]))
    if kind == "nest":
        depth = data.draw(st.integers(1, 200000))
        return ('{"a": ' + "[" * depth + "]" * depth + "}").encode()
    if kind == "digits":
        return ('{"quantization_config": {"version": ' + "9" * data.draw(st.integers(1, 6000)) + "}}").encode()
    if kind == "bytes":
        return data.draw(st.binary(max_size=64))
    return b'{"quantization_config": {"quant_method": "quark", "version": "0.1'[:data.draw(st.integers(0, 60))]


# -- shared folders, built once per module -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fuzz_base(tmp_path_factory) -> dict[str, Any]:
    model, config = frozen_model("int8")
    root = tmp_path_factory.mktemp("fuzz")
    single, sharded = root / "single", root / "sharded"
    ModelExporter(ExporterConfig(), single).export_safetensors_model(model, config)
    ModelExporter(ExporterConfig(), sharded).export_safetensors_model(model, config, max_shard_size="40KB")
    outside = root / "outside"
    outside.mkdir()
    secret = outside / "secret.safetensors"
    secret.write_bytes(struct.pack("<Q", 64) + b"SECRET-CONTENT " * 5)
    hf = json.loads((single / "config.json").read_text())
    data = {k: v for k, v in hf.items() if k != "quantization_config"}
    with init_empty_weights(include_buffers=False):
        meta = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**data))
    skeleton = ModelImporter(single).import_model_info(copy.deepcopy(meta))
    return {"root": root, "single": single, "sharded": sharded, "secret": secret, "config": hf,
            "tensors": load_file(str(single / "model.safetensors")),
            "safetensors": (single / "model.safetensors").read_bytes(),
            "index": json.loads((sharded / "model.safetensors.index.json").read_text()),
            "meta": meta, "skeleton": skeleton}


def _fresh(base: dict[str, Any], name: str, kind: str = "single") -> Path:
    folder = base["root"] / name
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(base[kind], folder, symlinks=True)
    return folder


def _header(blob: bytes) -> tuple[dict[str, Any], bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def _with_header(header: Any, rest: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + rest


# -- (a) the config loader -----------------------------------------------------------------------------------------
def _config_loader_case(base: dict[str, Any], tally: Tally, data: st.DataObject) -> None:
    folder = base["root"] / "config_case"
    folder.mkdir(exist_ok=True)
    path = folder / "config.json"
    kind = data.draw(st.sampled_from(["mutate", "mutate", "mutate", "raw", "custom"]))
    if kind == "custom":
        method = data.draw(st.sampled_from(["fp8", "awq"]))
        custom = mutate_json(data, {"quant_method": method, "activation_scheme": "static", "ignored_layers":
                                    ["lm_head"], "kv_cache_scheme": None, "bits": 4, "group_size": 32,
                                    "zero_point": True, "modules_to_not_convert": ["lm_head"],
                                    "weight_block_size": None})
        outcome(tally, folder, lambda: QuantConfigParser.from_custom_config(custom),
                ("quantization_config", "from_custom_config"))
        return
    if kind == "raw":
        path.write_bytes(raw_json_text(data))
    else:
        cfg = mutate_json(data, base["config"]) if data.draw(st.booleans()) else {
            **base["config"], "quantization_config": mutate_json(data, base["config"]["quantization_config"])}
        path.write_text(json.dumps(cfg))

    def load() -> None:
        qc = read_quantization_config(folder)
        if qc["quant_method"] == "quark":
            parse_config(path, qc)
        else:
            QuantConfigParser.from_custom_config(qc)

    outcome(tally, folder, load, ("config.json", "quantization_config"))


def _condition_case(layer: torch.nn.Module, tally: Tally, data: st.DataObject) -> None:
    atoms = ["module", ".self_attn", ".mlp", ".q_proj", ".v_proj", ".o_proj", ".up_proj", ".weight", ".shape",
             ".__class__", "[0]", "[-1]", "[99]", f"[{10**400}]", " == ", " != ", " < ", " >= ", " and ", " or ",
             "not ", "(", ")", "64", "-1", "1.5", "'x'", " + ", "[", "]", ",", "lambda x: x", *PAYLOADS]
    text = "".join(data.draw(st.lists(st.sampled_from(atoms), max_size=12)))
    if data.draw(st.integers(0, 9)) == 0:
        text = data.draw(st.sampled_from(["not " * 20000 + "1", "(" * 300 + "1" + ")" * 300, "1\x00", "x" * 2000,
                                          "[" * 100 + "]" * 100]))
    value: Any = data.draw(st.just(text) | json_values) if data.draw(st.integers(0, 9)) == 0 else text
    outcome(tally, Path.cwd(), lambda: evaluate_condition(value, layer), ("condition",))


# -- (b) the checkpoint importer -----------------------------------------------------------------------------------
POISON = ["nan", "inf", "-inf", "huge", "zero", "negative", "shape", "dtype", "int_wrap", "complex"]


def _poisoned(tensor: torch.Tensor, poison: str) -> torch.Tensor:
    t = tensor.clone()
    if poison in ("nan", "inf", "-inf"):
        t = t.float() if not t.is_floating_point() else t
        t.view(-1)[0] = float(poison)
    elif poison == "huge":
        t = torch.full(t.shape, 1e300, dtype=torch.float64)
    elif poison == "zero":
        t = torch.zeros_like(t)
    elif poison == "negative":
        t = -t.float() - 1
    elif poison == "shape":
        t = torch.ones(t.numel() + 1, dtype=t.dtype)
    elif poison == "complex":
        t = t.float().to(torch.complex64)
    elif poison == "dtype":
        t = t.to(torch.float16) if t.dtype != torch.float16 else t.to(torch.int64)
    else:
        t = t.to(torch.int64) + 2**40
    return t


def _importer_case(base: dict[str, Any], tally: Tally, data: st.DataObject) -> None:
    kind = data.draw(st.sampled_from(["header", "bytes", "index", "path", "config", "tensor", "tensor"]))
    folder = _fresh(base, "import_case", "sharded" if kind in ("index", "path") else "single")
    st_path = folder / "model.safetensors"
    names: tuple[str, ...] = (str(folder),)
    must_fail = False
    if kind == "header":
        header, rest = _header(base["safetensors"])
        if data.draw(st.booleans()):
            name = data.draw(st.sampled_from(sorted(header)))
            header[name] = mutate_json(data, header[name])
        else:
            header = mutate_json(data, header)
        st_path.write_bytes(_with_header(header, rest))
    elif kind == "bytes":
        blob = bytearray(base["safetensors"])
        for _ in range(data.draw(st.integers(1, 8))):
            blob[data.draw(st.integers(0, min(len(blob), 4096) - 1))] = data.draw(st.integers(0, 255))
        if data.draw(st.booleans()):
            blob = blob[:data.draw(st.integers(0, len(blob)))]
        st_path.write_bytes(bytes(blob))
    elif kind == "index":
        index_path = folder / "model.safetensors.index.json"
        if data.draw(st.integers(0, 4)) == 0:
            index_path.write_bytes(raw_json_text(data))
        else:
            index_path.write_text(json.dumps(mutate_json(data, base["index"])))
    elif kind == "path":
        (folder / "sub").mkdir()
        os.symlink(base["secret"], folder / "link-out")
        os.symlink(folder / "loop", folder / "loop")
        trick = data.draw(st.sampled_from(PATH_TRICKS))
        trick = str(base["secret"]) if trick == "SECRET" else trick
        target = data.draw(st.sampled_from(["index", "config.json", "shard"]))
        if target == "index":
            index = copy.deepcopy(base["index"])
            key = data.draw(st.sampled_from(sorted(index["weight_map"])))
            index["weight_map"][key] = trick
            (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        else:
            victim = folder / ("config.json" if target == "config.json" else sorted(folder.glob("model-*"))[0].name)
            victim.unlink()
            os.symlink(base["secret"] if data.draw(st.booleans()) else folder / "loop", victim)
            must_fail = True
    elif kind == "config":
        path = folder / "config.json"
        if data.draw(st.integers(0, 4)) == 0:
            path.write_bytes(raw_json_text(data))
        else:
            path.write_text(json.dumps(mutate_json(data, base["config"])))
    else:
        tensors = dict(base["tensors"])
        name = data.draw(st.sampled_from(sorted(tensors)))
        poison = data.draw(st.sampled_from(POISON))
        tensors[name] = _poisoned(tensors[name], poison)
        save_file(tensors, str(st_path), metadata={"format": "pt"})
        names = (name, str(folder))
        must_fail = poison in ("nan", "inf", "-inf", "huge", "complex")
    fresh_model = kind in ("config", "path") and data.draw(st.booleans())
    model = copy.deepcopy(base["meta"]) if fresh_model else base["skeleton"]
    loaded = outcome(tally, folder, lambda: ModelImporter(folder).import_model_info(model), names)
    assert not (loaded and must_fail), f"{kind} case loaded but must be refused"


# -- the properties: each built once per test, its folders mutated per case ---------------------------------------
def _run(case: Callable[..., None], tally: Tally, *args: Any) -> Callable[[st.DataObject], None]:
    def one(data: st.DataObject) -> None:
        case(*args, tally, data)
    return one


def _check(tally: Tally, examples: int) -> None:
    tally.report()
    assert tally.cases >= examples * 0.9  # hypothesis may stop a little early on exhausted strategies


@pytest.mark.parametrize("examples", [pytest.param(1000, id="default"),
                                      pytest.param(10000, id="slow", marks=pytest.mark.slow)])
def test_config_loader_ends_in_config_or_named_value_error(fuzz_base, examples):
    tally = Tally("config loader (config.json / quantization_config / fp8+awq configs)")
    run = _run(_config_loader_case, tally, fuzz_base)
    given(st.data())(settings(DEFAULT if examples == 1000 else SLOW)(run))()
    _check(tally, examples)


@pytest.mark.parametrize("examples", [pytest.param(1000, id="default"),
                                      pytest.param(10000, id="slow", marks=pytest.mark.slow)])
def test_condition_strings_end_in_bool_or_named_value_error(examples):
    tally = Tally("condition evaluator")
    run = _run(_condition_case, tally, tiny_model("llama").model.layers[0])
    given(st.data())(settings(DEFAULT if examples == 1000 else SLOW)(run))()
    _check(tally, examples)


@pytest.mark.parametrize("examples", [pytest.param(1000, id="default"),
                                      pytest.param(10000, id="slow", marks=pytest.mark.slow)])
def test_checkpoint_importer_ends_in_model_or_named_value_error(fuzz_base, examples):
    tally = Tally("checkpoint importer (headers, bytes, index, paths, config.json, tensors)")
    run = _run(_importer_case, tally, fuzz_base)
    given(st.data())(settings(DEFAULT if examples == 1000 else SLOW)(run))()
    _check(tally, examples)
