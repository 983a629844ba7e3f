"""`make bench` itself: the cheap parts run for real at small sizes (builder, guardrail, catalog, retrieval,
planner) and the table says what was measured. The full figures are in the README; no timing target is asserted
here (targets only in `make bench`), but every ratio must be the quotient of the figures reported beside it."""
import json
import subprocess
import sys

import pytest

from conftest import PKG


@pytest.mark.slow
def test_bench_runs_and_writes_the_table(tmp_path, tiny_model_dir):
    r = subprocess.run([sys.executable, str(PKG / "demo" / "bench.py"), "--tiny_model", str(tiny_model_dir),
                        "--skip", "merge,eval,service", "--records", "40", "--context_tables", "3", "--guard_rounds", "1",
                        "--catalog_tables", "300", "--catalog_columns", "10", "--retrieval_tables", "300",
                        "--build_records", "300",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "bench.json").read_text())
    table = (tmp_path / "bench.md").read_text()
    # each ratio is the quotient of the two figures reported beside it, and the table prints those same figures
    b = res["builder"]
    assert b["records"] == 40
    assert b["ratio"] == pytest.approx(b["builder_examples_per_s"] / b["raw_tokenizer_examples_per_s"], rel=1e-9)
    assert (f"{b['builder_examples_per_s']:.0f} vs {b['raw_tokenizer_examples_per_s']:.0f} examples/s = "
            f"**{b['ratio']:.2f}x**") in table
    g = res["guardrail"]
    demo_sql = len((PKG / "demo" / "raw_questions.jsonl").read_text().splitlines())
    assert g["pure"]["n"] == g["sqlglotc"]["n"] == demo_sql * 1      # every demo SQL, --guard_rounds 1
    assert g["pure"]["engine"] != g["sqlglotc"]["engine"]
    assert all(0 < g[e]["p50_ms"] <= g[e]["p99_ms"] for e in ("pure", "sqlglotc"))
    assert g["p99_speedup"] == pytest.approx(g["pure"]["p99_ms"] / g["sqlglotc"]["p99_ms"], rel=1e-9)
    assert f"**{g['sqlglotc']['p99_ms']:.2f} ms** ({g['p99_speedup']:.1f}x at p99)" in table
    assert res["planner"]["serve"]["fits"] and "eval" not in res and "merge" not in res
    c = res["catalog"]
    demo_catalog = json.loads((PKG / "demo" / "ebs_catalog.json").read_text())   # the demo tables + XX_ filler
    assert (c["tables"], c["columns"]) == (300, sum(map(len, demo_catalog.values())) + (300 - len(demo_catalog)) * 10)
    assert c["rss_ratio"] == pytest.approx(c["indexed"]["peak_rss_mb"] / c["csv_in_memory"]["peak_rss_mb"], rel=1e-9)
    assert f"{c['csv_in_memory']['peak_rss_mb']:.0f} MB (= {c['rss_ratio']:.2f}x)" in table
    assert table.strip() in r.stdout  # printed as written
    for row in ("dataset builder vs raw fast tokenizer", "guardrail layers 1-4", "guardrail on a real-size catalog",
                "70B serving plan",
                "70B LoRA training plan", f"Machine: {res['machine']}"):
        assert row in table
