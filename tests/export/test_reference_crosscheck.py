"""Cross-check our hf_format checkpoints against the reference implementation (amd-quark 0.13).

Both packages are imported as ``quark``, so the reference runs in a separate interpreter named by
the environment variable ``QUARK_REFERENCE_PYTHON`` (a venv with amd-quark 0.13, torch 2.13 CPU
and transformers 5.23, *without* this package). Unset, every test here is skipped. Setup used:

    python3 -m venv /tmp/refenv          # no system site packages
    /tmp/refenv/bin/pip install torch==2.13.0   # the CPU wheel; install it first
    /tmp/refenv/bin/pip install transformers==5.23.0 safetensors accelerate numpy \\
        scipy "onnx>=1.21,<=1.22.0" onnxslim zstandard sentencepiece
    /tmp/refenv/bin/pip install --no-deps amd_quark-0.13-py3-none-any.whl
    QUARK_REFERENCE_PYTHON=/tmp/refenv/bin/python python3 -m pytest -m reference \\
        tests/export/test_reference_crosscheck.py

Both sides start from the same float folder (a tiny random Llama saved once with ``save_pretrained``;
hidden 256 so that group 128 divides every Linear) and share the calibration batches and the input
ids through a safetensors file. Two directions per scheme:

(a) the reference quantizes and exports; we import its folder and compare our logits with the ones
    it computed (in memory, and after re-importing its own folder);
(b) we quantize and export; the reference imports our folder with its own importer and we compare
    its logits with ours.

Tolerance: the checkpoints carry the same integers/fp8 codes and scales, and both importers
dequantize them with the same float32 arithmetic, so logits must agree to float noise only
(``ATOL``, a few ulps of logits of magnitude ~1, covering a different matmul/accumulation order).
The single expected deviation: the reference's export overwrites the k_proj and v_proj KV-cache
output scales with max(k, v), so in (a) the fp8-KV checkpoint no longer reproduces the reference's
in-memory logits; there we compare with the reference's own re-import of that same folder.

(c) Fake quantization: for every template scheme (``TEMPLATE_SCHEMES``, which must be our whole
    scheme registry) both sides quantize the float model with the same calibration batches and
    compute logits in fake-quant mode, which must be bit-identical (same scales, same rounding:
    ``x * (1 / scale)``, MX6 blocks of 16, BFP16's int8 mantissa, ranges observed on the float model).
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.reference

ENV_VAR = "QUARK_REFERENCE_PYTHON"
REFERENCE_VERSION = "0.13"
ATOL = 1e-5
# case name -> (LLMTemplate scheme, fp8 KV cache)
CASES: dict[str, tuple[str, bool]] = {
    "fp8_kv": ("fp8", True),
    "int8": ("int8", False),
    "uint4_wo_128": ("uint4_wo_128", False),
    "int4_wo_128": ("int4_wo_128", False),
    "mxfp4": ("mxfp4", False),
}
# every LLMTemplate scheme, fake-quant logits compared bit for bit (test_fake_quant_logits_are_the_references)
TEMPLATE_SCHEMES = ("int4_wo_128", "int4_wo_64", "int4_wo_32", "uint4_wo_128", "uint4_wo_64", "uint4_wo_32", "int8",
                    "fp8", "mxfp4", "mxfp6_e2m3", "mxfp6_e3m2", "mx6", "bfp16")
SUBPROCESS_TIMEOUT_S = 900

_REFERENCE_SCRIPT = textwrap.dedent('''
    """Runs under amd-quark: 'export' quantizes + exports each case, 'import' loads our folders,
    'fakequant' computes the fake-quantized logits of each scheme."""
    import json
    import sys
    import traceback

    import torch
    import transformers
    from safetensors.torch import load_file, save_file

    from quark.torch import LLMTemplate, ModelQuantizer, export_safetensors, import_model_from_safetensors

    mode, float_dir, data_file, root, cases_json = sys.argv[1:6]
    cases = json.loads(cases_json)
    data = load_file(data_file)
    ids = data["input_ids"]
    calib = [data[k] for k in sorted(data) if k.startswith("calib_")]


    def float_model():
        return transformers.AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.float32).eval()


    @torch.no_grad()
    def logits(model):
        return model(ids).logits.float().contiguous()


    status = {}
    if mode == "fakequant":  # cases: a list of scheme names; logits of the fake-quantized models
        fake = {}
        for scheme in cases:
            try:
                config = LLMTemplate.get("llama").get_config(scheme=scheme)
                fake[scheme] = logits(ModelQuantizer(config).quantize_model(float_model(), calib))
                status[scheme] = "ok"
            except Exception:  # recorded per scheme; the test reports it
                status[scheme] = traceback.format_exc()
        save_file(fake, f"{root}/fakequant_logits.safetensors")
        cases = {}
    for name, (scheme, kv) in cases.items():
        folder = f"{root}/{name}"
        try:
            if mode == "export":
                model = float_model()
                config = LLMTemplate.get("llama").get_config(scheme=scheme, kv_cache_scheme="fp8" if kv else None)
                model = ModelQuantizer(config).quantize_model(model, calib)
                in_memory = logits(model)
                export_safetensors(model, folder)
                reloaded = logits(import_model_from_safetensors(float_model(), folder, device="cpu"))
                save_file({"in_memory": in_memory, "reloaded": reloaded}, f"{folder}.logits.safetensors")
            else:
                with_float = logits(import_model_from_safetensors(float_model(), folder, device="cpu"))
                skeleton = logits(import_model_from_safetensors(None, folder, device="cpu"))
                save_file({"with_float": with_float, "skeleton": skeleton}, f"{folder}.ref_logits.safetensors")
            status[name] = "ok"
        except Exception:  # recorded per case; the test reports it
            status[name] = traceback.format_exc()
    with open(f"{root}/status_{mode}.json", "w") as f:
        json.dump(status, f)
''')


# Prints the version of the `quark` that interpreter imports, only if it is amd-quark's own files
# (our package is also `quark` and also at API level 0.13, so the version alone proves nothing).
_PROBE = textwrap.dedent("""
    import importlib.metadata, pathlib, quark
    dist = importlib.metadata.distribution("amd-quark")
    root = pathlib.Path(dist.locate_file("quark")).resolve()
    assert pathlib.Path(quark.__file__).resolve().is_relative_to(root), (quark.__file__, root)
    print(dist.version)
