"""The disk placement: a model built on the meta device, each unit read from its checkpoint when needed.

Every test compares with the reference run on the same checkpoint loaded whole into memory
(``from_pretrained``): frozen weights, scales and zero points bit for bit, and the exported files
byte for byte. The meta-device model is never materialised whole, and host memory stays below
the model's size (``test_disk_peak_rss_stays_below_the_model_size``, in a subprocess).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers

from quark.torch import LLMTemplate, ModelExporter, ModelQuantizer
from quark.torch.export.config.config import ExporterConfig, JsonExporterConfig
from quark.torch.export.hf_format.writer import model_state
from quark.torch.llm.model_loading import load_model, load_model_on_disk
from quark.torch.quantization.calibration import weight_source
from quark.torch.quantization.calibration.layerwise import find_decoder_layers
from quark.torch.quantization.calibration.placement import modules_outside
from quark.torch.quantization.config.config import QuaRotConfig
from quark.torch.quantization.moe_experts import unfuse_experts
from quark.torch.quantization.nn.modules.quantize_linear import QuantLinear
from tests.helpers.tiny_models import tiny_config, token_batches

REPO = Path(__file__).resolve().parents[3]

CASES = {
    "fp8_kv": dict(scheme="fp8", kv_cache_scheme="fp8"),
    "int8_smoothquant": dict(scheme="int8", algorithm="smoothquant"),
    "int4_awq": dict(scheme="int4_wo_32", algorithm="awq"),
    "int4_gptq": dict(scheme="int4_wo_32", algorithm="gptq"),
    "int8_quarot": dict(scheme="int8"),
}
FAMILIES = ("llama", "opt", "qwen2_moe")


def _config(family: str) -> transformers.PretrainedConfig:
    if family == "qwen2_moe":
        return transformers.Qwen2MoeConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                           max_position_embeddings=128, moe_intermediate_size=64,
                                           shared_expert_intermediate_size=64, num_experts=4, num_experts_per_tok=2)
    return tiny_config(family)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folders = {}
    for family in FAMILIES:
        torch.manual_seed(0)
        folder = tmp_path_factory.mktemp(family)
        transformers.AutoModelForCausalLM.from_config(_config(family)).save_pretrained(folder)
        folders[family] = folder
    return folders


def _quantize(family: str, case: str, folder: Path, offload: Path | None) -> torch.nn.Module:
    if offload is None:
        model = load_model(folder)
        unfuse_experts(model)
    else:
        model = load_model_on_disk(folder, offload)
    config = LLMTemplate.get(family).get_config(**CASES[case])
    if case == "int8_quarot":
        config.pre_quant_opt_config = [QuaRotConfig(kv_cache_quant=False)]
    quantizer = ModelQuantizer(config, compute_device="cpu")
    quantizer.quantize_model(model, token_batches(4))
    quantizer.freeze(model)
    model.quark_config = config
    return model


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model_state(model)}


def _assert_equal_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        as_bits = (lambda t: t.view(torch.uint8)) if a[key].dtype.itemsize == 1 else (lambda t: t)
        assert torch.equal(as_bits(a[key]), as_bits(b[key])), key


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("family", FAMILIES)
def test_disk_placement_equals_the_model_in_memory(family, case, checkpoints, tmp_path):
    if family == "qwen2_moe" and case == "int8_quarot":
        pytest.skip("rotation refuses mixture-of-experts blocks in every placement")
    whole = _state(_quantize(family, case, checkpoints[family], None))
    on_disk = _quantize(family, case, checkpoints[family], tmp_path / "offload")
    assert all(p.device.type == "meta" for p in on_disk.parameters())  # every unit went back to disk
    _assert_equal_states(whole, _state(on_disk))


@pytest.mark.parametrize("custom_mode, merge", [("quark", True), ("fp8", False)])
def test_export_of_a_model_on_disk_equals_the_export_from_memory(custom_mode, merge, checkpoints, tmp_path):
    json_config = JsonExporterConfig(weight_merge_groups=[["*q_proj", "*k_proj", "*v_proj"]] if merge else [])
    outputs = []
    for offload in (None, tmp_path / "offload"):
        model = _quantize("llama", "fp8_kv", checkpoints["llama"], offload)
        out = tmp_path / f"export-{len(outputs)}"
        ModelExporter(ExporterConfig(json_export_config=json_config), out).export_safetensors_model(
            model, model.quark_config, custom_mode=custom_mode, max_shard_size=20_000)
        outputs.append(out)
    names = sorted(p.name for p in outputs[0].iterdir())
    assert names == sorted(p.name for p in outputs[1].iterdir())
    assert sum(n.endswith(".safetensors") for n in names) > 2  # several shards, streamed
    for name in names:
        assert (outputs[0] / name).read_bytes() == (outputs[1] / name).read_bytes(), name


def test_gguf_export_streams_a_model_on_disk_one_layer_at_a_time(checkpoints, tmp_path, monkeypatch):
    """Q4_0 (int4 g32 AWQ): the file written from memory, byte for byte; while it is written at most one decoder
    layer holds data, and afterwards none."""
    import gguf

    from tests.conftest import PACKAGE_ASSETS

    files = []
    live_layers = [0]
    real_write = gguf.GGUFWriter.write_tensor_data
    for offload in (None, tmp_path / "offload"):
        model = _quantize("llama", "int4_awq", checkpoints["llama"], offload)
        _, layers = find_decoder_layers(model)

        def write(self, tensor, *args, _layers=layers, **kwargs):
            live = sum(any(p.device.type != "meta" for p in layer.parameters()) for layer in _layers)
            live_layers[0] = max(live_layers[0], live)
            return real_write(self, tensor, *args, **kwargs)

        monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", write)
        live_layers[0] = 0
        out = tmp_path / f"gguf-{len(files)}"
        files.append(ModelExporter(ExporterConfig(), out).export_gguf_model(
            model, PACKAGE_ASSETS / "stories260K", "llama"))
    assert live_layers[0] == 1  # the model on disk
    assert all(p.device.type == "meta" for p in model.parameters())
    assert files[0].read_bytes() == files[1].read_bytes()


def test_the_meta_model_is_never_materialised_whole(checkpoints, tmp_path, monkeypatch):
    """At every read, at most two decoder layers (and the modules outside them) hold data."""
    model = load_model_on_disk(checkpoints["llama"], tmp_path / "offload")
    _, layers = find_decoder_layers(model)
    layer_size = max(sum(p.numel() for p in layer.parameters()) for layer in layers)
    outside_size = sum(p.numel() for m in modules_outside(model, layers) for p in m.parameters(recurse=False))
    worst = {"layers": 0, "total": 0, "reads": 0}
    real_read = weight_source.DiskWeights.read

    def read(self, name, device="cpu"):
        live_layers = sum(any(p.device.type != "meta" for p in layer.parameters()) for layer in layers)
        live = sum(p.numel() for p in model.parameters() if p.device.type != "meta")
        worst.update(layers=max(worst["layers"], live_layers), total=max(worst["total"], live),
                     reads=worst["reads"] + 1)
        return real_read(self, name, device)

    monkeypatch.setattr(weight_source.DiskWeights, "read", read)
    config = LLMTemplate.get("llama").get_config(scheme="int4_wo_32", algorithm="gptq")
    config.pre_quant_opt_config = [QuaRotConfig(kv_cache_quant=False)]
    quantizer = ModelQuantizer(config, compute_device="cpu")
    quantizer.quantize_model(model, token_batches(4))
    quantizer.freeze(model)
    _state(model)
    assert worst["reads"] > 0
    assert worst["layers"] <= 2
    assert worst["total"] <= 2 * layer_size + outside_size
    assert all(p.device.type == "meta" for p in model.parameters())


def test_a_pass_reads_the_embeddings_once_not_once_per_batch(checkpoints, tmp_path, monkeypatch):
    """The capture runs every calibration batch through the embeddings: read once per pass (on an H200 the
    8B embeddings read per batch made the disk placement 25 s a layer)."""
    model = load_model_on_disk(checkpoints["llama"], tmp_path / "offload")
    reads: list[str] = []
    real_read = weight_source.DiskWeights.read

    def read(self, name, device="cpu"):
        reads.append(name)
        return real_read(self, name, device)

    monkeypatch.setattr(weight_source.DiskWeights, "read", read)
    config = LLMTemplate.get("llama").get_config(scheme="fp8", kv_cache_scheme="fp8")
    ModelQuantizer(config, compute_device="cpu").quantize_model(model, token_batches(8))
    embeddings = [n for n in reads if "embed_tokens" in n]
    assert 1 <= len(embeddings) <= 2, embeddings  # the calibration pass's capture (and the tail's, if any)


@pytest.mark.parametrize("algorithm", ["gptq", "awq"])
def test_weight_algorithms_read_each_decoder_layer_once(algorithm, checkpoints, tmp_path, monkeypatch):
    """AWQ and GPTQ derive every weight quantizer of a layer while it is loaded for them, so swapping in the
    quantized linears reads nothing: each decoder weight is read from the checkpoint once (a second read of
    every layer was a whole extra pass over a 70B model on disk); the result equals the model in memory."""
    import collections

    reads: collections.Counter = collections.Counter()
    real_read = weight_source.DiskWeights.read

    def read(self, name, device="cpu"):
        reads[name] += 1
        return real_read(self, name, device)

    monkeypatch.setattr(weight_source.DiskWeights, "read", read)
    model = load_model_on_disk(checkpoints["llama"], tmp_path / "offload")
    config = LLMTemplate.get("llama").get_config(scheme="int4_wo_32", algorithm=algorithm)
    config.exclude = []  # lm_head too: no algorithm derives its quantizer, so it is calibrated after them
    quantizer = ModelQuantizer(config, compute_device="cpu")
    quantizer.quantize_model(model, token_batches(4))
    layer_reads = {name: n for name, n in reads.items() if ".layers." in name}
    assert layer_reads and set(layer_reads.values()) == {1}, layer_reads
    assert isinstance(model.lm_head, QuantLinear)
    assert "weight_qparams" in quantizer.summary.stage_seconds
    assert not any(m.weight_qparams_missing() for m in model.modules() if isinstance(m, QuantLinear))
    quantizer.freeze(model)
    memory = load_model(checkpoints["llama"])
    reference = ModelQuantizer(config, compute_device="cpu")
    reference.quantize_model(memory, token_batches(4))
    assert "weight_qparams" not in reference.summary.stage_seconds  # calibrated while swapping, as before
    reference.freeze(memory)
    _assert_equal_states(_state(model), _state(memory))


def test_the_next_decoder_layer_is_read_in_the_background(checkpoints, tmp_path, monkeypatch):
    """Loading layer N starts reading layer N + 1 in a background thread: the same reads as without it (none
    wasted, none repeated), each layer after the first read ahead in every pass, and the same result."""
    import collections
    import threading

    real_read = weight_source.DiskWeights._read_file
    runs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("QUARK_DISK_READ_AHEAD", flag)
        reads: collections.Counter = collections.Counter()

        def read_file(self, path, key, _reads=reads):
            _reads[(threading.current_thread().name.startswith("quark-read-ahead"), key)] += 1
            return real_read(self, path, key)

        monkeypatch.setattr(weight_source.DiskWeights, "_read_file", read_file)
        model = load_model_on_disk(checkpoints["llama"], tmp_path / f"offload-{flag}")
        config = LLMTemplate.get("llama").get_config(scheme="int4_wo_32", algorithm="gptq")
        quantizer = ModelQuantizer(config, compute_device="cpu")
        quantizer.quantize_model(model, token_batches(4))
        quantizer.freeze(model)
        runs[flag] = (reads, _state(model))
    ahead, plain = runs["1"][0], runs["0"][0]
    assert sum(ahead.values()) == sum(plain.values())
    background = {key: n for (in_background, key), n in ahead.items() if in_background}
    layer_1 = {key: n for (_, key), n in plain.items() if key.startswith("model.layers.1.")}
    assert background == layer_1  # layer 0 follows no layer; layer 1 is read ahead in every pass
    _assert_equal_states(runs["1"][1], runs["0"][1])


def _renamed_checkpoint(kind: str, folder: Path) -> tuple[str, dict]:
    """A tiny checkpoint whose tensor names transformers converts when loading, saved in its original names: the
    key that shows it, and the quantization to run (template config arguments)."""
    torch.manual_seed(0)
    if kind == "mixtral":  # the block renamed (block_sparse_moe -> mlp), the experts' w1/w3/w2 fused
        config = transformers.MixtralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                            max_position_embeddings=128, num_local_experts=4, num_experts_per_tok=2)
        transformers.MixtralForCausalLM(config).save_pretrained(folder)
        return "model.layers.0.block_sparse_moe.experts.3.w3.weight", dict(scheme="int4_wo_32", algorithm="gptq")
    text = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, vocab_size=300, max_position_embeddings=128, sliding_window=32)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
    transformers.Gemma3ForConditionalGeneration(config).save_pretrained(folder)  # language_model.* -> model.*
    return "language_model.model.layers.1.mlp.down_proj.weight", dict(scheme="int4_wo_32")


@pytest.mark.parametrize("kind", ["mixtral", "gemma3_vlm"])
def test_checkpoints_whose_names_transformers_converts_are_read_through_its_rules(kind, tmp_path):
    """Mixtral's checkpoints name the experts ``block_sparse_moe.experts.<e>.w1/w2/w3`` and Gemma 3's (vision and
    language) its decoder ``language_model.model.*``; transformers renames and fuses them when loading. The disk
    placement finds each parameter's tensor (each unfused expert Linear's) through transformers' own rules and
    quantizes as the model loaded into memory does."""
    from safetensors import safe_open

    folder = tmp_path / kind
    original, arguments = _renamed_checkpoint(kind, folder)
    with safe_open(str(next(folder.glob("*.safetensors"))), "pt") as f:
        assert original in set(f.keys())
    results = []
    for offload in (None, tmp_path / "offload"):
        model = load_model(folder) if offload is None else load_model_on_disk(folder, offload)
        if offload is None:
            unfuse_experts(model)
        config = LLMTemplate.get("mixtral" if kind == "mixtral" else "llama").get_config(**arguments)
        quantizer = ModelQuantizer(config, compute_device="cpu", calibrate_all_experts=True)
        quantizer.quantize_model(model, token_batches(4))
        quantizer.freeze(model)
        results.append(_state(model))
    _assert_equal_states(results[0], results[1])


def test_a_layer_written_after_it_was_read_ahead_is_read_from_its_new_copy(checkpoints, tmp_path):
    model = load_model_on_disk(checkpoints["llama"], tmp_path / "offload")
    source = weight_source.disk_weights(model)
    name = "model.layers.1.mlp.down_proj.weight"
    old = source.read(name)
    source.read_ahead("model.layers.1")
    source.write({name: old + 1})
    assert torch.equal(source.read(name), old + 1)
    source.forget_read_ahead()
    assert torch.equal(source.read(name), old + 1)


def test_changed_layers_go_to_the_offload_folder_and_are_read_back_from_it(checkpoints, tmp_path):
    offload = tmp_path / "offload"
    model = _quantize("llama", "int4_gptq", checkpoints["llama"], offload)
    source = weight_source.disk_weights(model)
    assert source is not None
    frozen = "model.layers.1.mlp.down_proj.weight"
    assert frozen in source.offloaded and not source.read(frozen).is_floating_point()  # packed int4
    assert "model.embed_tokens.weight" not in source.offloaded  # never changed: read from the checkpoint
    files = sorted(offload.glob("*.safetensors"))
    assert files and {p for p, _ in source.offloaded.values()} == set(files)  # replaced copies are deleted


def test_checkpoints_the_disk_placement_cannot_read_are_refused_before_any_work(checkpoints, tmp_path):
    empty = tmp_path / "pickles"
    empty.mkdir()
    (empty / "config.json").write_text((checkpoints["llama"] / "config.json").read_text())
    with pytest.raises(ValueError, match=r"--offload disk reads the layers from the model's safetensors shards.*"
                                         "--offload cpu"):
        load_model_on_disk(empty, tmp_path / "offload")
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    (renamed / "config.json").write_text((checkpoints["llama"] / "config.json").read_text())
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(checkpoints["llama"] / "model.safetensors"))
    save_file({k.replace("model.", "transformer."): v for k, v in tensors.items()}, str(renamed / "model.safetensors"))
    with pytest.raises(ValueError, match=r"the checkpoint has no tensor for .* --offload cpu"):
        load_model_on_disk(renamed, tmp_path / "offload")


def test_an_offload_file_damaged_after_it_was_written_is_refused_by_name(checkpoints, tmp_path):
    """The disk placement reads headers with the exporter's checked parser: a truncated file is named."""
    from quark.torch.quantization.calibration.safetensors_header import CheckpointError

    model = _quantize("llama", "int4_gptq", checkpoints["llama"], tmp_path / "offload")
    source = weight_source.disk_weights(model)
    name = "model.layers.1.mlp.down_proj.weight"
    path, _ = source.offloaded[name]
    path.write_bytes(path.read_bytes()[:-16])
    source._headers.clear()
    with pytest.raises(CheckpointError, match="truncated"):
        source.read(name)


