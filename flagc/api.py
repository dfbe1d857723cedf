"""flagc's Python API: `build` a model into an artifact folder, `load` an artifact to run it.

The CLI's commands are thin wrappers over these functions.
"""

from __future__ import annotations

import json
import os
import platform
import time
from typing import Any, Optional

import flagc
from flagc.artifact import FORMAT_VERSION, staged_folder, write_manifest
from flagc.checkpoints.source import ModelSource, open_model_source
from flagc.dsl.custom import build_custom_graph, builtin_model_class, load_custom_model
from flagc.errors import ConfigError
from flagc.ir.graph import Graph
from flagc.ir.symbolic import dim_str
from flagc.lower.targets import get_target
from flagc.progress import phase

__all__ = ["build", "plan", "load", "BuildResult"]

class BuildResult(dict):
    """The manifest of the artifact just built (a dict), plus `path`."""

    @property
    def path(self) -> str:
        return self["_path"]


def build(model: str, target: str = "onnx-fp32", output: str = "out/model", *,
          custom: Optional[str] = None, max_seq: Optional[int] = None, max_batch: int = 8,
          task: str = "text-generation", overwrite: bool = True,
          dump_ir: Optional[str] = None, check: bool = False,
          passes: Optional[list[str]] = None, random_weights: bool = False, seed: int = 0,
          check_resources: bool = True, model_dir: Optional[str] = None,
          frontend: str = "auto", pass_options: Optional[dict[str, Any]] = None,
          quant_block: Optional[int] = None, report: bool = False,
          decode_graphs: Optional[list[int]] = None, kernels: str = "onnxruntime",
          greedy_screen: bool = True) -> BuildResult:
    """Build `model` (a HF folder or a .gguf file) for `target` into the folder `output`.

    Args:
        model: path to a Hugging Face style folder (config.json + weights) or a GGUF file.
        target: e.g. "onnx-fp32" (see `flagc.lower.targets.TARGETS`).
        output: artifact folder; written atomically (temp folder, then rename).
        custom: a custom model file (graph DSL) whose `__model__` describes the network; by
            default the built-in graph for the checkpoint's model_type is used.
        max_seq: the longest context (prompt + generated) the artifact accepts; defaults to
            min(the model's max positions, 4096).
        max_batch: the largest batch the runtime will size its cache for.
        dump_ir: a folder to write the IR after each pass (`NN-pass.ir`).
        check: run the IR interpreter before and after each pass on random inputs and stop at
            the first pass whose result diverges.
        passes: an explicit pass list instead of the target's pipeline (debugging).
        random_weights: ignore any checkpoint and generate seeded random weights lazily;
            `model` may then also be a zoo hub name (e.g. "GLM-10b-ch").
        seed: the random weights' seed.
        check_resources: refuse (ResourceError) before starting when the build's estimated
            peak memory or disk use exceeds what the machine has (see `plan`).
        model_dir: where zoo / hub names are looked up (and downloaded to).
        frontend: "auto" (graph DSL for its built-in decoders, torch.export for every other
            family and task), "torch" or "dsl".
        pass_options: options the passes read, e.g. {"fp16_limit": 4096.0,
            "keep_last_fp32": 1, "calibrate": False} for the precision planner; for the quantize
            pass (passes/quantize.py) "quant_symmetric", "quant_calibrate", "quant_sensitive",
            "quant_skip", "quant_lm_head_bits", "quant_act".
        quant_block: onnx-int4 block size along K (16, 32, 64, 128 or 256; default 32).
        report: write report.json / report.md (flagc/quant_report.py): logits cosine, top-1
            agreement and perplexity delta vs the float weights, overall and per quantized layer.
        decode_graphs: batch sizes that also get a static-shape decode graph
            (flagc/lower/onnx_static.py), which the CUDA runtime replays as a CUDA graph; the
            KV cache then lives in max_seq-long buffers shared by past and present.
        kernels: "onnxruntime" (its kernels only) or "flagc": flagc's own kernels in the
            static decode graphs (runtimes/kernels, an onnxruntime custom-op library compiled
            on first use): for onnx-fp16, graphs of up to 4 rows multiply with its CUDA
            products (nvcc needed); for onnx-fp32 / int8 / int4, the dense graphs attend with
            its CPU attention, and int4's block-quantized products run on its QGemv; on an
            onnx-int8 encoder (no decode graphs) attention runs over packed tokens (a C++
            compiler needed).
        greedy_screen: static decode graphs with a float32 LM head also get greedy variants
            that screen the head at 8 bits and prove each pick exact, computing the full head
            only when the proof fails (flagc/lower/onnx_greedy_screen.py; CPU greedy decoding).
    """
    t0 = time.perf_counter()
    tgt = get_target(target)
    if max_batch < 1:
        raise ConfigError(f"--max-batch must be >= 1, got {max_batch}")
    decode_graphs = _checked_decode_graphs(decode_graphs, tgt, max_batch)
    _check_kernels(kernels, tgt, decode_graphs)
    source, graph, config, graph_source = _frontend(model, custom, random_weights, seed, task,
                                                    model_dir, frontend)
    if kernels == "flagc" and not decode_graphs and _kv_layout(graph) is not None:
        raise ConfigError("--kernels flagc serves a decoder's static decode graphs: add "
                          "--decode-graphs (e.g. --decode-graphs 1)")
    positions = int(config.get("max_positions") or config.get("max_position_embeddings") or 4096)
    if max_seq is None:
        max_seq = min(positions, 4096)
    if not 1 <= max_seq <= positions:
        raise ConfigError(f"--max-seq {max_seq} must be between 1 and the model's max positions "
                          f"{positions}")
    if check_resources:
        _plan(source, graph, graph_source, tgt, output, passes).check()
    from flagc.quant_build import quant_pass_options

    pass_options = quant_pass_options(tgt, pass_options, quant_block,
                                      lambda: _load_tokenizer(source))
    pass_stats, pass_ctx = _optimize(graph, tgt, dump_ir, check, passes,
                                     {"max_seq": max_seq, **(pass_options or {})})
    tokenizer = _load_tokenizer(source)
    static: dict[str, Any] = {}
    with staged_folder(output, overwrite=overwrite) as tmp:
        from flagc.lower.onnx_model import lower_to_onnx

        if tgt.backend == "tensorrt":
            from flagc.lower.trt_target import lower_to_trt, update_manifest

            files, trt_info = lower_to_trt(graph, tgt, tmp, output=output, max_seq=max_seq,
                                           max_batch=max_batch, io=_io_signature(graph))
            for role, extra in graph.metadata.get("companions", {}).items():  # T5's encoder
                _optimize(extra, tgt, None, check, passes, pass_options)
                more, trt_info.setdefault("companions", {})[role] = lower_to_trt(
                    extra, tgt, tmp, output=output, max_seq=max_seq, max_batch=max_batch,
                    io=_io_signature(extra), engine_file=f"{role}.plan")
                files += more
        else:
            # Static decode graphs name the same weights: one model.onnx.data for all of them.
            files = lower_to_onnx(graph, tgt, os.path.join(tmp, tgt.engine_file),
                                  **({"external_threshold": 0} if decode_graphs else {}))
            static = _write_decode_graphs(graph, os.path.join(tmp, tgt.engine_file),
                                          decode_graphs, max_seq, kernels, greedy_screen)
            if kernels == "flagc" and not decode_graphs:  # an encoder
                static = _packed_attention(os.path.join(tmp, tgt.engine_file))
            from flagc.lower.onnx_static import GRAPH_KINDS

            files += [f for kind in GRAPH_KINDS for f in static.get(kind, {}).values()]
            files += static.pop("data", [])
            for role, extra in graph.metadata.get("companions", {}).items():  # T5's encoder
                _optimize(extra, tgt, None, check, passes, pass_options)
                files += lower_to_onnx(extra, tgt, os.path.join(tmp, f"{role}.onnx"))
        tok_files = tokenizer.save(tmp) if tokenizer is not None else []
        manifest = _manifest(source, graph, config, tgt, files, tok_files, tokenizer, max_seq,
                             max_batch, task, time.perf_counter() - t0)
        manifest["build"]["passes"] = [p.as_dict() for p in pass_stats]
        manifest["build"]["declined_rewrites"] = pass_ctx.declined
        if pass_ctx.plan:
            manifest["precision_plan"] = pass_ctx.plan
        if report:
            from flagc.quant_report import write_report

            manifest["report"] = write_report(graph, tmp, tokenizer, plan=pass_ctx.plan)["overall"]
        manifest.update(_zoo_manifest(graph))
        if tgt.backend == "tensorrt":
            update_manifest(manifest, trt_info)
        elif static.get("custom_ops") and not decode_graphs:
            manifest["custom_ops"] = static["custom_ops"]
        elif static:
            manifest["kv_cache"]["shared_buffer"] = True
            custom = static.pop("custom_ops", None)
            manifest["static_decode"] = {**static, "length_input": "cache_length"}
            if custom:
                manifest["custom_ops"] = custom
        write_manifest(tmp, manifest)
    manifest["_path"] = os.path.abspath(output)
    return BuildResult(manifest)


