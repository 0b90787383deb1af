"""digamma, trigamma and lgamma of float32 blocks as Triton device functions (x >= 0).

Triton has no special functions of its own (CUDA's libdevice has ``lgammaf`` but no digamma), so the
three are computed the classical way, by the recurrence up to ``y >= SHIFT_TO`` (= 8) and the asymptotic
series there, whose first omitted term is below float32's resolution (< 1e-11):

    psi(x)   = psi(x + n) - sum_{i<n} 1 / (x + i),
    psi(y)  ~= log y - 1/(2y) - 1/(12y^2) + 1/(120y^4) - 1/(252y^6) + 1/(240y^8);
    psi1(x)  = psi1(x + n) + sum_{i<n} 1 / (x + i)^2,
    psi1(y) ~= 1/y + 1/(2y^2) + 1/(6y^3) - 1/(30y^5) + 1/(42y^7) - 1/(30y^9);
    lnG(y)  ~= (y - 1/2) log y - y + log(2 pi) / 2 + 1/(12y) - 1/(360y^3) + 1/(1260y^5) - 1/(1680y^7).

lgamma below 8 instead moves x into [1.5, 2.5) (up or down) and uses a polynomial around 2, so that it
stays accurate near its roots 1 and 2 (the shift up to 8 would cancel there). The recurrences are unrolled
with a mask (elements that need fewer steps stay put), so every element of a block runs the same
instructions. Measured in float32 against float64 ``torch.special`` on 1e-6 .. 1e8 (``tests/test_triton_kernels.py``):
error <= 1e-6 max(1, |f(x)|) for all three, like torch's own float32 functions. At ``x = 0``:
``psi = -inf``, ``psi1 = inf``, ``lnG = inf``, as torch. The domain is ``x >= 0`` (the losses'
concentrations are positive): there is no reflection formula.

Also the online ``logsumexp`` of a row read in tiles (:func:`logsumexp_start`, :func:`logsumexp_update`,
:func:`logsumexp_finish`; per lane ``m' = max(m, x)``, ``s' = s exp(m - m') + exp(x - m')``, then the lanes
combined), shared by the KD loss and the ensemble's accumulation from logits.

Importing this module needs ``triton``; set ``TRITON_INTERPRET=1`` before importing it to run the
functions on CPU tensors with Triton's interpreter.
"""
import math

import triton
import triton.language as tl

#: The recurrence moves x up to at least this before the asymptotic series is used.
SHIFT_TO = tl.constexpr(8)
_HALF_LOG_2PI = tl.constexpr(0.5 * math.log(2.0 * math.pi))


@triton.jit
def digamma(x):
    """psi(x) of a float32 block, x >= 0 (the compiler drops the unused trigamma half)."""
    psi, _ = digamma_and_trigamma(x)
    return psi


@triton.jit
def trigamma(x):
    """psi1(x) = d psi / dx of a float32 block, x >= 0 (the compiler drops the unused digamma half)."""
    _, psi1 = digamma_and_trigamma(x)
    return psi1


@triton.jit
def digamma_and_trigamma(x):
    """(psi(x), psi1(x)) of a float32 block, x >= 0, sharing the recurrence's reciprocals."""
    shift = tl.zeros_like(x)
    shift1 = tl.zeros_like(x)
    y = x
    for _ in tl.static_range(SHIFT_TO):
        small = y < SHIFT_TO
        r = 1.0 / y
        shift += tl.where(small, r, 0.0)
        shift1 += tl.where(small, r * r, 0.0)
        y = tl.where(small, y + 1.0, y)
    inv = 1.0 / y
    inv2 = inv * inv
    psi = tl.log(y) - 0.5 * inv - inv2 * (1.0 / 12 - inv2 * (1.0 / 120 - inv2 * (1.0 / 252 - inv2 * (1.0 / 240))))
    psi1 = inv * (1.0 + inv * (0.5 + inv * (1.0 / 6 - inv2 * (1.0 / 30 - inv2 * (1.0 / 42 - inv2 * (1.0 / 30))))))
    return psi - shift, psi1 + shift1


