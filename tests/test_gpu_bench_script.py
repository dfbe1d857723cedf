"""benchmarks/gpu_llama_decode.py runs end to end in its --tiny CPU mode (the GPU run is the
lead's; this keeps the script from rotting). No assertion on speed, only on what it reports."""

import importlib.util
import os

import pytest

pytest.importorskip("transformers")


def _load():
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "gpu_llama_decode.py")
    spec = importlib.util.spec_from_file_location("gpu_llama_decode", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tiny_run_reports_rates_bound_and_agreement(tmp_path, capsys):
    bench = _load()
    r = bench.main(["--tiny", "--work", str(tmp_path), "--reps", "1", "--new-tokens", "12",
                    "--prompt-len", "16", "--batches", "1,2",
                    "--engines", "flagc,flagc-dynamic,eager",
                    "--bandwidth-gbs", "10", "--json", str(tmp_path / "r.json")])
    assert set(r["decode_tok_s"]) == {"flagc", "flagc-dynamic", "eager"}
    assert all(v > 0 for d in r["decode_tok_s"].values() for v in d.values())
    # every generated token agrees, through the static decode graphs and the dynamic graph
    assert r["agreement_first_32"] == {"flagc": {"1": 12, "2": 12},
                                       "flagc-dynamic": {"1": 12, "2": 12}}
    assert r["bandwidth_bound_tok_s"] == pytest.approx(10e9 / r["weight_bytes"])
    out = capsys.readouterr().out
    assert "| flagc (onnx-fp32, onnxruntime CPU EP, static decode graph) |" in out
    assert "| flagc (onnx-fp32, onnxruntime CPU EP, dynamic graph) |" in out
    assert "% of bound" in out
    assert os.path.isfile(tmp_path / "r.json")


def test_agreement_counts_the_worst_rows_leading_run():
    bench = _load()
    assert bench.agreement([[1, 2, 3], [1, 2, 9]], [[1, 2, 3], [1, 2, 3]], k=3) == 2
    assert bench.agreement([[5] * 40], [[5] * 40]) == 32
