"""GLM blank-infilling generation over a GLM artifact (FlagAI's glm_generate_sample loop).

The prompt holds a [MASK] / [sMASK] / [gMASK] (a trailing [gMASK] is added when it has none).
The context runs once bidirectionally (separator = its length, 2-D positions (i, 0)); then,
starting from <|startofpiece|>, every new token sits at the mask's position with block position
1, 2, ... and sees the whole context and the tokens before it (separator 0), until
<|endofpiece|>. Prompts run one at a time: GLM's separator mask has no padding.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from flagc.errors import RuntimeInputError
from flagc.runtimes.generate import GenerationResult
from flagc.runtimes.sampling import Sampler, SamplingParams

__all__ = ["GLMGenerator", "GLM_TOKENS"]

# FlagAI's GLM tokenizers' special tokens, by role.
GLM_TOKENS = {"mask": ("[MASK]", "[sMASK]", "[gMASK]"), "gmask": "[gMASK]",
              "sop": "<|startofpiece|>", "eop": "<|endofpiece|>"}


class GLMGenerator:
    """`engine.run(feeds) -> outputs` of a GLM artifact built for lm / seq2seq."""

    def __init__(self, engine, manifest: Mapping[str, Any]):
        self.engine = engine
        kv = manifest["kv_cache"]
        self.layers, self.heads, self.head_dim = kv["layers"], kv["kv_heads"], kv["head_dim"]
        self.vocab_size = int(manifest["vocab_size"])

    @staticmethod
    def special_ids(tokenizer) -> dict[str, Any]:
        """mask ids, gmask, sop and eop ids from the tokenizer (RuntimeInputError if absent)."""
        def tid(t):
            i = tokenizer.token_to_id(t)
            if i is None:
                raise RuntimeInputError(f"the GLM tokenizer has no {t!r} token; pass glm_tokens="
                                        "{'mask': [...], 'gmask': id, 'sop': id, 'eop': id}")
            return i
        masks = [i for i in (tokenizer.token_to_id(t) for t in GLM_TOKENS["mask"])
                 if i is not None]
        return {"mask": masks, "gmask": tid(GLM_TOKENS["gmask"]), "sop": tid(GLM_TOKENS["sop"]),
                "eop": tid(GLM_TOKENS["eop"])}

    def _run(self, ids, positions, sep, past) -> tuple[np.ndarray, dict]:
        feeds = {"input_ids": np.asarray([ids], np.int64),
                 "position_ids": np.asarray([positions], np.int64),
                 "attention_mask": np.asarray([sep], np.int64)}
        for i in range(self.layers):
            for kind in ("key", "value"):
                feeds[f"past_key_values.{i}.{kind}"] = past[f"{i}.{kind}"]
        out = self.engine.run(feeds)
        presents = {k[len("present."):]: v for k, v in out.items() if k.startswith("present.")}
        return out["logits"][:, -1, :], presents

    def generate_one(self, prompt: Sequence[int], params: SamplingParams,
                     tokens: Mapping[str, Any], decode: Callable | None = None,
                     ) -> GenerationResult:
        if params.num_beams > 1:
            raise RuntimeInputError("GLM blank infilling supports greedy and sampled decoding, "
                                    "not beam search")
        t0 = time.perf_counter()
        ids = [int(t) for t in prompt]
        masks = [i for i, t in enumerate(ids) if t in set(tokens["mask"]) | {tokens["gmask"]}]
        if not masks:
            ids.append(int(tokens["gmask"]))
            masks = [len(ids) - 1]
        mask_pos, n = masks[0], len(ids)
        empty = np.zeros((1, self.heads, 0, self.head_dim), np.float32)
        past = {f"{i}.{k}": empty for i in range(self.layers) for k in ("key", "value")}
        _, past = self._run(ids, [list(range(n)), [0] * n], n, past)
        sampler = Sampler(params, self.vocab_size, [tokens["eop"]])
        sampler.begin([ids])
        token, generated, reason = int(tokens["sop"]), [], "length"
        for step in range(params.max_new_tokens):
            logits, past = self._run([token], [[mask_pos], [step + 1]], 0, past)
            token = int(sampler.step(logits)[0])
            if token == tokens["eop"]:
                reason = "stop"
                break
            generated.append(token)
        return GenerationResult(token_ids=generated, text=decode(generated) if decode else None,
                                finish_reason=reason, prompt_tokens=len(prompt),
                                timings={"total_s": time.perf_counter() - t0})
