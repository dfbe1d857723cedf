"""Tests of `flagc bench`: schema, ratios, skipped baselines, plots, --compare.

One smoke run is shared by most tests: a tiny random LLaMA built by `flagc.build` and run by the
real engine, a tiny random BERT (a stand-in engine until flagc builds BERT graphs), 2
repetitions, transformers and ort-optimizer as baselines, and ort-genai hidden so it must come
out "skipped".
No test asserts a time.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

import flagc
from flagc.bench import baselines, register, sources
from flagc.bench.base import DECODE, ENCODER
from flagc.bench.compare import compare, parse_threshold
from flagc.bench.runner import Options, points_for
from flagc.bench.schema import RESULT_SCHEMA, check_result, validate
from flagc.bench.stats import PeakRss, summarize, summarize_rate
from flagc.bench.suites import SUITES
from flagc.bench.workloads import Tokenizer, make_inputs
from flagc.errors import ConfigError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _app() -> typer.Typer:
    app = typer.Typer()
    register(app)

    @app.callback()
    def main() -> None:  # a callback keeps `bench` a named subcommand, as in flagc's CLI
        """test app"""

    return app


class FakeEncoder:
    """Stand-in engine for encoder artifacts while `flagc build` has no BERT graph: the engine
    API's `forward` with a small deterministic sleep."""

    def __init__(self, path: Path, device: str = "cpu", threads: int | None = None) -> None:
        folder = Path(path) if Path(path).is_dir() else Path(path).parent
        self.manifest = json.loads((folder / "manifest.json").read_text())

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> dict:
        assert input_ids.dtype == np.int64 and input_ids.ndim == 2
        time.sleep(0.0003 * input_ids.shape[0])
        return {"last_hidden_state": np.zeros(input_ids.shape + (4,), np.float32)}


def _load(path, device="cpu", threads=None):
    """flagc.load, except for the stand-in encoder artifacts (marked in their manifest)."""
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    if json.loads((folder / "manifest.json").read_text()).get("test_stand_in"):
        return FakeEncoder(path, device, threads)
    from flagc.api import load

    return load(str(path), device=device, threads=threads)


def _encoder_artifact(root: Path, src: Path) -> Path:
    """A real tiny-bert artifact when flagc can build one, else a stand-in folder."""
    out = root / "tiny-bert"
    try:
        flagc.build(str(src), target="onnx-fp32", output=str(out), task="embedding")
        return out
    except ConfigError:  # no BERT graph yet: the manifest says so and _load fakes the engine
        pass
    out.mkdir(parents=True)
    manifest = {"model": "tiny-bert", "family": "bert", "task": "embedding",
                "target": {"name": "onnx-fp32"}, "source": {"path": str(src)},
                "test_stand_in": True}
    (out / "manifest.json").write_text(json.dumps(manifest))
    shutil.copy(src / "tokenizer.json", out / "tokenizer.json")
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench-cache")


