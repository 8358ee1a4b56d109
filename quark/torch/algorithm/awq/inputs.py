"""Statistics of a scaling group's input tokens, streamed over its recorded calls (no concatenation).

AWQ's search needs, per scaling group, the mean |activation| per channel (its scale candidates),
each quantization group's input covariance with massive tokens capped (its clipping search) and,
for a group whose output is a linear's (no ``module2inspect``), the full input covariance, from
which each candidate's output error is ``tr(E C Eᵀ)`` (:func:`output_error`). They are kept as
sums with their token count, so the sums of several ranks add up (``distributed.all_reduce_``) to
those of one process on all the tokens. Tokens go ``token_chunk`` at a time, so no float copy of
a whole call is made.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from quark.torch.algorithm.utils.gram import add_gram_rows, gram, half_gemm, matmul_f32
from quark.torch.algorithm.utils.tokens import cap_factors
from quark.torch.quantization.calibration.distributed import all_gather_cat, all_reduce_

__all__ = ["GroupInputStats", "group_input_stats", "output_error"]

#: Tokens per step of the streamed statistics: bounds the float32 temporaries (8192 tokens of
#: Llama-3-8B's down_proj input are 470 MB in float32).
TOKEN_CHUNK = 8192

#: Tokens per product of the group covariances: the capped tokens are a copy of the recorded inputs (2048 of
#: Llama-3-8B's down_proj inputs are 59 MB in bfloat16; a whole chunk's 235 MB raised AWQ's peak GPU memory).
GRAM_ROWS = 2048


#: Tokens whose |x| one float64 sum of :func:`group_input_stats` takes: ``sum(dtype=float64)`` converts its
#: input to float64 first (8192 tokens of Llama-3-8B's down_proj input: a 0.9 GiB temporary; measured on an
#: H100 as 1.35 GiB of AWQ's peak).
ABS_SUM_ROWS = 1024

@dataclass
class GroupInputStats:
    """Sums over ``tokens`` input tokens of a scaling group.

    ``abs_sum [in]``: Σ|x|; ``block_cov[size] [in // size, size, size]``: each quantization group's
    Σ x_g x_gᵀ with massive tokens capped; ``full_cov [in, in]``: Σ x xᵀ uncapped, or None.
    ``tokens`` counts every rank's tokens after :meth:`reduce`.
    """

    tokens: int
    abs_sum: torch.Tensor
    block_cov: dict[int, torch.Tensor]
    full_cov: torch.Tensor | None = None
    local_tokens: int = -1  # this process's tokens (``tokens`` before :meth:`reduce`)

    def __post_init__(self) -> None:
        if self.local_tokens < 0:
            self.local_tokens = self.tokens

    def mean_abs(self) -> torch.Tensor:
        return (self.abs_sum / max(self.tokens, 1)).float()

    def covariance(self, size: int) -> torch.Tensor:
        """Each quantization group's second moment ``mean_t x_g x_gᵀ`` (massive tokens capped), float32."""
        return (self.block_cov[size] / max(self.tokens, 1)).float()

    def reduce(self) -> GroupInputStats:
        """Sum the statistics over the ranks of an initialised process group (nothing with one process).

        ``full_cov`` stays this process's: the output errors computed from it are summed instead
        (a few numbers rather than an ``[in, in]`` matrix).
        """
        count = torch.tensor([float(self.tokens)], dtype=torch.float64, device=self.abs_sum.device)
        all_reduce_(count)
        self.tokens = int(count.item())
        all_reduce_(self.abs_sum)
        for cov in self.block_cov.values():
            all_reduce_(cov)
        return self


def _chunks(xs: Iterable[torch.Tensor], token_chunk: int) -> Iterator[torch.Tensor]:
    """The tokens of ``xs`` in order, ``token_chunk`` at a time across call boundaries, so the sums do
    not depend on how the calibration calls were split or merged."""
    pending: list[torch.Tensor] = []
    held = 0
    for x in xs:
        flat = x.reshape(-1, x.shape[-1])
        while flat.shape[0]:
            take = min(token_chunk - held, flat.shape[0])
            pending.append(flat[:take])
            held += take
            flat = flat[take:]
            if held == token_chunk:
                yield pending[0] if len(pending) == 1 else torch.cat(pending)
                pending, held = [], 0
    if pending:
        yield pending[0] if len(pending) == 1 else torch.cat(pending)


@torch.no_grad()
def group_input_stats(xs: Sequence[torch.Tensor], group_sizes: Iterable[int], full: bool = False,
                      token_chunk: int | None = None) -> GroupInputStats:
    """The sums of :class:`GroupInputStats` over every token of the tensors ``xs`` (each ``[..., in]``).

    Massive tokens are capped as in GPTQ's Hessian (:mod:`quark.torch.algorithm.utils.tokens`),
    against the median peak of all tokens of ``xs``. ``token_chunk`` defaults to ``TOKEN_CHUNK``, read
    at each call.
    """
    token_chunk = token_chunk or TOKEN_CHUNK
    if not xs:
        raise ValueError("group_input_stats: no recorded inputs")
    cols, device = xs[0].shape[-1], xs[0].device
    sizes = sorted(set(group_sizes))
    peaks = torch.cat([c.abs().amax(-1).float() for c in _chunks(xs, token_chunk)])
    factors = cap_factors(peaks, median_of=all_gather_cat(peaks, "AWQ token peaks"))
    # float64 sums divided once: the float32 statistics do not depend on how the tokens were split over
    # calls or ranks (on a GPU each half-precision chunk's product is float32, then summed in float64)
    abs_sum = torch.zeros(cols, dtype=torch.float64, device=device)
    block = {s: torch.zeros(cols // s, s, s, dtype=torch.float64, device=device) for s in sizes}
    full_cov = torch.zeros(cols, cols, dtype=torch.float32, device=device) if full else None
    t0 = 0
    for chunk in _chunks(xs, token_chunk):
        n = chunk.shape[0]
        for r0 in range(0, n, ABS_SUM_ROWS):  # a float64 sum converts its input first: a few rows at a time
            abs_sum += chunk[r0:r0 + ABS_SUM_ROWS].abs().sum(0, dtype=torch.float64)
        if full_cov is not None:
            _add_gram(full_cov, chunk)
        for r0 in range(0, n, GRAM_ROWS):  # the capped tokens are a copy: a few rows at a time
            part = chunk[r0:r0 + GRAM_ROWS]
            rows = part.shape[0]
            if factors is not None:
                part = part * factors[t0 + r0:t0 + r0 + rows, None].to(part.dtype)
            for s in sizes:  # [G, rows, s]: one batched product per quantization group
                block[s] += _gram64(part.reshape(rows, cols // s, s).transpose(0, 1))
        t0 += n
    return GroupInputStats(t0, abs_sum, block, full_cov)


def _add_gram(total: torch.Tensor, x: torch.Tensor) -> None:
    """``total += xᵀ x`` (float32) without a second ``[in, in]`` temporary: half-precision tokens on a GPU
    a block of rows of the product at a time (:func:`add_gram_rows`), others in one in-place float32 product."""
    if half_gemm(x):
        add_gram_rows(total, x)
        return
    xf = x.float()
    total.addmm_(xf.t(), xf)


def _gram64(x: torch.Tensor) -> torch.Tensor:
    """``xᵀ x`` summed in float64: from float64 tokens off the GPU (exact products), from the
    half-precision GEMM's float32 result on a GPU."""
    if half_gemm(x):
        return gram(x).double()
    xd = x.double()
    return xd.transpose(-2, -1) @ xd


def output_error(delta: torch.Tensor, cov: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``Σ_t ||delta x_t||²`` = ``tr(delta C deltaᵀ)`` for ``delta [out, in]`` and ``C = Σ_t x_t x_tᵀ``
    (float32, a 0-d tensor). On a GPU with a half-precision model (``dtype``) the product runs in that
    precision with float32 accumulation, as the model's own forward would."""
    return (matmul_f32(delta, cov, dtype) * delta.float()).sum()
