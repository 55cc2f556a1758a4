"""Fit the erf coefficient tables in minisft/kernels/erf_coefficients.py (run from the
repository root: `python tools/fit_erf.py`; it rewrites that file).

Two approximations, both fitted to Python's math.erf/math.erfc (correctly rounded to
double precision) and never fitted at run time:

- float64 (gradient checks need ~1e-15): Chebyshev interpolation at the Chebyshev nodes
  (Trefethen, "Approximation Theory and Approximation Practice", ch. 4), in two pieces,
      |x| < 2:       erf(x) = x * P(x^2)                            P: degree 18 on [0, 4]
      2 <= |x| < 6:  erf(x) = sign(x) (1 - exp(-x^2) Q(1/x^2) / |x|)  Q: degree 16 on [1/36, 1/4]
      |x| >= 6:      erf(x) = sign(x)       (erfc(6) is below half an ulp of 1)
  max error 4e-15, evaluated by Clenshaw's recurrence.
- float32 (the fast GELU): one rational function erf(x) = x * R(x^2), R = P5 / Q5, on
  |x| <= 3.92 (where erf rounds to 1 in float32), fitted for relative error by iteratively
  reweighted linear least squares (the Sanathanan-Koerner iteration, IEEE Trans. Automatic
  Control 8 (1963)); max error 3.3e-8 when evaluated in float64.
- float32, evaluated in float32 (the fast GELU's normal CDF): the tail
      erfc(z) = exp(-z^2) t P(t),  t = 1 / (1 + p z),  z >= 0,  p = 0.45,  P of degree 9,
  the form of Numerical Recipes' erfcc (Press et al., ch. 6.2) with the polynomial outside the
  exponential, fitted to erfcx(z) = erfc(z) exp(z^2) for the smallest largest relative error
  (Lawson's iteration of weighted least squares: C. L. Lawson, JPL report 1964; as used by
  Rice, "The Approximation of Functions", vol. 1) at Chebyshev nodes in t on (0, 1]: max
  relative error 3.2e-8 on all of z >= 0, so Phi(x) = erfc(-x / sqrt 2) / 2 keeps its
  relative accuracy in the far negative tail, where 1 + erf(x / sqrt 2) would cancel. p was
  chosen by a scan (0.42 to 0.50 in steps of 0.01: 1.0e-7, 8.1e-8, 5.5e-8, 3.2e-8, 5.0e-8,
  8.0e-8, ...).
"""
import math
import pathlib

import numpy

CLIP32 = 3.92
TAIL_P, TAIL_DEGREE = 0.45, 9
TARGET = pathlib.Path(__file__).resolve().parents[1] / "minisft" / "kernels" / "erf_coefficients.py"


def erf_over_x(t):
    """erf(x) / x at t = x^2 (its limit 2/sqrt(pi) at 0)."""
    return math.erf(math.sqrt(t)) / math.sqrt(t) if t > 0 else 2 / math.sqrt(math.pi)


def chebyshev_fit(f, lo, hi, degree):
    """Coefficients of the Chebyshev interpolant of f on [lo, hi]."""
    nodes = numpy.cos(numpy.pi * (numpy.arange(degree + 1) + 0.5) / (degree + 1))
    values = [f((lo + hi) / 2 + (hi - lo) / 2 * u) for u in nodes]
    return numpy.polynomial.chebyshev.chebfit(nodes, values, degree)


def rational_fit(degree=5, points=2000, iterations=20):
    """(P, Q), lowest power first with Q[0] = 1, with P/Q ~ erf(x)/x in t = x^2 on
    [0, CLIP32^2], for relative error."""
    x = CLIP32 / 2 * (1 + numpy.cos(numpy.pi * (numpy.arange(points) + 0.5) / points))
    t = x * x
    f = numpy.array([erf_over_x(v) for v in t])
    powers = numpy.vander(t, degree + 1, increasing=True)
    weight = 1 / f
    for _ in range(iterations):
        # P(t) - f (Q(t) - 1) = f, weighted by 1 / (f Q_previous(t))
        system = numpy.hstack([powers, -f[:, None] * powers[:, 1:]]) * weight[:, None]
        c = numpy.linalg.lstsq(system, f * weight, rcond=None)[0]
        p, q = c[:degree + 1], numpy.r_[1.0, c[degree + 1:]]
        weight = 1 / (f * (powers @ q))
    return p, q


def erfcx(z):
    """erfc(z) exp(z^2), z >= 0; its asymptotic series where exp(z^2) would overflow."""
    if z < 25:
        return math.erfc(z) * math.exp(z * z)
    total, term = 1.0, 1.0
    for k in range(1, 8):
        term *= -(2 * k - 1) / (2 * z * z)
        total += term
    return total / (z * math.sqrt(math.pi))


def tail_fit(points=4000, iterations=40):
    """P, lowest power first, with t P(t) ~ erfcx(z) at t = 1 / (1 + TAIL_P z), for relative
    error: Lawson's iteration (each weight times the square root of its relative error)."""
    t = 0.5 * (1 + numpy.cos(numpy.pi * (numpy.arange(points) + 0.5) / points))
    t = t[t > 1e-6]
    f = numpy.array([erfcx(v) for v in (1 / t - 1) / TAIL_P]) / t
    powers = numpy.vander(t, TAIL_DEGREE + 1, increasing=True)
    weight = 1 / f
    for _ in range(iterations):
        c = numpy.linalg.lstsq(powers * weight[:, None], f * weight, rcond=None)[0]
        weight = weight * numpy.sqrt(numpy.abs(powers @ c - f) / f + 1e-30)
        weight /= weight.mean()
    return c


def _table(name, values):
    rows = "".join(f"    {float(v)!r},\n" for v in values)
    return f"{name} = (\n{rows})\n"


def main():
    small = chebyshev_fit(erf_over_x, 0.0, 4.0, 18)
    large = chebyshev_fit(lambda w: math.erfc(w ** -0.5) * math.exp(1 / w) * w ** -0.5, 1 / 36, 1 / 4, 16)
    p, q = rational_fit()
    text = ('"""erf coefficient tables, written by tools/fit_erf.py (which says how they were\n'
            'fitted); do not edit by hand."""\n\n'
            "# float64: Chebyshev coefficients (lowest first) of erf(x)/x in t = x^2 on [0, 4] ...\n"
            + _table("SMALL", small) + "SMALL_RANGE = (0.0, 4.0)\n\n"
            "# ... and of erfc(x) exp(x^2) |x| in w = 1/x^2 on [1/36, 1/4]\n"
            + _table("LARGE", large) + "LARGE_RANGE = (1 / 36, 1 / 4)\n\n"
            f"# float32: erf(x) = x P(t) / Q(t), t = x^2, power series lowest first, |x| <= {CLIP32}\n"
            + _table("RATIONAL_P", p) + _table("RATIONAL_Q", q) + f"RATIONAL_CLIP = {CLIP32}\n\n"
            f"# float32: erfc(z) = exp(-z^2) t P(t), t = 1 / (1 + {TAIL_P} z), z >= 0, P lowest first\n"
            + _table("TAIL", tail_fit()) + f"TAIL_P = {TAIL_P}\n")
    TARGET.write_text(text, encoding="utf-8")
    print(f"wrote {TARGET}")


if __name__ == "__main__":
    main()
