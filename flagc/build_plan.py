"""The build plan: what a build will do and what it will cost, known before any weight is read.

`plan_build` looks only at the IR graph (weight names and shapes, never data) and the target, and
estimates the artifact's files and sizes, the build's peak memory and its disk use. `flagc build
--dry-run` prints it; every build checks it first (`BuildPlan.check`) and refuses, with the
numbers, when the machine cannot hold it, instead of dying half-way from the OOM killer.

The memory model follows how lowering streams weights (flagc.lower.onnx_model): one tensor at a
time is loaded as float32, converted, and written, so the peak is a fixed interpreter overhead
plus a few copies of the largest tensor. A model small enough to embed its weights in model.onnx
holds all of them in the protobuf (and again while serializing) instead.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from typing import Any, Optional

from flagc.errors import ResourceError
from flagc.ir.graph import Graph
from flagc.ir.ops import Op

__all__ = ["BuildPlan", "plan_build", "available_memory", "free_disk", "weight_bytes",
           "BASE_OVERHEAD", "format_bytes"]

# Python + torch + onnx + numpy imported, plus allocator slack (measured: ~0.25 GB of imports;
# the rest is headroom for the graph, protobufs and fragmentation).
BASE_OVERHEAD = 768 * 2**20
# Copies of the largest tensor alive at once while streaming it: the float32 load, its transpose
# (Linear weights are written [in, out]) and the converted / quantized result.
STREAM_COPIES = {"fp32": 2.0, "fp16": 2.5, "bf16": 2.5, "int8": 3.0, "int4": 3.0}
# Bytes per element of a weight as written, by target precision and role. Linear weights are what
# the quantizing targets quantize (int4: 4-bit codes, an fp32 scale and a 4-bit zero point per
# block of 32, as passes/quantize.py writes them; int8: 8 bits + an fp32 scale per output row,
# ~0 per element); other weights keep float32 on the quantizing targets, which run float32
# activations on CPU. The LM head kept at 8 bits under int4 is not modelled (<2% for GLM-10b).
_BLOCK = 32
_BYTES = {
    "fp32": {"linear": 4.0, "other": 4.0},
    "fp16": {"linear": 2.0, "other": 2.0},
    "bf16": {"linear": 2.0, "other": 2.0},
    "int8": {"linear": 1.0, "other": 4.0},
    "int4": {"linear": 0.5 + 4.5 / _BLOCK, "other": 4.0},
}
_NODE_PROTO_BYTES = 400  # one ONNX NodeProto with its names and attributes, roughly
_LAYER = re.compile(r"^(.*?\.(?:layers|layer|h|blocks|block)\.\d+)\.")


@dataclass
class PlannedFile:
    name: str
    bytes: int


@dataclass
class BuildPlan:
    """Everything `flagc build --dry-run` prints; `check()` refuses builds that cannot fit."""

    model: str
    source: str  # e.g. "hf-folder /path", "random weights (seed 0)"
    graph_source: str  # e.g. "graph DSL LlamaModel", "torch.export frontend"
    target: str
    precision: str
    output: str
    parameters: int
    tensors: int
    largest_tensor: tuple[str, int]  # name, float32 bytes
    largest_layer: tuple[str, int]  # layer prefix, float32 bytes
    passes: list[str]
    precision_plan: dict[str, str]
    files: list[PlannedFile]
    peak_memory: int
    disk: int
    available_memory: Optional[int] = None
    free_disk: Optional[int] = None
    notes: list[str] = field(default_factory=list)

    @property
    def fits_memory(self) -> bool:
        return self.available_memory is None or self.peak_memory <= self.available_memory

    @property
    def fits_disk(self) -> bool:
        return self.free_disk is None or self.disk <= self.free_disk

    def check(self) -> None:
        """Raise ResourceError, naming the numbers and the way out, when the build cannot fit."""
        problems = []
        if not self.fits_memory:
            problems.append(f"needs ~{format_bytes(self.peak_memory)} of memory at its peak "
                            f"but {format_bytes(self.available_memory)} is available")
        if not self.fits_disk:
            problems.append(f"writes ~{format_bytes(self.disk)} but "
                            f"{os.path.dirname(self.output) or '.'} has "
                            f"{format_bytes(self.free_disk)} free")
        if problems:
            raise ResourceError(f"build of {self.model} for {self.target} refused before "
                                f"starting: it {' and '.join(problems)} (largest tensor "
                                f"{self.largest_tensor[0]}: "
                                f"{format_bytes(self.largest_tensor[1])} as float32). Free "
                                "memory or disk, pick a smaller target precision or another "
                                "output folder; `flagc build --dry-run` shows the plan")

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "source": self.source, "graph": self.graph_source,
                "target": self.target, "output": self.output, "parameters": self.parameters,
                "tensors": self.tensors, "passes": self.passes,
                "precision_plan": self.precision_plan,
                "files": {f.name: f.bytes for f in self.files},
                "peak_memory_bytes": self.peak_memory, "disk_bytes": self.disk,
                "available_memory_bytes": self.available_memory,
                "free_disk_bytes": self.free_disk,
                "largest_tensor": list(self.largest_tensor),
                "largest_layer": list(self.largest_layer), "notes": self.notes}

    def render(self) -> str:
        def verdict(ok: bool) -> str:
            return "ok" if ok else "DOES NOT FIT"

        lines = [
            f"model       {self.model}  ({self.source})",
            f"graph       {self.graph_source}: {self.parameters / 1e9:.2f} B parameters in "
            f"{self.tensors} tensors",
            f"largest     layer {self.largest_layer[0]} {format_bytes(self.largest_layer[1])}, "
            f"tensor {self.largest_tensor[0]} {format_bytes(self.largest_tensor[1])} (float32)",
            f"target      {self.target} ({self.precision})",
            f"passes      {', '.join(self.passes) if self.passes else '(none)'}",
            "precision   " + "; ".join(f"{k} -> {v}" for k, v in self.precision_plan.items()),
            f"output      {self.output}/",
        ]
        lines += [f"              {f.name:<22} ~{format_bytes(f.bytes)}" for f in self.files]
        avail = (f" of {format_bytes(self.available_memory)} available"
                 if self.available_memory is not None else "")
        free = f" of {format_bytes(self.free_disk)} free" if self.free_disk is not None else ""
        lines.append(f"peak memory ~{format_bytes(self.peak_memory)}{avail}: "
                     f"{verdict(self.fits_memory)}")
        lines.append(f"disk        ~{format_bytes(self.disk)}{free}: {verdict(self.fits_disk)}")
        lines += [f"note        {n}" for n in self.notes]
        return "\n".join(lines)


def format_bytes(n: Optional[float]) -> str:
    if n is None:
        return "?"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def available_memory() -> Optional[int]:
    """Memory the build may use now: MemAvailable (free + reclaimable cache), in bytes."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def free_disk(path: str) -> Optional[int]:
    """Free bytes on the file system that will hold `path` (its nearest existing parent)."""
    path = os.path.abspath(path)
    while path and not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    try:
        return int(shutil.disk_usage(path).free)
    except OSError:
        return None


