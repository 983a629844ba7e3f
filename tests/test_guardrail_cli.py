"""SQL guardrail from the outside: the `sql_guardrail.py` CLI contract (check, batch, config errors, help) and the
guarded retry client `ask` against a fake OpenAI endpoint. The verdicts themselves are in tests/test_sql_guardrail.py.
"""
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from serving import send_json
import sql_guardrail as g
from prompting import chat_messages
from test_sql_guardrail import ADVERSARIAL, CATALOG, EBS_PASS, ORG

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "custom_oracle_llama" / "inference" / "sql_guardrail.py"


@pytest.fixture(scope="module")
def policy():
    """The shipped policy without required_filters (as in tests/test_sql_guardrail.py)."""
    return {**g.load_policy(), "required_filters": []}


# ----------------------------------------------------------------------------------------------------- CLI
def run_cli(*args, stdin="", env=None):
    return subprocess.run([sys.executable, str(SCRIPT), *args], input=stdin, capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def catalog_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cat") / "catalog.json"
    path.write_text(json.dumps(CATALOG))
    return path


@pytest.mark.slow
def test_cli_check_ok_and_rejected(catalog_file):
    r = run_cli("check", "--catalog", str(catalog_file), stdin="```sql\nSELECT invoice_num FROM ap_invoices_all "
                                                                    "WHERE org_id IN (:org_ids);\n```")
    assert r.returncode == 0, r.stderr
    v = json.loads(r.stdout)
    assert v["ok"] is True and v["sql"].endswith("ap_invoices_all WHERE org_id IN (:org_ids)") and v["binds"] == ["org_ids"]
    r = run_cli("check", "--catalog", str(catalog_file), stdin="SELECT ai.invoice_total FROM ap_invoices_all ai")
    assert r.returncode == 1
    v = json.loads(r.stdout)
    assert v["ok"] is False and v["sql"] is None and v["unknown_columns"] == ["AP_INVOICES_ALL.INVOICE_TOTAL"]
    r = run_cli("check", stdin="DELETE FROM ap_invoices_all")
    assert r.returncode == 1 and json.loads(r.stdout)["codes"] == ["unsafe"]
    assert len(r.stdout.strip().splitlines()) == 1


@pytest.mark.slow
def test_cli_context_security_filters(tmp_path):
    ctx = tmp_path / "ctx.json"
    ctx.write_text(json.dumps({"tables": [], "security_filters": ORG}))
    r = run_cli("check", "--context", str(ctx), stdin="SELECT invoice_num FROM ap_invoices_all")
    assert r.returncode == 1 and json.loads(r.stdout)["codes"] == ["security_filter"]


@pytest.mark.slow
def test_cli_batch_in_order(catalog_file):
    lines = [{"text": "SELECT invoice_num FROM ap_invoices_all WHERE org_id IN (:org_ids)", "id": "a"},
             {"text": "DROP TABLE ap_invoices_all"},
             {"text": "SELECT invoice_num FROM ap_invoices_all", "security_filters": ORG},
             {"text": "SELECT invoice_num FROM ap_invoices_all WHERE org_id IN (:org_ids)", "security_filters": ORG},
             {"text": "SELECT nope FROM ap_invoices_all"}]
    r = run_cli("check", "--batch", "--catalog", str(catalog_file), stdin="\n".join(json.dumps(x) for x in lines))
    assert r.returncode == 1, r.stderr
    out = [json.loads(x) for x in r.stdout.strip().splitlines()]
    assert [v["ok"] for v in out] == [True, False, False, True, False]
    assert out[0]["id"] == "a" and out[1]["codes"] == ["unsafe"] and out[2]["codes"] == ["security_filter"]
    assert out[4]["unknown_columns"] == ["AP_INVOICES_ALL.NOPE"]
    r = run_cli("check", "--batch", stdin=json.dumps(lines[0]) + "\n" + json.dumps(lines[3]))
    assert r.returncode == 0 and len(r.stdout.strip().splitlines()) == 2


@pytest.mark.slow
@pytest.mark.parametrize("args,stdin,match", [
    (["check", "--catalog", "/nonexistent/catalog.json"], "SELECT 1 FROM dual", "cannot read catalog"),
    (["check", "--policy", "/nonexistent/p.yaml"], "SELECT 1 FROM dual", "cannot read policy"),
    (["check", "--batch"], "{not json\n", "line 1 is not JSON"),
    (["check", "--batch"], '{"sql": "SELECT 1 FROM dual"}\n', 'must be an object with a "text"'),
    (["check", "--batch"], '{"text": "SELECT 1 FROM dual", "security_filters": "ORG_ID"}\n', "security_filters"),
    (["check", "--context", "/nonexistent/ctx.json"], "SELECT 1 FROM dual", "cannot read context"),
    (["check", "--explain-dsn", "127.0.0.1:1/X"], "SELECT 1 FROM dual", "ORACLE_USER"),
    (["ask", "--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--question", "q"], "", "needs --catalog"),
])
def test_cli_config_errors_exit_2_with_one_line(args, stdin, match):
    r = run_cli(*args, stdin=stdin, env={"ORACLE_USER": "", "ORACLE_DSN": ""})
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stdout == "" and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and match in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("args", [[], ["check", "--bogus"], ["frobnicate"], ["ask", "--model", "m"]])
def test_cli_usage_errors_exit_2(args):
    r = run_cli(*args)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "error:" in r.stderr


@pytest.mark.slow
def test_cli_help_documents_every_flag():
    parser = g.build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "cmd").choices
    for name, sub in subparsers.items():
        r = run_cli(name, "--help")
        assert r.returncode == 0
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help and len(action.help) > 15, (name, action.option_strings)
                assert action.option_strings[-1] in r.stdout
    top = run_cli("--help")
    assert "Exit codes" in top.stdout and "--version" in top.stdout


