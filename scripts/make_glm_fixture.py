"""Build the GLM golden fixture (tests/fixtures/glm/) by running FlagAI 1.8.4's own GLM code.

This script is run by hand, once, in a separate virtualenv that has FlagAI installed; CI only reads
the files it writes, so CI needs no FlagAI. How the virtualenv was made (FlagAI's full dependency
set drags in diffusers, pytorch-lightning, tensorboard, datasets, torchvision, ...; none of them is
needed to import `flagai.model.glm_model`)::

    python3 -m venv /tmp/flagai-venv
    /tmp/flagai-venv/bin/pip install "torch==2.13.0"
    /tmp/flagai-venv/bin/pip install --no-deps flagai==1.8.4 -c constraints.txt  # torch==2.13.0
    /tmp/flagai-venv/bin/pip install packaging requests tqdm numpy safetensors -c constraints.txt
    /tmp/flagai-venv/bin/python scripts/make_glm_fixture.py

What it writes (all tensors fp32 / int64, safetensors):
- `config.json`: the FlagAI config dict the model was built from, plus provenance.
- `weights.safetensors`: `GLMModel.state_dict()` under FlagAI's own tensor names.
- `cls_head.safetensors`: the `GLMForSequenceClassification` head (pool_layer, multichoice_head).
- `io.safetensors`: inputs and FlagAI's outputs (see `CASES` below for the names).

The random init is re-drawn with larger scales than FlagAI's (std 0.02): with tiny weights every
attention row is near uniform and a wrong mask or position id would still pass a 1e-4 check.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "glm"

# Small, but with every structural feature of GLM-large: block position encoding, 2 layers so the
# per-layer memories matter, head_dim 8 so 4 heads is a real multi-head split.
CONFIG = {
    "num_layers": 2,
    "vocab_size": 100,
    "hidden_size": 32,
    "num_attention_heads": 4,
    "embedding_dropout_prob": 0.1,
    "attention_dropout_prob": 0.1,
    "output_dropout_prob": 0.1,
    "max_sequence_length": 64,
    "max_memory_length": 0,
    "checkpoint_activations": False,
    "checkpoint_num_layers": 1,
    "parallel_output": True,
    "relative_encoding": False,
    "block_position_encoding": True,
    "output_predict": True,
    "spell_length": None,
    "spell_func": "lstm",
    "attention_scale": 1.0,
    "class_num": 3,
}


def build(cls, config: dict, **kwargs):
    """Build a FlagAI model the way FlagAI's `init_from_json` does (dict -> ConfigObj)."""
    from flagai.model.base_model import change_json_to_cls

    model = cls(change_json_to_cls(dict(config)), **kwargs)
    return model.eval()


