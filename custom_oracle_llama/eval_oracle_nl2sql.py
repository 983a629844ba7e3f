#!/usr/bin/env python
"""Evaluate the Oracle EBS NL2SQL model through the guarded path, on a held-out conversations set.

Each example's question + context goes to an OpenAI-compatible endpoint (vLLM) through sql_guardrail.ask (the
training prompt, the guardrail, its one retry), --concurrency requests in flight; or, with --predictions,
precomputed answers are checked (no server). Reported per example and in total: SQL-only contract, parse error,
unsafe, hallucination, security-filter and EXPLAIN error rates (first attempt and final answer), retry rate and
success, exact match after normalization, execution match (EX), latency p50/p95. Thresholds gate on FINAL answers.

Backend (EXPLAIN and execution): a staging Oracle with --oracle_dsn (EXPLAIN PLAN; queries executed read-only with
a fetch cap and a call timeout; credentials from ORACLE_USER / ORACLE_PASSWORD); otherwise the embedded DuckDB
mirror of the catalog (inference/duckdb_explain.py), filled with deterministic synthetic rows generated from
--schema (inference/duckdb_mirror_data.py; literals of the gold queries seed the values). Oracle constructs the
mirror cannot express are "not checkable", never errors.

Execution match: gold and answer are executed (--row_cap, --exec_timeout) and compared as multisets of rows
(ordered only when the gold orders and the question asks for an order), column names ignored, column order
respected, numbers within 10 significant digits. exec_match is true/false, or null when undecidable (the gold does
not execute, or the answer uses what the backend cannot run). A rejected or missing answer is not a match.
--candidates N samples N answers (--temperature), drops guardrail rejects, executes the rest and keeps the majority
result (ties: highest log-probability); the report gives EX@1 (the guarded greedy answer) beside EX with selection.

Outputs (atomic, in --out_dir): report.json, report.md, failure_categories.png.
Exit codes: 0 all thresholds pass, 1 a threshold failed (each printed), 2 bad input / unreachable server.
"""
import argparse
import datetime as dt
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE / "inference")]

from artifacts import StageError, atomic_write_json, atomic_write_text, library_versions  # noqa: E402
import sql_guardrail  # noqa: E402
from guardrail.codes import categories_of  # noqa: E402
import candidates as cand  # noqa: E402
from eval_inputs import (load_eval_data, load_predictions, make_backend, parse_binds,  # noqa: E402
                         retrieve_contexts)
from eval_report import (CATEGORY_LABELS, MAX_GATES, MIN_GATES, gate, print_summary,  # noqa: E402
                         render_markdown, summarize, write_chart)


