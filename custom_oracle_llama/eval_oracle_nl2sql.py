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
import json
import math
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE / "inference")]

from artifacts import StageError, atomic_write_json, atomic_write_text, library_versions  # noqa: E402
import sql_guardrail  # noqa: E402
from guardrail.codes import CATEGORIES as GUARD_CATEGORIES, CATEGORY_LABELS as GUARD_LABELS, categories_of  # noqa
import candidates as cand  # noqa: E402

# The guardrail's report categories + the eval's own: a request the endpoint failed (timeout, 5xx).
CATEGORIES = (*GUARD_CATEGORIES, "endpoint_error")
CATEGORY_LABELS = {**GUARD_LABELS, "endpoint_error": "endpoint error"}
# --max_<name>_rate flag -> the category it gates (always the FINAL-answer rate).
MAX_GATES = {"parse_error": "parse_error", "hallucination": "hallucination", "unsafe": "unsafe",
             "security_violation": "security_filter", "explain_error": "explain_error"}
# --min_<name> flag -> the totals entry it gates.
MIN_GATES = {"exact_match": lambda t: t["exact_match"]["final"], "execution_match": lambda t: t["execution"]["rate"]}


# ------------------------------------------------------------------------------------------------- inputs
def load_eval_data(path, limit=None):
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise StageError(f"cannot read --eval_data {path}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StageError(f"--eval_data {path} is not valid JSON: {e}") from None
    if not isinstance(data, list) or not data:
        raise StageError(f"--eval_data {path} must be a non-empty JSON list of examples")
    seen = set()
    for i, ex in enumerate(data):
        where = f"--eval_data {path} item {i}"
        if not isinstance(ex, dict):
            raise StageError(f"{where} is not an object")
        for key, typ in (("id", (str, int)), ("question", str), ("sql", str), ("context", dict)):
            if not isinstance(ex.get(key), typ):
                raise StageError(f'{where}: "{key}" is missing or not a {getattr(typ, "__name__", "string")}')
        if ex["id"] in seen:
            raise StageError(f"{where}: duplicate id {ex['id']!r}")
        seen.add(ex["id"])
        filters = ex["context"].get("security_filters")
        if filters is not None and not (isinstance(filters, list) and all(
                isinstance(f, dict) and isinstance(f.get("table"), str) and isinstance(f.get("column"), str)
                for f in filters)):
            raise StageError(f"{where}: security_filters must be a list of {{table, column, predicate}} objects")
    return data[:limit] if limit else data


def load_predictions(path, examples):
    """{id: {"text"[, "retry_text"][, "candidates": [{"text", "logprob"}]]}} for every example."""
    preds = {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise StageError(f"cannot read --predictions {path}: {e.strerror or e}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise StageError(f"--predictions {path} line {n} is not JSON: {e}") from None
        ok = isinstance(item, dict) and "id" in item and all(
            isinstance(item.get(k), (str, type(None))) for k in ("text", "retry_text")) and all(
            isinstance(c, dict) and isinstance(c.get("text"), str) for c in item.get("candidates", []))
        if not ok:
            raise StageError(f'--predictions {path} line {n} must be {{"id", "text"[, "retry_text"]'
                             f'[, "candidates": [{{"text", "logprob"}}]]}}')
        preds[item["id"]] = item
    missing = [ex["id"] for ex in examples if ex["id"] not in preds]
    if missing:
        raise StageError(f"--predictions {path} has no answer for {len(missing)} example(s), e.g. {missing[:3]}")
    return preds


def parse_binds(items):
    """--bind org_ids=204,205 -> {"org_ids": [204, 205]} (numbers where they parse)."""
    out = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise StageError(f"--bind {item!r} must be NAME=VALUE[,VALUE...]")
        values = [int(v) if re.fullmatch(r"-?\d+", v) else v for v in value.split(",")]
        out[name.lower()] = values
    return out


def make_backend(args, catalog, examples):
    """{"name", "explain" (check_sql's explain argument), "execute" (sql -> result, or None), "mirror"}."""
    if args.oracle_dsn:
        import oracle_explain
        user = os.environ.get("ORACLE_USER")
        password = os.environ.get("ORACLE_PASSWORD")
        if not user or password is None:
            raise StageError("--oracle_dsn given but ORACLE_USER / ORACLE_PASSWORD are not set")
        oracle_explain.explain_connect_params(args.oracle_dsn, user, args.explain_timeout)
        binds = parse_binds(args.bind)

        def execute(sql):
            return oracle_explain.execute_oracle(sql, args.oracle_dsn, user, password, args.exec_timeout,
                                                 args.row_cap, binds)
        return {"name": f"Oracle {dsn_host(args.oracle_dsn)}", "mirror": None, "execute": execute,
                "explain": {"dsn": args.oracle_dsn, "user": user, "password": password,
                            "timeout_s": args.explain_timeout}}
    from duckdb_explain import DuckDBMirror
    data, binds, today = None, {}, args.today or dt.date.today()
    if args.schema:
        import duckdb_mirror_data
        schema = load_schema(args.schema)
        data = duckdb_mirror_data.synthetic_rows(schema, seed=args.seed, today=today,
                                                 sqls=[ex["sql"] for ex in examples])
        binds = {**duckdb_mirror_data.bind_values(schema, data), **parse_binds(args.bind)}
    mirror = DuckDBMirror(catalog, data, binds, today)
    rows = f", synthetic rows seed {args.seed}, today {today}" if data else ", empty tables"
    return {"name": f"DuckDB mirror (embedded default{rows})", "mirror": mirror, "explain": mirror.feedback,
            "execute": (lambda sql: mirror.execute(sql, args.row_cap, args.exec_timeout)) if data else None,
            "binds": binds}


def retrieve_contexts(examples, args):
    """--retrieve: each example's context from retrieve_context.py (what `ask` does for a bare question)."""
    import retrieve_context as rc
    index = rc.build_index(rc.load_schema(args.schema))
    tokenizer = rc.load_tokenizer(args.tokenizer) if args.tokenizer else None
    for ex in examples:
        try:
            ex["context"] = rc.retrieve(index, ex["question"], tokenizer, args.max_context_tokens)
        except StageError as e:  # e.g. "no relevant tables": the model is asked without context, and it shows
            ex["context"], ex["retrieval_error"] = {}, str(e)


def load_schema(path):
    try:
        schema = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StageError(f"cannot read --schema {path}: {e}") from None
    if not isinstance(schema, dict) or not isinstance(schema.get("tables"), dict):
        raise StageError(f"--schema {path} must be an object with \"tables\" (the shape of demo/ebs_schema.json)")
    return schema


def dsn_host(dsn):
    m = re.search(r"HOST\s*=\s*([^)\s]+)", dsn, re.I)
    if m:
        return m.group(1)
    return re.split(r"[:/]", dsn.split("@")[-1].lstrip("/"), maxsplit=1)[0] or dsn


def check_endpoint(client, model):
    """Fail fast with one line when the server is down or does not serve `model`."""
    try:
        served = [m.id for m in client.models.list().data]
    except Exception as e:
        raise StageError(f"model endpoint {client.base_url} is not reachable: {type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None
    if model not in served:
        raise StageError(f"model {model!r} is not served by {client.base_url} (served: {served})")


# ----------------------------------------------------------------------------------------------- evaluation
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
    base_url = args.base_url.rstrip("/") if args.base_url.rstrip("/").endswith("/v1") else args.base_url.rstrip(
        "/") + "/v1"  # vLLM serves the API under /v1; the server root is accepted too
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


def percentile(values, q):
    """Nearest-rank percentile (no interpolation: every figure is a latency that was actually observed)."""
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return None
    return vals[max(0, math.ceil(q / 100 * len(vals)) - 1)]


def summarize(rows, wall_s, backend):
    n = len(rows)

    def rate(pred, among=rows):
        return round(sum(1 for r in among if pred(r)) / len(among), 4) if among else None

    totals = {"examples": n}
    for cat in CATEGORIES:
        totals[f"{cat}_rate"] = {"first": rate(lambda r, c=cat: c in r["categories_first"]),
                                 "final": rate(lambda r, c=cat: c in r["categories_final"])}
    totals["ok_rate"] = {"first": rate(lambda r: r["ok_first"]), "final": rate(lambda r: r["ok_final"])}
    totals["exact_match"] = {"first": rate(lambda r: r["exact_match_first"]),
                             "final": rate(lambda r: r["exact_match_final"])}
    retried = [r for r in rows if r["retried"]]
    totals["retry_rate"] = rate(lambda r: r["retried"])
    totals["retry_success"] = rate(lambda r: r["ok_final"], retried)
    totals["retried"] = len(retried)
    attempts = [a for r in rows for a in r["attempts"]]
    totals["explain"] = {s: sum(1 for a in attempts if a["explain"]["status"] == s)
                         for s in ("clean", "error", "not_checkable", "not_run")}
    totals["explain"]["not_checkable_reasons"] = sorted({a["explain"]["detail"] for a in attempts
                                                         if a["explain"]["status"] == "not_checkable"})
    decided = [r for r in rows if r["exec_match"] is not None]
    decided_first = [r for r in rows if r["exec_match_first"] is not None]
    gold_ok = [r for r in rows if r.get("gold_status") == "ok"]
    totals["execution"] = {
        "backend": backend["name"] if backend["execute"] else None,
        "executed": sum(1 for r in gold_ok if r["pred_status"] == "ok"),
        "matched": sum(1 for r in decided if r["exec_match"]), "decided": len(decided),
        "rate": rate(lambda r: r["exec_match"], decided), "rate_first": rate(lambda r: r["exec_match_first"],
                                                                             decided_first),
        "gold_executed": len(gold_ok), "gold_nonempty": rate(lambda r: r["gold_rows"], gold_ok),
        "undecided_reasons": sorted({r["exec_reason"] for r in rows if r["exec_match"] is None})[:20]}
    sel = [r for r in rows if "selection" in r]
    if sel:
        decided_sel = [r for r in sel if r["exec_match_selected"] is not None]
        totals["candidates"] = {"rate_at_1": rate(lambda r: r["exec_match"], [r for r in sel if r in decided]),
                                "rate_selected": rate(lambda r: r["exec_match_selected"], decided_sel),
                                "latency_ms_p50": percentile([r["selection"]["latency_ms"] for r in sel], 50),
                                "latency_ms_p95": percentile([r["selection"]["latency_ms"] for r in sel], 95)}
    lat = [r["latency_ms"] for r in rows]
    totals["latency_ms"] = {"p50": percentile(lat, 50), "p95": percentile(lat, 95),
                            "first_attempt_p50": percentile([r["latency_first_ms"] for r in rows], 50),
                            "first_attempt_p95": percentile([r["latency_first_ms"] for r in rows], 95)}
    totals["wall_s"] = round(wall_s, 2)
    totals["examples_per_s"] = round(n / wall_s, 3) if wall_s > 0 else None
    return totals


def gate(totals, args):
    """[{flag, value, limit, passed}] for every threshold given."""
    out = []
    for flag, cat in MAX_GATES.items():
        limit = getattr(args, f"max_{flag}_rate")
        if limit is not None:
            value = totals[f"{cat}_rate"]["final"]
            out.append({"flag": f"--max_{flag}_rate", "value": value, "limit": limit, "passed": value <= limit})
    for flag, value_of in MIN_GATES.items():
        limit = getattr(args, f"min_{flag}")
        if limit is not None:
            value = value_of(totals)
            out.append({"flag": f"--min_{flag}", "value": value, "limit": limit,
                        "passed": value is not None and value >= limit})
    return out


# -------------------------------------------------------------------------------------------------- outputs
def pct(x):
    return "n/a" if x is None else f"{100 * x:.1f}%"


def ms(x):
    return "n/a" if x is None else f"{x:.0f}"


def yes_no(x):
    return "n/a" if x is None else ("yes" if x else "no")


def render_markdown(report):
    t, c, e = report["totals"], report["config"], report["totals"]["execution"]
    lines = [f"# Oracle EBS NL2SQL eval: {c['model']}", "",
             f"- eval data: `{c['eval_data']}` ({t['examples']} examples), mode: {c['mode']}",
             f"- backend (EXPLAIN, execution): {c['backend']}",
             f"- guardrail: {c['sqlglot']}, policy `{c['policy']}`, catalog `{c['catalog']}`",
             f"- prompt template sha256 {c['template_sha256'][:16]}..., concurrency {c['concurrency']}", "",
             "Rates are over examples. **first** = the model's first answer; **final** = the answer the user gets "
             "(the retry's when the first was rejected). Thresholds gate on final answers. Execution match is over "
             "the examples where it could be decided.", "",
             "| metric | first attempt | final |", "|---|---:|---:|"]
    for cat in CATEGORIES:
        r = t[f"{cat}_rate"]
        lines.append(f"| {CATEGORY_LABELS[cat]} rate | {pct(r['first'])} | {pct(r['final'])} |")
    lines += [f"| guardrail pass (ok) | {pct(t['ok_rate']['first'])} | {pct(t['ok_rate']['final'])} |",
              f"| exact match (normalized) | {pct(t['exact_match']['first'])} | {pct(t['exact_match']['final'])} |",
              f"| **execution match (EX)** | {pct(e['rate_first'])} | {pct(e['rate'])} |",
              "", "| metric | value |", "|---|---:|",
              f"| execution: matched / decided (examples) | {e['matched']} / {e['decided']} of {t['examples']} |",
              f"| gold queries returning rows | {pct(e['gold_nonempty'])} of {e['gold_executed']} executed |",
              f"| retry rate | {pct(t['retry_rate'])} ({t['retried']} of {t['examples']} examples) |",
              f"| retry success (final ok among retried) | {pct(t['retry_success'])} |",
              f"| EXPLAIN clean / error / not checkable / not run (attempts) | {t['explain']['clean']} / "
              f"{t['explain']['error']} / {t['explain']['not_checkable']} / {t['explain']['not_run']} |",
              f"| latency p50 / p95 per example (ms, both attempts) | {ms(t['latency_ms']['p50'])} / "
              f"{ms(t['latency_ms']['p95'])} |",
              f"| wall time / throughput | {t['wall_s']} s / {t['examples_per_s']} examples/s |"]
    if "candidates" in t:
        k = t["candidates"]
        lines += [f"| EX@1 (guarded greedy) vs EX with selection ({c['candidates']} candidates, temperature "
                  f"{c['temperature']}) | {pct(k['rate_at_1'])} vs {pct(k['rate_selected'])} |",
                  f"| extra latency of the candidates request p50 / p95 (ms) | {ms(k['latency_ms_p50'])} / "
                  f"{ms(k['latency_ms_p95'])} |"]
    lines.append("")
    if e["undecided_reasons"]:
        lines += ["Execution match undecided: " + "; ".join(e["undecided_reasons"]), ""]
    if t["explain"]["not_checkable_reasons"]:
        lines += ["Not checkable on the EXPLAIN backend: " + "; ".join(t["explain"]["not_checkable_reasons"]), ""]
    if report["gates"]:
        lines += ["## Thresholds", "", "| flag | value | limit | result |", "|---|---:|---:|---|"]
        lines += [f"| {g['flag']} | {pct(g['value'])} | {pct(g['limit'])} | {'pass' if g['passed'] else '**FAIL**'} |"
                  for g in report["gates"]]
        lines.append("")
    lines += ["## Per example", "", "| id | first | final | retried | exact (final) | EX (final) | latency ms | "
              "final reason |", "|---|---|---|---|---|---|---:|---|"]
    for r in report["examples"]:
        reason = "; ".join(r["attempts"][-1]["reasons"] or [r["exec_reason"]])[:160]
        reason = reason.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {r['id']} | {', '.join(r['categories_first']) or 'ok'} | "
                     f"{', '.join(r['categories_final']) or 'ok'} | {yes_no(r['retried'])} | "
                     f"{yes_no(r['exact_match_final'])} | {yes_no(r['exec_match'])} | {ms(r['latency_ms'])} | "
                     f"{reason} |")
    return "\n".join(lines) + "\n"


def write_chart(path, totals):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    e = totals["execution"]
    bars = [(CATEGORY_LABELS[c], totals[f"{c}_rate"]["first"], totals[f"{c}_rate"]["final"]) for c in CATEGORIES]
    bars += [("exact match", totals["exact_match"]["first"], totals["exact_match"]["final"]),
             ("execution match (EX)", e["rate_first"], e["rate"])]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    xs = range(len(bars))
    ax.bar([x - 0.2 for x in xs], [100 * (b[1] or 0) for b in bars], width=0.4, label="first attempt")
    ax.bar([x + 0.2 for x in xs], [100 * (b[2] or 0) for b in bars], width=0.4, label="final (after retry)")
    ax.axvline(len(CATEGORIES) - 0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(list(xs), [b[0] for b in bars], rotation=20, ha="right")
    ax.set_ylabel("% of examples")
    ax.set_ylim(0, 100)
    ax.set_title(f"Failure categories | exact and execution match ({totals['examples']} examples"
                 f"{'' if e['rate'] is not None else '; EX n/a: no execution backend'})")
    ax.legend()
    fig.tight_layout()
    import io
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------------ main
def build_parser():
    p = argparse.ArgumentParser(prog="eval_oracle_nl2sql.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--eval_data", required=True, help="conversations JSON from the dataset builder (e.g. "
                                                      "runs/data/ebs_holdout.json): list of {id, question, sql, context}")
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


def run_eval(args):
    validate_args(args)
    examples = load_eval_data(args.eval_data, args.limit)
    catalog = sql_guardrail.load_catalog(args.catalog)
    policy = sql_guardrail.load_policy(args.policy)
    if args.retrieve:
        retrieve_contexts(examples, args)
    preds = load_predictions(args.predictions, examples) if args.predictions else None
    if preds is not None and args.candidates > 1:
        short = [i for i, p in preds.items() if len(p.get("candidates", [])) < 1]
        if any(ex["id"] in short for ex in examples):
            raise StageError("--candidates with --predictions needs a \"candidates\" list on every answer")
    backend = make_backend(args, catalog, examples)
    run = make_runner(args, catalog, policy, backend, preds)
    from tqdm import tqdm
    rows, t0 = {}, time.perf_counter()
    pool = ThreadPoolExecutor(max_workers=args.concurrency)
    try:
        futures = {pool.submit(evaluate_example, ex, run, backend): ex["id"] for ex in examples}
        for fut in tqdm(as_completed(futures), total=len(futures), desc="eval", unit="ex", file=sys.stderr):
            rows[futures[fut]] = fut.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # a fatal error must not wait for the whole queue
    rows = [rows[ex["id"]] for ex in examples]
    totals = summarize(rows, time.perf_counter() - t0, backend)
    from prompting import template_sha256
    report = {
        "config": {"eval_data": str(args.eval_data), "catalog": str(args.catalog), "schema": args.schema,
                   "policy": policy["_path"], "mode": "predictions file" if preds is not None else "live endpoint",
                   "base_url": args.base_url, "model": args.model or f"predictions:{Path(args.predictions).name}",
                   "predictions": args.predictions, "retrieve": args.retrieve, "concurrency": args.concurrency, "limit": args.limit,
                   "max_tokens": args.max_tokens, "backend": backend["name"], "explain_backend": backend["name"],
                   "binds": backend.get("binds") or parse_binds(args.bind), "seed": args.seed,
                   "row_cap": args.row_cap, "exec_timeout_s": args.exec_timeout, "candidates": args.candidates,
                   "temperature": args.temperature if args.candidates > 1 else None,
                   "sqlglot": sql_guardrail.SQLGLOT_IMPL["name"] + " " + sql_guardrail.SQLGLOT_IMPL["version"],
                   "template_sha256": template_sha256(),
                   "versions": library_versions("sqlglot", "duckdb", "openai", "faker"),
                   "rate_definitions": "rate = examples with the category / examples; first = first attempt, "
                                       "final = answer returned to the user (retry's when retried); EXPLAIN runs "
                                       "only on attempts that passed layers 1-4; execution rate = matched / "
                                       "decided; thresholds gate on final"},
        "totals": totals, "gates": gate(totals, args), "examples": rows,
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", render_markdown(report))
    write_chart(out / "failure_categories.png", totals)
    return report, out


def print_summary(report, out):
    t, e = report["totals"], report["totals"]["execution"]
    print(f"\nbackend: {report['config']['backend']}   examples: {t['examples']}")
    print(f"{'metric':<34}{'first':>10}{'final':>10}")
    for cat in CATEGORIES:
        r = t[f"{cat}_rate"]
        print(f"{CATEGORY_LABELS[cat] + ' rate':<34}{pct(r['first']):>10}{pct(r['final']):>10}")
    print(f"{'guardrail pass':<34}{pct(t['ok_rate']['first']):>10}{pct(t['ok_rate']['final']):>10}")
    print(f"{'exact match':<34}{pct(t['exact_match']['first']):>10}{pct(t['exact_match']['final']):>10}")
    print(f"{'execution match (EX)':<34}{pct(e['rate_first']):>10}{pct(e['rate']):>10}   "
          f"({e['matched']}/{e['decided']} decided; gold non-empty {pct(e['gold_nonempty'])})")
    if "candidates" in t:
        k = t["candidates"]
        print(f"EX@1 {pct(k['rate_at_1'])} -> with selection {pct(k['rate_selected'])}; extra latency p50 "
              f"{ms(k['latency_ms_p50'])} ms")
    print(f"retry rate {pct(t['retry_rate'])}, retry success {pct(t['retry_success'])}; EXPLAIN not checkable "
          f"{t['explain']['not_checkable']}; latency p50/p95 {ms(t['latency_ms']['p50'])}/{ms(t['latency_ms']['p95'])} ms")
    print(f"reports: {out / 'report.json'}  {out / 'report.md'}  {out / 'failure_categories.png'}")


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
    failed = [g for g in report["gates"] if not g["passed"]]
    for g in failed:
        print(f"threshold failed: {g['flag']} {g['limit']} (measured {g['value']})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
