"""Layers whose shape the scheme's group/block size does not divide: ``Config.unfit_layers`` and
``--unfit_layers`` (error, keep, fallback), on the embedded stories260K (MLP width 172)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn

from quark.torch import ModelExporter, ModelImporter, ModelQuantizer
from quark.torch.export.config.config import ExporterConfig
from quark.torch.llm import perplexity, schemes
from quark.torch.llm.cli import main
from quark.torch.llm.model_loading import EMBEDDED_MODEL_DIR
from quark.torch.llm.summary import SUMMARY_FILE
from quark.torch.quantization.config.config import Config, QuantizationConfig
from quark.torch.quantization.config.resolve import fitting_spec
from quark.torch.quantization.config.type import QSchemeType
from quark.torch.quantization.nn.modules.quantize_linear import QuantLinear

DOWN = [f"model.layers.{i}.mlp.down_proj" for i in range(5)]  # in_features 172
IDS = torch.tensor([[1, 403, 407, 261, 378, 425, 261, 302, 30, 71, 2]])


def stories() -> nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(EMBEDDED_MODEL_DIR, dtype=torch.float32).eval()


def recipe_config(scheme: str, group_size: int | None = None, unfit: str = "error") -> Config:
    request = schemes.SchemeRequest(scheme=scheme, group_size=group_size, unfit_layers=unfit)
    return schemes.build_config(schemes.template_for("llama"), request)


def test_config_refuses_unknown_mode() -> None:
    with pytest.raises(ValueError, match=r"unfit_layers='float'.*error, keep, fallback"):
        Config(global_quant_config=QuantizationConfig(), unfit_layers="float")


def test_error_names_the_option_and_leaves_the_model() -> None:
    model = stories()
    config = recipe_config("w_int4_per_group_sym", 32)
    with pytest.raises(ValueError, match="does not fit 5 tensor") as info:
        ModelQuantizer(config).quantize_model(model, None)
    assert "unfit_layers='fallback'" in str(info.value) and "--unfit_layers" in str(info.value)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    assert config.exclude == ["lm_head"] and not config.layer_quant_config


def test_keep_leaves_unfit_layers_in_float() -> None:
    model = stories()
    config = recipe_config("w_mxfp8", unfit="keep")
    ModelQuantizer(config).quantize_model(model, None)
    for name in DOWN:
        assert type(model.get_submodule(name)) is nn.Linear
    assert isinstance(model.get_submodule("model.layers.0.mlp.up_proj"), QuantLinear)
    assert config.exclude == ["lm_head", *DOWN]


def test_fallback_int4_group_to_per_channel_and_back_through_export(tmp_path: Path) -> None:
    model = stories()
    config = recipe_config("w_int4_per_group_sym", 32, unfit="fallback")
    ModelQuantizer(config).quantize_model(model, None)
    down = model.get_submodule(DOWN[0])
    assert isinstance(down, QuantLinear)
    assert down.quant_config.weight.qscheme == QSchemeType.per_channel and down.quant_config.weight.ch_axis == 0
    up = model.get_submodule("model.layers.0.mlp.up_proj").quant_config.weight
    assert up.qscheme == QSchemeType.per_group and up.group_size == 32
    assert set(config.layer_quant_config) == set(DOWN)
    ModelQuantizer.freeze(model)
    with torch.no_grad():
        expected = model(IDS).logits
    ModelExporter(ExporterConfig(), tmp_path / "o").export_safetensors_model(model, config)
    reloaded = ModelImporter(str(tmp_path / "o"), saved_format="safetensors").import_model_info(stories())
    with torch.no_grad():
        assert torch.allclose(reloaded(IDS).logits, expected, atol=1e-5)


def test_fallback_keeps_block_formats_without_a_fitting_block() -> None:
    model = stories()
    config = recipe_config("w_mxfp8_a_mxfp8", unfit="fallback")
    ModelQuantizer(config).quantize_model(model, None)
    assert all(type(model.get_submodule(n)) is nn.Linear for n in DOWN)
    assert config.exclude == ["lm_head", *DOWN]


def test_fitting_spec_is_the_largest_power_of_two_group_that_divides() -> None:
    weight = recipe_config("w_int4_per_group_sym", 128).global_quant_config.weight
    fitted = fitting_spec(weight, "weight", 576)  # SmolLM2's hidden size
    assert fitted.qscheme == QSchemeType.per_group and fitted.group_size == 64
    assert fitting_spec(weight, "weight", 172).qscheme == QSchemeType.per_channel
    mx6 = recipe_config("w_mx6").global_quant_config.weight  # block 16, pairs share a micro-exponent
    assert fitting_spec(mx6, "weight", 24).group_size == 8
    activation = recipe_config("w_mxfp8_a_mxfp8").global_quant_config.input_tensors
    assert fitting_spec(activation, "input_tensors", 172) is None  # no per-channel activations: float


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([*args, "--num_calib_data", "1", "--seq_len", "32", "--log_severity_level", "2"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_refuses_before_float_evaluation(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                             tmp_path: Path) -> None:
    def no_evaluation(*args: object, **kwargs: object) -> None:
        raise AssertionError("the float model was evaluated before the shape check")

    monkeypatch.setattr(perplexity, "story_perplexity", no_evaluation)
    code, _, err = _cli(["--quant_scheme", "w_int4_per_group_sym", "--group_size", "32", "--output_dir",
                      str(tmp_path / "o")], capsys)
    assert code == 2
    assert "does not fit 5 tensor" in err and "--unfit_layers fallback|keep" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("scheme", "mode", "kept", "fallback"), [
    ("w_int4_per_group_sym", "fallback", 0, 5),
    ("w_bfp16", "keep", 5, 0),
])
def test_cli_unfit_layers_in_summary(scheme: str, mode: str, kept: int, fallback: int,
                                     capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "o"
    extra = ["--group_size", "32"] if "int4" in scheme else []
    code, out_text, err = _cli(["--quant_scheme", scheme, *extra, "--unfit_layers", mode, "--skip_evaluation",
                      "--output_dir", str(out)], capsys)
    assert code == 0, err
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert [u["layer"] for u in summary["unfit_layers"]] == DOWN
    assert sum(u["action"] == "keep" for u in summary["unfit_layers"]) == kept
    assert sum(u["action"] == "fallback" for u in summary["unfit_layers"]) == fallback
    assert summary["quantized_layers"] == 35 - kept
    assert f"{kept} kept in float, {fallback} fallback" in out_text


def test_cli_quarot_needs_a_hadamard_of_the_mlp_width(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = _cli(["--quant_scheme", "w_int8_a_int8_per_tensor_sym", "--quant_algo", "quarot",
                      "--skip_evaluation", "--output_dir", str(tmp_path / "o")], capsys)
    assert code == 2
    assert "size 172" in err and "--unfit_layers keep" in err
    code, _, err = _cli(["--quant_scheme", "w_int8_a_int8_per_tensor_sym", "--quant_algo", "quarot",
                      "--unfit_layers", "keep", "--skip_evaluation", "--output_dir", str(tmp_path / "o")], capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "o" / SUMMARY_FILE).read_text())
    assert summary["unfit_layers"][0]["changes"] == ["QuaRotConfig.had: True -> False"]


def test_fallback_with_awq_keeps_layers_it_cannot_group() -> None:
    from quark.torch.quantization.model_transformation import fit_config_to_model

    request = schemes.SchemeRequest(scheme="w_int4_per_group_sym", algorithms=["awq"], unfit_layers="fallback")
    config = schemes.build_config(schemes.template_for("llama"), request)  # group 128 on widths 64 and 172
    done = fit_config_to_model(stories(), config)
    assert config.exclude == ["lm_head", *DOWN]  # AWQ refuses per-channel weights
    assert {n: c.weight.group_size for n, c in config.layer_quant_config.items()} == {
        u.name: 64 for u in done if u.action == "fallback"}
    assert len(config.layer_quant_config) == 30
