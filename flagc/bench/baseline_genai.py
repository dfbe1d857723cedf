"""Baseline "ort-genai": onnxruntime-genai's model builder output, run by its generator loop.

Built with `python -m onnxruntime_genai.models.builder -i SRC -o OUT -p PRECISION -e cpu|cuda`
into the cache folder, and timed as in anchors.py: ttft from GeneratorParams creation until the
first generate_next_token() returns, decode from the later generate_next_token() returns.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from flagc.bench.base import DECODE, BenchEngine, Point, Skip
from flagc.bench.baselines import BaselineContext

__all__ = ["GenaiEngine", "builder_precision"]

PINNED = "0.18.0"  # the version the anchors were measured with


def builder_precision(target: str) -> str:
    """The builder's -p for a flagc target; `Skip` where the builder has no counterpart."""
    for p in ("int4", "fp16", "bf16", "fp32"):
        if p in target:
            return p
    raise Skip(f"onnxruntime-genai's builder has no precision matching target {target!r}")


class GenaiEngine(BenchEngine):
    """onnxruntime-genai on its own builder's export of the source decoder."""

    name = "ort-genai"

    def __init__(self, ctx: BaselineContext) -> None:
        super().__init__()
        if ctx.workload != DECODE:
            raise Skip("ort-genai builds decoders only")
        self.ctx = ctx
        self.precision = builder_precision(ctx.target)
        self.label = f"ort-genai {self.precision}"
        self.model: Any = None

    def load(self) -> None:
        import onnxruntime_genai as og
        from importlib import metadata

        version = metadata.version("onnxruntime-genai")
        if version != PINNED:
            self.details["version_note"] = f"onnxruntime-genai {version}, anchors used {PINNED}"
        src = self.ctx.source
        if src is None or not (src / "config.json").is_file():
            raise Skip(f"the builder needs a Hugging Face source folder; the manifest's source "
                       f"is {src}")
        folder = self._build(src)
        cfg = og.Config(str(folder))
        cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": self.ctx.threads, "inter_op_num_threads": 1}}}}))
        self.model = og.Model(cfg)
        self.details.update({"model": str(folder), "precision": self.precision,
                             "version": version})

    def _build(self, src: Path) -> Path:
        ep = "cuda" if self.ctx.device == "cuda" else "cpu"
        stamp = f"{src.resolve()}|{(src / 'config.json').stat().st_mtime_ns}|{self.precision}|{ep}"
        key = hashlib.sha256(stamp.encode()).hexdigest()[:16]
        folder = self.ctx.cache_dir / "ort-genai" / key
        if (folder / "genai_config.json").is_file():
            return folder
        tmp = folder.with_name(key + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(src),
               "-o", str(tmp), "-p", self.precision, "-e", ep, "-c", str(tmp / "_cache")]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0 or not (tmp / "genai_config.json").is_file():
            shutil.rmtree(tmp, ignore_errors=True)
            missing = [ln for ln in r.stderr.splitlines() if "No module named" in ln]
            if missing:  # the builder's own dependencies are part of "installed"
                raise Skip(f"onnxruntime-genai's builder cannot run here: {missing[-1].strip()}")
            raise RuntimeError(f"onnxruntime-genai builder failed (rc={r.returncode}): "
                               f"{(r.stdout + r.stderr)[-1500:]}")
        shutil.rmtree(tmp / "_cache", ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
        self.details["build_s"] = round(time.perf_counter() - t0, 1)
        return folder

    def run(self, point: Point, inputs: Any) -> dict[str, float]:
        import numpy as np
        import onnxruntime_genai as og

        n_total = point.seq + point.new_tokens
        t0 = time.perf_counter()
        params = og.GeneratorParams(self.model)
        # min_length = max_length suppresses EOS, so exactly new_tokens are generated.
        params.set_search_options(max_length=n_total, min_length=n_total, do_sample=False,
                                  batch_size=point.batch)
        gen = og.Generator(self.model, params)
        gen.append_tokens(np.asarray(inputs.prompts, dtype=np.int32))
        gen.generate_next_token()
        gen.get_next_tokens()  # the anchors read each token back to the host; so do we
        t1 = time.perf_counter()
        n = 1
        while not gen.is_done():
            gen.generate_next_token()
            gen.get_next_tokens()
            n += 1
        t2 = time.perf_counter()
        return {"ttft_s": t1 - t0, "total_s": t2 - t0, "new_tokens": float(n),
                "decode_s_per_token": (t2 - t1) / max(n - 1, 1)}

    def close(self) -> None:
        self.model = None
