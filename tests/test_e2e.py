"""The chain end to end on the real engines: guarded retry against the live server, then `make demo` on the
session's trained + packaged tiny model (4-bit via vLLM must reproduce >= 8/10 training SQL, else exit 1), which
leaves no vLLM server behind."""
import contextlib
import json
import re
import socket
import subprocess
from pathlib import Path

import psutil
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


@pytest.fixture(scope="module")
def demo(demo_runs, packaged_model) -> dict:
    """`make demo` once, with the Makefile's MIN_LEARNED, on this session's trained + packaged model."""
    r = subprocess.run(["make", "-s", "demo", f"RUNS={demo_runs}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=1800)
    return {"run": r, "summary_path": demo_runs / "demo" / "demo_summary.json"}


@pytest.mark.slow
def test_make_demo_serves_asks_and_reports(demo, demo_runs):
    """`make demo`'s serving half on this session's trained + packaged model, with its learned-model gate: the
    4-bit model served by vLLM reproduces >= 8/10 training SQL (else `make demo` exits 1)."""
    r = demo["run"]
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads(demo["summary_path"].read_text())
    print(f"learned: 4-bit {summary['learned_quant']}/10, merged {summary['learned_merged']}/10")
    assert summary["learned_quant"] >= 8 and "Q: " in r.stdout
    for name in ("holdout", "train10-quant", "train10-merged"):
        d = demo_runs / "eval" / name
        assert (d / "report.json").exists() and (d / "report.md").exists()
        assert (d / "failure_categories.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "learned: gold SQL reproduced, 4-bit via vLLM" in r.stdout


def vllm_leftovers(demo_runs: Path) -> dict:
    """What is still alive of the demo's two vLLM servers (4-bit, then merged bf16): processes whose command line
    names the run's model folders, processes whose PID the servers logged (API server, engine core: vLLM prefixes
    its log lines with `(Name pid=N)`), and ports they listened on that still accept a connection."""
    logs = [demo_runs / "demo" / f"vllm-{kind}.log" for kind in ("quant", "merged")]
    assert all(p.is_file() for p in logs), logs
    text = "\n".join(p.read_text(errors="replace") for p in logs)
    ports = {int(p) for p in re.findall(r"--port (\d+)", text)}
    pids = {int(p) for p in re.findall(r"\bpid=(\d+)", text)}
    assert len(ports) == 2 and pids, "each server's launcher line names its port; vLLM logs its PIDs"
    ended = max(p.stat().st_mtime for p in logs)  # the servers wrote their logs until they stopped
    folders = (str(demo_runs / "quant"), str(demo_runs / "merged"))
    by_cmdline = [p.info for p in psutil.process_iter(["pid", "cmdline"])
                  if any(f in " ".join(p.info["cmdline"] or []) for f in folders)]
    by_pid = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc = psutil.Process(pid)
            if proc.create_time() <= ended:    # not a new process that happens to reuse the number
                by_pid.append({"pid": pid, "cmdline": proc.cmdline()})
    listening = []
    for port in ports:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
            listening.append(port)
    return {"by_cmdline": by_cmdline, "by_pid": by_pid, "listening": listening}


@pytest.mark.slow
def test_make_demo_leaves_no_vllm_server_running(demo, demo_runs):
    assert demo["run"].returncode == 0, demo["run"].stderr[-3000:]
    assert vllm_leftovers(demo_runs) == {"by_cmdline": [], "by_pid": [], "listening": []}


@pytest.mark.slow
def test_make_demo_exits_1_below_min_learned(demo, demo_runs):
    """The learned-model gate for real: the same demo with MIN_LEARNED one question above what the first run
    reproduced fails with run_demo.py's exit 1 (make reports `Error 1`, as `make[1]` when nested under `make test`;
    2 would be a stage error) and its line."""
    first = json.loads(demo["summary_path"].read_text())
    n, learned = first["n_train"], first["learned_quant"]
    r = subprocess.run(["make", "-s", "demo", f"RUNS={demo_runs}", f"MIN_LEARNED={(learned + 1) / n}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=1800)
    again = json.loads(demo["summary_path"].read_text())
    assert again["learned_quant"] == learned, "temperature 0 on the same package: the same figure"
    make_error = r"^make(\[\d+\])?: \*\*\* \[Makefile:\d+: demo\] Error 1$"
    assert r.returncode == 2 and re.search(make_error, r.stderr, re.M), r.stderr[-3000:]
    assert f"error: the 4-bit model reproduced only {learned}/{n} training SQL" in r.stderr
    assert "Traceback" not in r.stderr
    assert vllm_leftovers(demo_runs) == {"by_cmdline": [], "by_pid": [], "listening": []}