@triton.jit
def _lgamma_near_two(p):
    """lnG(2 + p) for |p| <= 1/2: p times a degree-7 polynomial (Cephes' ``lgamf``; Taylor-like
    coefficients (1 - gamma_E), (zeta(2) - 1) / 2, ... adjusted), accurate to float32 and exact at p = 0."""
    poly = 6.055172732649237e-4
    poly = poly * p - 1.311620815545743e-3
    poly = poly * p + 2.863437556468661e-3
    poly = poly * p - 7.366775108654962e-3
    poly = poly * p + 2.058355474821512e-2
    poly = poly * p - 6.735323259371034e-2
    poly = poly * p + 3.224669577325661e-1
    poly = poly * p + 4.227843421859038e-1
    return p * poly


@triton.jit
def lgamma(x):
    """log Gamma(x) of a float32 block, x >= 0."""
    # x < SHIFT_TO: to t in [1.5, 2.5) by the recurrence, up (x < 1.5: two steps at most) or down (six at
    # most), so that lnG(x) = lnG(t) - log(x (x + 1) ..) or lnG(t) + log(t (t + 1) .. (x - 1)).
    small = x < SHIFT_TO
    t = tl.where(small, x, 2.0)
    up = tl.zeros_like(x) + 1.0
    for _ in tl.static_range(2):
        low = t < 1.5
        up = tl.where(low, up * t, up)
        t = tl.where(low, t + 1.0, t)
    down = tl.zeros_like(x) + 1.0
    for _ in tl.static_range(SHIFT_TO - 2):
        high = t >= 2.5
        t = tl.where(high, t - 1.0, t)
        down = tl.where(high, down * t, down)
    near = _lgamma_near_two(t - 2.0) + tl.log(down) - tl.log(up)
    # x >= SHIFT_TO: Stirling's series
    y = tl.maximum(x, SHIFT_TO * 1.0)
    inv = 1.0 / y
    inv2 = inv * inv
    series = inv * (1.0 / 12 - inv2 * (1.0 / 360 - inv2 * (1.0 / 1260 - inv2 * (1.0 / 1680))))
    return tl.where(small, near, (y - 0.5) * tl.log(y) - y + _HALF_LOG_2PI + series)


@triton.jit
def digamma1p(x):
    """psi(1 + x) of a float32 block, x >= 0; below 1/8 by its Taylor series
    ``-gamma_E + sum_{k>=2} (-1)^k zeta(k) x^(k-1)`` (to x^9, truncation < 1e-9), whose errors vary smoothly
    with x, so that differences ``psi(1 + x) - psi(1 + y)`` of small x, y keep their digits."""
    t = tl.minimum(x, 0.125)
    series = 1.0009945751278181
    series = 1.0020083928260822 - t * series
    series = 1.0040773561979443 - t * series
    series = 1.0083492773819228 - t * series
    series = 1.0173430619844491 - t * series
    series = 1.0369277551433699 - t * series
    series = 1.0823232337111382 - t * series
    series = 1.2020569031595943 - t * series
    series = 1.6449340668482264 - t * series
    series = t * series - 0.5772156649015329
    return tl.where(x < 0.125, series, digamma(x + 1.0))


def row_block(k: int, max_block: int) -> int:
    """The tile width of a one-row-per-program kernel over K columns: the next power of 2 of K (at least
    16), at most ``max_block`` (each kernel's own limit, set by its register use)."""
    return min(max_block, triton.next_power_of_2(max(k, 16)))


#: Start of a running maximum: the lowest finite float32, so that a lane that has seen only -inf keeps
#: ``exp(-inf - LOWEST) = 0`` and never computes ``-inf - (-inf)``.
_LOWEST = tl.constexpr(-3.4028234663852886e38)


@triton.jit
def logsumexp_start(BLOCK: tl.constexpr):
    """The per-lane state (running maximum, sum of ``exp(x - maximum)``) of an online logsumexp over tiles."""
    return tl.full([BLOCK], _LOWEST, tl.float32), tl.zeros([BLOCK], tl.float32)


@triton.jit
def logsumexp_update(top, total, x):
    """Fold one tile ``x`` (-inf where masked) into the per-lane state ``(top, total)``."""
    new_top = tl.maximum(top, x)
    return new_top, total * tl.exp(top - new_top) + tl.exp(x - new_top)


@triton.jit
def logsumexp_finish(top, total):
    """``log sum_k exp(x_k)`` of everything folded in: -inf if every x was -inf, +inf or NaN if one was."""
    row_top = tl.max(top, 0)
    return row_top + tl.log(tl.sum(total * tl.exp(top - row_top), 0))
