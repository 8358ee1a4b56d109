"""GGUF export: gguf's reader and gguf.quants.dequantize against our dequantized weights."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import transformers

from quark.torch import LLMTemplate, ModelExporter, ModelQuantizer
from quark.torch.export.config.config import ExporterConfig
from quark.torch.quantization.config.config import Config, QuantizationConfig, QuantizationSpec
from quark.torch.quantization.config.type import Dtype, QSchemeType
from tests.export.helpers import frozen_model
from tests.helpers.tiny_models import tiny_model


@pytest.fixture(scope="module")
def stories_q4_1(tmp_path_factory):
    from tests.conftest import PACKAGE_ASSETS

    folder = PACKAGE_ASSETS / "stories260K"
    if not (folder / "model.safetensors").is_file():
        pytest.skip(f"stories260K not found at {folder}")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    # intermediate size 172 is not a multiple of 32: down_proj stays float (written F16)
    config = LLMTemplate.get("llama").get_config(scheme="uint4_wo_32", exclude_layers=["lm_head", "*down_proj"])
    ModelQuantizer(config).quantize_model(model, None)
    ModelQuantizer.freeze(model)
    out = tmp_path_factory.mktemp("gguf") / "stories"
    path = ModelExporter(ExporterConfig(), out).export_gguf_model(model, folder, "llama")
    return model, path, folder


def _tensor(reader, name):
    return next(t for t in reader.tensors if t.name == name)


def _permute(w, n_head):
    """llama.cpp convert_hf_to_gguf's q/k permutation, written out here."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_stories_q4_1_round_trip(stories_q4_1):
    model, path, folder = stories_q4_1
    reader = gguf.GGUFReader(str(path))
    fields = reader.fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["llama.block_count"].contents() == 5
    assert fields["llama.attention.head_count_kv"].contents() == 4
    assert fields["llama.rope.freq_base"].contents() == 10000.0
    assert fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q4_1)
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    tokens = fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == 512 and tokens[100] == sp.id_to_piece(100)
    layer = model.model.layers[0]
    for gname, module, heads in (("blk.0.attn_v.weight", layer.self_attn.v_proj, None),
                                 ("blk.0.attn_q.weight", layer.self_attn.q_proj, 8),
                                 ("blk.0.attn_k.weight", layer.self_attn.k_proj, 4),
                                 ("blk.0.ffn_gate.weight", layer.mlp.gate_proj, None)):
        t = _tensor(reader, gname)
        assert t.tensor_type == gguf.GGMLQuantizationType.Q4_1
        got = gguf.quants.dequantize(t.data, t.tensor_type)
        ours = module.quantized_weight(torch.float32).numpy()
        if heads:
            ours = _permute(ours, heads)
        # GGML keeps d and m in fp16: per block |error| <= 15 * ulp(d) / 2 + ulp(m) / 2
        scale = module.weight_quantizer.scale.t().float().numpy()  # [out, in/32]
        if heads:
            scale = _permute(scale, heads)
        bound = np.repeat(scale, 32, axis=1) * 2.0**-10 * 16 + 1e-7
        assert np.all(np.abs(got - ours) <= bound), gname
    down = _tensor(reader, "blk.0.ffn_down.weight")
    assert down.tensor_type == gguf.GGMLQuantizationType.F16
    assert not any(t.name == "output.weight" for t in reader.tensors)  # tied embeddings