def test_a_model_that_cannot_be_built_on_the_meta_device_is_refused(checkpoints, tmp_path, monkeypatch):
    from quark.torch.llm import model_loading

    class Broken:
        __name__ = "Broken"

        @staticmethod
        def from_config(*args, **kwargs):
            raise NotImplementedError("Cannot copy out of meta tensor; no data!")

    monkeypatch.setattr(model_loading, "model_class", lambda model_type: Broken)
    with pytest.raises(ValueError, match=r"cannot be built on the meta device .*--offload cpu"):
        load_model_on_disk(checkpoints["llama"], tmp_path / "offload")


_RSS_SCRIPT = textwrap.dedent("""
    import json, sys, tempfile
    import psutil, torch
    import transformers.models.llama.modeling_llama  # code, not weights: imported before the baseline
    from quark.torch import LLMTemplate, ModelExporter, ModelQuantizer
    from quark.torch.llm.model_loading import load_model, load_model_on_disk
    folder, placement = sys.argv[1], sys.argv[2]
    batches = [torch.randint(0, 2048, (1, 32), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    base = psutil.Process().memory_info().rss
    with tempfile.TemporaryDirectory() as offload:
        model = load_model_on_disk(folder, offload) if placement == "disk" else load_model(folder)
        config = LLMTemplate.get("llama").get_config(scheme="fp8", kv_cache_scheme="fp8")
        quantizer = ModelQuantizer(config, compute_device="cpu")
        quantizer.quantize_model(model, batches)
        quantizer.freeze(model)
        ModelExporter(export_dir=offload + "/out").export_safetensors_model(model, config, max_shard_size="40MB")
    # VmHWM, not ru_maxrss: a child forked from a large parent inherits the parent's ru_maxrss
    status = open("/proc/self/status").read().split("VmHWM:")[1]
    peak = int(status.split()[0]) * 1024
    print(json.dumps({"base": base, "peak": peak}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmHWM from /proc/self/status")
def test_disk_peak_rss_stays_below_the_model_size(tmp_path):
    """A 360 MiB Llama (8 layers of 45 MiB): quantize, freeze and export it from disk with less host memory
    than its weights (the same run with the model in memory needs more than them, so the measurement
    can tell). The peak RSS is counted from after the imports (torch, transformers, the model's code)."""
    config = transformers.LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                                      num_attention_heads=16, num_key_value_heads=4, vocab_size=2048,
                                      max_position_embeddings=128)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    model_bytes = sum(p.numel() * 4 for p in model.parameters())
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path / "model")
    del model
    used = {}
    for placement in ("disk", "memory"):
        run = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(tmp_path / "model"), placement],
                             capture_output=True, text=True, cwd=REPO, timeout=600, check=False)
        assert run.returncode == 0, run.stderr[-2000:]
        rss = json.loads(run.stdout.strip().splitlines()[-1])
        used[placement] = rss["peak"] - rss["base"]
    assert model_bytes > 250 * 2**20
    assert used["memory"] > model_bytes, used
    assert used["disk"] < model_bytes, used
    print(f"model {model_bytes / 2**20:.0f} MiB; peak RSS above the start: disk {used['disk'] / 2**20:.0f} MiB, "
          f"in memory {used['memory'] / 2**20:.0f} MiB")


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(CASES))
def test_disk_placement_on_gpu_equals_the_model_in_cpu_memory(case, checkpoints, tmp_path):
    """Layers read from disk onto the GPU give the tensors of layers moved there from CPU memory, and
    nothing of the model stays on the GPU."""
    states = []
    for offload in (None, tmp_path / "offload"):
        model = load_model(checkpoints["llama"]) if offload is None else load_model_on_disk(checkpoints["llama"],
                                                                                          offload)
        config = LLMTemplate.get("llama").get_config(**CASES[case])
        if case == "int8_quarot":
            config.pre_quant_opt_config = [QuaRotConfig(kv_cache_quant=False)]
        quantizer = ModelQuantizer(config, compute_device="cuda")
        quantizer.quantize_model(model, token_batches(6, seq=32))
        quantizer.freeze(model)
        assert all(t.device.type in ("cpu", "meta") for t in (*model.parameters(), *model.buffers()))
        states.append(_state(model))
    _assert_equal_states(*states)


