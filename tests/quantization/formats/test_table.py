"""The format table: one row per Dtype, and its facts agree with torch and the OCP specs."""

from __future__ import annotations

import pytest
import torch

from quark.torch.quantization.config.type import Dtype
from quark.torch.quantization.formats import FORMATS, MX_ELEMENT_DTYPES, code_to_float, format_info


def test_every_dtype_has_exactly_one_row() -> None:
    assert set(FORMATS) == set(Dtype)
    assert all(info.dtype == d for d, info in FORMATS.items())


@pytest.mark.parametrize("dtype, tdtype", [(Dtype.fp8_e4m3, torch.float8_e4m3fn),
                                           (Dtype.fp8_e5m2, torch.float8_e5m2),
                                           (Dtype.float16, torch.float16),
                                           (Dtype.bfloat16, torch.bfloat16)])
def test_float_limits_equal_torch_finfo(dtype: Dtype, tdtype: torch.dtype) -> None:
    info = FORMATS[dtype]
    assert info.qmax == torch.finfo(tdtype).max
    assert info.qmin == torch.finfo(tdtype).min
    assert info.torch_dtype == tdtype
    assert info.bits == torch.finfo(tdtype).bits


@pytest.mark.parametrize("dtype, qmin, qmax", [(Dtype.int8, -128, 127), (Dtype.uint8, 0, 255),
                                               (Dtype.int4, -8, 7), (Dtype.uint4, 0, 15),
                                               (Dtype.int2, -2, 1)])
def test_integer_ranges(dtype: Dtype, qmin: int, qmax: int) -> None:
    assert (FORMATS[dtype].qmin, FORMATS[dtype].qmax) == (qmin, qmax)


def test_e2m1_grid() -> None:
    values = code_to_float(torch.arange(16, dtype=torch.uint8), Dtype.fp4)
    assert set(values.abs().tolist()) == {0, 0.5, 1, 1.5, 2, 3, 4, 6}


@pytest.mark.parametrize("dtype", [Dtype.fp6_e3m2, Dtype.fp6_e2m3, Dtype.fp4])
def test_small_float_max_is_largest_code(dtype: Dtype) -> None:
    info = FORMATS[dtype]
    values = code_to_float(torch.arange(2**info.bits, dtype=torch.uint8), dtype)
    assert values.max().item() == info.qmax
    assert values.min().item() == info.qmin
    assert 2.0**info.emax <= info.qmax < 2.0 ** (info.emax + 1)


@pytest.mark.parametrize("dtype, block, sub, mbits", [(Dtype.mx9, 16, 2, 7), (Dtype.mx6, 16, 2, 4),
                                                      (Dtype.bfp16, 8, None, 7)])
def test_block_floating_point_rows(dtype: Dtype, block: int, sub: int | None, mbits: int) -> None:
    info = FORMATS[dtype]
    assert (info.block_size, info.sub_block_size, info.mbits) == (block, sub, mbits)
    assert info.qmax == 2**mbits - 1 == -info.qmin


def test_mx_rows() -> None:
    assert FORMATS[Dtype.mx].block_size == 32
    assert set(MX_ELEMENT_DTYPES) == {Dtype.fp8_e4m3, Dtype.fp8_e5m2, Dtype.fp6_e3m2,
                                      Dtype.fp6_e2m3, Dtype.fp4, Dtype.int8}


def test_format_info_unknown_raises() -> None:
    with pytest.raises(ValueError, match="known"):
        format_info("int3")  # type: ignore[arg-type]
