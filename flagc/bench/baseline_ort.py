"""Baseline "ort-optimizer": onnxruntime's own BERT path, built as the anchors build it.

torch.onnx.export (TorchScript exporter, opset 18) of the eager-attention HF encoder, fused by
`onnxruntime.transformers.optimizer` (model_type "bert": Attention, EmbedLayerNormalization,
SkipLayerNormalization, BiasGelu), and for int8 targets quantized by `quantize_dynamic`
(per-channel QInt8, the accurate variant of the anchors' d2pc row). The dynamo exporter is not
used: its graphs get no Attention fusion from this optimizer (anchors' session notes).
Exported models are cached under the cache folder, keyed by source and variant.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

from flagc.bench.base import ENCODER, BenchEngine, Point, Skip
from flagc.bench.baselines import BaselineContext

__all__ = ["OrtOptimizerEngine", "ort_session", "precision_for"]

BERT_TYPES = {"bert"}  # model types the optimizer's "bert" fusions are written for
INPUT_NAMES = ["input_ids", "attention_mask", "token_type_ids"]


def precision_for(target: str) -> str:
    """The baseline precision matching a flagc target ("fp32" when there is no closer one)."""
    if "int8" in target:
        return "int8"
    if "fp16" in target:
        return "fp16"
    return "fp32"


def ort_session(path: Path, threads: int, device: str) -> Any:
    """An onnxruntime session set up as the anchors' (sequential, N intra-op threads)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    providers = ["CPUExecutionProvider"]
    if device == "cuda":
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(str(path), so, providers=providers)


def _cache_key(source: Path, variant: str) -> str:
    import onnxruntime
    import torch

    cfg = source / "config.json"
    stamp = f"{source.resolve()}|{cfg.stat().st_mtime_ns}|{variant}|{torch.__version__}|" \
            f"{onnxruntime.__version__}"
    return hashlib.sha256(stamp.encode()).hexdigest()[:16]


class OrtOptimizerEngine(BenchEngine):
    """ORT on the optimizer-fused TorchScript export of the source encoder."""

    name = "ort-optimizer"

    def __init__(self, ctx: BaselineContext) -> None:
        super().__init__()
        if ctx.workload != ENCODER:
            raise Skip("ort-optimizer covers encoders only (optimizer model_type 'bert')")
        self.ctx = ctx
        self.precision = precision_for(ctx.target)
        self.label = f"ORT optimizer {self.precision}"
        self.session: Any = None

    def load(self) -> None:
        src = self.ctx.source
        if src is None or not (src / "config.json").is_file():
            raise Skip(f"needs a Hugging Face source folder; the manifest's source is {src}")
        cfg = json.loads((src / "config.json").read_text())
        if cfg.get("model_type") not in BERT_TYPES:
            raise Skip(f"the optimizer's bert fusions do not apply to model_type "
                       f"{cfg.get('model_type')!r}")
        folder = self.ctx.cache_dir / "ort-optimizer" / _cache_key(src, self.precision)
        path = folder / "model.onnx"
        if not path.is_file():
            self.details["prepare_s"] = self._prepare(src, cfg, folder)
        self.details.update({"model": str(path), "precision": self.precision})
        self.session = ort_session(path, self.ctx.threads, self.ctx.device)
        self._names = [i.name for i in self.session.get_inputs()]

    def _prepare(self, src: Path, cfg: dict[str, Any], folder: Path) -> float:
        import onnx
        import torch
        from onnxruntime.transformers.optimizer import optimize_model

        from flagc.bench.baseline_hf import load_hf_model

        t0 = time.perf_counter()
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        hf = load_hf_model(self.ctx, attn="eager").float().cpu()

        class Wrap(torch.nn.Module):  # keyword call: positional args hit `use_cache` in v5
            def __init__(self, m: Any) -> None:
                super().__init__()
                self.m = m

            def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
                return self.m(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state

        ids = torch.ones(2, 16, dtype=torch.int64)
        raw = tmp / "export.onnx"
        with warnings.catch_warnings():  # tracer warnings about masks: known and harmless here
            warnings.simplefilter("ignore")
            torch.onnx.export(Wrap(hf).eval(), (ids, ids, torch.zeros_like(ids)), str(raw),
                              input_names=INPUT_NAMES, output_names=["last_hidden_state"],
                              dynamo=False, opset_version=18,
                              dynamic_axes={k: {0: "batch", 1: "seq"} for k in INPUT_NAMES})
        om = optimize_model(str(raw), model_type="bert", num_heads=cfg["num_attention_heads"],
                            hidden_size=cfg["hidden_size"])
        if self.precision == "fp16":
            om.convert_float_to_float16(keep_io_types=True)
        fused = tmp / "opt.onnx"
        om.save_model_to_file(str(fused))
        self.details["fused_ops"] = {k: v for k, v in om.get_fused_operator_statistics().items()
                                     if v}
        final = tmp / "model.onnx"
        if self.precision == "int8":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            # DefaultTensorType: ORT shape inference cannot type contrib-op outputs (Attention,
            # EmbedLayerNormalization) of the fused graph; everything here is fp32.
            quantize_dynamic(str(fused), str(final), weight_type=QuantType.QInt8,
                             per_channel=True,
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        else:
            fused.rename(final)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)  # publish the cache entry whole, or not at all
        return round(time.perf_counter() - t0, 2)

    def run(self, point: Point, inputs: Any) -> dict[str, float]:
        feeds = {k: getattr(inputs, k) for k in self._names}
        t0 = time.perf_counter()
        self.session.run(None, feeds)
        return {"latency_s": time.perf_counter() - t0}

    def close(self) -> None:
        self.session = None
