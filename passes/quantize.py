"""quantize: LINEAR with a weight initializer -> QLINEAR (onnx-int4 / onnx-int8 targets).

Schemes (flagc.ir.quant): onnx-int4 stores block-wise round-to-nearest 4-bit codes (block 32 by
default, asymmetric with integer zero points unless `quant_symmetric`), computed with int8
activations per block (MatMulNBits accuracy_level 4); onnx-int8 stores per-channel symmetric
8-bit codes and quantizes activations dynamically per tensor (DynamicQuantizeMatMul), which
onnxruntime's CPU kernels run faster than fp32 MatMul (see benchmarks/quant_kernels.py).

Sensitive layers stay at higher precision, by rule and optionally by measurement; every choice
and its reason goes into `ctx.plan["quantization"]` (the manifest's precision_plan):
- rule: the LM head (the linear producing `logits`) keeps 8 bits under int4. It is the widest
  matrix and its errors land directly on the logits; tied to the embedding, it often comes from
  an 8-bit checkpoint table (GGUF Q8_0) that 8-bit blocks reproduce exactly.
- rule: embeddings stay float (a gather reads one row per token: no compute to save) and
  weights named by `quant_skip` (fnmatch patterns) stay float.
- measured (`quant_sensitive=N`): each linear is quantized alone and its output error on a
  calibration input is measured through the reference interpreter; the N worst keep 8 bits
  (int4) or stay float (int8).
`quant_exact_grid` (default true; false, or weight-name patterns) keeps 4-bit weights that
already sit on a per-block grid min + scale * q (checkpoints quantized that way: GGUF Q4_1)
exactly: codes, scales, zero points 0 and float offsets per block (an integer zero point can
only approximate a float minimum, and re-quantizing such a checkpoint loses what it kept:
SmolLM2's greedy top-1 agreement with float32 goes from 93% to 76%). Weights not on a grid
quantize as usual. The offsets cost nothing in the static decode graphs on flagc's kernels
(QGemv takes them per block, flagc/lower/onnx_qgemv.py); on onnxruntime's MatMulNBits the
lowering adds their term, the block sums of x times the offsets (flagc/lower/onnx_quant.py),
four more ops per linear (SmolLM2: ~30% slower decode steps; `quant_exact_grid=false` trades
the accuracy back for it).
Calibration also sharpens the 4-bit codes: `quant_calibrate` weights each block's scale search
by the mean squared activation of every input feature, and `quant_gptq` adds GPTQ's error
feedback through the layer Hessian (passes/quant_sensitivity.py, flagc/ir/quant.py).

Weights are quantized lazily: each new initializer's loader quantizes its float weight when
lowering writes it, one tensor at a time (a one-entry cache serves codes, scales and zero
points from one quantization), so a 10B model never sits in memory.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from flagc.errors import ConfigError
from flagc.ir.builder import make_node
from flagc.ir.graph import Graph, Node, WeightSource
from flagc.ir.ops import Op
from flagc.ir.quant import ACT_QUANT, BLOCK_SIZES, QuantScheme, codes_shape, exact_grid, \
    gptq_quantize, n_blocks, quantize_weight, zero_points_cols
from flagc.ir.types import DType, TensorType
from flagc.passes.manager import PassContext, register_pass

__all__ = ["quantize", "quant_options", "FLOAT_WEIGHTS"]

FLOAT_WEIGHTS = "quant_float_weights"  # graph.metadata: codes name -> (name, type, source)
DEFAULT_BLOCK = 32


@dataclass(frozen=True)
class QuantOptions:
    precision: str  # "int4" | "int8"
    block: int
    symmetric: bool
    skip: tuple[str, ...]
    sensitive: int
    lm_head_bits: int  # 4, 8, or 0 (float)
    act_quant: str  # flagc.ir.quant.ACT_QUANT
    calibrate: bool  # weight the scale search by calibration activations
    gptq: bool  # GPTQ error feedback on calibration activations (implies calibrate)
    # weights (fnmatch patterns; "*": all) kept exactly where already on a 4-bit block grid
    exact_grid: tuple[str, ...] = ()


def quant_options(precision: str, options: dict[str, Any]) -> QuantOptions:
    """Validated quantization options (ConfigError naming the flag)."""
    block = options.get("quant_block")
    block = DEFAULT_BLOCK if block is None else block
    if precision == "int4" and block not in BLOCK_SIZES:
        raise ConfigError(f"--quant-block must be one of {', '.join(map(str, BLOCK_SIZES))} "
                          f"(onnxruntime's MatMulNBits needs a power of two >= 16), got {block}")
    sensitive = options.get("quant_sensitive") or 0
    if not isinstance(sensitive, int) or sensitive < 0:
        raise ConfigError(f"--quant-sensitive must be a count >= 0, got {sensitive!r}")
    lm_head = options.get("quant_lm_head_bits")
    if lm_head is None:
        lm_head = 8
    if lm_head not in (0, 4, 8):
        raise ConfigError(f"quant_lm_head_bits must be 0 (float), 4 or 8, got {lm_head!r}")
    skip = options.get("quant_skip") or ()
    act = options.get("quant_act") or ("tensor" if precision == "int8" else "block")
    if act not in ACT_QUANT:
        raise ConfigError(f"quant_act must be one of {ACT_QUANT}, got {act!r}")
    return QuantOptions(precision, int(block), bool(options.get("quant_symmetric", False)),
                        tuple(skip), sensitive, lm_head, act,
                        bool(options.get("quant_calibrate", False)
                             or options.get("quant_gptq", False)),
                        bool(options.get("quant_gptq", False)),
                        _patterns(options.get("quant_exact_grid", True), "quant_exact_grid"))


def _patterns(value, flag: str) -> tuple[str, ...]:
    """true / false or fnmatch patterns of weight names (a string, comma-separated, or a list)."""
    if value in (None, False, "false", "0", 0):
        return ()
    if value in (True, "true", "1", 1):
        return ("*",)
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
        raise ConfigError(f"{flag} takes true / false or weight-name patterns, got {value!r}")
    return tuple(p.strip() for p in value if p.strip())


class _LazyQuantized:
    """Quantizes one float weight on demand; codes/scales/zero points share one computation."""

    # (owner, result): one tensor at a time. The owner itself, not its id: an id is reused once
    # its object is collected, and a stale result (another weight's) would come back.
    _last: tuple[Any, Any] = (None, None)

    def __init__(self, source: WeightSource, scheme: QuantScheme,
                 importance: Optional[np.ndarray] = None, hessian: Optional[np.ndarray] = None,
                 exact: bool = False):
        self.source, self.scheme, self.importance = source, scheme, importance
        self.hessian, self.exact = hessian, exact

    def part(self, index: int) -> WeightSource:
        def load():
            owner, result = _LazyQuantized._last
            if owner is not self or result is None:
                w = np.asarray(self.source.load())
                if self.exact:  # checked at pass time: the grid is there
                    result = exact_grid(w, self.scheme.bits, self.scheme.block_for(w.shape[1]))
                elif self.hessian is not None and self.scheme.bits == 4:
                    result = gptq_quantize(w, self.scheme, self.hessian)
                else:
                    result = quantize_weight(w, self.scheme, self.importance)
                _LazyQuantized._last = (self, result)
            return result[index]
        what = ("codes", "scales", "zero points", "offsets")[index]
        return WeightSource(load, origin=f"{what} ({self.scheme.describe()}) of "
                                         f"{self.source.origin}")


def _scheme_for(opts: QuantOptions, bits: int) -> QuantScheme:
    if opts.precision == "int8":
        return QuantScheme(8, 0, True)  # per-channel symmetric
    if bits == 8:
        # Symmetric (255 levels leave nothing for a zero point to win), blocks of at least 32:
        # then an absmax int8 table in blocks of 32 (GGUF Q8_0) comes back exactly.
        return QuantScheme(8, max(opts.block, 32), True)
    return QuantScheme(bits, opts.block, opts.symmetric)


def quantize_linear(graph: Graph, node: Node, scheme: QuantScheme, act_quant: str,
                    importance: Optional[np.ndarray] = None,
                    hessian: Optional[np.ndarray] = None, exact: bool = False) -> Node:
    """The QLINEAR node replacing `node` (a LINEAR reading a weight), with lazy initializers.
    exact: the weight is on a per-block grid (`exact_grid`): its codes, scales, zero points 0
    and offsets keep it as it is."""
    w = node.inputs[1]
    n, k = (int(d) for d in w.shape)
    lazy = _LazyQuantized(graph.weight_sources[w.name], scheme, importance, hessian, exact)
    kind = "x" if exact else "s" if scheme.symmetric else "a"  # x: exact grid, with offsets
    tag = f"{w.name}.q{scheme.bits}b{scheme.block}{kind}"
    codes = graph.add_weight(tag, TensorType(DType.U8, codes_shape(n, k, scheme)), lazy.part(0))
    nb = n_blocks(k, scheme.block_for(k))
    scales = graph.add_weight(tag + ".scales", TensorType(DType.F32, (n, nb)), lazy.part(1))
    zp = offsets = None
    if not scheme.symmetric or exact:
        zp = graph.add_weight(tag + ".zero_points",
                              TensorType(DType.U8, (n, zero_points_cols(nb, scheme.bits))),
                              lazy.part(2))
    if exact:
        offsets = graph.add_weight(tag + ".offsets", TensorType(DType.F32, (n, nb)),
                                   lazy.part(3))
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    # The float weight stays reachable for the accuracy report (flagc/quant_report.py) after
    # DCE prunes it from the graph; only its loader is kept, no data.
    graph.metadata.setdefault(FLOAT_WEIGHTS, {})[codes.name] = (w.name, w.type,
                                                                graph.weight_sources[w.name])
    new = make_node(Op.QLINEAR, [node.inputs[0], codes, scales, zp, bias]
                    + ([offsets] if exact else []),
                    {"bits": scheme.bits, "k": k, "act_quant": act_quant}, node.name)
    # The output Value carries over (same type), so readers and graph outputs need no rewiring.
    return Node(new.op, new.inputs, new.attrs, node.outputs, node.name)


def _on_grid(graph: Graph, node: Node, scheme: QuantScheme) -> bool:
    """Whether `node`'s float weight is on a per-block grid of `scheme.bits` (quant_exact_grid:
    a checkpoint quantized that way, e.g. GGUF Q4_1); loads the weight once to check."""
    w = np.asarray(graph.weight_sources[node.inputs[1].name].load())
    block = scheme.block_for(w.shape[1])
    # most weights are not on a grid, which their first rows already show
    return exact_grid(w[:16], scheme.bits, block) is not None \
        and exact_grid(w, scheme.bits, block) is not None


def _candidates(graph: Graph) -> list[Node]:
    return [n for n in graph.nodes if n.op is Op.LINEAR and n.inputs[1].kind == "weight"
            and n.inputs[1].dtype is DType.F32 and n.inputs[1].name in graph.weight_sources]


def _lm_head(graph: Graph) -> Optional[Node]:
    logits = graph.outputs.get("logits")
    node = logits.producer if logits is not None else None
    return node if node is not None and node.op is Op.LINEAR else None


@register_pass("quantize")
def quantize(graph: Graph, ctx: PassContext) -> dict[str, int]:
    precision = ctx.options.get("precision") or getattr(ctx.target, "precision", None)
    if precision not in ("int4", "int8"):
        return {}
    opts = quant_options(precision, ctx.options)
    default_bits = 4 if precision == "int4" else 8
    act = opts.act_quant
    decisions: dict[Node, tuple[int, str]] = {}  # node -> (bits, reason); bits 0 = float
    head = _lm_head(graph)
    for node in _candidates(graph):
        name = node.inputs[1].name
        if any(fnmatch.fnmatch(name, p) for p in opts.skip):
            decisions[node] = (0, "rule: matches --quant-skip")
        elif node is head and opts.lm_head_bits != default_bits:
            decisions[node] = (opts.lm_head_bits, "rule: LM head (errors land on the logits)")
        else:
            decisions[node] = (default_bits, "default")
    measured: dict[Node, float] = {}
    importance: dict[Node, np.ndarray] = {}
    hessians: dict[Node, np.ndarray] = {}
    if opts.sensitive or opts.calibrate:
        from flagc.passes.quant_sensitivity import Calibration

        calib = Calibration(graph, ctx.options.get("calibration_ids"))
        if opts.calibrate:
            importance = {n: calib.importance(n) for n in decisions}
        if opts.gptq:
            hessians = {n: calib.hessian(n).astype(np.float32) for n in decisions}
        if opts.sensitive:
            todo = [n for n, (b, _) in decisions.items() if b == default_bits]
            measured = calib.errors(todo, lambda n: _scheme_for(opts, default_bits), act,
                                    importance.get)
            keep_bits = 8 if precision == "int4" else 0
            for n in sorted(measured, key=measured.get, reverse=True)[:opts.sensitive]:
                decisions[n] = (keep_bits, f"measured: output error {measured[n]:.3g} is among "
                                           f"the {opts.sensitive} largest")
        del calib
    counts = {"int4": 0, "int8": 0, "kept float": 0, "exact grid": 0}
    replaced: dict[int, Node] = {}
    layers: dict[str, dict[str, Any]] = {}
    for node, (bits, reason) in decisions.items():
        entry: dict[str, Any] = {"reason": reason}
        if node in measured:
            entry["measured_error"] = round(float(measured[node]), 6)
        if bits == 0:
            entry["scheme"] = "float"
            counts["kept float"] += 1
        else:
            scheme = _scheme_for(opts, bits)
            exact = (bits == 4 and any(fnmatch.fnmatch(node.inputs[1].name, p)
                                       for p in opts.exact_grid)
                     and _on_grid(graph, node, scheme))
            entry["scheme"] = scheme.describe() + (", exact grid (float offsets)" if exact
                                                   else "")
            replaced[id(node)] = quantize_linear(graph, node, scheme, act,
                                                 importance.get(node), hessians.get(node), exact)
            counts[f"int{bits}"] += 1
            counts["exact grid"] += int(exact)
        layers[node.inputs[1].name] = entry
    graph.nodes = [replaced.get(id(n), n) for n in graph.nodes]
    ctx.plan["quantization"] = {
        "precision": precision,
        "default": _scheme_for(opts, default_bits).describe(),
        "activations": {"block": "int8 per weight block (MatMulNBits accuracy_level 4)",
                        "tensor": "dynamic uint8 per tensor (DynamicQuantizeMatMul)",
                        "none": "float"}[act],
        "rules": ["embeddings stay float: a gather reads one row per token, nothing to speed up"]
                 + (["LM head keeps 8 bits"] if precision == "int4" and opts.lm_head_bits == 8
                    else []),
        "sensitive_kept": opts.sensitive,
        "calibrated": bool(importance),
        "gptq": bool(hessians),
        "layers": layers,
    }
    return {k: v for k, v in counts.items() if v}