""")


def _clean_env() -> dict[str, str]:
    # The reference must never see this checkout on its path (it would import our `quark`).
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


@pytest.fixture(scope="module")
def reference_python(tmp_path_factory) -> str:
    python = os.environ.get(ENV_VAR)
    if not python:
        pytest.skip(f"{ENV_VAR} is not set: point it to a python with amd-quark {REFERENCE_VERSION} installed")
    cwd = tmp_path_factory.mktemp("refcheck")
    try:
        proc = subprocess.run([python, "-c", _PROBE], cwd=cwd,
                              env=_clean_env(), capture_output=True, text=True, timeout=300)
    except OSError as exc:
        pytest.skip(f"{ENV_VAR}={python!r} cannot be run: {exc}")
    version = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    if proc.returncode != 0 or not version.startswith(REFERENCE_VERSION):
        pytest.skip(f"{ENV_VAR}={python!r} does not import amd-quark {REFERENCE_VERSION} "
                    f"(version {version!r}, rc {proc.returncode}): {proc.stderr[-300:]}")
    return python


@pytest.fixture(scope="module")
def workspace(reference_python, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("crosscheck")
    config = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                      max_position_embeddings=128)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(root / "float")
    gen = torch.Generator().manual_seed(1)
    data = {f"calib_{i}": torch.randint(0, 128, (1, 16), generator=gen) for i in range(2)}
    data["input_ids"] = torch.randint(0, 128, (1, 8), generator=gen)
    save_file(data, root / "data.safetensors")
    (root / "reference_script.py").write_text(_REFERENCE_SCRIPT)
    return root


def _run_reference(python: str, ws: Path, mode: str, root: Path, cases: object = CASES) -> dict[str, str]:
    proc = subprocess.run([python, str(ws / "reference_script.py"), mode, str(ws / "float"),
                           str(ws / "data.safetensors"), str(root), json.dumps(cases)],
                          cwd=ws, env=_clean_env(), capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    status_file = root / f"status_{mode}.json"
    if proc.returncode != 0 or not status_file.exists():
        raise RuntimeError(f"reference {mode} script failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(status_file.read_text())


def _float_model(ws: Path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(ws / "float", dtype=torch.float32).eval()


@torch.no_grad()
def _logits(ws: Path, model: torch.nn.Module) -> torch.Tensor:
    return model(load_file(ws / "data.safetensors")["input_ids"]).logits.float()


@pytest.fixture(scope="module")
def reference_exports(reference_python, workspace) -> tuple[Path, dict[str, str]]:
    root = workspace / "ref"
    root.mkdir()
    return root, _run_reference(reference_python, workspace, "export", root)


@pytest.fixture(scope="module")
def our_exports(reference_python, workspace) -> tuple[Path, dict[str, str], dict[str, torch.Tensor]]:
    from quark.torch import LLMTemplate, ModelExporter, ModelQuantizer

    root = workspace / "ours"
    root.mkdir()
    data = load_file(workspace / "data.safetensors")
    calib = [data[k] for k in sorted(data) if k.startswith("calib_")]
    ours = {}
    for name, (scheme, kv) in CASES.items():
        model = _float_model(workspace)
        config = LLMTemplate.get("llama").get_config(scheme=scheme, kv_cache_scheme="fp8" if kv else None)
        ModelQuantizer(config).quantize_model(model, calib)
        ModelQuantizer.freeze(model)
        ModelExporter(export_dir=root / name).export_safetensors_model(model, config)
        ours[name] = _logits(workspace, model)
    return root, _run_reference(reference_python, workspace, "import", root), ours


def _header(folder: Path) -> dict[str, tuple[str, list[int]]]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: (f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118


def _require_ok(status: dict[str, str], name: str, what: str) -> None:
    if status.get(name) != "ok":
        pytest.fail(f"the reference could not {what} {name}:\n{status.get(name)}")


@pytest.mark.parametrize("name", list(CASES))
def test_reference_checkpoint_loads_in_ours(workspace, reference_exports, name):
    from quark.torch import ModelImporter

    root, status = reference_exports
    _require_ok(status, name, "quantize + export")
    ref = load_file(root / f"{name}.logits.safetensors")
    with_float = _logits(workspace, ModelImporter(root / name).import_model_info(_float_model(workspace)))
    skeleton = _logits(workspace, ModelImporter(root / name).load_model())
    torch.testing.assert_close(with_float, ref["reloaded"], rtol=0, atol=ATOL)
    torch.testing.assert_close(skeleton, ref["reloaded"], rtol=0, atol=ATOL)
    if CASES[name][1]:
        # the reference wrote max(k, v) as both KV scales: its own reload moved away from its model
        assert not torch.allclose(ref["in_memory"], ref["reloaded"], rtol=0, atol=ATOL)
    else:
        torch.testing.assert_close(with_float, ref["in_memory"], rtol=0, atol=ATOL)


@pytest.mark.parametrize("name", list(CASES))
def test_our_checkpoint_loads_in_reference(our_exports, name):
    root, status, ours = our_exports
    _require_ok(status, name, "import our export of")
    ref = load_file(root / f"{name}.ref_logits.safetensors")
    torch.testing.assert_close(ref["with_float"], ours[name], rtol=0, atol=ATOL)
    torch.testing.assert_close(ref["skeleton"], ours[name], rtol=0, atol=ATOL)


def _json_differences(ours: object, ref: object, path: str = "") -> list[str]:
    """Every difference, the version string and the KV-cache spec's null ``scale_type`` included."""
    if isinstance(ours, dict) and isinstance(ref, dict):
        out = []
        for key in sorted(set(ours) | set(ref)):
            sub = f"{path}.{key}"
            if key not in ours or key not in ref:
                out.append(f"{sub}: only in {'ours' if key in ours else 'reference'}")
            else:
                out += _json_differences(ours[key], ref[key], sub)
        return out
    if isinstance(ours, list) and isinstance(ref, list) and len(ours) == len(ref):
        return [d for i, (a, b) in enumerate(zip(ours, ref, strict=True))
                for d in _json_differences(a, b, f"{path}[{i}]")]
    return [] if ours == ref else [f"{path}: ours {ours!r} != reference {ref!r}"]


