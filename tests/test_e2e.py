"""The chain end to end on the real engines: guarded retry against the live server, then `make demo` on the
session's trained + packaged tiny model (4-bit via vLLM must reproduce >= 8/10 training SQL)."""
import json
import subprocess

import pytest

from conftest import ROOT
import sql_guardrail as g

QUESTION_CONTEXT = {"tables": [{"name": "AP_INVOICES_ALL", "columns": [
    {"name": "INVOICE_ID", "type": "NUMBER"}, {"name": "INVOICE_NUM", "type": "VARCHAR2(50)"},
    {"name": "ORG_ID", "type": "NUMBER"}]}],
    "security_filters": [{"table": "AP_INVOICES_ALL", "column": "ORG_ID", "predicate": "ORG_ID IN (:org_ids)"}]}


@pytest.mark.slow
def test_ask_retries_once_with_precise_reasons_against_live_server(vllm_tiny):
    """The untrained tiny model's first answer fails the guardrail; the retry prompt carries the exact reasons."""
    catalog = {"AP_INVOICES_ALL": {"INVOICE_ID": "NUMBER", "INVOICE_NUM": "VARCHAR2(50)", "ORG_ID": "NUMBER"}}
    res = g.ask(f"{vllm_tiny['base_url']}/v1", vllm_tiny["model"], "List invoice numbers", QUESTION_CONTEXT,
                catalog, g.load_policy(), api_key=vllm_tiny["api_key"], max_tokens=64)
    first, second = res["attempts"][0], res["attempts"][-1]
    assert not first["verdict"]["ok"] and res["retried"] and len(res["attempts"]) == 2
    retry_prompt = second["messages"][0]["content"]
    assert "## Why it was rejected" in retry_prompt
    for reason in first["verdict"]["reasons"]:
        assert f"- {reason}" in retry_prompt
    assert retry_prompt.startswith(first["messages"][0]["content"].split("## Question")[0])
    assert res["ok"] == second["verdict"]["ok"] and (res["sql"] is None) == (not res["ok"])
    assert all(a["latency_ms"] > 0 for a in res["attempts"])


@pytest.mark.slow
def test_make_demo_serves_asks_and_reports(demo_runs, packaged_model):
    """`make demo`'s serving half on this session's trained + packaged model, with its learned-model gate: the
    4-bit model served by vLLM reproduces >= 8/10 training SQL (else `make demo` exits 1)."""
    r = subprocess.run(["make", "-s", "demo", f"RUNS={demo_runs}"], cwd=ROOT, capture_output=True,
                       text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((demo_runs / "demo" / "demo_summary.json").read_text())
    print(f"learned: 4-bit {summary['learned_quant']}/10, merged {summary['learned_merged']}/10")
    assert summary["learned_quant"] >= 8 and "Q: " in r.stdout
    for name in ("holdout", "train10-quant", "train10-merged"):
        d = demo_runs / "eval" / name
        assert (d / "report.json").exists() and (d / "report.md").exists()
        assert (d / "failure_categories.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "learned: gold SQL reproduced, 4-bit via vLLM" in r.stdout
