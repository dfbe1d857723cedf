"""Quantization options of a build: validated before any weight is read, plus calibration ids.

`build(quant_block=...)` / `--quant-block` land in the pass options the quantize pass reads;
with calibration on (`quant_calibrate` / `quant_sensitive`) and a tokenizer at hand, the
calibration input is a fixed text (not the report's, so the report measures unseen text).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from flagc.errors import ConfigError

__all__ = ["quant_pass_options", "CALIBRATION_TEXT"]

CALIBRATION_TEXT = (
    "Photosynthesis is the process by which green plants and some other organisms use sunlight "
    "to synthesize foods from carbon dioxide and water. It generally involves the green pigment "
    "chlorophyll and generates oxygen as a byproduct. In economics, inflation is a general "
    "increase in the prices of goods and services. Python is a high-level programming language "
    "whose design philosophy emphasizes code readability with the use of significant indentation."
    " The Amazon rainforest covers much of the Amazon basin of South America and is home to an "
    "enormous variety of plants, insects, birds and mammals. Many of its species have not yet "
    "been described by scientists.\n\nQ: What is the boiling point of water at sea level?\nA: "
    "Water boils at 100 degrees Celsius, or 212 degrees Fahrenheit, at standard atmospheric "
    "pressure.\n\nThe old lighthouse keeper climbed the spiral stairs every evening to light the "
    "lamp. Ships passing the rocky coast relied on its beam, and for forty years he never missed "
    "a single night, not even during the great storm of the winter when the waves reached the "
    "windows of his small cottage. def add(a, b):\n    return a + b\n\nfor i in range(10):\n    "
    "print(add(i, i * 2))\n\nThe treaty was signed in 1648 and ended a long period of war in "
    "central Europe. Historians still debate its consequences for the balance of power between "
    "the states of the continent."
)


def quant_pass_options(target, pass_options: Optional[dict[str, Any]],
                       quant_block: Optional[int], tokenizer_loader) -> dict[str, Any]:
    """Pass options with the build's quantization flags merged in and checked."""
    from flagc.passes.quantize import quant_options

    options = dict(pass_options or {})
    if quant_block is not None:
        options["quant_block"] = quant_block
    quantized = target.contrib_ops and target.precision in ("int4", "int8")
    if not quantized:
        if "quant_block" in options:
            raise ConfigError(f"--quant-block applies to onnx-int4 only, not {target.name}")
        return options
    if options.get("quant_block") is not None and target.precision != "int4":
        raise ConfigError(f"--quant-block applies to onnx-int4 only (onnx-int8 is per-channel), "
                          f"not {target.name}")
    opts = quant_options(target.precision, options)  # ConfigError now, before any weight loads
    if (opts.calibrate or opts.sensitive) and "calibration_ids" not in options:
        tokenizer = tokenizer_loader()
        if tokenizer is not None:
            ids = tokenizer.encode(CALIBRATION_TEXT, add_special_tokens=False)
            options["calibration_ids"] = np.array([ids], dtype=np.int64)
    return options