def _roles(graph: Graph) -> dict[str, set[str]]:
    """How each weight is read: as a Linear's weight (written transposed, quantizable) or not."""
    roles: dict[str, set[str]] = {name: set() for name in graph.weights}
    for node in graph.nodes:
        for i, v in enumerate(node.inputs):
            if v is not None and v.kind == "weight" and v.name in roles:
                linear = node.op is Op.LINEAR and i == 1 and len(v.shape) == 2
                roles[v.name].add("linear" if linear else "other")
    return roles


def weight_bytes(graph: Graph, precision: str) -> tuple[int, dict[str, int]]:
    """Bytes of initializers lowering writes for `precision`, total and by role."""
    table = _BYTES.get(precision, _BYTES["fp32"])
    by_role = {"linear": 0, "other": 0}
    for name, roles in _roles(graph).items():
        v = graph.weights[name]
        count = _numel(v.shape)
        for role in roles or {"other"}:  # a tied embedding is written once per role
            itemsize = table[role] if v.dtype.is_float else v.dtype.itemsize
            by_role[role] += int(count * itemsize)
    return sum(by_role.values()), by_role


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _largest(graph: Graph) -> tuple[tuple[str, int], tuple[str, int]]:
    tensor, layers = ("", 0), {}
    for name, v in graph.weights.items():
        size = _numel(v.shape) * 4
        if size > tensor[1]:
            tensor = (name, size)
        m = _LAYER.match(name)
        key = m.group(1) if m else name
        layers[key] = layers.get(key, 0) + size
    layer = max(layers.items(), key=lambda kv: kv[1]) if layers else ("", 0)
    return tensor, layer


