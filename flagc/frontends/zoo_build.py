"""Zoo models (flagc.models) into IR through the torch.export frontend.

`zoo_graph(source, task)` builds the family's task module on the meta device (no weight is read),
wraps it in the export signature of its kind (zoo_wrappers), captures it and attaches every
parameter as a lazy WeightSource read through the family's weight map from the checkpoint store.
Encoder-decoders (T5) give the decoder step graph and carry the encoder graph in
`graph.metadata["companions"]`; `graph.metadata["manifest"]` holds what the runtime needs beyond
the generic manifest (kind of model, labels, pooling, the companions' IO).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

from flagc.checkpoints.source import ModelSource
from flagc.errors import CheckpointError, ConfigError
from flagc.frontends import zoo_wrappers as W
from flagc.frontends.torch_export import InputSpec, capture
from flagc.ir.graph import Graph, WeightSource
from flagc.ir.types import DType

__all__ = ["resolve_model_path", "uses_torch_frontend", "zoo_graph", "checkpoint_sources"]

I64, F32 = DType.I64, DType.F32


def resolve_model_path(model: str, model_dir: str | None) -> str:
    """A path for NAME_OR_FOLDER: the path itself, model_dir/NAME, or a hub download."""
    if os.path.exists(model):
        return model
    from flagc.models import registry
    from flagc.models.base import resolve_local_dir

    folder = resolve_local_dir(model_dir or "./checkpoints", model)
    if folder is not None:
        return str(folder)
    if registry.hub_model(model) is not None:
        from flagc.models.hub import resolve_model_dir

        return str(resolve_model_dir(model, model_dir or "./checkpoints"))
    return model  # open_model_source names the missing path


def uses_torch_frontend(source: ModelSource, task: str, frontend: str = "auto") -> bool:
    """auto: the graph DSL keeps the decoders it has built-in graphs for (text generation);
    every other family and task goes through torch.export."""
    if frontend not in ("auto", "torch", "dsl"):
        raise ConfigError(f"--frontend must be auto, torch or dsl, got {frontend!r}")
    if frontend != "auto":
        return frontend == "torch"
    from flagc.dsl.custom import BUILTIN_GRAPHS
    from flagc.errors import FlagcError
    from flagc.models.registry import family_for_model_type, normalize_task

    _adopt_hub_model_type(source)
    try:
        family_for_model_type(source.model_type)
    except FlagcError:
        return False  # not a zoo family: the DSL path reports the unknown model_type
    return not (source.model_type in BUILTIN_GRAPHS and normalize_task(task) == "lm")


# ---- one table: (family, task) -> how to wrap and what the graph's IO is -------------------
@dataclass(frozen=True)
class Capture:
    module: torch.nn.Module
    inputs: list[InputSpec]
    outputs: list[str]
    kind: str  # the runtime's handling: decoder | encoder | unilm | glm | glm-classify | t5


def _kv_inputs(layers: int, heads: int, head_dim: int, prefix="past_key_values", past="past"):
    return [InputSpec(n, F32, ("batch", heads, past, head_dim)) for n in W.flat_names(prefix,
                                                                                        layers)]


def _encoder(model, task: str) -> list[Capture]:
    with_logits = task in ("classification", "sequence_labeling")
    ins = [InputSpec(n, I64, ("batch", "seq"))
           for n in ("input_ids", "attention_mask", "token_type_ids")]
    outs = (["logits"] if with_logits else []) + ["last_hidden_state"]
    return [Capture(W.EncoderStep(model, with_logits), ins, outs, "encoder")]


def _attn_dims(attn) -> tuple[int, int]:
    return int(getattr(attn, "num_kv_heads", attn.num_heads)), int(attn.head_dim)


def _decoder(model, task: str) -> list[Capture]:
    layers = model.model.layers
    heads, d = _attn_dims(layers[0].attn)
    ins = [InputSpec("input_ids", I64, ("batch", "seq")),
           InputSpec("attention_mask", I64, ("batch", "past+seq")),
           InputSpec("position_ids", I64, ("batch", "seq"))] + _kv_inputs(len(layers), heads, d)
    outs = ["logits"] + W.flat_names("present", len(layers))
    return [Capture(W.DecoderStep(model), ins, outs, "decoder")]


def _unilm(model, task: str) -> list[Capture]:
    layers = model.model.layers
    heads, d = _attn_dims(layers[0].attn)
    ins = [InputSpec("input_ids", I64, ("batch", "seq")),
           InputSpec("token_type_ids", I64, ("batch", "seq")),
           InputSpec("attention_mask", I64, ("batch", "past+seq"))] + \
        _kv_inputs(len(layers), heads, d)
    outs = ["logits"] + W.flat_names("present", len(layers))
    return [Capture(W.UniLMStep(model), ins, outs, "unilm")]


def _glm(model, task: str) -> list[Capture]:
    ins = [InputSpec("input_ids", I64, ("batch", "seq")),
           InputSpec("position_ids", I64, ("batch", 2, "seq")),
           InputSpec("attention_mask", I64, ("batch",))]
    if task == "classification":
        return [Capture(W.GLMClassify(model), ins, ["logits"], "glm-classify")]
    layers = model.transformer.layers
    heads, d = _attn_dims(layers[0].attention)
    ins += _kv_inputs(len(layers), heads, d)
    outs = ["logits"] + W.flat_names("present", len(layers))
    return [Capture(W.GLMStep(model), ins, outs, "glm")]


def _t5(model, task: str) -> list[Capture]:
    c = model.config
    layers = c.num_decoder_layers
    cross = W.flat_names("cross", layers)
    enc = Capture(W.T5Encode(model),
                  [InputSpec("input_ids", I64, ("batch", "src")),
                   InputSpec("attention_mask", I64, ("batch", "src"))],
                  ["last_hidden_state"] + cross, "t5-encoder")
    dec_ins = [InputSpec("decoder_input_ids", I64, ("batch", "seq")),
               InputSpec("encoder_attention_mask", I64, ("batch", "src"))]
    dec_ins += _kv_inputs(layers, c.num_heads, c.d_kv)
    dec_ins += _kv_inputs(layers, c.num_heads, c.d_kv, prefix="cross", past="src")
    dec = Capture(W.T5DecodeStep(model, layers), dec_ins,
                  ["logits"] + W.flat_names("present", layers), "t5")
    return [dec, enc]


# family name -> capture builder (the first capture is the artifact's main graph)
CAPTURES: dict[str, Callable[[Any, str], list[Capture]]] = {
    "bert": lambda m, t: _unilm(m, t) if t == "seq2seq" else _encoder(m, t),
    "gpt2": _decoder,
    "llama": _decoder,
    "glm": _glm,
    "t5": _t5,
}


# ---- weights --------------------------------------------------------------------------------
def checkpoint_sources(model, store) -> dict[str, WeightSource]:
    """Module parameter name -> lazy WeightSource through the model's weight map.

    CheckpointError lists every parameter the checkpoint lacks or mis-shapes (never a silent
    random tensor in an artifact)."""
    expected, _ = model._expected_tensors()
    names_by_tensor: dict[int, list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        names_by_tensor.setdefault(id(t), []).append(name)
    sources: dict[str, WeightSource] = {}
    problems: list[str] = []
    for ck_name, ck_shape in store.shapes().items():
        target, transform = model.weight_map.map(ck_name)
        if target is None or target not in expected:
            continue  # skipped buffers, heads of other tasks, aliases of tied parameters
        shape = transform.shape(ck_shape) if transform else tuple(ck_shape)
        want = tuple(expected[target].shape)
        if shape != want:
            problems.append(f"{ck_name} -> {target}: expected {list(want)}, got {list(shape)}")
            continue

        def load(ck=ck_name, tr=transform):
            t = store.tensor(ck)
            if tr is not None:
                t = tr.apply(t)
            t = t.to(torch.float32) if t.is_floating_point() else t
            return t.contiguous().numpy()

        src = WeightSource(load, origin=f"{store.origin}:{ck_name}")
        for alias in names_by_tensor[id(expected[target])]:
            sources[alias] = src
    missing = [n for n in expected if n not in sources]
    if missing:
        problems.append(f"missing {missing}")
    if problems:
        raise CheckpointError(f"checkpoint {store.origin} does not fit {type(model).__name__}: "
                              + "; ".join(problems))
    return sources


# ---- graphs ---------------------------------------------------------------------------------
def zoo_graph(source: ModelSource, task: str, name: str = "model") -> tuple[Graph, dict]:
    """The IR of `source`'s model for `task` and the config dict api.build reads limits from."""
    from flagc.models import registry

    family = registry.family_for_model_type(source.model_type or _missing_type(source))
    canonical = registry.normalize_task(task)
    cls = registry.model_class(family, task)
    config = cls.config_from_dict(dict(source.config))
    with torch.device("meta"):
        model = cls(config).eval()
    weights = {f"inner.{k}": v for k, v in checkpoint_sources(model, source.weights).items()}
    captures = CAPTURES[family.name](model, canonical)
    graphs = []
    for i, cap in enumerate(captures):
        role = "" if i == 0 else f"_{cap.kind}"
        g = capture(cap.module, cap.inputs, cap.outputs, weights=weights, name=name + role,
                    strip_prefix="inner.")
        graphs.append(g)
    main = graphs[0]
    extra: dict[str, Any] = {"frontend": "torch.export", "zoo": {
        "family": family.name, "task": canonical, "kind": captures[0].kind,
        "class": cls.__name__}}
    labels = source.config.get("id2label")
    if labels:
        extra["zoo"]["id2label"] = {str(k): v for k, v in labels.items()}
    if canonical == "embedding":
        extra["zoo"]["pooling"] = pooling_config(source.path)
    for key in ("pad_token_id", "decoder_start_token_id", "eos_token_id"):
        if getattr(config, key, None) is not None:
            extra["zoo"][key] = getattr(config, key)
    if len(graphs) > 1:
        main.metadata["companions"] = {"encoder": graphs[1]}
    main.metadata["manifest"] = extra
    cfg = dict(source.config)
    cfg["max_positions"] = _max_positions(config)
    return main, cfg


