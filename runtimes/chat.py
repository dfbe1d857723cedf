"""A multi-turn conversation that keeps the KV cache between turns.

Each turn renders the whole conversation with the model's chat template (the tokenizer's jinja
template, from tokenizer_config.json or GGUF metadata) and generates with `resume=True`: the
decoder keeps the longest cached prefix of the new token ids and runs only the rest, so turn n
costs its own tokens, not the whole history. Comparing ids (rather than assuming the cache holds
exactly the previous prompt plus its answer) keeps this exact when the template re-tokenizes the
answer differently or a stop string cut it: the result always equals a fresh run on the
conversation.
"""

from __future__ import annotations

from typing import Callable, Optional

from flagc.runtimes.generate import GenerationResult
from flagc.runtimes.sampling import SamplingParams

__all__ = ["ChatSession"]


class ChatSession:
    """Turns of a chat with a loaded decoder artifact (`LoadedModel`)."""

    def __init__(self, model, system: Optional[str] = None, **sampling):
        """Args:
        model: a LoadedModel with a tokenizer that has a chat template.
        system: optional system message opening the conversation.
        sampling: generation keywords used for every turn (validated now).
        """
        self.model = model
        self.system = system
        self.sampling = sampling
        SamplingParams.from_kwargs(**sampling)  # bad values fail before the first turn
        if not model.tokenizer.chat_template:
            from flagc.errors import ConfigError

            raise ConfigError(f"{model.folder}: the tokenizer has no chat template "
                              "(tokenizer_config.json chat_template or GGUF "
                              "tokenizer.chat_template); use `flagc run` for plain prompts")
        self.messages: list[dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        """Start a new conversation (the cache buffers are kept, their content forgotten)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.model.decoder.reset()

    def prompt_ids(self) -> list[int]:
        """Token ids of the conversation so far, ending with the assistant's generation prompt."""
        tok = self.model.tokenizer
        text = tok.apply_chat_template(self.messages, add_generation_prompt=True)
        return tok.encode(text, add_special_tokens=False)

    def send(self, text: str, stream: Callable[[str], None] | None = None) -> GenerationResult:
        """Add a user turn and generate the assistant's answer (streamed if `stream`).

        A failed turn (e.g. the conversation outgrew the context) is taken back, so the session
        stays usable.
        """
        self.messages.append({"role": "user", "content": text})
        try:
            result = self.model.generate(self.prompt_ids(), resume=True, stream=stream,
                                         **self.sampling)
        except BaseException:
            self.messages.pop()
            raise
        self.messages.append({"role": "assistant", "content": result.text or ""})
        return result