def _checked_decode_graphs(batches: Optional[list[int]], tgt, max_batch: int) -> list[int]:
    """Validate --decode-graphs before any weight is read."""
    if not batches:
        return []
    if tgt.backend != "onnxruntime" or not tgt.contrib_ops:
        raise ConfigError(f"--decode-graphs needs an onnxruntime target with fused kernels "
                          f"(onnx-fp32 / onnx-fp16 / onnx-bf16 ...), not {tgt.name}")
    bad = [b for b in batches if not 1 <= int(b) <= max_batch]
    if bad:
        raise ConfigError(f"--decode-graphs batch {bad[0]} must be between 1 and --max-batch "
                          f"{max_batch}")
    return sorted({int(b) for b in batches})


# onnx-fp16: DecodeGemv (CUDA); targets with float32 activations: DecodeAttention (CPU)
_FLAGC_KERNEL_TARGETS = ("onnx-fp16", "onnx-fp32", "onnx-int8", "onnx-int4")


def _check_kernels(kernels: str, tgt, decode_graphs: list[int]) -> None:
    if kernels == "onnxruntime":
        return
    if kernels != "flagc":
        raise ConfigError(f"--kernels must be 'onnxruntime' or 'flagc', not {kernels!r}")
    if tgt.name not in _FLAGC_KERNEL_TARGETS:
        raise ConfigError(f"--kernels flagc: flagc's decode kernels serve "
                          f"{', '.join(_FLAGC_KERNEL_TARGETS)} (fp16: CUDA products; "
                          f"float32 activations: CPU attention; int4: CPU QGemv), not {tgt.name}")


