"""Model sources: a checkpoint (Hugging Face folder or GGUF file) as config + weights + tokenizer.

Everything downstream (the DSL, frontends) sees one shape of thing: a HF-style config dict, a
WeightStore with HF tensor names, and a way to build the tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from flagc.checkpoints.gguf_file import read_gguf
from flagc.checkpoints.stores import MappedStore, WeightStore, open_weight_store
from flagc.errors import CheckpointError, ConfigError

__all__ = ["ModelSource", "open_model_source"]


@dataclass
class ModelSource:
    path: str
    kind: str  # "hf-folder" | "gguf"
    config: dict[str, Any]
    weights: WeightStore
    load_tokenizer: Callable[[], Any]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", ""))

    def source_hash(self) -> str:
        """A digest of the config and the tensor inventory (names, dtypes, shapes, file sizes)."""
        h = hashlib.sha256(json.dumps(self.config, sort_keys=True, default=str).encode())
        for name in sorted(self.weights.names()):
            dtype, shape = self.weights.info(name)
            h.update(f"{name}:{dtype}:{shape};".encode())
        if os.path.isfile(self.path):
            h.update(str(os.path.getsize(self.path)).encode())
        return h.hexdigest()[:16]


def open_model_source(path: str) -> ModelSource:
    path = os.path.expanduser(os.fspath(path))
    if os.path.isfile(path) and path.endswith(".gguf"):
        return _gguf_source(path)
    if os.path.isdir(path):
        ggufs = [f for f in os.listdir(path) if f.endswith(".gguf")]
        if not os.path.exists(os.path.join(path, "config.json")) and len(ggufs) == 1:
            return _gguf_source(os.path.join(path, ggufs[0]))
        return _hf_source(path)
    raise CheckpointError(f"model path {path!r} is neither a folder with config.json nor a .gguf "
                          "file")


def _hf_source(folder: str) -> ModelSource:
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{folder}: no config.json (not a Hugging Face style model folder)")
    try:
        with open(cfg_path) as f:
            config = json.load(f)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{cfg_path}: invalid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ConfigError(f"{cfg_path}: expected a JSON object")
    weights = open_weight_store(folder)

    def load_tokenizer():
        from flagc.runtimes.tokenizer import Tokenizer

        return Tokenizer.from_pretrained(folder)

    return ModelSource(folder, "hf-folder", config, weights, load_tokenizer)


# ---- GGUF --------------------------------------------------------------------------------------

# GGUF tensor name (after "blk.N.") -> HF name (after "model.layers.N.")
_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_ARCHES = ("llama", "qwen2")


def _gguf_config(meta: dict[str, Any], tensors: dict, path: str) -> dict[str, Any]:
    arch = str(meta.get("general.architecture", ""))
    if arch not in _GGUF_ARCHES:
        raise ConfigError(f"{path}: GGUF architecture {arch!r} is not supported "
                          f"(supported: {', '.join(_GGUF_ARCHES)})")

    def get(key: str, default: Any = None, required: bool = True) -> Any:
        full = f"{arch}.{key}"
        if full in meta:
            return meta[full]
        if required and default is None:
            raise ConfigError(f"{path}: GGUF metadata lacks {full!r}")
        return default

    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    tokens = meta.get("tokenizer.ggml.tokens") or []
    config = {
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": int(get("attention.key_length", hidden // heads)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length", 2048)),
        "vocab_size": int(get("vocab_size", len(tokens) or None)),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
    }
    for key, meta_key in (("bos_token_id", "tokenizer.ggml.bos_token_id"),
                          ("eos_token_id", "tokenizer.ggml.eos_token_id"),
                          ("pad_token_id", "tokenizer.ggml.padding_token_id")):
        if meta_key in meta:
            config[key] = int(meta[meta_key])
    return config


def _reverse_llama_permute(w, n_head: int):
    """Undo llama.cpp's Q/K row permutation (it interleaves rotary halves for its rope kernel)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def _gguf_source(path: str) -> ModelSource:
    gg = read_gguf(path)
    config = _gguf_config(gg.metadata, gg.tensors, path)
    store = MappedStore(path)
    permute = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    for gname, info in gg.tensors.items():
        hf = _hf_name_for_gguf(gname)
        if hf is None:
            continue  # e.g. rope_freqs: recomputed from config
        load = info.load
        part = gname.split(".")[2] if gname.startswith("blk.") else ""
        if config["model_type"] == "llama" and part in permute and gname.endswith(".weight"):
            load = (lambda ld=load, n=permute[part]: _reverse_llama_permute(ld(), n))
        store.add(hf, info.quant.lower(), info.shape, load)
    metadata = gg.metadata

    def load_tokenizer():
        from flagc.runtimes.tokenizer import Tokenizer

        return Tokenizer.from_gguf(metadata)

    return ModelSource(path, "gguf", config, store, load_tokenizer,
                       extra={"gguf_name": metadata.get("general.name")})


def _hf_name_for_gguf(name: str) -> str | None:
    if name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _GGUF_LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_GGUF_LAYER_NAMES[parts[2]]}.{parts[3]}"
    return None