@pytest.fixture(scope="module")
def artifacts(cache: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("artifacts")
    llama = root / "tiny-llama"
    flagc.build(str(sources.tiny_llama(cache)), target="onnx-fp32", output=str(llama),
                task="text-generation")
    return [_encoder_artifact(root, sources.tiny_bert(cache)), llama]


@pytest.fixture(scope="module")
def smoke(artifacts: list[Path], cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One CLI run of the smoke suite; returns the parsed JSON, paths and the CLI output."""
    out = tmp_path_factory.mktemp("out")
    real_has_module = baselines.has_module
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(flagc, "load", _load)
        # Hide onnxruntime-genai whether or not it is installed: it must come out "skipped".
        mp.setattr(baselines, "has_module",
                   lambda name: name != "onnxruntime_genai" and real_has_module(name))
        res = CliRunner().invoke(_app(), [
            "bench", *map(str, artifacts), "--suite", "smoke", "--baseline",
            "transformers,ort-optimizer,ort-genai", "--reps", "2", "--warmup", "0",
            "--cache-dir", str(cache),
            "--json", str(out / "r.json"), "--markdown", str(out / "r.md"),
            "--plot", str(out / "r.png")])
    assert res.exit_code == 0, res.output + repr(res.exception)
    return {"result": json.loads((out / "r.json").read_text()), "dir": out, "output": res.output}


def test_suite_builds_its_own_artifacts(cache: Path) -> None:
    """`--suite smoke` without ARTIFACT builds with flagc.build; unbuildable ones get a note."""
    from flagc.bench.prepare import suite_artifacts

    built, notes = suite_artifacts(SUITES["smoke"], cache, log=lambda msg: None)
    assert "tiny-llama-onnx-fp32" in [p.name for p in built]
    for p in built:
        assert json.loads((p / "manifest.json").read_text())["source"]["path"]
    assert len(built) + len(notes) == 2  # each model either built or explained


def test_result_matches_schema(smoke: dict) -> None:
    check_result(smoke["result"])
    jsonschema = pytest.importorskip("jsonschema")
    # The schema is plain JSON Schema: the reference validator accepts it and the document.
    jsonschema.Draft202012Validator.check_schema(RESULT_SCHEMA)
    jsonschema.validate(smoke["result"], RESULT_SCHEMA)


def test_schema_rejects_broken_results(smoke: dict) -> None:
    bad = copy.deepcopy(smoke["result"])
    del bad["artifacts"][0]["ratios"]
    bad["artifacts"][1]["ratios"][0]["ratio"] = "fast"
    bad["artifacts"][1]["engines"][0]["status"] = "maybe"
    bad["surprise"] = 1
    errors = validate(bad, RESULT_SCHEMA)
    assert "$.artifacts[0]: missing required key 'ratios'" in errors
    assert "$.artifacts[1].ratios[0].ratio: expected number, got str" in errors
    assert any(e.startswith("$.artifacts[1].engines[0].status: 'maybe'") for e in errors)
    assert "$: unexpected key 'surprise'" in errors
    with pytest.raises(ValueError, match="flagc.bench/1"):
        check_result(bad)


def test_missing_baseline_is_reported_as_skipped(smoke: dict) -> None:
    for art in smoke["result"]["artifacts"]:
        genai = [e for e in art["engines"] if e["name"] == "ort-genai"]
        assert len(genai) == 1 and genai[0]["status"] == "skipped"
        assert "not installed" in genai[0]["note"]
        assert not [m for m in art["measurements"] if m["engine"] == "ort-genai"]
        assert not [r for r in art["ratios"] if r["baseline"] == "ort-genai"]
    md = (smoke["dir"] / "r.md").read_text()
    assert "| ort-genai | ort-genai | skipped |" in md
    assert "onnxruntime_genai is not installed" in smoke["output"]


def test_every_point_has_ratios_to_the_baseline(smoke: dict) -> None:
    arts = {a["id"]: a for a in smoke["result"]["artifacts"]}
    enc, dec = arts["tiny-bert/onnx-fp32"], arts["tiny-llama/onnx-fp32"]
    assert enc["workload"] == ENCODER and dec["workload"] == DECODE
    suite = SUITES["smoke"]
    assert [m["key"] for m in enc["measurements"] if m["engine"] == "flagc"] == \
        [f"encoder b{b} s{s}" for b, s in suite.encoder_points]
    assert {(r["key"].split(" | ")[1], r["metric"]) for r in dec["ratios"]} == \
        {(f"decode b{b} p{p} n8", m) for b, p in suite.decoder_points for m in ("ttft", "decode")}
    for art, baselines_run in ((enc, ["transformers", "ort-optimizer"]), (dec, ["transformers"])):
        assert {r["baseline"] for r in art["ratios"]} == set(baselines_run)
        assert all(r["ratio"] > 0 and r["ratio_best"] > 0 for r in art["ratios"])
        ok = [e for e in art["engines"] if e["status"] == "ok"]
        assert [e["name"] for e in ok] == ["flagc", *baselines_run]
    optimizer = next(e for e in dec["engines"] if e["name"] == "ort-optimizer")
    assert optimizer["status"] == "skipped" and "encoders only" in optimizer["note"]
    for m in dec["measurements"]:
        assert m["stats"]["new_tokens"] == 8  # EOS suppressed: every engine makes all tokens
        assert m["stats"]["decode_tok_s"]["n"] == 2


def test_plot_is_a_png_with_one_line_per_engine(smoke: dict) -> None:
    plot = smoke["result"]["plot"]
    data = Path(plot["file"]).read_bytes()
    assert data.startswith(PNG_MAGIC)
    import matplotlib.image

    assert matplotlib.image.imread(plot["file"]).ndim == 3
    decode_axis, batch_axis = plot["axes"]
    assert "context length" in decode_axis["title"] and "batch size" in batch_axis["title"]
    # The lines are read back from matplotlib's artists: one per engine that measured.
    engines = {a["id"]: [e["label"] for e in a["engines"] if e["status"] == "ok"]
               for a in smoke["result"]["artifacts"]}
    assert sorted(decode_axis["lines"]) == sorted(
        f"{lbl} [tiny-llama/onnx-fp32]" for lbl in engines["tiny-llama/onnx-fp32"])
    assert sorted(batch_axis["lines"]) == sorted(
        f"{lbl} [{aid}]" for aid, labels in engines.items() for lbl in labels)


def _scaled(result: dict, factor: float) -> dict:
    new = copy.deepcopy(result)
    for art in new["artifacts"]:
        for r in art["ratios"]:
            r["ratio"] = r["ratio"] * factor
            r["noisy"] = False
    return new


@pytest.mark.parametrize("factor, code", [(0.8, 1), (0.95, 0), (1.3, 0)])
def test_compare_fails_only_beyond_the_threshold(smoke: dict, tmp_path: Path,
                                                 factor: float, code: int) -> None:
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    base = _scaled(smoke["result"], 1.0)
    old.write_text(json.dumps(base))
    new.write_text(json.dumps(_scaled(base, factor)))
    res = CliRunner().invoke(_app(), ["bench", "--compare", str(old), str(new),
                                      "--max-regression", "10%"])
    assert res.exit_code == code, res.output
    word = {0.8: "regressed", 0.95: "same", 1.3: "improved"}[factor]
    assert word in res.output


def test_compare_reports_ratios_only_in_one_run(smoke: dict) -> None:
    old = smoke["result"]
    new = copy.deepcopy(old)
    gone = new["artifacts"][0]["ratios"].pop()
    changes = {c.key: c for c in compare(old, new, 0.1)}
    assert changes[gone["key"]].status == "gone"
    assert all(c.status == "same" for k, c in changes.items() if k != gone["key"])


def test_compare_rejects_a_file_that_is_not_a_result(tmp_path: Path) -> None:
    bad = tmp_path / "old.json"
    bad.write_text(json.dumps({"schema": "something else"}))
    res = CliRunner().invoke(_app(), ["bench", "--compare", str(bad), str(bad)])
    assert res.exit_code == 2 and "is not a flagc.bench/1 result" in res.output


@pytest.mark.parametrize("args, message", [
    (["--suite", "nope"], "--suite 'nope': unknown"),
    (["--suite", "smoke", "--baseline", "onnx"], "--baseline onnx: unknown"),
    (["--suite", "smoke", "--batch", "0"], "values must be positive"),
    (["--suite", "smoke", "--device", "tpu"], "--device 'tpu'"),
    ([], "nothing to measure"),
])
def test_bad_flags_are_named(args: list[str], message: str) -> None:
    res = CliRunner().invoke(_app(), ["bench", *args])
    assert res.exit_code == 2 and message in res.output, res.output


def test_missing_artifact_is_an_error_in_the_result(tmp_path: Path) -> None:
    from flagc.bench.runner import run_bench

    opts = Options(suite=SUITES["smoke"], baselines=[], cache_dir=tmp_path)
    result = run_bench([tmp_path / "nowhere"], opts, log=lambda msg: None)
    check_result(result)
    assert "does not exist" in result["artifacts"][0]["error"]


def test_parse_threshold() -> None:
    assert parse_threshold("10%") == pytest.approx(0.10)
    assert parse_threshold("5") == pytest.approx(0.05)
    with pytest.raises(ConfigError, match="not a percentage"):
        parse_threshold("ten")


def test_points_follow_batch_and_prompt_overrides(tmp_path: Path) -> None:
    suite = SUITES["cpu"]
    opts = Options(suite=suite, baselines=[], cache_dir=tmp_path)
    assert [(p.batch, p.seq) for p in points_for(ENCODER, opts)] == list(suite.encoder_points)
    opts.batches, opts.new_tokens = [1, 4], 16
    assert [p.key for p in points_for(DECODE, opts)] == ["decode b1 p32 n16", "decode b4 p32 n16"]
    opts.seqs = [64]
    assert [p.key for p in points_for(ENCODER, opts)] == ["encoder b1 s64", "encoder b4 s64"]


def test_encoder_inputs_match_hf_padding(artifacts: list[Path], cache: Path) -> None:
    """Padding and truncation as the anchors' `tok(rows, padding="max_length", truncation=True)`."""
    from transformers import AutoTokenizer

    from flagc.bench.base import Point
    from flagc.bench.workloads import ENCODER_SENTENCES

    tok = Tokenizer(artifacts[0] / "tokenizer.json")
    texts = [ENCODER_SENTENCES[0], " ".join(ENCODER_SENTENCES[2:5])]  # short, and truncated
    ids, mask = tok.encode_padded(texts, 12)
    ref = AutoTokenizer.from_pretrained(sources.tiny_bert(cache))(
        texts, padding="max_length", truncation=True, max_length=12, return_tensors="np")
    np.testing.assert_array_equal(ids, ref["input_ids"])
    np.testing.assert_array_equal(mask, ref["attention_mask"])
    inp = make_inputs(Point(ENCODER, 3, 64), tok, seed=1)
    assert inp.input_ids.shape == (3, 64) and 0 < inp.attention_mask.sum() < 3 * 64
    assert len(set(ids[1].tolist())) > 6  # a real vocabulary, not all [UNK]
    dec = make_inputs(Point(DECODE, 2, 40, 8), Tokenizer(artifacts[1] / "tokenizer.json"))
    assert [len(p) for p in dec.prompts] == [40, 40] and dec.prompts[0] != dec.prompts[1]


def test_stats_and_peak_rss() -> None:
    s = summarize([0.002, 0.001, 0.004], 1e3)
    assert (s["median"], s["min"], s["max"], s["n"], s["spread_pct"]) == (2.0, 1.0, 4.0, 3, 100.0)
    r = summarize_rate([0.5, 0.25, 1.0])
    assert (r["median"], r["max"], r["min"]) == (2.0, 4.0, 1.0)
    with PeakRss() as mem:
        block = np.ones(64 * 2**20 // 8)  # 64 MiB touched
    del block
    if mem.result is None:
        pytest.skip("no way to measure peak RSS here (no /proc, no psutil)")
    assert mem.result["peak_rise_mb"] >= 48