def _packed_attention(engine_path: str) -> dict[str, Any]:
    """--kernels flagc on an encoder: its attention over packed tokens runs on flagc's
    PackedAttention (flagc/lower/onnx_packed_attention.py); {"custom_ops": ...} when it does."""
    import onnx

    from flagc.lower.onnx_kernel_rewrite import DOMAIN
    from flagc.lower.onnx_packed_attention import use_packed_attention

    model = onnx.load(engine_path, load_external_data=False)
    if not use_packed_attention(model):
        raise ConfigError("--kernels flagc: this encoder's attention has no form flagc's "
                          "kernels serve (packed tokens on an onnxruntime target with "
                          "MultiHeadAttention); build without --kernels flagc")
    onnx.save(model, engine_path)
    return {"custom_ops": {"domain": DOMAIN, "device": "cpu",
                           "files": [os.path.basename(engine_path)]}}


def _write_decode_graphs(graph: Graph, engine_path: str, batches: list[int],
                         max_seq: int, kernels: str = "onnxruntime",
                         greedy_screen: bool = True) -> dict[str, Any]:
    """The static decode graphs written beside the engine: {"graphs": {batch: file},
    "dense_graphs": {batch: file}} (the no-padding variants, where the attention packs), plus
    "custom_ops" and "data" with flagc's GPU kernels (onnx_static.write_static_decodes)."""
    if not batches:
        return {}
    if _kv_layout(graph) is None:
        raise ConfigError("--decode-graphs needs a decoder with a KV cache; "
                          f"{graph.name} has none")
    from flagc.lower.onnx_static import write_static_decodes

    with phase(f"static decode graphs (batch {', '.join(map(str, batches))})"):
        return write_static_decodes(engine_path, batches, max_seq, label=graph.name,
                                    kernels=kernels, greedy_screen=greedy_screen)


