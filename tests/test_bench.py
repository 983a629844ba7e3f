"""`make bench` itself: the cheap parts run for real at small sizes (builder, guardrail, catalog, retrieval,
planner) and the table says what was measured. The full figures are in the README; no timing is asserted here (ratios only in `make bench`)."""
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
    assert res["builder"]["records"] == 40 and res["builder"]["ratio"] > 0
    assert res["guardrail"]["sqlglotc"]["p99_ms"] > 0 and res["guardrail"]["pure"]["p99_ms"] > 0
    assert res["planner"]["serve"]["fits"] and "eval" not in res and "merge" not in res
    assert res["catalog"]["tables"] == 300 and res["catalog"]["indexed"]["peak_rss_mb"] > 0
    table = (tmp_path / "bench.md").read_text()
    assert table.strip() in r.stdout  # printed as written
    for row in ("dataset builder vs raw fast tokenizer", "guardrail layers 1-4", "guardrail on a real-size catalog",
                "70B serving plan",
                "70B LoRA training plan", f"Machine: {res['machine']}"):
        assert row in table
