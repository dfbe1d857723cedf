"""Random weights: a WeightStore whose tensors are generated lazily, seeded per tensor name.

`flagc build --random-weights` builds any zoo config (a hub name such as GLM-10b-ch) or a Hugging
Face style folder holding only config.json, with no checkpoint on disk: for benchmarks and for the
scale tests. Everything downstream (DSL, frontends, lowering) sees an ordinary WeightStore.

Each tensor is drawn from its own generator, seeded by (seed, sha256(name)), so a tensor's values
do not depend on which other tensors were generated or in what order: lowering can stream them one
at a time and two builds with the same seed produce identical artifacts. Init follows the usual
transformer recipe: matrices uniform with std initializer_range, norm scales 1, biases 0.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable, Mapping

import numpy as np

from flagc.checkpoints.source import ModelSource
from flagc.checkpoints.stores import WeightStore
from flagc.errors import CheckpointError, ConfigError

__all__ = ["RandomWeightStore", "random_model_source", "checkpoint_layout", "module_shapes",
           "LAYOUTS"]

DEFAULT_STD = 0.02  # HF's initializer_range default


class RandomWeightStore(WeightStore):
    """Seeded random tensors for a fixed inventory of names and shapes (float32)."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], seed: int = 0,
                 std: float = DEFAULT_STD, origin: str = "random weights"):
        super().__init__(f"{origin} (seed {seed})")
        self.seed = int(seed)
        self.std = float(std)
        for name, shape in shapes.items():
            shape = tuple(int(d) for d in shape)
            self._index[name] = ("float32", shape, (lambda n=name, s=shape: self.generate(n, s)))

    def generate(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        kind = _init_kind(name, shape)
        if kind == "ones":
            return np.ones(shape, np.float32)
        if kind == "zeros":
            return np.zeros(shape, np.float32)
        words = np.frombuffer(hashlib.sha256(name.encode()).digest()[:16], dtype=np.uint32)
        rng = np.random.Generator(np.random.SFC64(np.random.SeedSequence(
            [self.seed, *map(int, words)])))
        # Uniform with the target std, not normal: numpy draws uniforms ~3x faster, which is
        # most of a 10B random build's time. In place: one tensor-sized buffer, never two.
        arr = rng.random(shape, dtype=np.float32)
        arr -= np.float32(0.5)
        arr *= np.float32(2 * np.sqrt(3.0) * self.std)
        return arr


def _init_kind(name: str, shape: tuple[int, ...]) -> str:
    leaf = name.lower()
    if leaf.endswith(".bias") or leaf.endswith("_bias"):
        return "zeros"
    if len(shape) == 1 and any(k in leaf for k in ("norm", "ln", "layernorm")):
        return "ones"
    if len(shape) == 1:
        return "zeros"
    return "normal"


# ---- inventories ---------------------------------------------------------------------------

def _llama_layout(cfg: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Hugging Face tensor names of a LLaMA / Qwen2 / Mistral checkpoint (what examples/llama.py
    reads)."""
    def get(key, *alts, default=None):
        for k in (key, *alts):
            if cfg.get(k) is not None:
                return int(cfg[k])
        if default is None:
            raise ConfigError(f"config is missing {key!r} (needed to lay out random weights)")
        return default

    hidden, layers = get("hidden_size"), get("num_hidden_layers", "num_layers")
    heads = get("num_attention_heads")
    kv_heads = get("num_key_value_heads", default=heads)
    head_dim = get("head_dim", default=hidden // heads)
    inter, vocab = get("intermediate_size"), get("vocab_size")
    qkv_bias = bool(cfg.get("attention_bias", cfg.get("model_type") == "qwen2"))
    out = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (hidden,)
        for proj, rows in (("q", heads * head_dim), ("k", kv_heads * head_dim),
                           ("v", kv_heads * head_dim)):
            out[f"{p}self_attn.{proj}_proj.weight"] = (rows, hidden)
            if qkv_bias:
                out[f"{p}self_attn.{proj}_proj.bias"] = (rows,)
        out[p + "self_attn.o_proj.weight"] = (hidden, heads * head_dim)
        out[p + "post_attention_layernorm.weight"] = (hidden,)
        out[p + "mlp.gate_proj.weight"] = (inter, hidden)
        out[p + "mlp.up_proj.weight"] = (inter, hidden)
        out[p + "mlp.down_proj.weight"] = (hidden, inter)
    out["model.norm.weight"] = (hidden,)
    if not cfg.get("tie_word_embeddings", False):
        out["lm_head.weight"] = (vocab, hidden)
    return out


# model_type -> checkpoint inventory, for the graph DSL's built-in models (which read checkpoint
# names). Other families go through their zoo module's parameter names (`module_shapes`).
LAYOUTS: dict[str, Callable[[Mapping[str, Any]], dict[str, tuple[int, ...]]]] = {
    "llama": _llama_layout,
    "qwen2": _llama_layout,
    "mistral": _llama_layout,
}


def module_shapes(module) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of a torch module (built on the meta device: no memory)."""
    return {name: tuple(p.shape) for name, p in module.named_parameters()}


def _zoo_shapes(cfg: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """The parameters of the zoo module for this config, built on the meta device."""
    import torch

    from flagc.models.registry import family_for_model_type

    family = family_for_model_type(str(cfg.get("model_type", "")))
    config = family.config_class(cfg.get("model_type")).from_dict(cfg)
    task = "lm" if "lm" in family.tasks else next(iter(family.tasks))
    with torch.device("meta"):
        module = family.tasks[task](config)
    return module_shapes(module)


def checkpoint_layout(cfg: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes a checkpoint of this config holds."""
    model_type = str(cfg.get("model_type", ""))
    if model_type in LAYOUTS:
        return LAYOUTS[model_type](cfg)
    return _zoo_shapes(cfg)


# ---- sources -------------------------------------------------------------------------------

class RandomModelSource(ModelSource):
    """A ModelSource whose weights are random; its hash includes the seed."""

    def source_hash(self) -> str:
        h = hashlib.sha256(super().source_hash().encode())
        h.update(f"random-seed={self.weights.seed}".encode())
        return h.hexdigest()[:16]


def random_model_source(model: str, seed: int = 0) -> ModelSource:
    """A zoo hub name (e.g. "GLM-10b-ch") or a folder with config.json, with random weights."""
    path = os.path.expanduser(os.fspath(model))
    folder = None
    if os.path.isdir(path):
        folder = path
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise CheckpointError(f"{path}: no config.json; --random-weights needs a config "
                                  "(a folder with config.json, or a zoo hub name)")
        try:
            with open(cfg_path) as f:
                config = json.load(f)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{cfg_path}: invalid JSON: {exc}") from exc
    else:
        from flagc.models.registry import hub_model, hub_model_names

        hub = hub_model(model)
        if hub is None:
            raise ConfigError(f"--random-weights: {model!r} is neither a folder with config.json "
                              f"nor a zoo hub name (known: {', '.join(hub_model_names())})")
        config = dict(hub.config)
    std = float(config.get("initializer_range") or DEFAULT_STD)
    store = RandomWeightStore(checkpoint_layout(config), seed=seed, std=std,
                              origin=f"random weights for {model}")

    def load_tokenizer():
        if folder is None:
            return None
        from flagc.runtimes.tokenizer import Tokenizer
        from flagc.runtimes.tokenizer_hf import has_tokenizer_source

        return Tokenizer.from_pretrained(folder) if has_tokenizer_source(folder) else None

    return RandomModelSource(folder or model, "random", config, store, load_tokenizer,
                             extra={"seed": int(seed)})