def plan(model: str, target: str = "onnx-fp32", output: str = "out/model", *,
         custom: Optional[str] = None, passes: Optional[list[str]] = None,
         random_weights: bool = False, seed: int = 0, task: str = "text-generation",
         model_dir: Optional[str] = None, frontend: str = "auto"):
    """What `build` with these arguments would do and cost (flagc.build_plan.BuildPlan), without
    reading any weight: `flagc build --dry-run`. A zoo name not downloaded yet is planned from
    its zoo config (same shapes) rather than downloaded."""
    tgt = get_target(target)
    layout_only = not random_weights and _not_downloaded(model, model_dir)
    source, graph, _, graph_source = _frontend(model, custom, random_weights or layout_only,
                                               seed, task, model_dir, frontend)
    result = _plan(source, graph, graph_source, tgt, output, passes)
    if layout_only:
        result.source = "zoo config; the checkpoint is not downloaded yet"
        result.notes.append(f"the build first downloads {model}'s checkpoint into "
                            f"{model_dir or './checkpoints'} (not counted above)")
    return result


def _not_downloaded(model: str, model_dir: Optional[str]) -> bool:
    from flagc.models.base import resolve_local_dir
    from flagc.models.registry import hub_model

    return (not os.path.exists(model) and hub_model(model) is not None
            and resolve_local_dir(model_dir or "./checkpoints", model) is None)


def _frontend(model: str, custom: Optional[str], random_weights: bool, seed: int,
              task: str = "text-generation", model_dir: Optional[str] = None,
              frontend: str = "auto"):
    """(source, graph, config, description) for a model path or, with random weights, a name."""
    from flagc.frontends.zoo_build import resolve_model_path, uses_torch_frontend, zoo_graph

    if random_weights:
        from flagc.checkpoints.random_store import random_model_source

        source = random_model_source(model, seed)
    else:
        source = open_model_source(resolve_model_path(model, model_dir))
    if custom is None and uses_torch_frontend(source, task, frontend):
        with phase("capturing graph (torch.export, meta device)"):
            graph, config = zoo_graph(source, task, name=_graph_name(source))
        return source, graph, config, "torch.export frontend"
    cls = load_custom_model(custom) if custom else builtin_model_class(source.model_type)
    graph, config = build_custom_graph(cls, source.config, source.weights,
                                       name=_graph_name(source))
    return source, graph, config, f"graph DSL {cls.__name__}"


def _zoo_manifest(graph: Graph) -> dict[str, Any]:
    """Manifest sections a torch-frontend graph adds (zoo kind, labels, companion engines)."""
    extra = dict(graph.metadata.get("manifest", {}))
    for role, g in graph.metadata.get("companions", {}).items():
        extra[role] = {"engine": f"{role}.onnx", "io": _io_signature(g)}
    return extra


def _plan(source: ModelSource, graph: Graph, graph_source: str, tgt, output: str,
          passes: Optional[list[str]]):
    from flagc.build_plan import plan_build

    what = (f"random weights, seed {source.extra['seed']}" if source.kind == "random"
            else f"{source.kind} {source.path}")
    return plan_build(graph, tgt, output, model=str(source.path), source=what,
                      graph_source=graph_source, passes=passes)


def load(path: str, device: str = "cpu", threads: Optional[int] = None,
         static_decode: bool = True):
    """Load an artifact folder (or the engine file inside it) for inference.

    static_decode: take one-token steps through the artifact's static decode graphs (CUDA
    graphs on cuda) when it has them; False runs every step through the dynamic graph."""
    from flagc.runtimes.model import load_artifact

    return load_artifact(path, device=device, threads=threads, static_decode=static_decode)


