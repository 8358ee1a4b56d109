"""FakeQuantize states: observe, quantize, dynamic, fixed qparams, two-stage, errors."""

from __future__ import annotations

import pytest
import torch

from quark.torch.quantization import formats
from quark.torch.quantization.config.config import QuantizationSpec
from quark.torch.quantization.config.type import Dtype, QSchemeType
from quark.torch.quantization.formats import fake_quantize
from quark.torch.quantization.tensor_quantize import (
    FakeQuantize,
    NonFiniteTensorError,
    compute_qparams,
    fake_quantize_with_spec,
)

INT8 = QuantizationSpec(dtype=Dtype.int8, qscheme=QSchemeType.per_tensor, symmetric=True, is_dynamic=False)
INT8_DYN = QuantizationSpec(dtype=Dtype.int8, qscheme=QSchemeType.per_tensor, symmetric=True, is_dynamic=True)


def test_static_observes_then_quantizes():
    fq = FakeQuantize(INT8, name="layer.input_quantizer")
    a, b = torch.randn(4, 8), torch.randn(4, 8) * 3
    assert torch.equal(fq(a), a)  # pass-through while observing
    fq(b)
    fq.finalize()
    expected_scale = torch.cat([a, b]).abs().max() / 127.5
    assert fq.scale.item() == pytest.approx(expected_scale.item())
    out = fq(a)
    torch.testing.assert_close(out, fake_quantize(a, fq.scale, fq.zero_point, Dtype.int8,
                                                  qscheme=QSchemeType.per_tensor), rtol=0, atol=0)
    assert not torch.equal(out, a)


def test_dynamic_uses_each_input():
    fq = FakeQuantize(INT8_DYN)
    x = torch.randn(16)
    scale, zp = compute_qparams(x, INT8_DYN)
    torch.testing.assert_close(fq(x), fake_quantize(x, scale, zp, Dtype.int8, qscheme=QSchemeType.per_tensor))
    # a power-of-two factor keeps every x * (1 / scale) exact, ties included
    torch.testing.assert_close(fq(8 * x), 8 * fq(x), rtol=0, atol=0)


def test_non_finite_calibration_names_quantizer():
    fq = FakeQuantize(INT8, name="model.layers.0.mlp.down_proj.input_quantizer")
    with pytest.raises(NonFiniteTensorError, match=r"down_proj\.input_quantizer.*1 NaN"):
        fq(torch.tensor([1.0, float("nan")]))


def test_uncalibrated_static_raises():
    fq = FakeQuantize(INT8, name="q")
    fq.disable_observer()
    with pytest.raises(RuntimeError, match="no scale"):
        fq(torch.ones(2))


def test_finalize_without_data_raises():
    with pytest.raises(RuntimeError, match="no calibration data"):
        FakeQuantize(INT8, name="q").finalize()


def test_set_qparams_fixes_grid():
    fq = FakeQuantize(INT8)
    fq.set_qparams(torch.tensor(0.5), torch.tensor(0, dtype=torch.int32))
    fq.enable_observer()
    assert not fq.observing
    assert fq(torch.tensor([0.74, 100.0])).tolist() == [0.5, 63.5]


def test_disable_fake_quant_passes_through():
    fq = FakeQuantize(INT8)
    fq.calibrate_from(torch.randn(10))
    fq.disable_fake_quant()
    x = torch.randn(10)
    assert torch.equal(fq(x), x)


def test_two_stage_fp4_with_fp8_scales():
    stage1 = QuantizationSpec(dtype=Dtype.fp4, qscheme=QSchemeType.per_group, ch_axis=-1, group_size=16,
                              is_dynamic=False)
    stage2 = QuantizationSpec(dtype=Dtype.fp8_e4m3, qscheme=QSchemeType.per_tensor, is_dynamic=False)
    fq = FakeQuantize([stage1, stage2])
    w = torch.randn(8, 64)
    fq.calibrate_from(w)
    s1 = w.reshape(8, 4, 16).abs().amax(-1) / 6.0
    torch.testing.assert_close(fq.scale, s1)
    scale2 = s1.max() / 448.0
    torch.testing.assert_close(fq.scale_quantizer.scale, scale2)
    q_scale = (s1 / scale2).to(torch.float8_e4m3fn).float() * scale2
    expected = fake_quantize(w, q_scale, None, Dtype.fp4, qscheme=QSchemeType.per_group, ch_axis=-1,
                             group_size=16)
    torch.testing.assert_close(fq(w), expected)