@pytest.mark.slow
def test_pure_python_switch_gives_identical_verdicts(catalog_file):
    """ORACLE_GUARD_PURE_SQLGLOT=1 really loads the .py sources, and verdicts match the compiled run."""
    compiled = run_cli("--version")
    pure = run_cli("--version", env={"ORACLE_GUARD_PURE_SQLGLOT": "1"})
    assert "pure python" in pure.stdout
    assert g.SQLGLOT_IMPL["name"] in compiled.stdout
    texts = [sql for _, sql, _ in EBS_PASS[:12]] + [t for _, t, _ in ADVERSARIAL[:40:2]]
    stdin = "\n".join(json.dumps({"text": t, "security_filters": ORG}) for t in texts)
    runs = [run_cli("check", "--batch", "--catalog", str(catalog_file), stdin=stdin, env=env)
            for env in ({}, {"ORACLE_GUARD_PURE_SQLGLOT": "1"})]
    strip = [[{k: v for k, v in json.loads(x).items() if k not in ("elapsed_ms", "sqlglot")}
              for x in r.stdout.splitlines()] for r in runs]
    assert len(strip[0]) == len(texts) and strip[0] == strip[1]
    assert "pure python" in runs[1].stderr


# ------------------------------------------------------------------------------------------------- ask (retry)
class _FakeVLLM(BaseHTTPRequestHandler):
    """OpenAI-compatible chat endpoint replaying scripted answers after `delay_s` and recording the requests (not
    the SUT)."""
    answers: list = []
    requests: list = []
    delay_s = 0.0

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append(body)
        time.sleep(type(self).delay_s)
        answer = type(self).answers.pop(0)
        if isinstance(answer[0], int):   # (HTTP status, message): vLLM's error body
            status, payload = answer[0], {"error": {"message": answer[1], "type": "BadRequestError", "param": None,
                                                    "code": answer[0]}}
        else:
            content, finish = answer
            status, payload = 200, {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                                    "choices": [{"index": 0, "finish_reason": finish,
                                                 "message": {"role": "assistant", "content": content}}],
                                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
        send_json(self, status, payload)

    def log_message(self, *a):
        pass


@pytest.fixture
def fake_server():
    _FakeVLLM.answers, _FakeVLLM.requests, _FakeVLLM.delay_s = [], [], 0.0
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _FakeVLLM)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1", _FakeVLLM
    srv.shutdown()


CONTEXT = {"tables": [{"name": "AP_INVOICES_ALL", "description": "AP invoice headers",
                       "columns": [{"name": "INVOICE_NUM", "type": "VARCHAR2"}, {"name": "ORG_ID", "type": "NUMBER"}]}],
           "joins": [], "columns": [], "synonyms": {}, "security_filters": ORG}


def test_ask_retries_once_with_reasons(fake_server, policy):
    url, srv = fake_server
    bad = "SELECT ai.invoice_total FROM ap_invoices_all ai"
    good = "SELECT ai.invoice_num FROM ap_invoices_all ai WHERE ai.org_id IN (:org_ids)"
    srv.answers, srv.delay_s = [(bad, "stop"), (good, "stop")], 0.25
    out = g.ask(url, "ebs", "List invoice numbers", CONTEXT, CATALOG, policy)
    assert out["ok"] and out["retried"] and out["sql"] == good and len(out["attempts"]) == 2
    first, second = out["attempts"]
    assert not first["verdict"]["ok"] and first["raw_output"] == bad
    reasons = first["verdict"]["reasons"]
    assert "unknown column AP_INVOICES_ALL.INVOICE_TOTAL (alias AI)" in reasons
    assert any(r.startswith("missing security filter on AP_INVOICES_ALL.ORG_ID") for r in reasons)
    assert first["messages"] == chat_messages("List invoice numbers", CONTEXT)
    assert second["messages"] == chat_messages("List invoice numbers", CONTEXT, previous_sql=bad, reasons=reasons)
    assert [r["messages"] for r in srv.requests] == [first["messages"], second["messages"]]
    assert all(r["temperature"] == 0 and r["max_tokens"] == 512 for r in srv.requests)
    prompt = srv.requests[1]["messages"][0]["content"]
    assert bad in prompt and "- unknown column AP_INVOICES_ALL.INVOICE_TOTAL (alias AI)" in prompt
    # each attempt's latency is the model call's, in ms: at least the endpoint's 250 ms delay, not seconds, not the
    # whole round trip (a loopback call on a busy 2-core box adds well under 3 s); the total is their sum
    assert all(250 <= a["latency_ms"] < 250 + 3000 for a in out["attempts"]), [a["latency_ms"] for a in out["attempts"]]
    assert out["latency_ms"] == round(first["latency_ms"] + second["latency_ms"], 1)