def test_a_failed_run_on_disk_leaves_the_weights_it_started_from(checkpoints, tmp_path, monkeypatch):
    """Rotation changes the layers, then fails its check: the offload folder's index is restored, so
    every weight reads as the checkpoint's again."""
    from quark.torch.algorithm.rotation import rotation

    def fail(model, plan):
        raise RuntimeError("injected: rotated logits differ")

    monkeypatch.setattr(rotation, "_verify", fail)
    model = load_model_on_disk(checkpoints["llama"], tmp_path / "offload")
    config = LLMTemplate.get("llama").get_config(scheme="int8", algorithm="rotation")
    with pytest.raises(RuntimeError, match="injected"):
        ModelQuantizer(config, compute_device="cpu").quantize_model(model, token_batches(2))
    assert weight_source.disk_weights(model).offloaded == {}
    assert not list((tmp_path / "offload").glob("*.safetensors"))
    from safetensors.torch import load_file

    original = load_file(str(checkpoints["llama"] / "model.safetensors"))
    _assert_equal_states(original, {k: v for k, v in _state(model).items() if k in original})


GENERIC = {
    "qwen3": lambda: transformers.Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                              max_position_embeddings=128, head_dim=16),
    # two layer structures (dense, then mixture of experts): discovery traces one layer of each
    "deepseek_v3": lambda: transformers.DeepseekV3Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        vocab_size=128, max_position_embeddings=128, moe_intermediate_size=32, n_routed_experts=4,
        num_experts_per_tok=2, first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=16, n_group=1, topk_group=1),
}


