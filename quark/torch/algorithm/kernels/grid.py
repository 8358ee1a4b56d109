"""Integer-grid arithmetic inside Triton kernels, op for op as ``utils.quant.fake_quant_with``.

Rounding: ``0`` half to even (``torch.round``), ``1`` half away from zero, ``2`` floor, each exact in
float32. Division by the scale: ``x * inv`` with ``inv = torch.reciprocal(scale)`` computed by the
caller (the ``"reciprocal"`` integer division mode), or the correctly rounded ``x / scale``
(``"exact"``).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_to_grid(x, METHOD: tl.constexpr):
    if METHOD == 2:
        return tl.floor(x)
    elif METHOD == 1:
        a = tl.floor(tl.abs(x) + 0.5)
        return tl.where(x < 0, -a, tl.where(x > 0, a, x * 0.0))
    else:
        r = tl.floor(x)
        d = x - r  # exact: r and x are within one unit
        odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
        return tl.where((d > 0.5) | ((d == 0.5) & odd), r + 1.0, r)


@triton.jit
def fake_quant_int(x, inv, scale, zp, qmin, qmax, METHOD: tl.constexpr, ZERO_FREE: tl.constexpr,
                   EXACT: tl.constexpr):
    if EXACT:
        v = tl.math.div_rn(x, scale)
    else:
        v = x * inv
    v = round_to_grid(v, METHOD)
    if ZERO_FREE:  # signed symmetric grids: zero point 0
        v = tl.minimum(tl.maximum(v, qmin), qmax)
    else:
        v = tl.minimum(tl.maximum(v + zp, qmin), qmax) - zp
    return v * scale
