"""LLaMA-family decoder as a flagc custom model file (also Qwen2 and Mistral-style checkpoints).

Use:  flagc build --model PATH --custom examples/llama.py --target onnx-fp32 -o out/model

It reads the Hugging Face tensor names. Qwen2 differs by q/k/v biases (`attention_bias`, on by
default for model_type qwen2), tied embeddings (`tie_word_embeddings`) and its rope theta; grouped
query attention comes from `num_key_value_heads`.
"""

from flagc import ComputeGraph


class LlamaModel(ComputeGraph):
    def build(self):
        weight, data, config = self.weight, self.data, self.config
        config.setdefault("max_positions", config.get("max_position_embeddings", 4096))

        eps = config.get("rms_norm_eps", 1e-6)
        head_dim = self.head_dim
        qkv_bias = config.get("attention_bias", config.get("model_type") == "qwen2")
        tied = config.get("tie_word_embeddings", False) or "lm_head.weight" not in weight

        self.Embedding(data["inputIds"], weight["model.embed_tokens.weight"], data["hiddenStates"])
        self.DataTypeAs(data["hiddenStates"], data["atype"])
        for i in range(config["num_hidden_layers"]):
            layer = weight["model.layers."][i]
            attn = layer[".self_attn."]
            mlp = layer[".mlp."]

            def bias(name):
                return attn[name + ".bias"] if qkv_bias else None

            self.RMSNorm(data["hiddenStates"], layer[".input_layernorm.weight"], eps,
                         data["attenInput"])
            self.Linear(data["attenInput"], attn["q_proj.weight"], bias("q_proj"), data["q"])
            self.Linear(data["attenInput"], attn["k_proj.weight"], bias("k_proj"), data["k"])
            self.Linear(data["attenInput"], attn["v_proj.weight"], bias("v_proj"), data["v"])
            self.ExpandHead(data["q"], head_dim)
            self.ExpandHead(data["k"], head_dim)
            self.ExpandHead(data["v"], head_dim)
            self.LlamaRotatePosition2D(data["q"], data["positionIds"], data["sin"], data["cos"],
                                       head_dim)
            self.LlamaRotatePosition2D(data["k"], data["positionIds"], data["sin"], data["cos"],
                                       head_dim)
            self.FusedAttention(data["q"], data["pastKey."][i], data["pastValue."][i], data["k"],
                                data["v"], data["attenInput"], data["attentionMask"],
                                data["attenOutput"], scale=head_dim ** -0.5)
            self.Linear(data["attenOutput"], attn["o_proj.weight"], weight.get(
                f"model.layers.{i}.self_attn.o_proj.bias"), data["attenLastOutput"])
            self.AddTo(data["hiddenStates"], data["attenLastOutput"])

            self.RMSNorm(data["hiddenStates"], layer[".post_attention_layernorm.weight"], eps,
                         data["attenInput"])
            self.Linear(data["attenInput"], mlp["gate_proj.weight"], None, data["w1"])
            self.Linear(data["attenInput"], mlp["up_proj.weight"], None, data["w3"])
            self.Silu(data["w1"], data["w1"])
            self.MulTo(data["w1"], data["w3"])
            self.Linear(data["w1"], mlp["down_proj.weight"], None, data["w2"])
            self.AddTo(data["hiddenStates"], data["w2"])

        self.RMSNorm(data["hiddenStates"], weight["model.norm.weight"], eps, data["hiddenStates"])
        lm_head = weight["model.embed_tokens.weight"] if tied else weight["lm_head.weight"]
        self.Linear(data["hiddenStates"], lm_head, None, data["logits"])


__model__ = LlamaModel