def test_block_and_cast_specs_need_no_calibration():
    mx = QuantizationSpec(dtype=Dtype.mx, mx_element_dtype=Dtype.fp8_e4m3, qscheme=QSchemeType.per_group,
                          ch_axis=-1, group_size=32, is_dynamic=True)
    x = torch.randn(2, 64)
    torch.testing.assert_close(FakeQuantize(mx)(x), fake_quantize_with_spec(x, mx))
    bf16 = QuantizationSpec(dtype=Dtype.bfloat16)
    assert torch.equal(FakeQuantize(bf16)(x), x.to(torch.bfloat16).float())


def test_checkpoint_form_mx_spec_uses_the_mx_path():
    """Quark checkpoints write MXFP4 as dtype fp4 + scale_format e8m0: same numerics as Dtype.mx."""
    ckpt = QuantizationSpec(dtype=Dtype.fp4, qscheme=QSchemeType.per_group, ch_axis=-1, group_size=32,
                            scale_format="e8m0", is_dynamic=True)
    x = torch.randn(4, 64) * 3
    expected = formats.mx_fake_quantize(x, Dtype.fp4, axis=-1, block_size=32)
    assert torch.equal(FakeQuantize(ckpt)(x), expected)
    assert torch.equal(fake_quantize_with_spec(x, ckpt), expected)


def test_set_qparams_stores_integer_zero_points_as_int32():
    spec = QuantizationSpec(dtype=Dtype.uint4, qscheme=QSchemeType.per_tensor, symmetric=False)
    fq = FakeQuantize(spec)
    fq.set_qparams(torch.tensor(0.1), torch.tensor(7.0))
    assert fq.zero_point.dtype == torch.int32 and fq.zero_point.item() == 7


def test_a_weight_calibrated_alone_keeps_its_qparams_not_its_statistics():
    """calibrate_from fixes the qparams from the tensor alone, then drops the observer's per-group minima and maxima
    (as large as the scales themselves: 0.44 GiB for an 8B model's int4 g128 weights, which a run in CPU memory
    kept); both stages of a two-stage spec, and a second calibration still works."""
    spec = QuantizationSpec(dtype=Dtype.uint4, qscheme=QSchemeType.per_group, ch_axis=-1, group_size=16,
                            symmetric=False, is_dynamic=False)
    fq = FakeQuantize(spec, name="fc.weight_quantizer")
    w = torch.randn(8, 64)
    fq.calibrate_from(w)
    lo, hi = w.reshape(8, 4, 16).amin(-1).clamp(max=0), w.reshape(8, 4, 16).amax(-1).clamp(min=0)
    torch.testing.assert_close(fq.scale, (hi - lo) / 15)
    assert not fq.observer.has_statistics and not fq.observing
    assert not [name for name, b in fq.named_buffers() if "observer" in name and b is not None]
    fq.calibrate_from(w * 2)
    torch.testing.assert_close(fq.scale, 2 * (hi - lo) / 15)
    two = FakeQuantize([QuantizationSpec(dtype=Dtype.fp4, qscheme=QSchemeType.per_group, ch_axis=-1, group_size=16,
                                         is_dynamic=False),
                        QuantizationSpec(dtype=Dtype.fp8_e4m3, qscheme=QSchemeType.per_tensor, is_dynamic=False)])
    two.calibrate_from(w)
    assert two.scale is not None and two.scale_quantizer.scale is not None
    assert not two.observer.has_statistics and not two.scale_quantizer.observer.has_statistics