def _precision_plan(precision: str) -> dict[str, str]:
    if precision in ("fp32", "fp16", "bf16"):
        # Norm and attention kernels keep fp32 math inside whatever their I/O type.
        return {"weights": precision, "activations": precision, "norms/softmax": "fp32"}
    bits = {"int8": "int8 per output channel", "int4": f"int4 blocks of {_BLOCK}"}[precision]
    return {"linear weights": bits, "other weights": "fp32", "activations": "fp32"}


def _pass_names(target) -> list[str]:
    """The target's pass pipeline, from the pass package (passes/) when it is importable."""
    try:
        from flagc.passes import pipeline_for
    except ImportError:
        return []
    return list(pipeline_for(target))


def plan_build(graph: Graph, target, output: str, *, model: str, source: str,
               graph_source: str, passes: Optional[list[str]] = None,
               tokenizer_bytes: int = 0, memory: Optional[int] = -1,
               disk: Optional[int] = -1) -> BuildPlan:
    """The plan for lowering `graph` to `target` into `output`.

    `memory` / `disk` override the measured available memory / free disk (tests); -1 measures.
    """
    from flagc.lower.onnx_model import EMBED_WEIGHTS_LIMIT

    precision = target.precision
    total, _ = weight_bytes(graph, precision)
    tensor, layer = _largest(graph)
    proto = len(graph.nodes) * _NODE_PROTO_BYTES + 4096
    external = total > EMBED_WEIGHTS_LIMIT
    engine = target.engine_file
    if external:
        files = [PlannedFile(engine, proto), PlannedFile(engine + ".data", total)]
    else:
        files = [PlannedFile(engine, proto + total)]
    files.append(PlannedFile("manifest.json", 16 * 1024 + 64 * len(graph.nodes) // 100))
    if tokenizer_bytes:
        files.append(PlannedFile("tokenizer files", tokenizer_bytes))
    # Embedded weights sit in the ModelProto, its serialization and onnx.checker's copy.
    held = 0 if external else 3 * total
    peak = int(BASE_OVERHEAD + proto * 3 + STREAM_COPIES.get(precision, 3.0) * tensor[1] + held)
    disk_need = sum(f.bytes for f in files)
    notes = []
    if not external:
        notes.append(f"weights ({format_bytes(total)}) are embedded in {engine}: below the "
                     f"external-data threshold of {format_bytes(EMBED_WEIGHTS_LIMIT)}")
    if os.path.exists(output):
        notes.append(f"{output} exists: it is replaced only after the new artifact is complete, "
                     "so both are on disk for a moment")
    return BuildPlan(
        model=model, source=source, graph_source=graph_source, target=target.name,
        precision=precision, output=os.path.abspath(output),
        parameters=graph.parameter_count(), tensors=len(graph.weights), largest_tensor=tensor,
        largest_layer=layer, passes=list(passes) if passes is not None else _pass_names(target),
        precision_plan=_precision_plan(precision), files=files, peak_memory=peak,
        disk=disk_need,
        available_memory=available_memory() if memory == -1 else memory,
        free_disk=free_disk(output) if disk == -1 else disk, notes=notes)
