"""Baseline "transformers": the source model in Hugging Face transformers (torch eager mode).

Encoders: `AutoModel` forward under inference_mode (default attention, as the anchors' (a)).
Decoders: `AutoModelForCausalLM.generate`, greedy with the KV cache; token times come from a
streamer's put() calls, exactly as anchors.py takes them.
"""

from __future__ import annotations

import time
from typing import Any

from flagc.bench.base import ENCODER, BenchEngine, Point, Skip
from flagc.bench.baselines import BaselineContext

__all__ = ["HFEngine", "load_hf_model"]


def load_hf_model(ctx: BaselineContext, attn: str | None = None) -> Any:
    """The source model as a transformers module (fp32; fp16 for fp16 targets on CUDA)."""
    import torch
    import transformers

    # Progress bars would interleave with the bench log; the timings never include loading.
    transformers.utils.logging.disable_progress_bar()
    src = ctx.source
    if src is None:
        raise Skip("the manifest records no source path to load the baseline from")
    if not src.exists():
        raise Skip(f"source weights {src} are gone (the manifest's source path)")
    cls = transformers.AutoModel if ctx.workload == ENCODER else transformers.AutoModelForCausalLM
    dtype = torch.float16 if ctx.device == "cuda" and "fp16" in ctx.target else torch.float32
    kw: dict[str, Any] = {"dtype": dtype}
    if attn:
        kw["attn_implementation"] = attn
    if src.is_file() and src.suffix == ".gguf":
        # transformers dequantizes GGUF weights on load; the model is then plain fp32.
        model = cls.from_pretrained(src.parent, gguf_file=src.name, **kw)
    elif (src / "config.json").is_file():
        model = cls.from_pretrained(src, **kw)
    else:
        raise Skip(f"source {src} is neither a Hugging Face folder nor a GGUF file")
    return model.to(ctx.device).eval()


class HFEngine(BenchEngine):
    """transformers eager mode on the artifact's source weights."""

    name = "transformers"

    def __init__(self, ctx: BaselineContext) -> None:
        super().__init__()
        self.ctx = ctx
        self.label = "transformers"
        self.model: Any = None
        self._feeds: tuple[int, dict[str, Any]] | None = None

    def load(self) -> None:
        import torch

        torch.set_num_threads(self.ctx.threads)
        self.model = load_hf_model(self.ctx)
        cfg = self.model.config
        self.details.update({"attn_implementation": getattr(cfg, "_attn_implementation", None),
                             "dtype": str(next(self.model.parameters()).dtype)})
        self.label = f"transformers {self.details['dtype'].replace('torch.', '')}"

    def _sync(self) -> None:
        if self.ctx.device == "cuda":
            import torch

            torch.cuda.synchronize()

    def _tensors(self, inputs: Any) -> dict[str, Any]:
        # Convert a point's inputs once (zero-copy on CPU), not inside the timed call.
        import torch

        if self._feeds is None or self._feeds[0] != id(inputs):
            feeds = {k: torch.from_numpy(getattr(inputs, k)).to(self.ctx.device)
                     for k in ("input_ids", "attention_mask", "token_type_ids")}
            self._feeds = (id(inputs), feeds)
        return self._feeds[1]

    def run(self, point: Point, inputs: Any) -> dict[str, float]:
        import torch

        if point.workload == ENCODER:
            feeds = self._tensors(inputs)
            self._sync()
            t0 = time.perf_counter()
            with torch.inference_mode():
                self.model(**feeds).last_hidden_state
            self._sync()
            return {"latency_s": time.perf_counter() - t0}
        return self._generate(point, inputs)

    def _generate(self, point: Point, inputs: Any) -> dict[str, float]:
        import torch
        from transformers.generation.streamers import BaseStreamer

        class TimingStreamer(BaseStreamer):
            # put() is called once with the prompt, then once per generation step.
            def __init__(self) -> None:
                self.times: list[float] = []

            def put(self, value: Any) -> None:
                self.times.append(time.perf_counter())

            def end(self) -> None:
                pass

        x = torch.tensor(inputs.prompts, device=self.ctx.device)
        cfg = self.model.generation_config
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_token_id
        if isinstance(pad, list):
            pad = pad[0]
        st = TimingStreamer()
        self._sync()
        t0 = time.perf_counter()
        with torch.inference_mode():
            self.model.generate(x, attention_mask=torch.ones_like(x), streamer=st, do_sample=False,
                                max_new_tokens=point.new_tokens, min_new_tokens=point.new_tokens,
                                use_cache=True, pad_token_id=pad)
        self._sync()
        total = time.perf_counter() - t0
        toks = st.times[1:]
        return {"ttft_s": toks[0] - t0, "total_s": total, "new_tokens": float(len(toks)),
                "decode_s_per_token": (toks[-1] - toks[0]) / max(len(toks) - 1, 1)}

    def close(self) -> None:
        self.model = None
        self._feeds = None
