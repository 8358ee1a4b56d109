"""How much weight GPTQ's Hessian gives to tokens with massive activations.

Trained LLMs turn the first token of a sequence (and sometimes a few delimiter tokens) into an
*attention sink* whose hidden state carries massive activations, thousands of times the typical
value in a few channels (Sun et al., 2024, "Massive Activations in Large Language Models"). In
SmolLM2-135M one such token out of 512 makes its channel's Hessian diagonal ~10⁶× the median: GPTQ
then spends a layer's whole error budget reproducing that token, and the damping (a fraction of
the *mean* diagonal) over-regularises every other column. Leaving the token out is worse still
(its output matters: perplexity 30.1 → 48.1 on SmolLM2 int4 g64), so instead each token's
contribution is capped: a token whose peak |activation| exceeds ``MASSIVE_TOKEN_RATIO`` × the
median token peak of its batch is scaled down to that peak, keeping its direction (30.1 → 28.6;
RTN 30.7, float 21.8; ``bench/quality.py``, README). AWQ's clipping search caps its input
covariance the same way (``awq.group_input_covariance``).
"""

from __future__ import annotations

import torch

#: Cap on a token's peak |activation| as a multiple of the batch's median token peak, applied to
#: GPTQ's Hessian statistics. ``None`` leaves every token as it is (the reference behaviour).
MASSIVE_TOKEN_RATIO: float | None = 10.0


def token_weights(x: torch.Tensor, ratio: float | None = None) -> torch.Tensor | None:
    """Per-token factors ``[tokens, 1]`` that cap each token's peak (None when nothing is capped; on a GPU, factors
    of 1: :func:`cap_factors`)."""
    flat = x.reshape(-1, x.shape[-1])
    factors = cap_factors(flat.detach().abs().amax(-1, keepdim=True).float(), ratio)
    return None if factors is None else factors.to(flat.dtype)


def cap_factors(peak: torch.Tensor, ratio: float | None = None,
                median_of: torch.Tensor | None = None) -> torch.Tensor | None:
    """Float32 factors (``peak``'s shape) that cap each token's peak |activation| ``peak`` (float32, one
    per token) at ``ratio`` × the median of the non-zero ones of ``median_of`` (default: of ``peak``); None
    when nothing is capped. Statistics streamed over several calls take the peaks of all their tokens first, and
    data-parallel ranks those of every rank (all-gathered), so the median is one process's. On a GPU the factors
    come from :func:`cap_factors_without_waiting` (exact ones where nothing is capped: the same products).
    """
    if peak.is_cuda:
        return cap_factors_without_waiting(peak, ratio, median_of)
    ratio = MASSIVE_TOKEN_RATIO if ratio is None else ratio
    every = peak if median_of is None else median_of
    # all-zero tokens carry nothing (Llama 4's experts see every token, the ones not routed to them as zeros):
    # they do not lower the median
    every = every[every > 0]
    if ratio is None or every.numel() < 2:
        return None
    limit = float(ratio) * every.median()
    if limit <= 0 or bool((peak <= limit).all()):
        return None
    return limit / peak.clamp(min=limit)


def cap_factors_without_waiting(peak: torch.Tensor, ratio: float | None = None,
                                median_of: torch.Tensor | None = None) -> torch.Tensor | None:
    """:func:`cap_factors` computed on ``peak``'s device without reading anything back (each of its tests is a
    synchronisation that idles a GPU): factors of exactly 1 where it returns None, the same factors otherwise.
    None only when capping is off (``ratio`` None)."""
    ratio = MASSIVE_TOKEN_RATIO if ratio is None else ratio
    if ratio is None:
        return None
    every = peak if median_of is None else median_of
    positive = every > 0
    limit = float(ratio) * torch.where(positive, every, float("nan")).nanmedian()  # the median of the positive ones
    factors = limit / peak.clamp(min=limit)  # limit / limit = 1 for the peaks within it
    return torch.where(positive.sum() >= 2, factors, torch.ones_like(factors))


def capped_tokens(x: torch.Tensor, ratio: float | None = None) -> torch.Tensor:
    """``x [..., d]`` as ``[tokens, d]`` with every token's peak capped at ``ratio`` × the median peak."""
    flat = x.reshape(-1, x.shape[-1])
    weights = token_weights(flat, ratio)
    return flat if weights is None else flat * weights