def test_stories_runs_in_llama_cpp(stories_q4_1):
    """llama.cpp's own forward on our GGUF scores the text as our PyTorch quantized model does."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (building it "
                                                        "from source takes longer than this test suite allows)")
    import sentencepiece

    model, path, folder = stories_q4_1
    sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    story = (folder / "calibration.txt").read_text().split("<|endoftext|>")[0].strip()
    ids = [1, *sp.encode(story)]
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, logits_all=True, verbose=False)
    llm.eval(ids)
    cpp = torch.tensor(np.array(llm.scores[: len(ids)]))
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0]
    target = torch.tensor(ids[1:])

    def nll(logits):
        return torch.nn.functional.cross_entropy(logits[:-1].float(), target).item()

    # llama.cpp keeps Q4_1's block scale and minimum in fp16 and multiplies with 8-bit activations
    # (measured: NLL 1.3874 vs 1.3861, same argmax at 98.9% of positions)
    assert abs(nll(cpp) - nll(ours)) < 0.01
    assert (cpp.argmax(-1) == ours.argmax(-1)).float().mean() > 0.95


def _q8_config() -> Config:
    spec = QuantizationSpec(dtype=Dtype.int8, qscheme=QSchemeType.per_group, ch_axis=-1, group_size=32)
    return Config(global_quant_config=QuantizationConfig(weight=spec), exclude=["lm_head"])


@pytest.mark.parametrize(("scheme", "ggml"), [("int4_wo_32", "Q4_0"), ("q8", "Q8_0")])
def test_block_types_exact_codes(tmp_path, scheme, ggml):
    if scheme == "q8":
        model = tiny_model("llama")
        ModelQuantizer(_q8_config()).quantize_model(model, None)
        ModelQuantizer.freeze(model)
    else:
        model, _ = frozen_model(scheme)
    from tests.conftest import PACKAGE_ASSETS

    path = ModelExporter(ExporterConfig(), tmp_path / "o").export_gguf_model(model, PACKAGE_ASSETS / "stories260K",
                                                                             "llama")
    reader = gguf.GGUFReader(str(path))
    t = _tensor(reader, "blk.1.attn_v.weight")
    assert t.tensor_type == getattr(gguf.GGMLQuantizationType, ggml)
    module = model.model.layers[1].self_attn.v_proj
    w = module.quantized_weight(torch.float32)
    scale = module.weight_quantizer.scale
    scale = (scale.t() if ggml == "Q4_0" else scale).float()  # int4 per-group storage is transposed
    s = scale.repeat_interleave(32, 1)
    codes = torch.round(w / s)
    expected = codes * s.half().float()  # the same codes with fp16 block scales
    assert np.allclose(gguf.quants.dequantize(t.data, t.tensor_type), expected.numpy(), rtol=0, atol=1e-7)


@pytest.mark.parametrize("gguf_type", ["F16", "BF16"])
def test_float_types(tmp_path, gguf_type):
    model, _ = frozen_model("mx6")
    from tests.conftest import PACKAGE_ASSETS

    path = ModelExporter(ExporterConfig(), tmp_path / "o").export_gguf_model(
        model, PACKAGE_ASSETS / "stories260K", "llama", gguf_type=gguf_type)
    t = _tensor(gguf.GGUFReader(str(path)), "blk.0.attn_v.weight")
    got = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
    ours = model.model.layers[0].self_attn.v_proj.quantized_weight(torch.float32)
    dtype = torch.float16 if gguf_type == "F16" else torch.bfloat16
    assert torch.equal(got, ours.to(dtype).float())


@pytest.mark.parametrize("gguf_type", ["BF16", "F32"])
def test_float_types_of_a_per_group_int4_weight(tmp_path, gguf_type):
    """int4 per-group weights dequantize to a transposed view: written as its values, not refused."""
    model, _ = frozen_model("int4_wo_32")
    from tests.conftest import PACKAGE_ASSETS

    path = ModelExporter(ExporterConfig(), tmp_path / "o").export_gguf_model(
        model, PACKAGE_ASSETS / "stories260K", "llama", gguf_type=gguf_type)
    reader = gguf.GGUFReader(str(path))
    for gname, module in (("blk.0.attn_v.weight", model.model.layers[0].self_attn.v_proj),
                          ("blk.1.ffn_down.weight", model.model.layers[1].mlp.down_proj)):
        t = _tensor(reader, gname)
        got = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        ours = module.quantized_weight(torch.float32)
        assert torch.equal(got, ours.to(torch.bfloat16).float() if gguf_type == "BF16" else ours), gname


def test_unsupported_quantization_is_refused(tmp_path):
    model, _ = frozen_model("mx6")
    from tests.conftest import PACKAGE_ASSETS

    with pytest.raises(ValueError, match=r"no GGML block type.*Q4_0 .*Q4_1"):
        ModelExporter(ExporterConfig(), tmp_path / "o").export_gguf_model(model, PACKAGE_ASSETS / "stories260K",
                                                                          "llama")
    with pytest.raises(ValueError, match=r"cannot be written as Q4_1"):
        ModelExporter(ExporterConfig(), tmp_path / "o").export_gguf_model(
            model, PACKAGE_ASSETS / "stories260K", "llama", gguf_type="Q4_1")
    with pytest.raises(ValueError, match=r"model_type='opt'\) is not supported; supported: llama"):
        ModelExporter(ExporterConfig(), tmp_path / "o").export_gguf_model(model, PACKAGE_ASSETS / "stories260K", "opt")
    assert not (tmp_path / "o").exists()
