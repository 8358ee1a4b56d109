"""Granularity of quantization parameters: one place that maps a qscheme to parameter shapes.

Canonical parameter shapes (every other layer relies on these):

============  ===========================  ==============================================
qscheme       arguments                    parameter shape for ``x`` of shape ``S``
============  ===========================  ==============================================
per_tensor    --                           ``()``
per_channel   ``ch_axis=a``                ``(S[a],)``
per_group     ``ch_axis=a, group_size=g``  ``S`` with ``S[a]`` replaced by ``ceil(S[a] / g)``
============  ===========================  ==============================================

A last partial group (e.g. 172 elements in groups of 32: five full groups and one of 12) is a
group like any other; only its real elements take part in reductions. Negative axes count from
the end. Block formats (OCP MX, MX6/MX9, BFP16) use the per_group layout along their block axis.
"""

from __future__ import annotations

import math

import torch

from quark.torch.quantization.config.type import QSchemeType

__all__ = [
    "as_qscheme",
    "broadcast_param",
    "group_param",
    "grouped_view",
    "normalize_axis",
    "param_shape",
    "reduce_amax",
    "reduce_minmax",
    "to_blocks",
]


def as_qscheme(qscheme: QSchemeType | str) -> QSchemeType:
    """``qscheme`` as a ``QSchemeType`` (strings accepted; ``ValueError`` lists the allowed names)."""
    return QSchemeType.from_any("formats", "qscheme", qscheme)  # type: ignore[return-value]


def normalize_axis(axis: int | None, ndim: int, owner: str = "formats", field: str = "ch_axis") -> int:
    """``axis`` as a non-negative index into a tensor of rank ``ndim`` (``ValueError`` if out of range)."""
    if axis is None or isinstance(axis, bool) or not isinstance(axis, int):
        raise ValueError(f"{owner}.{field}={axis!r} must be an int in [{-ndim}, {ndim - 1}]")
    if not -ndim <= axis < ndim:
        raise ValueError(f"{owner}.{field}={axis} is out of range for a tensor of rank {ndim} "
                         f"(allowed: {-ndim}..{ndim - 1})")
    return axis % ndim


def _check_group_size(group_size: int | None, owner: str = "formats") -> int:
    if group_size is None or isinstance(group_size, bool) or not isinstance(group_size, int) \
            or group_size <= 0:
        raise ValueError(f"{owner}.group_size={group_size!r} must be a positive int for per_group")
    return group_size


def param_shape(x_shape: torch.Size | tuple[int, ...], qscheme: QSchemeType | str,
                ch_axis: int | None = None, group_size: int | None = None) -> tuple[int, ...]:
    """The canonical shape of a scale / zero point for a tensor of shape ``x_shape``."""
    qs = as_qscheme(qscheme)
    shape = tuple(int(s) for s in x_shape)
    if qs == QSchemeType.per_tensor:
        return ()
    axis = normalize_axis(ch_axis, len(shape))
    if qs == QSchemeType.per_channel:
        return (shape[axis],)
    g = _check_group_size(group_size)
    out = list(shape)
    out[axis] = math.ceil(shape[axis] / g)
    return tuple(out)


