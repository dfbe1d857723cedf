"""Symbolic dimensions: integer polynomials over named symbols (`batch`, `seq`, `past`, ...).

A dim is either a plain `int` or a `Sym`. Sums and products of symbols stay exact (`past+seq`,
`batch*seq`), which is all transformer shapes need; a `Sym` that reduces to a constant becomes an int.
"""

from __future__ import annotations

import re
from typing import Mapping, Union

__all__ = ["Sym", "Dim", "sym", "dim_str", "parse_dim", "eval_dim", "dim_mul", "dim_div"]

Monomial = tuple[str, ...]  # sorted symbol names; () is the constant term


class Sym:
    """An integer polynomial over named symbols; immutable and hashable."""

    __slots__ = ("terms",)

    def __init__(self, terms: Mapping[Monomial, int]):
        object.__setattr__(self, "terms", {m: c for m, c in sorted(terms.items()) if c != 0})

    def __setattr__(self, *_):  # immutable
        raise AttributeError("Sym is immutable")

    @staticmethod
    def make(terms: Mapping[Monomial, int]) -> "Dim":
        s = Sym(terms)
        if not s.terms:
            return 0
        if list(s.terms) == [()]:
            return s.terms[()]
        return s

    def __add__(self, other: "Dim") -> "Dim":
        return Sym.make(_add(self.terms, _terms(other), 1))

    __radd__ = __add__

    def __sub__(self, other: "Dim") -> "Dim":
        return Sym.make(_add(self.terms, _terms(other), -1))

    def __rsub__(self, other: "Dim") -> "Dim":
        return Sym.make(_add(_terms(other), self.terms, -1))

    def __mul__(self, other: "Dim") -> "Dim":
        return dim_mul(self, other)

    __rmul__ = __mul__

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sym):
            return self.terms == other.terms
        return False

    def __hash__(self) -> int:
        return hash(tuple(self.terms.items()))

    def __repr__(self) -> str:
        return dim_str(self)

    @property
    def symbols(self) -> set[str]:
        return {name for mono in self.terms for name in mono}


Dim = Union[int, Sym]


def sym(name: str) -> Sym:
    """A single named symbol."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ValueError(f"bad symbol name {name!r}: use letters, digits and underscores")
    return Sym({(name,): 1})


def _terms(d: Dim) -> dict[Monomial, int]:
    if isinstance(d, Sym):
        return dict(d.terms)
    return {(): int(d)} if d else {}


def _add(a: Mapping[Monomial, int], b: Mapping[Monomial, int], sign: int) -> dict[Monomial, int]:
    out = dict(a)
    for m, c in b.items():
        out[m] = out.get(m, 0) + sign * c
    return out


def dim_mul(a: Dim, b: Dim) -> Dim:
    if isinstance(a, int) and isinstance(b, int):
        return a * b
    out: dict[Monomial, int] = {}
    for ma, ca in _terms(a).items():
        for mb, cb in _terms(b).items():
            m = tuple(sorted(ma + mb))
            out[m] = out.get(m, 0) + ca * cb
    return Sym.make(out)


def dim_div(a: Dim, b: Dim) -> Dim | None:
    """Exact division, or None when the quotient is not an integer polynomial we can name."""
    if isinstance(b, int):
        if b == 0:
            return None
        if isinstance(a, int):
            return a // b if a % b == 0 else None
        if all(c % b == 0 for c in a.terms.values()):
            return Sym.make({m: c // b for m, c in a.terms.items()})
        return None
    if a == b:
        return 1
    # Divide by a single monomial (e.g. batch*seq*64 / seq): every term must contain it.
    if len(b.terms) == 1:
        (mb, cb), = b.terms.items()
        out: dict[Monomial, int] = {}
        for m, c in _terms(a).items():
            rest = list(m)
            for name in mb:
                if name not in rest:
                    return None
                rest.remove(name)
            if c % cb:
                return None
            out[tuple(rest)] = c // cb
        return Sym.make(out)
    return None


def dim_str(d: Dim) -> str:
    """Canonical text: `past+seq`, `batch*seq`, `2*seq+1`."""
    if isinstance(d, int):
        return str(d)
    parts = []
    for mono, c in sorted(d.terms.items(), key=lambda mc: (-len(mc[0]), mc[0])):
        body = "*".join(mono)
        if not mono:
            text = str(abs(c))
        elif abs(c) == 1:
            text = body
        else:
            text = f"{abs(c)}*{body}"
        sign = "-" if c < 0 else "+"
        parts.append((sign, text))
    out = ("-" if parts[0][0] == "-" else "") + parts[0][1]
    for sign, text in parts[1:]:
        out += sign + text
    return out


_TERM = re.compile(r"([+-]?)\s*([^+-]+)")


def parse_dim(text: str) -> Dim:
    """Inverse of dim_str: accepts sums/differences of `c*name*name` terms and integers."""
    text = text.replace(" ", "")
    if not text:
        raise ValueError("empty dim")
    pos, total = 0, 0
    for m in _TERM.finditer(text):
        if m.start() != pos:
            raise ValueError(f"bad dim {text!r}")
        pos = m.end()
        sign = -1 if m.group(1) == "-" else 1
        term: Dim = sign
        for factor in m.group(2).split("*"):
            term = dim_mul(term, int(factor) if factor.isdigit() else sym(factor))
        total = total + term
    if pos != len(text):
        raise ValueError(f"bad dim {text!r}")
    return total


def eval_dim(d: Dim, bindings: Mapping[str, int]) -> int:
    """The integer value of a dim once its symbols are bound; KeyError names an unbound symbol."""
    if isinstance(d, int):
        return d
    total = 0
    for mono, c in d.terms.items():
        v = c
        for name in mono:
            v *= bindings[name]
        total += v
    return total