@pytest.mark.parametrize("answers,ok,retried,n", [
    ([("SELECT invoice_num FROM ap_invoices_all WHERE org_id IN (:org_ids)", "stop")], True, False, 1),
    ([("DELETE FROM ap_invoices_all", "stop"), ("DROP TABLE ap_invoices_all", "stop")], False, True, 2),
    ([("SELECT invoice_num FROM ap_invoices_all WHERE org_id IN (:org_ids)", "length"),
      ("SELECT invoice_num FROM ap_invoices_all WHERE org_id IN (:org_ids)", "stop")], True, True, 2),
    ([("", "stop"), ("Sorry, I cannot help.", "stop")], False, True, 2),
])
def test_ask_never_returns_unvalidated_sql(fake_server, policy, answers, ok, retried, n):
    url, srv = fake_server
    srv.answers = list(answers)
    out = g.ask(url, "ebs", "q", CONTEXT, CATALOG, policy)
    assert out["ok"] is ok and out["retried"] is retried and len(out["attempts"]) == n
    assert (out["sql"] is not None) is ok and (out["final"]["sql"] is not None) is ok
    if answers[0][1] == "length":
        assert "cut off" in out["attempts"][0]["verdict"]["reasons"][-1]


@pytest.mark.slow
def test_ask_cli_round_trip(fake_server, tmp_path, catalog_file):
    url, srv = fake_server
    srv.answers = [("SELECT nope FROM ap_invoices_all", "stop"),
                   ("SELECT invoice_num FROM ap_invoices_all WHERE org_id IN (:org_ids)", "stop")]
    ctx = tmp_path / "ctx.json"
    ctx.write_text(json.dumps(CONTEXT))
    r = run_cli("ask", "--base-url", url, "--model", "ebs", "--question", "List invoices", "--context", str(ctx),
                "--catalog", str(catalog_file))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["retried"] and out["ok"] and "attempt 1: rejected" in r.stderr and "attempt 2: ok" in r.stderr


@pytest.mark.slow
def test_ask_endpoint_400_is_one_line_error_without_retry(fake_server, tmp_path, catalog_file):
    """vLLM answers 400 when a prompt exceeds max-model-len: `ask` stops with one line naming the status and vLLM's
    message (exit 2, nothing on stdout), and does not send the retry (there is no answer to give reasons about)."""
    url, srv = fake_server
    too_long = "This model's maximum context length is 2048 tokens. However, you requested 2600 tokens."
    srv.answers = [(400, too_long)]
    ctx = tmp_path / "ctx.json"
    ctx.write_text(json.dumps(CONTEXT))
    r = run_cli("ask", "--base-url", url, "--model", "ebs", "--question", "q", "--context", str(ctx),
                "--catalog", str(catalog_file))
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model endpoint call failed: BadRequestError: Error code: "
                                                   "400"), r.stderr
    assert too_long in lines[0]
    assert len(srv.requests) == 1


@pytest.mark.slow
def test_ask_unreachable_endpoint_is_one_line_error(tmp_path, catalog_file):
    ctx = tmp_path / "ctx.json"
    ctx.write_text(json.dumps(CONTEXT))
    r = run_cli("ask", "--base-url", "http://127.0.0.1:9", "--model", "m", "--question", "q", "--context", str(ctx),
                "--timeout", "5", "--catalog", str(catalog_file))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "model endpoint call failed" in r.stderr


@pytest.mark.parametrize("text, code", [("transactions", "contract"), ("was placed", "contract"),
                                        ("1+1", "contract"), ("SHUTDOWN abort", "unsafe")])
def test_bare_words_are_prose_not_statements(text, code):
    assert g.check_sql(text)["codes"] == [code]


def test_explain_backend_callable_and_normalized_sql():
    v = g.check_sql("SELECT 1 FROM DUAL", explain=lambda sql: [f"EXPLAIN failed for {sql}"])
    assert not v["ok"] and v["codes"] == ["explain_error"] and "explain" in v["checks"]
    assert g.normalized_sql("select a.x  from  ap_invoices_all a") == "SELECT A.X FROM AP_INVOICES_ALL A"
