"""The eval against a live OpenAI-compatible endpoint: requests really in flight at once, and an endpoint error.

The endpoint is a fake standing in for vLLM (a real HTTP server in a thread: /v1/models and /v1/chat/completions,
answering each question's gold SQL after a delay and counting the requests it holds at once); the eval script, run
as a subprocess as `make eval` runs it, is what is under test.
"""
import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import PKG, ROOT
from prompting import chat_messages
from serving import send_json

SCRIPT = PKG / "eval_oracle_nl2sql.py"
CATALOG = PKG / "demo" / "ebs_catalog.json"
RAW = [json.loads(line) for line in (PKG / "demo" / "raw_questions.jsonl").read_text().splitlines() if line.strip()]
MODEL = "oracle-ebs-sql"
TOO_LONG = "This model's maximum context length is 2048 tokens. However, you requested 2600 tokens."


class _FakeVLLM(BaseHTTPRequestHandler):
    """Answers a question's gold SQL (`gold`: question -> SQL) after `delay_s`, or vLLM's 400 for a question in
    `refuse`; records every chat request's question and the most requests it held at once."""
    gold: dict = {}
    refuse: set = set()
    delay_s = 0.0
    lock = threading.Lock()
    now = most = 0
    asked: list = []

    def reply(self, status, payload):
        send_json(self, status, payload)

    def do_GET(self):
        self.reply(200, {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "vllm"}]})

    def do_POST(self):
        cls = type(self)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        question = body["messages"][0]["content"].split("## Question\n", 1)[1].split("\n", 1)[0]
        with cls.lock:
            cls.asked.append(question)
            cls.now += 1
            cls.most = max(cls.most, cls.now)
        time.sleep(cls.delay_s)
        with cls.lock:
            cls.now -= 1
        if question in cls.refuse:
            return self.reply(400, {"error": {"message": TOO_LONG, "type": "BadRequestError", "param": None,
                                              "code": 400}})
        self.reply(200, {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": cls.gold[question]}}],
                         "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

    def log_message(self, *a):
        pass


@pytest.fixture
def fake_vllm():
    _FakeVLLM.gold, _FakeVLLM.refuse, _FakeVLLM.delay_s = {}, set(), 0.0
    _FakeVLLM.now = _FakeVLLM.most = 0
    _FakeVLLM.asked = []
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _FakeVLLM)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", _FakeVLLM
    srv.shutdown()


def eval_data(path: Path, n: int) -> list[dict]:
    """n demo records in the dataset builder's format (distinct questions)."""
    recs = [{"id": r["id"], "conversations": chat_messages(r["question"], r["context"], answer_sql=r["sql"]),
             "sql_type": "oracle", "question": r["question"], "sql": r["sql"], "context": r["context"]}
            for r in RAW[:n]]
    assert len({r["question"] for r in recs}) == n
    path.write_text(json.dumps(recs))
    return recs


def run_eval(base_url, data, out, *extra):
    return subprocess.run([sys.executable, str(SCRIPT), "--eval_data", str(data), "--catalog", str(CATALOG),
                           "--base_url", base_url, "--model", MODEL, "--out_dir", str(out), *map(str, extra)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


@pytest.mark.slow
@pytest.mark.parametrize("concurrency", [1, 4])
def test_eval_keeps_concurrency_requests_in_flight(fake_vllm, tmp_path, concurrency):
    """8 questions, each answered after 0.75 s: the endpoint holds exactly --concurrency requests at once (4 is
    `make eval`'s setting = vLLM's max-num-seqs), never more, and every answer is scored against its own question."""
    url, srv = fake_vllm
    recs = eval_data(tmp_path / "eval.json", 8)
    srv.gold, srv.delay_s = {r["question"]: r["sql"] for r in recs}, 0.75
    r = run_eval(url, tmp_path / "eval.json", tmp_path / "out", "--concurrency", concurrency)
    assert r.returncode == 0, r.stderr[-3000:]
    assert srv.most == concurrency
    assert sorted(srv.asked) == sorted(srv.gold), "one request per question, no retry (every answer passes)"
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["config"]["concurrency"] == concurrency and report["config"]["mode"] == "live endpoint"
    t = report["totals"]
    assert t["examples"] == 8 and t["exact_match"] == {"first": 1.0, "final": 1.0} and t["retried"] == 0
    assert all(row["latency_ms"] >= 750 for row in report["examples"])
    # 8 requests of 0.75 s in 8 / concurrency waves: the run cannot be shorter than that
    assert t["wall_s"] >= 0.75 * 8 / concurrency


@pytest.mark.slow
def test_eval_records_a_400_as_an_endpoint_error_and_goes_on(fake_vllm, tmp_path):
    """One prompt refused with vLLM's 400 (over max-model-len): as documented, that example is recorded as an
    endpoint error with the status and vLLM's message, it is not retried, the other examples are evaluated, the
    report is written and a gate on the final answers fails with its line (exit 1); no traceback."""
    url, srv = fake_vllm
    recs = eval_data(tmp_path / "eval.json", 4)
    srv.gold, srv.refuse = {r["question"]: r["sql"] for r in recs}, {recs[1]["question"]}
    r = run_eval(url, tmp_path / "eval.json", tmp_path / "out", "--concurrency", 2, "--min_exact_match", 1)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    failed = [line for line in r.stderr.splitlines() if line.startswith("threshold failed")]
    assert failed == ["threshold failed: --min_exact_match 1.0 (measured 0.75)"], r.stderr
    assert sorted(srv.asked) == sorted(srv.gold), "the refused prompt is not sent again"
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    rows = {row["id"]: row for row in report["examples"]}
    refused = rows[recs[1]["id"]]
    assert refused["categories_final"] == ["endpoint_error"] and not refused["retried"]
    (reason,) = refused["attempts"][0]["reasons"]
    assert reason.startswith("model endpoint call failed: BadRequestError: Error code: 400") and TOO_LONG in reason
    assert all(rows[x["id"]]["exact_match_final"] for x in recs if x is not recs[1])
    t = report["totals"]
    assert t["endpoint_error_rate"] == {"first": 0.25, "final": 0.25} and t["exact_match"]["final"] == 0.75
    gated = run_eval(url, tmp_path / "eval.json", tmp_path / "gated", "--max_endpoint_error_rate", 0)
    assert gated.returncode == 1 and "threshold failed: --max_endpoint_error_rate 0.0 (measured 0.25)" in gated.stderr


@pytest.mark.slow
def test_eval_with_every_request_failing_exits_2_even_without_a_gate(fake_vllm, tmp_path):
    """A run that measured nothing is not a pass: every prompt refused -> exit 2 naming the endpoint's error."""
    url, srv = fake_vllm
    recs = eval_data(tmp_path / "eval.json", 3)
    srv.gold, srv.refuse = {r["question"]: r["sql"] for r in recs}, {r["question"] for r in recs}
    r = run_eval(url, tmp_path / "eval.json", tmp_path / "out", "--max_unsafe_rate", 0)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "error: the endpoint failed on every example (model endpoint call failed: BadRequestError" in r.stderr
    assert (tmp_path / "out" / "report.json").is_file()
