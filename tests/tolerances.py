"""Per-precision tolerance table: how far an artifact's logits may be from transformers' fp32.

`max_abs` bounds the largest absolute logit difference relative to the largest |logit| (so it
holds for any logit scale); `cosine` bounds the per-position logits cosine; `greedy` is how many
leading greedy tokens must equal transformers'.
"""

TOLERANCE = {
    "onnx-fp32": {"max_abs": 1e-4, "cosine": 0.999999, "greedy": 32},
    "onnx-fp16": {"max_abs": 5e-3, "cosine": 0.9999, "greedy": 16},
    "onnx-bf16": {"max_abs": 4e-2, "cosine": 0.999, "greedy": 0},
    "onnx-int8": {"max_abs": 5e-2, "cosine": 0.99, "greedy": 0},
    "onnx-int4": {"max_abs": 2e-1, "cosine": 0.95, "greedy": 0},
}