def _quantization_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())["quantization_config"]


@pytest.mark.parametrize("name", list(CASES))
def test_same_quantization_config(reference_exports, our_exports, name):
    ref_root, status = reference_exports
    _require_ok(status, name, "quantize + export")
    assert _json_differences(_quantization_config(our_exports[0] / name), _quantization_config(ref_root / name)) == []


@pytest.mark.parametrize("name", list(CASES))
def test_same_tensor_layout(reference_exports, our_exports, name):
    ref_root, status = reference_exports
    _require_ok(status, name, "quantize + export")
    assert _header(our_exports[0] / name) == _header(ref_root / name)


@pytest.fixture(scope="module")
def reference_fake_quant(reference_python, workspace) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    root = workspace / "fakequant"
    root.mkdir()
    status = _run_reference(reference_python, workspace, "fakequant", root, list(TEMPLATE_SCHEMES))
    return load_file(root / "fakequant_logits.safetensors"), status


def test_every_template_scheme_is_cross_checked():
    from quark.torch import LLMTemplate

    assert set(TEMPLATE_SCHEMES) == set(LLMTemplate.list_schemes())


@pytest.mark.parametrize("scheme", TEMPLATE_SCHEMES)
def test_fake_quant_logits_are_the_references(workspace, reference_fake_quant, scheme):
    from quark.torch import LLMTemplate, ModelQuantizer

    ref, status = reference_fake_quant
    _require_ok(status, scheme, "fake-quantize with")
    data = load_file(workspace / "data.safetensors")
    calib = [data[k] for k in sorted(data) if k.startswith("calib_")]
    config = LLMTemplate.get("llama").get_config(scheme=scheme)
    ours = _logits(workspace, ModelQuantizer(config).quantize_model(_float_model(workspace), calib))
    torch.testing.assert_close(ours, ref[scheme], rtol=0, atol=0)