@pytest.mark.parametrize("algorithm", ["awq", "smoothquant"])
@pytest.mark.parametrize("family", list(GENERIC))
def test_discovered_scaling_groups_on_disk_equal_the_model_in_memory(family, algorithm, tmp_path):
    """Families without template data discover their scaling groups by running the model: on disk too (the
    probe reads the layers it runs), with the in-memory result."""
    from quark.torch.llm import schemes

    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(GENERIC[family]()).save_pretrained(tmp_path / "model")
    scheme = "w_uint4_per_group_asym" if algorithm == "awq" else "w_int8_a_int8_per_tensor_sym"
    states = []
    for offload in (None, tmp_path / "offload"):
        if offload is None:
            model = load_model(tmp_path / "model")
            unfuse_experts(model)
        else:
            model = load_model_on_disk(tmp_path / "model", offload)
        request = schemes.SchemeRequest(scheme, algorithms=[algorithm], group_size=32 if algorithm == "awq" else None)
        quantizer = ModelQuantizer(schemes.build_config(schemes.template_for(family), request), compute_device="cpu")
        quantizer.quantize_model(model, token_batches(4))
        quantizer.freeze(model)
        states.append(_state(model))
    assert all(p.device.type == "meta" for p in model.parameters())
    _assert_equal_states(states[0], states[1])