def _adopt_hub_model_type(source: ModelSource) -> None:
    """FlagAI's hub config.json files (GLM-large-ch, ...) carry no model_type: take the hub
    table's, found by the folder's name."""
    if source.model_type:
        return
    from flagc.models import registry

    hub = registry.hub_model(os.path.basename(os.path.normpath(str(source.path))))
    if hub is not None and hub.config.get("model_type"):
        source.config["model_type"] = hub.config["model_type"]


def _missing_type(source: ModelSource) -> str:
    raise ConfigError(f"{source.path}: config.json has no model_type; add one of the zoo's "
                      "families (bert, roberta, gpt2, llama, qwen2, t5, glm)")


def _max_positions(config) -> int:
    for key in ("max_position_embeddings", "max_sequence_length"):
        n = getattr(config, key, None)
        if n:
            # RoBERTa numbers real tokens from pad_id + 1
            return int(n) - int(getattr(config, "position_offset", 0) or 0)
    return 4096  # relative positions (T5): no table limits the length


def pooling_config(folder: str) -> dict[str, Any]:
    """sentence-transformers pooling (modules.json + <n>_Pooling/config.json); mean by default."""
    pooling = {"mode": "mean", "normalize": False}
    modules_path = os.path.join(str(folder), "modules.json")
    if not os.path.isfile(modules_path):
        return pooling
    with open(modules_path) as f:
        modules = json.load(f)
    for m in modules:
        kind = str(m.get("type", ""))
        if kind.endswith("Pooling"):
            cfg_path = os.path.join(str(folder), m.get("path", ""), "config.json")
            if os.path.isfile(cfg_path):
                with open(cfg_path) as f:
                    cfg = json.load(f)
                for mode in ("cls_token", "mean_tokens", "max_tokens", "lasttoken"):
                    if cfg.get(f"pooling_mode_{mode}"):
                        pooling["mode"] = mode.replace("_tokens", "").replace("_token", "")
                        break
        elif kind.endswith("Normalize"):
            pooling["normalize"] = True
    return pooling
