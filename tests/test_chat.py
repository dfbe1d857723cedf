"""Chat (the KV cache kept between turns), `flagc chat` over piped stdin, streaming and stop
strings end to end, on a random LLaMA with a small trained byte-level BPE and a ChatML template."""

import json
import os

import pytest
from typer.testing import CliRunner

import flagc
from flagc.cli import app
from flagc.runtimes.chat import ChatSession

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Multi-byte characters (CJK, emoji, accents) are rare here, so their bytes span several tokens.
CORPUS = ["Hello world, how are you today? I am fine, thank you.",
          "The capital of France is Paris. 世界 café 🎉 naïve",
          "user assistant system: tell me a story about a fox."] * 10


@pytest.fixture(scope="module")
def chat_artifact(tmp_path_factory):
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder = tmp_path_factory.mktemp("chat")
    src = str(folder / "hf")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    os.makedirs(src)
    tok.save(os.path.join(src, "tokenizer.json"))
    with open(os.path.join(src, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": CHATML, "eos_token": "<|im_end|>",
                   "pad_token": "<|endoftext|>", "bos_token": None}, f)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=96,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, bos_token_id=None,
        eos_token_id=tok.token_to_id("<|im_end|>"), pad_token_id=0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(src)
    out = str(folder / "art")
    flagc.build(src, "onnx-fp32", out, custom=os.path.join("examples", "llama.py"))
    return out


def _conversation_ids(model, messages):
    tok = model.tokenizer
    return tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True),
                      add_special_tokens=False)


def test_turn_two_reuses_the_cache_and_equals_a_fresh_run(chat_artifact):
    model = flagc.load(chat_artifact)
    session = ChatSession(model, system="Be brief.", max_new_tokens=10)
    first = session.send("Hello, how are you?")
    turn1_prompt = _conversation_ids(model, session.messages[:2])
    assert first.timings["prefill_tokens"] == len(turn1_prompt)
    second = session.send("Tell me about Paris 世界")
    full = _conversation_ids(model, session.messages[:-1])
    # Only the new turn ran: the cached turn-1 prompt (at least) was kept.
    assert second.prompt_tokens == len(full)
    assert second.timings["prefill_tokens"] <= len(full) - len(turn1_prompt)
    fresh = flagc.load(chat_artifact).generate(full, max_new_tokens=10)
    assert second.token_ids == fresh.token_ids and second.text == fresh.text
    assert session.messages[-1] == {"role": "assistant", "content": second.text}


def test_reset_forgets_the_conversation(chat_artifact):
    model = flagc.load(chat_artifact)
    session = ChatSession(model, max_new_tokens=6)
    first = session.send("Hello")
    session.send("Tell me a story")
    session.reset()
    assert session.messages == []
    again = session.send("Hello")
    assert again.token_ids == first.token_ids
    assert again.timings["prefill_tokens"] == again.prompt_tokens  # nothing reused


def test_cli_chat_reads_turns_from_stdin(chat_artifact):
    model = flagc.load(chat_artifact)
    session = ChatSession(model, max_new_tokens=6)
    expected = [session.send("Hello").text, session.send("Tell me a story").text]
    res = CliRunner().invoke(app, ["chat", chat_artifact, "-n", "6"],
                             input="Hello\nTell me a story\n/reset\nHello\n/exit\nignored\n")
    assert res.exit_code == 0, res.output
    assert res.output == (f"{expected[0]}\n{expected[1]}\n(conversation cleared)\n"
                          f"{expected[0]}\n")
    res = CliRunner().invoke(app, ["chat", chat_artifact, "-n", "6"], input="Hello\n")
    assert res.exit_code == 0 and res.output == f"{expected[0]}\n"  # EOF ends the chat


def test_cli_chat_errors(chat_artifact):
    res = CliRunner().invoke(app, ["chat", chat_artifact, "--top-p", "2"], input="Hello\n")
    assert res.exit_code == 1 and "invalid sampling parameter top_p=2.0" in res.output
    long_turn = "fox " * 600  # over the 512-token context
    res = CliRunner().invoke(app, ["chat", chat_artifact, "-n", "4"],
                             input=f"{long_turn}\nHello\n")
    assert res.exit_code == 1
    assert "max sequence length 512" in res.output and "/reset" in res.output
    hello = ChatSession(flagc.load(chat_artifact), max_new_tokens=4).send("Hello").text
    assert res.output.rstrip("\n").endswith(hello)  # the failed turn was dropped, chat went on


def test_stream_concatenates_to_the_full_text(chat_artifact):
    prompt = "Hello 世界! 🎉 café"
    args = ["run", chat_artifact, "-p", prompt, "-n", "24"]
    plain = CliRunner().invoke(app, args)
    streamed = CliRunner().invoke(app, [*args, "--stream"])
    assert plain.exit_code == streamed.exit_code == 0
    assert streamed.output == plain.output
    pieces = []
    result = flagc.load(chat_artifact).generate(prompt, max_new_tokens=24, stream=pieces.append)
    assert "".join(pieces) == result.text and len(pieces) > 1


def test_stop_string_ends_at_the_right_character(chat_artifact):
    model = flagc.load(chat_artifact)
    free = model.generate("The capital of France", max_new_tokens=16)
    text = free.text
    stop = next(c for c in text[3:] if c.strip())  # a character first seen after the start
    cut = text.index(stop)
    stopped = model.generate("The capital of France", max_new_tokens=16, stop_strings=[stop])
    assert stopped.text == text[:cut]
    assert stopped.finish_reason == "stop"
    assert len(stopped.token_ids) <= len(free.token_ids)