def _optimize(graph: Graph, target, dump_ir: Optional[str], check: bool,
              passes: Optional[list[str]], options: Optional[dict[str, Any]] = None):
    from flagc.passes import optimize

    with phase(f"optimizing ({target.name} passes)"):
        return optimize(graph, target, {**(options or {}), "passes": passes}, dump_dir=dump_ir,
                        check=check)


def _graph_name(source: ModelSource) -> str:
    base = os.path.basename(os.path.normpath(source.path))
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in base) or "model"


def _load_tokenizer(source: ModelSource):
    from flagc.runtimes.tokenizer_hf import has_tokenizer_source

    if source.kind == "hf-folder" and not has_tokenizer_source(source.path):
        return None  # e.g. a test model saved without tokenizer: the artifact takes token ids
    return source.load_tokenizer()


def _io_signature(graph: Graph) -> dict[str, list[dict[str, Any]]]:
    def sig(name, v):
        return {"name": name, "dtype": v.dtype.value, "shape": [dim_str(d) for d in v.shape]}

    return {"inputs": [sig(v.name, v) for v in graph.inputs],
            "outputs": [sig(k, v) for k, v in graph.outputs.items()]}


def _kv_layout(graph: Graph) -> Optional[dict[str, Any]]:
    past = [v for v in graph.inputs if v.name.startswith("past_key_values.")]
    if not past:
        return None
    v = past[0]
    return {
        "layers": len(past) // 2,
        "kv_heads": int(v.shape[1]),
        "head_dim": int(v.shape[3]),
        "dtype": "bfloat16" if v.dtype.value == "bf16" else v.dtype.numpy.name,
        "layout": "[batch, kv_heads, past, head_dim]",
        "inputs": "past_key_values.{i}.key|value",
        "outputs": "present.{i}.key|value",
    }


def _generation_defaults(source: ModelSource, config: dict, tokenizer) -> dict[str, Any]:
    eos: list[int] = []
    gen_cfg = {}
    path = os.path.join(source.path, "generation_config.json") if source.kind == "hf-folder" \
        else None
    if path and os.path.isfile(path):
        with open(path) as f:
            gen_cfg = json.load(f)
    for value in (gen_cfg.get("eos_token_id"), config.get("eos_token_id")):
        if value is not None:
            eos = [value] if isinstance(value, int) else list(value)
            break
    if not eos and tokenizer is not None:
        eos = list(tokenizer.eos_token_ids)
    pad = gen_cfg.get("pad_token_id", config.get("pad_token_id"))
    if pad is None and tokenizer is not None:
        pad = tokenizer.pad_token_id
    if pad is None:
        pad = eos[0] if eos else 0
    return {"eos_token_ids": [int(e) for e in eos], "pad_token_id": int(pad),
            "bos_token_id": config.get("bos_token_id"),
            "defaults": {"max_new_tokens": 128}}


def _manifest(source, graph, config, tgt, files, tok_files, tokenizer, max_seq, max_batch,
              task, seconds) -> dict[str, Any]:
    kv = _kv_layout(graph)
    logits = graph.outputs.get("logits")
    return {
        "format_version": FORMAT_VERSION,
        "flagc_version": flagc.__version__,
        "model": os.path.basename(os.path.normpath(source.path)),
        "family": source.model_type,
        "task": task,
        "target": {"name": tgt.name, "backend": tgt.backend, "precision": tgt.precision,
                   "opset": tgt.opset},
        "engine": tgt.engine_file,
        "files": files,
        "io": _io_signature(graph),
        "kv_cache": kv,
        "vocab_size": int(logits.shape[-1]) if logits is not None else None,
        "dims": {"max_seq": max_seq, "max_batch": max_batch,
                 "symbols": ["batch", "seq", "past"]},
        "generation": _generation_defaults(source, config, tokenizer),
        "tokenizer": ({"kind": tokenizer.kind, "files": tok_files} if tokenizer is not None
                      else None),
        "graph": {"nodes": len(graph.nodes), "ops": graph.op_histogram(),
                  "parameters": graph.parameter_count()},
        "source": {"path": os.path.abspath(source.path), "kind": source.kind,
                   "hash": source.source_hash()},
        "build": {"seconds": round(seconds, 3), "host": platform.node(), "passes": []},
    }