# ----------------------------------------------------------------------------------------------- arguments
def build_parser():
    p = argparse.ArgumentParser(prog="eval_oracle_nl2sql.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--eval_data", required=True,
                   help="conversations JSON from the dataset builder (e.g. runs/data/ebs_holdout.json): list of "
                        "{id, question, sql, context}")
    p.add_argument("--catalog", required=True, help="schema catalog JSON {TABLE: {COLUMN: TYPE}} (or ALL_TAB_COLUMNS "
                                                    "CSV) for the hallucination check and the DuckDB mirror")
    p.add_argument("--schema", help="schema file (demo/ebs_schema.json shape): the DuckDB mirror is filled with "
                                    "synthetic rows generated from it, which enables execution match")
    p.add_argument("--retrieve", action="store_true", help="question-only path: replace each example's context with "
                                                         "the one retrieve_context.py builds from --schema")
    p.add_argument("--tokenizer", help="tokenizer directory for --retrieve's token budget (default: a word count)")
    p.add_argument("--max_context_tokens", type=int, default=2048, help="--retrieve's prompt budget (default 2048)")
    p.add_argument("--base_url", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 (/v1 is added "
                                      "when missing; not with --predictions)")
    p.add_argument("--model", help="served model name (required with --base_url)")
    p.add_argument("--api_key_env", help="environment variable holding the endpoint's API key (never on the "
                                         "command line)")
    p.add_argument("--predictions", help='JSONL of precomputed answers {"id", "text"[, "retry_text"][, "candidates"'
                                         ': [{"text", "logprob"}]]} to check instead of querying a server')
    p.add_argument("--policy", help="guardrail policy YAML (default: inference/guardrail_policy.yaml)")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight (default 4 = vLLM max-num-seqs)")
    p.add_argument("--max_tokens", type=int, default=512, help="generation limit per attempt (default 512)")
    p.add_argument("--timeout", type=float, default=300.0, help="HTTP timeout per request in seconds (default 300)")
    p.add_argument("--candidates", type=int, default=1, metavar="N",
                   help="also sample N answers per question and keep the majority execution result (default 1: off)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature for --candidates (0.7)")
    p.add_argument("--oracle_dsn", help="staging Oracle DSN for EXPLAIN PLAN and execution (user/password from "
                                        "ORACLE_USER / ORACLE_PASSWORD); default: the embedded DuckDB mirror")
    p.add_argument("--explain_timeout", type=float, default=10.0, help="Oracle connect/EXPLAIN timeout (s)")
    p.add_argument("--bind", action="append", metavar="NAME=V1[,V2]",
                   help="bind values for execution, e.g. org_ids=204,205 (required on Oracle for MOAC binds; the "
                        "mirror binds :org_ids to all but one of its synthetic operating units)")
    p.add_argument("--exec_timeout", type=float, default=10.0, help="time limit per executed query (s, default 10)")
    p.add_argument("--row_cap", type=int, default=10000, help="more rows than this = not matched (default 10000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the mirror's synthetic rows (default 0)")
    p.add_argument("--today", type=dt.date.fromisoformat, help="the mirror's SYSDATE and data horizon, YYYY-MM-DD "
                                                               "(default: today; fix it for reproducible reports)")
    p.add_argument("--out_dir", default="runs/eval", help="where report.json, report.md and failure_categories.png "
                                                          "go (default runs/eval)")
    p.add_argument("--limit", type=int, help="evaluate only the first N examples")
    for flag, cat in MAX_GATES.items():
        p.add_argument(f"--max_{flag}_rate", type=float, metavar="X",
                       help=f"fail (exit 1) when the final-answer {CATEGORY_LABELS[cat]} rate exceeds X (0..1)")
    p.add_argument("--min_exact_match", type=float, metavar="X",
                   help="fail (exit 1) when the final-answer exact-match rate is below X (0..1)")
    p.add_argument("--min_execution_match", type=float, metavar="X",
                   help="fail (exit 1) when the final-answer execution-match rate is below X (0..1)")
    return p


def validate_args(args):
    if bool(args.predictions) == bool(args.base_url):
        raise StageError("give exactly one of --base_url (query a server) or --predictions (precomputed answers)")
    if args.base_url and not args.model:
        raise StageError("--base_url needs --model (the served model name)")
    if min(args.concurrency, args.max_tokens, args.candidates, args.row_cap, args.limit or 1) < 1:
        raise StageError("--concurrency, --limit, --max_tokens, --candidates and --row_cap must be >= 1")
    if args.exec_timeout <= 0 or args.temperature < 0:
        raise StageError("--exec_timeout must be > 0 and --temperature >= 0")
    if args.candidates > 1 and args.temperature == 0:
        raise StageError("--candidates N > 1 samples N answers: give --temperature > 0 (greedy decoding gives N "
                         "copies of one answer; vLLM refuses n > 1 with temperature 0)")
    for flag in [f"max_{f}_rate" for f in MAX_GATES] + [f"min_{f}" for f in MIN_GATES]:
        v = getattr(args, flag)
        if v is not None and not 0 <= v <= 1:
            raise StageError(f"--{flag} must be between 0 and 1 (got {v})")
    if args.retrieve and not args.schema:
        raise StageError("--retrieve needs --schema (the schema file the contexts are retrieved from)")
    executes = bool(args.schema or args.oracle_dsn)
    if not executes and (args.candidates > 1 or args.min_execution_match is not None):
        raise StageError("--candidates and --min_execution_match execute queries: give --schema (DuckDB mirror with "
                         "synthetic rows) or --oracle_dsn")


# ---------------------------------------------------------------------------------------------- evaluation
def check_endpoint(client, model):
    """Fail fast with one line when the server is down or does not serve `model`."""
    try:
        served = [m.id for m in client.models.list().data]
    except Exception as e:
        raise StageError(f"model endpoint {client.base_url} is not reachable: {type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None
    if model not in served:
        raise StageError(f"model {model!r} is not served by {client.base_url} (served: {served})")


def make_runner(args, catalog, policy, backend, preds):
    """example -> {"attempts": [{raw_output, finish_reason, latency_ms, verdict}], "candidates": ... | None}."""
    explain = backend["explain"]

    def check(text, ex):
        return sql_guardrail.check_sql(text, catalog=catalog, policy=policy, explain=explain,
                                       security_filters=ex["context"].get("security_filters") or [])

    def select(ex, cands, latency):
        for c in cands:
            c["verdict"] = c.get("verdict") or check(c["text"], ex)
        return {"selection": cand.select_candidate(cands, backend["execute"]), "latency_ms": latency,
                "candidates": [{"text": c["text"], "logprob": c.get("logprob"), "ok": c["verdict"]["ok"],
                                "status": c.get("execution", {}).get("status")} for c in cands]}

    if preds is not None:
        def run(ex):
            item, attempts = preds[ex["id"]], []
            for text in (item.get("text"), item.get("retry_text")):
                v = check(text, ex)
                attempts.append({"raw_output": text, "finish_reason": None, "latency_ms": None, "verdict": v})
                if v["ok"] or "retry_text" not in item:
                    break
            many = select(ex, [dict(c) for c in item["candidates"]], None) if args.candidates > 1 else None
            return {"attempts": attempts, "candidates": many}
        return run
    import openai
    api_key = os.environ.get(args.api_key_env) if args.api_key_env else None
    if args.api_key_env and api_key is None:
        raise StageError(f"--api_key_env {args.api_key_env} is not set in the environment")
    base_url = sql_guardrail.openai_base_url(args.base_url)  # vLLM serves under /v1; the server root is accepted
    client = openai.OpenAI(base_url=base_url, api_key=api_key or "EMPTY", timeout=args.timeout, max_retries=0)
    check_endpoint(client, args.model)

    def run(ex):
        result = sql_guardrail.ask(base_url, args.model, ex["question"], ex["context"], catalog, policy,
                                   max_tokens=args.max_tokens, timeout=args.timeout, explain=explain, client=client)
        many = None
        if args.candidates > 1:
            from prompting import chat_messages
            t0 = time.perf_counter()
            cands = cand.sample_candidates(client, args.model, chat_messages(ex["question"], ex["context"]),
                                           args.candidates, args.temperature, args.max_tokens)
            many = select(ex, cands, round((time.perf_counter() - t0) * 1000, 1))
        return {"attempts": result["attempts"], "candidates": many}
    return run


def explain_status(verdict, mirror):
    """clean | error | not_checkable | not_run for one attempt (EXPLAIN ran inside check_sql when listed in checks)."""
    if "explain" not in (verdict.get("checks") or []):
        return {"status": "not_run", "detail": "layers 1-4 rejected the answer" if verdict.get("candidate_sql")
                else "no SQL"}
    if mirror is not None:  # cached: the same result check_sql saw
        r = mirror.explain(verdict["candidate_sql"])
        return {k: r[k] for k in ("status", "detail", "duckdb_sql", "fixups")}
    failed = "explain_error" in (verdict.get("codes") or [])
    return {"status": "error" if failed else "clean",
            "detail": "; ".join(x for x in verdict["reasons"] if "Oracle" in x) if failed else ""}


def evaluate_example(ex, run, backend):
    """One example through the guarded path -> its per-example row."""
    t0 = time.perf_counter()
    try:
        result = run(ex)
    except sql_guardrail.EndpointError as e:  # one request failed (timeout, 5xx): recorded, the run goes on
        result = {"attempts": [{"raw_output": None, "finish_reason": None, "latency_ms": None, "verdict": {
            "ok": False, "sql": None, "candidate_sql": None, "codes": [], "reasons": [str(e)], "checks": []}}],
            "candidates": None, "endpoint_error": True}
    attempts = []
    for a in result["attempts"]:
        v = a["verdict"]
        cats = ["endpoint_error"] if result.get("endpoint_error") else categories_of(v.get("codes") or [])
        attempts.append({"raw_output": a.get("raw_output"), "finish_reason": a.get("finish_reason"),
                         "latency_ms": a.get("latency_ms"), "ok": v["ok"], "sql": v.get("candidate_sql"),
                         "codes": v.get("codes", []), "reasons": v.get("reasons", []),
                         "unknown_tables": v.get("unknown_tables", []),
                         "unknown_columns": v.get("unknown_columns", []),
                         "explain": explain_status(v, backend["mirror"]), "categories": cats})
    first, final = attempts[0], attempts[-1]
    gold = sql_guardrail.normalized_sql(ex["sql"])
    lat = [a["latency_ms"] for a in attempts if a.get("latency_ms") is not None]
    row = {"id": ex["id"], "question": ex["question"], "gold_sql": ex["sql"], "tags": ex.get("tags", []),
           "retrieval_error": ex.get("retrieval_error"),
           "retried": len(attempts) > 1, "ok_first": first["ok"], "ok_final": final["ok"],
           "exact_match_first": first["sql"] is not None and sql_guardrail.normalized_sql(first["sql"]) == gold,
           "exact_match_final": final["sql"] is not None and sql_guardrail.normalized_sql(final["sql"]) == gold,
           "categories_first": first["categories"], "categories_final": final["categories"],
           "latency_ms": round(sum(lat), 1) if lat else None, "latency_first_ms": first.get("latency_ms"),
           "exec_match": None, "exec_reason": "no execution backend (give --schema or --oracle_dsn)",
           "exec_match_first": None, "gold_rows": None, "attempts": attempts}
    if backend["execute"] is not None:
        execute = backend["execute"]
        gold_result = execute(ex["sql"])
        ordered = cand.ordered_comparison(ex["question"], ex["sql"])
        results = {}

        def match(sql):
            if sql not in results:
                pred = execute(sql) if sql else None
                results[sql] = (*cand.compare_results(gold_result, pred, ordered), pred and pred["status"])
            return results[sql][:2]

        row["exec_match_first"], row["exec_reason_first"] = match(first["sql"] if first["ok"] else None)
        row["exec_match"], row["exec_reason"] = match(final["sql"] if final["ok"] else None)
        row.update(exec_ordered=ordered, gold_status=gold_result["status"], pred_status=results[
                   final["sql"] if final["ok"] else None][2],
                   gold_rows=len(gold_result["rows"]) if gold_result["status"] == "ok" else None)
        many = result.get("candidates")
        if many is not None:
            sel = many["selection"]
            row["exec_match_selected"], row["exec_reason_selected"] = match(sel["sql"])
            row["selection"] = {**sel, "latency_ms": many["latency_ms"], "candidates": many["candidates"]}
    row["wall_ms"] = round((time.perf_counter() - t0) * 1000, 1)
    return row


def evaluate_all(examples, run, backend, concurrency):
    """-> (rows in example order, wall seconds), `concurrency` examples in flight, a progress bar on stderr."""
    from tqdm import tqdm
    rows, t0 = {}, time.perf_counter()
    pool = ThreadPoolExecutor(max_workers=concurrency)
    try:
        futures = {pool.submit(evaluate_example, ex, run, backend): ex["id"] for ex in examples}
        for fut in tqdm(as_completed(futures), total=len(futures), desc="eval", unit="ex", file=sys.stderr):
            rows[futures[fut]] = fut.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # a fatal error must not wait for the whole queue
    return [rows[ex["id"]] for ex in examples], time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------------ main
def run_eval(args):
    """Read the inputs, evaluate every example, summarize, gate, write the reports -> (report, out_dir)."""
    validate_args(args)
    examples = load_eval_data(args.eval_data, args.limit)
    catalog = sql_guardrail.load_catalog(args.catalog)
    policy = sql_guardrail.load_policy(args.policy)
    if args.retrieve:
        retrieve_contexts(examples, args)
    preds = load_predictions(args.predictions, examples, args.candidates > 1) if args.predictions else None
    backend = make_backend(args, catalog, examples)
    run = make_runner(args, catalog, policy, backend, preds)
    rows, wall_s = evaluate_all(examples, run, backend, args.concurrency)
    totals = summarize(rows, wall_s, backend)
    report = {"config": report_config(args, policy, backend, preds), "totals": totals, "gates": gate(totals, args),
              "examples": rows}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", render_markdown(report))
    write_chart(out / "failure_categories.png", totals)
    return report, out


def report_config(args, policy, backend, preds):
    """report.json's "config": what was evaluated, on which backend, with which settings and library versions."""
    from prompting import template_sha256
    return {"eval_data": str(args.eval_data), "catalog": str(args.catalog), "schema": args.schema,
            "policy": policy["_path"], "mode": "predictions file" if preds is not None else "live endpoint",
            "base_url": args.base_url, "model": args.model or f"predictions:{Path(args.predictions).name}",
            "predictions": args.predictions, "retrieve": args.retrieve, "concurrency": args.concurrency,
            "limit": args.limit, "max_tokens": args.max_tokens, "backend": backend["name"],
            "explain_backend": backend["name"], "binds": backend.get("binds") or parse_binds(args.bind),
            "seed": args.seed, "row_cap": args.row_cap, "exec_timeout_s": args.exec_timeout,
            "candidates": args.candidates, "temperature": args.temperature if args.candidates > 1 else None,
            "sqlglot": sql_guardrail.SQLGLOT_IMPL["name"] + " " + sql_guardrail.SQLGLOT_IMPL["version"],
            "template_sha256": template_sha256(), "versions": library_versions("sqlglot", "duckdb", "openai", "faker"),
            "rate_definitions": "rate = examples with the category / examples; first = first attempt, final = answer "
                                "returned to the user (retry's when retried); EXPLAIN runs only on attempts that "
                                "passed layers 1-4; execution rate = matched / decided; thresholds gate on final"}


def main(argv=None):
    import stage_env  # offline flags and caches as `make` sets them, without overriding the user's
    stage_env.apply()
    args = build_parser().parse_args(argv)
    try:
        report, out = run_eval(args)
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_summary(report, out)
    if report["totals"]["endpoint_error_rate"]["final"] == 1:  # nothing was measured: not a pass of any gate
        first = report["examples"][0]["attempts"][-1]["reasons"][0]
        print(f"error: the endpoint failed on every example ({first}); reports in {out}", file=sys.stderr)
        return 2
    failed = [g for g in report["gates"] if not g["passed"]]
    for g in failed:
        print(f"threshold failed: {g['flag']} {g['limit']} (measured {g['value']})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
