"""Shamir secret sharing over GF(2^256 + 297), for SecAgg+'s recovery of dropped devices' masks.

Shamir, "How to Share a Secret", CACM 1979. A secret is the constant term of a random
polynomial of degree ``threshold - 1``; each holder gets its value at one non-zero point, and
any ``threshold`` values rebuild the secret by Lagrange interpolation at 0, while fewer reveal
nothing about it. Coefficients come from the operating system's randomness.
"""

from __future__ import annotations

import secrets

PRIME = 2**256 + 297
"""Shares live in GF(2^256 + 297), the smallest prime field holding every 32-byte secret; a share
is 33 bytes."""


def shamir_split(secret: int, xs: list[int], threshold: int) -> list[int]:
    """Shares of ``secret`` at the non-zero points ``xs``; any ``threshold`` of them rebuild it."""
    coefficients = [secret] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = []
    for x in xs:
        value = 0
        for coefficient in reversed(coefficients):
            value = (value * x + coefficient) % PRIME
        shares.append(value)
    return shares


def shamir_combine(points: list[tuple[int, int]]) -> int:
    """The secret (the polynomial at 0) from ``(x, share)`` points, by Lagrange interpolation."""
    secret = 0
    for i, (xi, yi) in enumerate(points):
        numerator, denominator = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                numerator = numerator * xj % PRIME
                denominator = denominator * (xj - xi) % PRIME
        secret = (secret + yi * numerator * pow(denominator, -1, PRIME)) % PRIME
    return secret