def randomize(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Re-draw every parameter with scales large enough to make attention peaked."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))


def glm_inputs(gen: torch.Generator):
    """Four sequences of 12 tokens, prefix boundaries 0 (causal), 4, 7 and 12 (bidirectional).

    Position ids follow GLM's blank infilling layout: part A counts 0..sep-1; part B (the span
    being generated) repeats the position of the [MASK] it fills (sep-1) while its block position
    counts 1, 2, ...
    """
    batch, seq = 4, 12
    seps = torch.tensor([0, 4, 7, 12], dtype=torch.long)
    input_ids = torch.randint(1, CONFIG["vocab_size"], (batch, seq), generator=gen)
    position_ids = torch.zeros(batch, 2, seq, dtype=torch.long)
    for b, sep in enumerate(seps.tolist()):
        if sep == 0:
            position_ids[b, 0] = torch.arange(seq)
            continue
        position_ids[b, 0, :sep] = torch.arange(sep)
        position_ids[b, 0, sep:] = sep - 1
        position_ids[b, 1, sep:] = torch.arange(1, seq - sep + 1)
    return input_ids, position_ids, seps


def main() -> int:
    """Run FlagAI on the fixed inputs and write the fixture folder."""
    if os.getenv("ENV_TYPE"):
        print("unset ENV_TYPE: the fixture must come from FlagAI's single-process code path")
        return 2
    import flagai
    from flagai.model.glm_model import GLMForSeq2Seq, GLMForSequenceClassification, GLMModel
    from safetensors.torch import save_file

    torch.manual_seed(1234)
    gen = torch.Generator().manual_seed(1234)
    model = build(GLMModel, CONFIG)
    randomize(model, gen)
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}

    input_ids, position_ids, seps = glm_inputs(gen)
    labels = torch.randint(0, CONFIG["vocab_size"], input_ids.shape, generator=gen)
    io: dict[str, torch.Tensor] = {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "attention_mask": seps,
        "labels": labels,
    }
    with torch.no_grad():
        out = model(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=seps,
            return_memory=True,
            labels=labels,
        )
        io["logits"] = out["logits"]
        io["loss"] = out["loss"].reshape(1)
        # FlagAI's mems: every layer's input plus the last layer's output, [batch, seq, hidden].
        for i, mem in enumerate(out["hidden_states"]):
            io[f"mems.{i}"] = mem

        # One incremental step on top of the memories (FlagAI's generation path): a 13th token,
        # part of span B, so it sees all 12 memory positions.
        step_ids = torch.randint(1, CONFIG["vocab_size"], (4, 1), generator=gen)
        step_pos = torch.stack([position_ids[:, 0, -1:], position_ids[:, 1, -1:] + 1], dim=1)
        step = model(
            input_ids=step_ids,
            position_ids=step_pos,
            attention_mask=seps,
            mems=out["hidden_states"],
            return_memory=True,
        )
        io["step_input_ids"] = step_ids
        io["step_position_ids"] = step_pos
        io["step_logits"] = step["logits"]

        # attention_scale > 1 switches FlagAI to its max-subtracted, rescaled score path.
        scaled = build(GLMModel, {**CONFIG, "attention_scale": 2.0})
        scaled.load_state_dict(weights)
        io["scaled_logits"] = scaled(
            input_ids=input_ids, position_ids=position_ids, attention_mask=seps
        )["logits"]

        # Seq2seq loss: cross entropy with ignore_index=0, weighted by loss_mask.
        s2s = build(GLMForSeq2Seq, CONFIG)
        s2s.load_state_dict(weights)
        loss_mask = (torch.arange(12).view(1, -1) >= seps.view(-1, 1)).long()
        target_ids = labels.clone()
        target_ids[:, 0] = 0  # exercises ignore_index=0
        s2s_out = s2s(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=seps,
            target_ids=target_ids,
            loss_mask=loss_mask,
        )
        io["s2s_target_ids"] = target_ids
        io["s2s_loss_mask"] = loss_mask
        io["s2s_loss"] = s2s_out["loss"].reshape(1)

        # Sequence classification head, pooled at [CLS] and at the separator ('start').
        cls_model = build(GLMForSequenceClassification, CONFIG, pool_token="cls")
        cls_model.model.load_state_dict(weights)
        randomize(cls_model.pool_layer, gen)
        randomize(cls_model.multichoice_head, gen)
        head = {
            k: v.contiguous()
            for k, v in cls_model.state_dict().items()
            if not k.startswith("model.")
        }
        cls_labels = torch.tensor([0, 2, 1, 2])
        cls_out = cls_model(
            input_ids=input_ids, position_ids=position_ids, attention_mask=seps, labels=cls_labels
        )
        io["cls_labels"] = cls_labels
        io["cls_logits"] = cls_out["logits"]
        io["cls_loss"] = cls_out["loss"].reshape(1)
        start_model = build(GLMForSequenceClassification, CONFIG, pool_token="start")
        start_model.load_state_dict(cls_model.state_dict())
        # 'start' indexes outputs[b, sep]: keep sep < seq for this case.
        start_seps = seps.clamp(max=11)
        io["start_attention_mask"] = start_seps
        io["start_logits"] = start_model(
            input_ids=input_ids, position_ids=position_ids, attention_mask=start_seps
        )["logits"]

    OUT.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(OUT / "weights.safetensors"))
    save_file(head, str(OUT / "cls_head.safetensors"))
    save_file({k: v.contiguous() for k, v in io.items()}, str(OUT / "io.safetensors"))
    meta = {
        "config": CONFIG,
        "provenance": {
            "flagai": flagai.__version__ if hasattr(flagai, "__version__") else "1.8.4",
            "torch": torch.__version__,
            "python": sys.version.split()[0],
            "script": "scripts/make_glm_fixture.py",
            "classes": "flagai.model.glm_model.GLMModel / GLMForSeq2Seq / "
            "GLMForSequenceClassification, eval() mode",
        },
    }
    (OUT / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {OUT}: " + ", ".join(sorted(p.name for p in OUT.iterdir())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
