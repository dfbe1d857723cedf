"""Checks each converted value's IR shape against the shape torch.export traced for it.

The exported program carries a symbolic shape per FX node (sympy expressions over export's own
symbols). Binding those symbols to the IR's (from the graph inputs) turns every traced shape into
an IR dim, so a converter that builds the wrong shape is caught at the node that did it instead
of as a numeric mismatch at the end.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from flagc.ir.symbolic import Dim, dim_str
from flagc.ir.types import TensorType

__all__ = ["ShapeCheck"]


class ShapeCheck:
    def __init__(self) -> None:
        self.symbols: dict[Any, Dim] = {}  # sympy Symbol -> IR dim

    def bind(self, fake: torch.Tensor, ir_type: TensorType) -> None:
        """Learn export's symbols from a graph input's traced shape."""
        import sympy

        for d, ir in zip(fake.shape, ir_type.shape):
            expr = _expr(d)
            if isinstance(expr, sympy.Symbol):
                self.symbols.setdefault(expr, ir)

    def dim(self, d) -> Optional[Dim]:
        """An export dim as an IR dim; None when it uses a symbol no input explains."""
        import sympy

        expr = _expr(d)
        if isinstance(expr, int):
            return expr
        total: Dim = 0
        for term, coeff in sympy.expand(expr).as_coefficients_dict().items():
            if not coeff.is_integer:
                return None
            value: Dim = int(coeff)
            for factor in sympy.Mul.make_args(term):
                if factor == 1:
                    continue
                base, power = factor.as_base_exp()
                if base not in self.symbols or not power.is_integer or int(power) < 1:
                    return None
                for _ in range(int(power)):
                    value = value * self.symbols[base]
            total = total + value
        return total

    def problem(self, ir_type: TensorType, fake) -> Optional[str]:
        """A description of how the IR shape differs from the traced one, or None."""
        if not isinstance(fake, torch.Tensor):
            return None
        if len(fake.shape) != ir_type.rank:
            return f"IR {ir_type} has rank {ir_type.rank}, torch traced {tuple(fake.shape)}"
        for axis, (d, ir) in enumerate(zip(fake.shape, ir_type.shape)):
            want = self.dim(d)
            if want is not None and want != ir:
                return (f"IR {ir_type} but torch traced dim {axis} as {dim_str(want)} "
                        f"(shape {tuple(fake.shape)})")
        return None


def _expr(d):
    if isinstance(d, int):
        return d
    node = getattr(d, "node", None)
    expr = getattr(node, "expr", None)
    if expr is None:
        return int(d)
    return int(expr) if expr.is_number else expr
