"""Hadamard matrices: Sylvester for powers of two times a Paley core (orders 12, 20, 28, 36, ...).

An order-``n`` Hadamard matrix (entries ±1, ``H Hᵀ = n I``) is built as ``Sylvester(2^k) ⊗ C``
where the core ``C`` has order ``m = n / 2^k`` and comes from Paley's constructions over a prime
field: type I (order ``p + 1``, ``p ≡ 3 mod 4``) or type II (order ``2 (p + 1)``, ``p ≡ 1 mod 4``).
This covers e.g. 576 = 16·36, 1536 = 128·12, 14336 = 512·28. Sizes without such a factorisation
raise ``ValueError``; callers that accept any orthogonal matrix can fall back to a random one.
:func:`mean_preserving_rotation` builds the rotations LayerNorm models need (``Q·1 = 1``).
"""

from __future__ import annotations

import math

import torch


def _is_prime(p: int) -> bool:
    return p >= 2 and all(p % d for d in range(2, math.isqrt(p) + 1))


def _jacobsthal(p: int) -> torch.Tensor:
    squares = {(i * i) % p for i in range(1, p)}
    chi = [0] + [1 if i in squares else -1 for i in range(1, p)]
    return torch.tensor([[chi[(j - i) % p] for j in range(p)] for i in range(p)], dtype=torch.float64)


def _paley1(p: int) -> torch.Tensor:
    q = _jacobsthal(p)
    n = p + 1
    s = torch.zeros(n, n, dtype=torch.float64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = q
    return torch.eye(n, dtype=torch.float64) + s


def _paley2(p: int) -> torch.Tensor:
    q = _jacobsthal(p)
    n = p + 1
    c = torch.zeros(n, n, dtype=torch.float64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = q
    a = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    h = torch.zeros(2 * n, 2 * n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            block = b if c[i, j] == 0 else c[i, j] * a
            h[2 * i:2 * i + 2, 2 * j:2 * j + 2] = block
    return h


def _core(m: int) -> torch.Tensor | None:
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if m == 2:
        return torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    if m % 4:
        return None
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return _paley1(m - 1)
    if m % 2 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return _paley2(m // 2 - 1)
    return None


def hadamard_matrix(n: int) -> torch.Tensor:
    """An order-``n`` ±1 Hadamard matrix (float64), or ``ValueError`` when none is constructible here."""
    if n < 1:
        raise ValueError(f"hadamard_matrix: size {n} must be positive")
    k = 0
    while n % (2 ** (k + 1)) == 0:
        k += 1
    for j in range(k, -1, -1):
        core = _core(n >> j)
        if core is not None:
            h = core
            sylvester = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
            for _ in range(j):
                h = torch.kron(sylvester, h)
            return h
    raise ValueError(
        f"no Hadamard matrix of size {n} is available (supported: 2^k times 1, 2, or a Paley order "
        "p+1 with prime p ≡ 3 mod 4, or 2(p+1) with prime p ≡ 1 mod 4); use random=True for a random "
        "orthogonal rotation"
    )


def orthogonal_rotation(n: int, random: bool = False, seed: int = 0) -> torch.Tensor:
    """An orthonormal ``[n, n]`` float64 rotation.

    ``random=False``: the normalised Hadamard matrix. ``random=True``: the Hadamard matrix times a
    random ±1 diagonal (QuaRot's randomised Hadamard), or, when no Hadamard matrix of this size
    exists, a random orthogonal matrix (QR of a Gaussian).
    """
    gen = torch.Generator().manual_seed(seed)
    try:
        h = hadamard_matrix(n) / math.sqrt(n)
    except ValueError:
        if not random:
            raise
        q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
        return q * torch.sign(torch.diagonal(r))
    if random:
        signs = torch.randint(0, 2, (n,), generator=gen, dtype=torch.float64) * 2 - 1
        h = h * signs
    return h


def _legendre_signs(n: int) -> torch.Tensor:
    """Quadratic characters ``(k | p)`` for ``k = 1..n-1``, ``p`` the smallest prime above ``n``."""
    p = n + 1
    while not _is_prime(p):
        p += 1
    squares = {(i * i) % p for i in range(1, p)}
    return torch.tensor([1.0 if k in squares else -1.0 for k in range(1, n)], dtype=torch.float64)


def mean_preserving_rotation(n: int, random: bool = False, seed: int = 0) -> torch.Tensor:
    """An orthonormal ``[n, n]`` float64 ``Q`` with ``Q·1 = 1`` (so ``Qᵀ·1 = 1`` too).

    Rotating mean-free rows ``x`` as ``x Q`` keeps them mean-free, which is what LayerNorm models
    need (their norms subtract the mean, a plain Hadamard would move the mean direction onto a
    single channel). Construction: ``Q = Ĥ D Ĥᵀ`` with ``Ĥ`` a normalised Hadamard matrix whose
    rows are sign-flipped so that its first column is constant, and ``D = diag(1, s)``: ``Ĥᵀ·1``
    is ``√n e₁``, which ``D`` keeps, so ``Q·1 = 1``; on the mean-free subspace ``Q`` flips signs in
    the Hadamard (Walsh) basis, spreading any single channel over all channels like QuaRot's
    randomised Hadamard. ``s`` must not be a Hadamard row itself (``Q`` would then be a
    permutation), so ``random=False`` takes the Legendre-symbol signs (fixed, well spread) and
    ``random=True`` random signs from ``seed``. Without a Hadamard matrix of order ``n``,
    ``random=True`` falls back to ``M diag(1, R) M`` (``M`` the Householder reflection exchanging
    ``e₁`` and ``1/√n``, ``R`` a random orthogonal matrix of order ``n - 1``); ``random=False`` raises.
    """
    gen = torch.Generator().manual_seed(seed)
    try:
        h = hadamard_matrix(n)
    except ValueError:
        if not random:
            raise
        u = torch.full((n,), 1.0 / math.sqrt(n), dtype=torch.float64)
        w = u.clone()
        w[0] -= 1.0
        m = torch.eye(n, dtype=torch.float64)
        if float(w.norm()) > 0:
            m = m - 2.0 * torch.outer(w, w) / float(w @ w)
        inner = torch.eye(n, dtype=torch.float64)
        if n > 1:
            q, r = torch.linalg.qr(torch.randn(n - 1, n - 1, generator=gen, dtype=torch.float64))
            inner[1:, 1:] = q * torch.sign(torch.diagonal(r))
        return m @ inner @ m
    h = h * torch.sign(h[:, :1]) / math.sqrt(n)
    if random:
        signs = torch.randint(0, 2, (n - 1,), generator=gen, dtype=torch.float64) * 2 - 1
    else:
        signs = _legendre_signs(n)
    d = torch.cat([torch.ones(1, dtype=torch.float64), signs])
    return (h * d) @ h.t()