def to_blocks(x: torch.Tensor, axis: int, block: int, pad_value: float = 0.0) -> torch.Tensor:
    """View ``x`` as blocks along ``axis``: shape ``(*others, n_blocks, block)``.

    ``axis`` moves to the end (other dims keep their order) and is padded with ``pad_value`` up to
    a multiple of ``block``.
    """
    axis = normalize_axis(axis, x.ndim)
    moved = x.movedim(axis, -1)
    n = moved.shape[-1]
    pad = (-n) % block
    if pad:
        moved = torch.nn.functional.pad(moved, (0, pad), value=pad_value)
    return moved.reshape(*moved.shape[:-1], (n + pad) // block, block)


def reduce_minmax(x: torch.Tensor, qscheme: QSchemeType | str, ch_axis: int | None = None,
                  group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-parameter ``(min, max)`` of ``x`` in the canonical parameter shape (NaN propagates)."""
    qs = as_qscheme(qscheme)
    one_pass = x.element_size() > 1  # aminmax reads x once; float8 has no aminmax kernel
    if qs == QSchemeType.per_tensor:
        return tuple(torch.aminmax(x)) if one_pass and x.numel() else (x.amin(), x.amax())  # type: ignore[return-value]
    axis = normalize_axis(ch_axis, x.ndim)
    if qs == QSchemeType.per_channel:
        flat = x.movedim(axis, 0).reshape(x.shape[axis], -1)
        # along a dimension, PyTorch's CPU aminmax is several times slower than amin and amax (2 cores, a
        # 14336 x 4096 bf16 weight: 70 ms against 10 ms); on a GPU it reads the tensor once
        if one_pass and flat.numel() and x.device.type != "cpu":
            return tuple(flat.aminmax(dim=1))  # type: ignore[return-value]
        return flat.amin(dim=1), flat.amax(dim=1)
    g = _check_group_size(group_size)
    # Pad with +inf for the min and -inf for the max so padding never wins a reduction.
    mins = to_blocks(x, axis, g, pad_value=math.inf).amin(dim=-1).movedim(-1, axis)
    maxs = to_blocks(x, axis, g, pad_value=-math.inf).amax(dim=-1).movedim(-1, axis)
    return mins, maxs


def reduce_amax(x: torch.Tensor, qscheme: QSchemeType | str, ch_axis: int | None = None,
                group_size: int | None = None) -> torch.Tensor:
    """Per-parameter ``max(|x|)`` in the canonical parameter shape (NaN propagates)."""
    qs = as_qscheme(qscheme)
    a = x.abs()
    if qs == QSchemeType.per_tensor:
        return a.amax()
    axis = normalize_axis(ch_axis, x.ndim)
    if qs == QSchemeType.per_channel:
        return a.movedim(axis, 0).reshape(x.shape[axis], -1).amax(dim=1)
    g = _check_group_size(group_size)
    return to_blocks(a, axis, g, pad_value=0.0).amax(dim=-1).movedim(-1, axis)


def grouped_view(x_shape: torch.Size | tuple[int, ...], qscheme: QSchemeType | str, ch_axis: int | None = None,
                 group_size: int | None = None) -> tuple[tuple[int, ...], int] | None:
    """For per_group parameters of a tensor whose grouped axis is a multiple of the group: ``(shape, axis)``,
    the tensor's shape with that axis split into ``(groups, group)`` and where the groups are, so that a canonical
    parameter with a unit dimension after its group axis (``p.unsqueeze(axis + 1)``) broadcasts against the tensor
    viewed so (no copy of the parameter per element). None otherwise."""
    if as_qscheme(qscheme) != QSchemeType.per_group:
        return None
    shape = tuple(int(s) for s in x_shape)
    axis = normalize_axis(ch_axis, len(shape))
    g = _check_group_size(group_size)
    if shape[axis] % g:
        return None
    return (*shape[:axis], shape[axis] // g, g, *shape[axis + 1:]), axis


def broadcast_param(p: torch.Tensor, x_shape: torch.Size | tuple[int, ...],
                    qscheme: QSchemeType | str, ch_axis: int | None = None,
                    group_size: int | None = None) -> torch.Tensor:
    """Expand a parameter of canonical shape to ``x_shape`` (each element gets its own value).

    per_tensor accepts any one-element tensor; per_channel any tensor of ``S[a]`` elements;
    per_group needs exactly the canonical shape (a transposed layout must not pass silently).
    """
    qs = as_qscheme(qscheme)
    shape = tuple(int(s) for s in x_shape)
    expected = param_shape(shape, qs, ch_axis, group_size)
    if qs == QSchemeType.per_tensor:
        if p.numel() != 1:
            raise ValueError(f"formats.broadcast_param: per_tensor parameter must have one element, "
                             f"got shape {tuple(p.shape)}")
        return p.reshape(()).expand(shape)
    axis = normalize_axis(ch_axis, len(shape))
    if qs == QSchemeType.per_channel:
        if p.numel() != expected[0]:
            raise ValueError(f"formats.broadcast_param: per_channel parameter for ch_axis={ch_axis} "
                             f"of a tensor of shape {shape} must have {expected[0]} elements, got "
                             f"shape {tuple(p.shape)}")
        view = [1] * len(shape)
        view[axis] = expected[0]
        return p.reshape(view).expand(shape)
    _check_group_param(p, shape, ch_axis, group_size)
    g = _check_group_size(group_size)
    return p.repeat_interleave(g, dim=axis).narrow(axis, 0, shape[axis])


def group_param(p: torch.Tensor, x_shape: torch.Size | tuple[int, ...], ch_axis: int | None,
                group_size: int | None) -> torch.Tensor:
    """A per_group parameter of canonical shape with a unit dimension after its group axis: broadcasts against the
    tensor viewed as :func:`grouped_view`'s shape (each group's value once, where :func:`broadcast_param` copies it
    to every element). Checked as :func:`broadcast_param` checks it."""
    shape = tuple(int(s) for s in x_shape)
    _check_group_param(p, shape, ch_axis, group_size)
    return p.unsqueeze(normalize_axis(ch_axis, len(shape)) + 1)


def _check_group_param(p: torch.Tensor, shape: tuple[int, ...], ch_axis: int | None, group_size: int | None) -> None:
    expected = param_shape(shape, QSchemeType.per_group, ch_axis, group_size)
    if tuple(p.shape) != expected:
        raise ValueError(f"formats.broadcast_param: per_group parameter for a tensor of shape {shape} "
                         f"(ch_axis={ch_axis}, group_size={group_size}) must have shape {expected}, "
                         f"got {tuple(p.shape)}")
