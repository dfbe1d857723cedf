"""The suites table: what each `--suite` builds (when no ARTIFACT is given) and measures.

Shapes and repetition counts of `cpu` and `gpu` are the anchors' (baselines/anchors.py and
gpu_anchor.py): MiniLM b8×s128 and b1×s32; SmolLM2 batch 1, 32-token prompt, 128 greedy new
tokens, 7 repetitions after 1 warm-up; the 1.1B LLaMA shape at batch 1 and 8 with a 128-token
prompt and 256 new tokens. The extra points are the sweeps the plots draw.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flagc.bench.base import DECODE, ENCODER

__all__ = ["SuiteModel", "Suite", "SUITES"]


@dataclass(frozen=True)
class SuiteModel:
    """A model a suite builds for each of `targets` (targets the model cannot take are skipped
    with the builder's reason)."""

    name: str
    source: str  # key of flagc.bench.sources.SOURCES
    task: str  # the artifact's task, as `flagc build --task` takes it
    targets: tuple[str, ...]
    build_options: tuple[tuple[str, object], ...] = ()  # more `flagc.build` keyword arguments


@dataclass(frozen=True)
class Suite:
    """Workload points, repetitions and defaults of one suite."""

    name: str
    description: str
    models: tuple[SuiteModel, ...]
    encoder_points: tuple[tuple[int, int], ...]  # (batch, seq); the first is the anchor shape
    decoder_points: tuple[tuple[int, int], ...]  # (batch, prompt length)
    new_tokens: int
    warmup: dict[str, int] = field(default_factory=dict)  # per workload
    reps: dict[str, int] = field(default_factory=dict)
    baselines: tuple[str, ...] = ("transformers", "ort-optimizer", "ort-genai")
    device: str = "cpu"


SUITES: dict[str, Suite] = {
    s.name: s
    for s in (
        Suite(
            name="smoke",
            description="seconds: tiny random BERT and LLaMA, onnx-fp32, few repetitions",
            models=(SuiteModel("tiny-bert", "tiny-bert", "embedding", ("onnx-fp32",)),
                    SuiteModel("tiny-llama", "tiny-llama", "text-generation", ("onnx-fp32",))),
            encoder_points=((2, 16), (1, 16), (4, 16)),
            decoder_points=((1, 8), (1, 16), (2, 8)),
            new_tokens=8,
            warmup={ENCODER: 1, DECODE: 1},
            reps={ENCODER: 3, DECODE: 3},
        ),
        Suite(
            name="cpu",
            description="anchors: all-MiniLM-L6-v2 and SmolLM2-135M, every CPU target",
            models=(SuiteModel("minilm", "minilm", "embedding", ("onnx-fp32",)),
                    # int8: attention over packed tokens on flagc's CPU kernel
                    SuiteModel("minilm", "minilm", "embedding", ("onnx-int8",),
                               build_options=(("kernels", "flagc"),)),
                    SuiteModel("smollm2", "smollm2", "text-generation",
                               ("onnx-fp32", "onnx-int8", "onnx-int4"),
                               # static decode graph for the anchor's batch 1, attending
                               # with flagc's CPU kernel (runtimes/kernels)
                               build_options=(("decode_graphs", (1,)),
                                              ("kernels", "flagc")))),
            encoder_points=((8, 128), (1, 32), (1, 128), (2, 128), (4, 128)),
            decoder_points=((1, 32), (1, 256), (4, 32)),
            new_tokens=128,
            warmup={ENCODER: 3, DECODE: 1},
            reps={ENCODER: 20, DECODE: 7},
        ),
        Suite(
            name="gpu",
            description="GPU anchor: 1.1B LLaMA shape, random fp16 weights, batch 1 and 8",
            models=(SuiteModel("llama-1.1b", "llama-1.1b-random", "text-generation",
                              ("onnx-fp16", "trt-fp16"),
                              # batch 1 on flagc's own decode kernels (runtimes/kernels)
                              build_options=(("decode_graphs", (1, 8)),
                                             ("kernels", "flagc"))),),
            encoder_points=(),
            decoder_points=((1, 128), (8, 128)),
            new_tokens=256,
            warmup={ENCODER: 3, DECODE: 2},
            reps={ENCODER: 20, DECODE: 5},
            baselines=("transformers", "ort-genai"),
            device="cuda",
        ),
    )
}
