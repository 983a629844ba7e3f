"""`make bench` itself: the cheap parts run for real (builder on a small batch, guardrail, planner) and the table
says what was measured. The full figures are in the README; no timing is asserted here (ratios only in `make bench`)."""
import json
import subprocess
import sys

from conftest import PKG


def test_bench_runs_and_writes_the_table(tmp_path, tiny_model_dir):
    r = subprocess.run([sys.executable, str(PKG / "demo" / "bench.py"), "--tiny_model", str(tiny_model_dir),
                        "--skip", "merge,eval", "--records", "40", "--context_tables", "3", "--guard_rounds", "1",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "bench.json").read_text())
    assert res["builder"]["records"] == 40 and res["builder"]["ratio"] > 0
    assert res["guardrail"]["sqlglotc"]["p99_ms"] > 0 and res["guardrail"]["pure"]["p99_ms"] > 0
    assert res["planner"]["serve"]["fits"] and "eval" not in res and "merge" not in res
    table = (tmp_path / "bench.md").read_text()
    assert table.strip() in r.stdout  # printed as written
    for row in ("dataset builder vs raw fast tokenizer", "guardrail layers 1-4", "70B serving plan",
                "70B LoRA training plan", f"Machine: {res['machine']}"):
        assert row in table
