#!/usr/bin/env python
"""Evaluate the Oracle EBS NL2SQL model through the guarded path, on a held-out conversations set.

Each example's question + context is sent to an OpenAI-compatible endpoint (vLLM) with the training prompt
(prompting.chat_messages, via sql_guardrail.ask), with up to --concurrency requests in flight; every answer goes
through the guardrail with its one retry. Or, with --predictions, precomputed answers are checked (no server).

Per example and in total it reports: SQL-only contract violations, parse errors, unsafe statements, hallucinations
(unknown table/column), security-filter violations, EXPLAIN errors (+ not checkable), retry rate and success,
exact match after normalization, execution match, latency p50/p95. Rates are over examples; "first" is the first
attempt, "final" the answer the user gets (the retry's when there was one). Thresholds gate on FINAL answers.

EXPLAIN (layer 5): on a staging Oracle when --oracle_dsn is given; otherwise on the embedded default, a DuckDB
in-memory mirror of the catalog (empty tables, DATE columns as DATE) fed by sqlglot oracle->duckdb transpilation
(ErrorLevel.RAISE) with fix-ups for the usual EBS idioms. Oracle constructs DuckDB cannot express (CONNECT BY,
package functions, ...) and DuckDB/Oracle type-system differences are "not checkable", never errors.

Outputs (each written atomically into --out_dir): report.json, report.md, failure_categories.png.
Exit codes: 0 all thresholds pass, 1 a threshold failed (each failure printed), 2 bad input / unreachable server.
"""
import argparse
import json
import math
import os
import re
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE / "inference")]

from artifacts import StageError, atomic_write_json, atomic_write_text, library_versions  # noqa: E402
import sql_guardrail  # noqa: E402

import sqlglot  # noqa: E402  (after sql_guardrail: it decides pure vs compiled sqlglot)
from sqlglot import exp  # noqa: E402
from sqlglot.errors import ErrorLevel  # noqa: E402

CATEGORIES = ["contract", "parse_error", "unsafe", "hallucination", "security_filter", "explain_error",
              "endpoint_error"]
CATEGORY_LABELS = {"contract": "SQL-only contract", "parse_error": "parse error", "unsafe": "unsafe statement",
                   "hallucination": "hallucination (table/column)", "security_filter": "security filter",
                   "explain_error": "EXPLAIN error", "endpoint_error": "endpoint error"}
# --max_<name>_rate flag -> the metric it gates (always the FINAL-answer rate).
MAX_GATES = {"parse_error": "parse_error", "hallucination": "hallucination", "unsafe": "unsafe",
             "security_violation": "security_filter", "explain_error": "explain_error"}


# ------------------------------------------------------------------------------------ exact-match normalization
def normalized_sql(sql):
    """Canonical text for exact match (the guardrail's when it has one; else parse -> regenerate, upper-cased names)."""
    if sql is None:
        return None
    if hasattr(sql_guardrail, "normalized_sql"):
        return sql_guardrail.normalized_sql(sql)
    try:
        tree = sqlglot.parse_one(sql, read="oracle", error_level=ErrorLevel.RAISE)
        from sqlglot.optimizer.normalize_identifiers import normalize_identifiers
        return normalize_identifiers(tree, dialect="oracle").sql(dialect="oracle", comments=False)
    except Exception:  # unparseable text can still match byte-for-byte after whitespace folding
        return " ".join(sql.split())


# ------------------------------------------------------------------------------ EXPLAIN: DuckDB catalog mirror
class NotCheckable(Exception):
    """The query uses Oracle features the DuckDB mirror cannot express: no verdict, never an error."""


def duckdb_type(oracle_type) -> str:
    """Oracle column type -> DuckDB type. DATE stays DATE so Oracle date arithmetic (d - d, d + n) binds alike."""
    t = (oracle_type or "").upper().strip()
    if t.startswith(("NUMBER", "FLOAT", "BINARY_DOUBLE", "BINARY_FLOAT")):
        m = re.match(r"NUMBER\((\d+)(?:,\s*(-?\d+))?\)", t)
        if m and (m.group(2) in (None, "0")) and int(m.group(1)) <= 18:
            return "BIGINT"
        return "DOUBLE"
    if t.startswith(("INTEGER", "INT", "SMALLINT", "PLS_INTEGER")):
        return "BIGINT"
    if t == "DATE":
        return "DATE"
    if t.startswith("TIMESTAMP"):
        return "TIMESTAMP"
    if t in ("BLOB", "RAW", "LONG RAW") or t.startswith("RAW"):
        return "BLOB"
    return "VARCHAR"  # VARCHAR2, NVARCHAR2, CHAR, CLOB, LONG, ROWID, unknown


# Oracle TRUNC/ROUND date format -> DuckDB date_trunc part.
_TRUNC_UNITS = {"YYYY": "year", "YEAR": "year", "YYY": "year", "YY": "year", "Y": "year", "SYYYY": "year",
                "SYEAR": "year", "IYYY": "year", "Q": "quarter", "MM": "month", "MON": "month", "MONTH": "month",
                "RM": "month", "WW": "week", "IW": "week", "W": "week", "D": "week", "DY": "week", "DAY": "week",
                "DD": "day", "DDD": "day", "J": "day", "HH": "hour", "HH12": "hour", "HH24": "hour", "MI": "minute"}
_PSEUDO_NOT_CHECKABLE = {"LEVEL", "CONNECT_BY_ISLEAF", "CONNECT_BY_ISCYCLE", "ORA_ROWSCN", "ROWID"}


def _as_date(node):
    return exp.Cast(this=node, to=exp.DataType.build("DATE"))


class DuckDBMirror:
    """Empty DuckDB tables shaped like the catalog; explain(oracle_sql) -> {status, detail, duckdb_sql, fixups}."""

    def __init__(self, catalog):
        import duckdb
        self.catalog = catalog
        self._lock = threading.Lock()  # one connection; EXPLAIN takes ~1 ms, a lock is simpler than cursors
        self.con = duckdb.connect(":memory:")
        for table, cols in catalog.items():
            cols_sql = ", ".join(f'"{c}" {duckdb_type(t)}' for c, t in cols.items())
            self.con.execute(f'CREATE TABLE "{table}" ({cols_sql})')
        if "DUAL" not in catalog:  # Oracle's one-row table exists everywhere; catalogs exported from EBS omit it
            self.con.execute('CREATE TABLE "DUAL" ("DUMMY" VARCHAR)')
        # The mirror must never read files or the network, whatever the query names (read_csv, ATTACH, ...).
        self.con.execute("SET enable_external_access = false")
        self.con.execute("SET lock_configuration = true")
        self._cache = {}

    # -- Oracle AST -> DuckDB-bindable AST
    def _column_type(self, col, aliases):
        """Oracle type of a column reference, from the catalog through the query's table aliases (None if unknown)."""
        name = col.name.upper()
        if col.table:
            table = aliases.get(col.table.upper())
            return (self.catalog.get(table) or {}).get(name) if table else None
        types = {self.catalog[t][name] for t in set(aliases.values()) if name in self.catalog.get(t, {})}
        return types.pop() if len(types) == 1 else None

    def to_duckdb(self, sql):
        """(duckdb_sql, fixups). Raises NotCheckable for constructs DuckDB cannot express."""
        try:
            tree = sqlglot.parse_one(sql, read="oracle", error_level=ErrorLevel.RAISE)
        except Exception as e:  # the guardrail parsed it; failing here is a sqlglot limitation, not the model's
            raise NotCheckable(f"sqlglot cannot re-parse it: {sql_guardrail._first_line(e)}") from None
        if not isinstance(tree, exp.Query):
            raise NotCheckable(f"{tree.key.upper()} is not a query")
        fixups = []
        if tree.find(exp.Connect):
            raise NotCheckable("CONNECT BY hierarchical query")
        for dot in tree.find_all(exp.Dot):
            if isinstance(dot.expression, (exp.Anonymous, exp.Func)):
                raise NotCheckable(f"package function {dot.sql(dialect='oracle')[:60]}")
        for col in tree.find_all(exp.Column):
            if not col.table and col.name.upper() in _PSEUDO_NOT_CHECKABLE:
                raise NotCheckable(f"pseudo-column {col.name.upper()}")
        aliases = {}
        for t in tree.find_all(exp.Table):
            aliases[(t.alias or t.name).upper()] = t.name.upper()
            aliases.setdefault(t.name.upper(), t.name.upper())

        if any(c.args.get("join_mark") for c in tree.find_all(exp.Column)):
            from sqlglot.transforms import eliminate_join_marks
            try:
                tree = eliminate_join_marks(tree)
            except Exception as e:
                raise NotCheckable(f"(+) outer join sqlglot cannot rewrite: {e}") from None
            fixups.append("(+) outer joins -> LEFT JOIN")

        def fix(node):
            if isinstance(node, exp.Placeholder):
                fixups.append(f"bind :{node.name} -> NULL")
                return exp.Null()
            if isinstance(node, exp.CurrentTimestamp) and node.args.get("sysdate"):
                fixups.append("SYSDATE -> CURRENT_DATE")
                return exp.CurrentDate()
            if isinstance(node, exp.Column) and not node.table and node.name.upper() == "ROWNUM":
                fixups.append("ROWNUM -> 1 (numeric pseudo-column)")
                return exp.Literal.number(1)
            if isinstance(node, (exp.DateTrunc, exp.TimestampTrunc)):
                unit = node.args.get("unit")
                key = (unit.name if unit is not None else "DD").upper()
                if key not in _TRUNC_UNITS:
                    raise NotCheckable(f"TRUNC format {key!r}")
                fixups.append(f"TRUNC(date, '{key}') -> CAST(date_trunc('{_TRUNC_UNITS[key]}') AS DATE)")
                return _as_date(exp.DateTrunc(this=node.this, unit=exp.Literal.string(_TRUNC_UNITS[key])))
            if isinstance(node, exp.Anonymous) and str(node.this).upper() == "TRUNC" and len(node.expressions) == 1:
                arg = node.expressions[0]
                ty = self._column_type(arg, aliases) if isinstance(arg, exp.Column) else None
                if (ty or "").upper().startswith(("DATE", "TIMESTAMP")):
                    fixups.append("TRUNC(date) -> CAST(date_trunc('day') AS DATE)")
                    return _as_date(exp.DateTrunc(this=arg, unit=exp.Literal.string("day")))
                return node
            if isinstance(node, exp.AddMonths):
                fixups.append("ADD_MONTHS -> CAST(date + INTERVAL n MONTH AS DATE)")
                months = exp.Interval(this=exp.Paren(this=node.expression), unit=exp.var("MONTH"))
                return _as_date(exp.Add(this=node.this, expression=months))
            if isinstance(node, exp.ToNumber):
                fixups.append("TO_NUMBER(x[, fmt]) -> CAST(x AS DOUBLE)")
                return exp.Cast(this=node.this, to=exp.DataType.build("DOUBLE"))
            if isinstance(node, exp.ToChar):
                # Oracle number/date format models do not map onto strftime; TO_CHAR is VARCHAR either way.
                fixups.append("TO_CHAR(x, fmt) -> CAST(x AS VARCHAR)")
                return exp.Cast(this=node.this, to=exp.DataType.build("VARCHAR"))
            return node

        # Children first (reversed pre-order), so a rewritten parent wraps already rewritten arguments.
        for node in reversed(list(tree.walk())):
            new = fix(node)
            if new is not node:
                node.replace(new)
        try:
            out = tree.sql(dialect="duckdb", unsupported_level=ErrorLevel.RAISE)
        except Exception as e:
            raise NotCheckable(f"sqlglot cannot write it for DuckDB: {sql_guardrail._first_line(e)}") from None
        return out, sorted(set(fixups))

    # -- DuckDB error -> verdict
    @staticmethod
    def classify(error):
        """'error' when the message proves the query is wrong on the catalog, else 'not_checkable'."""
        text = str(error)
        kind = type(error).__name__
        if kind == "CatalogException":
            return "not_checkable" if re.search(r"(Scalar|Aggregate|Table) Function with name", text) else "error"
        if kind == "BinderException":
            # Overload/cast failures come from DuckDB's stricter typing (Oracle converts implicitly): no verdict.
            if re.search(r"No function matches|Cannot compare|Cannot mix|explicit cast|could not be implicitly",
                         text, re.I):
                return "not_checkable"
            return "error"
        return "not_checkable"  # Parser/Conversion/NotImplemented: transpilation or type-system artefacts

    def explain(self, sql):
        """{status: clean|error|not_checkable, detail, duckdb_sql, fixups}; cached per SQL text."""
        if sql in self._cache:
            return self._cache[sql]
        result = {"status": "clean", "detail": "", "duckdb_sql": None, "fixups": []}
        try:
            result["duckdb_sql"], result["fixups"] = self.to_duckdb(sql)
            with self._lock:
                self.con.execute("EXPLAIN " + result["duckdb_sql"]).fetchall()
        except NotCheckable as e:
            result.update(status="not_checkable", detail=str(e))
        except Exception as e:
            detail = sql_guardrail._first_line(e)
            result.update(status=self.classify(e), detail=detail)
        self._cache[sql] = result
        return result

    def feedback(self, sql):
        """check_sql's explain callable contract: [] when accepted (or not checkable), else feedback lines."""
        r = self.explain(sql)
        return [f"EXPLAIN on the catalog mirror failed: {r['detail']}"] if r["status"] == "error" else []


class OracleExplainer:
    """EXPLAIN PLAN on a staging Oracle through sql_guardrail.explain_oracle (same result shape as the mirror)."""

    def __init__(self, dsn, user, password, timeout_s):
        self.config = {"dsn": dsn, "user": user, "password": password, "timeout_s": timeout_s}
        sql_guardrail.explain_connect_params(dsn, user, timeout_s)

    def explain(self, sql):
        lines = sql_guardrail.explain_oracle(sql, **self.config)
        return {"status": "error" if lines else "clean", "detail": "; ".join(lines), "duckdb_sql": None,
                "fixups": []}


def dsn_host(dsn):
    m = re.search(r"HOST\s*=\s*([^)\s]+)", dsn, re.I)
    if m:
        return m.group(1)
    return re.split(r"[:/]", dsn.split("@")[-1].lstrip("/"), maxsplit=1)[0] or dsn


def guardrail_takes_explain_callable():
    """True when check_sql accepts explain=callable(sql) -> [reasons] (then EXPLAIN errors drive the retry)."""
    called = []
    try:
        sql_guardrail.check_sql("SELECT 1 FROM DUAL", explain=lambda s: called.append(s) or [])
    except Exception:
        return False
    return bool(called)


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
                raise StageError(f'{where}: "{key}" is missing or not a {typ.__name__ if isinstance(typ, type) else "string"}')
        if ex["id"] in seen:
            raise StageError(f"{where}: duplicate id {ex['id']!r}")
        seen.add(ex["id"])
        sql_guardrail._validate_filters(ex["context"].get("security_filters"), where)
    return data[:limit] if limit else data


def load_predictions(path, examples):
    """{id: {"text", optional "retry_text"}} for every example; unknown or missing ids are an error."""
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
        if not isinstance(item, dict) or "id" not in item or not isinstance(item.get("text"), (str, type(None))) \
                or not isinstance(item.get("retry_text", ""), (str, type(None))):
            raise StageError(f'--predictions {path} line {n} must be {{"id", "text"[, "retry_text"]}}')
        preds[item["id"]] = item
    ids = {ex["id"] for ex in examples}
    missing = [ex["id"] for ex in examples if ex["id"] not in preds]
    if missing:
        raise StageError(f"--predictions {path} has no answer for {len(missing)} example(s), e.g. {missing[:3]}")
    return {k: v for k, v in preds.items() if k in ids}


def check_endpoint(client, model):
    """Fail fast with one line when the server is down or does not serve `model`."""
    try:
        served = [m.id for m in client.models.list().data]
    except Exception as e:
        raise StageError(f"model endpoint {client.base_url} is not reachable: {type(e).__name__}: "
                         f"{sql_guardrail._first_line(e)}") from None
    if model not in served:
        raise StageError(f"model {model!r} is not served by {client.base_url} (served: {served})")


# ----------------------------------------------------------------------------------------------- evaluation
def categories(verdict, explain_status):
    codes = set(verdict.get("codes") or [])
    cats = {c for c in ("contract", "parse_error", "unsafe", "security_filter", "explain_error", "endpoint_error")
            if c in codes}
    if codes & {"unknown_table", "unknown_column"}:
        cats.add("hallucination")
    if explain_status == "error":
        cats.add("explain_error")
    return [c for c in CATEGORIES if c in cats]


def finish_attempt(attempt, explainer, explain_in_loop):
    """Attach the EXPLAIN verdict (status/detail) and failure categories to one attempt."""
    v = attempt["verdict"]
    sql = v.get("candidate_sql")
    passed_1_4 = sql is not None and not (set(v.get("codes") or []) - {"explain_error"})
    ex = {"status": "not_run", "detail": "layers 1-4 rejected the answer" if sql else "no SQL"}
    if isinstance(explainer, OracleExplainer):
        if "explain" in (v.get("checks") or []):  # ran inside check_sql: read its verdict, never EXPLAIN twice
            failed = "explain_error" in (v.get("codes") or [])
            ex = {"status": "error" if failed else "clean",
                  "detail": "; ".join(x for x in v.get("reasons", []) if "Oracle" in x) if failed else ""}
    elif passed_1_4 and explainer is not None:
        ex = explainer.explain(sql)  # cached: free when check_sql already ran it through the callable hook
        if not explain_in_loop and ex["status"] == "error":
            # The guardrail could not run this layer itself: apply its verdict after the round trip.
            v.update(ok=False, sql=None)
            v["codes"] = list(dict.fromkeys((v.get("codes") or []) + ["explain_error"]))
            v["reasons"] = (v.get("reasons") or []) + [f"EXPLAIN failed: {ex['detail']}"]
    attempt["explain"] = {k: ex.get(k) for k in ("status", "detail", "duckdb_sql", "fixups")}
    attempt["categories"] = categories(v, ex["status"])
    return attempt


def slim_attempt(a):
    v = a["verdict"]
    return {"raw_output": a.get("raw_output"), "finish_reason": a.get("finish_reason"),
            "latency_ms": a.get("latency_ms"), "ok": v["ok"], "sql": v.get("candidate_sql"),
            "codes": v.get("codes", []), "reasons": v.get("reasons", []),
            "unknown_tables": v.get("unknown_tables", []), "unknown_columns": v.get("unknown_columns", []),
            "explain": a["explain"], "categories": a["categories"]}


def evaluate_example(ex, run, cfg):
    """One example through the guarded path -> its per-example row."""
    t0 = time.perf_counter()
    try:
        result = run(ex)
    except StageError as e:
        if not str(e).startswith("model endpoint call failed"):
            raise  # e.g. the staging Oracle went away: not the model's fault, stop the run
        # one request failed (timeout, 5xx): recorded for this example, the run goes on
        v = sql_guardrail._verdict(codes=["endpoint_error"], reasons=[str(e)])
        result = {"attempts": [{"raw_output": None, "finish_reason": None, "latency_ms": None, "verdict": v}]}
    attempts = [finish_attempt(a, cfg["explainer"], cfg["explain_in_loop"]) for a in result["attempts"]]
    gold = normalized_sql(ex["sql"])
    first, final = attempts[0], attempts[-1]
    lat = [a["latency_ms"] for a in attempts if a.get("latency_ms") is not None]
    return {
        "id": ex["id"], "question": ex["question"], "gold_sql": ex["sql"], "tags": ex.get("tags", []),
        "retried": len(attempts) > 1, "ok_first": first["verdict"]["ok"], "ok_final": final["verdict"]["ok"],
        "exact_match_first": normalized_sql(first["verdict"].get("candidate_sql")) == gold,
        "exact_match_final": normalized_sql(final["verdict"].get("candidate_sql")) == gold,
        "execution_match": None,
        "categories_first": first["categories"], "categories_final": final["categories"],
        "latency_ms": round(sum(lat), 1) if lat else None,
        "latency_first_ms": first.get("latency_ms"),
        "wall_ms": round((time.perf_counter() - t0) * 1000, 1),
        "attempts": [slim_attempt(a) for a in attempts],
    }


def percentile(values, q):
    """Nearest-rank percentile (no interpolation: every figure is a latency that was actually observed)."""
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return None
    return vals[max(0, math.ceil(q / 100 * len(vals)) - 1)]


def summarize(rows, wall_s):
    n = len(rows)

    def rate(pred):
        return round(sum(1 for r in rows if pred(r)) / n, 4) if n else None

    totals = {"examples": n}
    for cat in CATEGORIES:
        totals[f"{cat}_rate"] = {"first": rate(lambda r, c=cat: c in r["categories_first"]),
                                 "final": rate(lambda r, c=cat: c in r["categories_final"])}
    totals["ok_rate"] = {"first": rate(lambda r: r["ok_first"]), "final": rate(lambda r: r["ok_final"])}
    totals["exact_match"] = {"first": rate(lambda r: r["exact_match_first"]),
                             "final": rate(lambda r: r["exact_match_final"])}
    retried = [r for r in rows if r["retried"]]
    totals["retry_rate"] = rate(lambda r: r["retried"])
    totals["retry_success"] = round(sum(r["ok_final"] for r in retried) / len(retried), 4) if retried else None
    totals["retried"] = len(retried)
    attempts = [a for r in rows for a in r["attempts"]]
    totals["explain"] = {s: sum(1 for a in attempts if a["explain"]["status"] == s)
                         for s in ("clean", "error", "not_checkable", "not_run")}
    totals["explain"]["not_checkable_reasons"] = sorted({a["explain"]["detail"] for a in attempts
                                                         if a["explain"]["status"] == "not_checkable"})
    totals["execution_match"] = None
    lat = [r["latency_ms"] for r in rows]
    totals["latency_ms"] = {"p50": percentile(lat, 50), "p95": percentile(lat, 95),
                            "first_attempt_p50": percentile([r["latency_first_ms"] for r in rows], 50),
                            "first_attempt_p95": percentile([r["latency_first_ms"] for r in rows], 95)}
    totals["wall_s"] = round(wall_s, 2)
    totals["examples_per_s"] = round(n / wall_s, 3) if wall_s > 0 else None
    return totals


def gate(totals, args):
    """[(flag, value, limit, passed)] for every threshold given."""
    out = []
    for flag, cat in MAX_GATES.items():
        limit = getattr(args, f"max_{flag}_rate")
        if limit is not None:
            value = totals[f"{cat}_rate"]["final"]
            out.append((f"--max_{flag}_rate", value, limit, value <= limit))
    if args.min_exact_match is not None:
        value = totals["exact_match"]["final"]
        out.append(("--min_exact_match", value, args.min_exact_match, value >= args.min_exact_match))
    return out


# -------------------------------------------------------------------------------------------------- outputs
def pct(x):
    return "n/a" if x is None else f"{100 * x:.1f}%"


def ms(x):
    return "n/a" if x is None else f"{x:.0f}"


def render_markdown(report):
    t, c = report["totals"], report["config"]
    lines = [f"# Oracle EBS NL2SQL eval: {c['model']}", "",
             f"- eval data: `{c['eval_data']}` ({t['examples']} examples), mode: {c['mode']}",
             f"- EXPLAIN backend: {c['explain_backend']}" + ("" if c["explain_in_loop"] else
                                                             " (applied after the round trip: EXPLAIN errors do "
                                                             "not trigger the retry)"),
             f"- guardrail: {c['sqlglot']}, policy `{c['policy']}`, catalog `{c['catalog']}`",
             f"- prompt template sha256 {c['template_sha256'][:16]}..., concurrency {c['concurrency']}", "",
             "Rates are over examples. **first** = the model's first answer; **final** = the answer the user gets "
             "(the retry's when the first was rejected). Thresholds gate on final answers.", "",
             "| metric | first attempt | final |", "|---|---:|---:|"]
    for cat in CATEGORIES:
        r = t[f"{cat}_rate"]
        lines.append(f"| {CATEGORY_LABELS[cat]} rate | {pct(r['first'])} | {pct(r['final'])} |")
    lines += [f"| guardrail pass (ok) | {pct(t['ok_rate']['first'])} | {pct(t['ok_rate']['final'])} |",
              f"| exact match (normalized) | {pct(t['exact_match']['first'])} | {pct(t['exact_match']['final'])} |",
              "", "| metric | value |", "|---|---:|",
              f"| retry rate | {pct(t['retry_rate'])} ({t['retried']} of {t['examples']} examples) |",
              f"| retry success (final ok among retried) | {pct(t['retry_success'])} |",
              f"| EXPLAIN clean / error / not checkable / not run (attempts) | {t['explain']['clean']} / "
              f"{t['explain']['error']} / {t['explain']['not_checkable']} / {t['explain']['not_run']} |",
              f"| execution match | n/a ({c['execution_match_note']}) |",
              f"| latency p50 / p95 per example (ms, both attempts) | {ms(t['latency_ms']['p50'])} / "
              f"{ms(t['latency_ms']['p95'])} |",
              f"| first-attempt latency p50 / p95 (ms) | {ms(t['latency_ms']['first_attempt_p50'])} / "
              f"{ms(t['latency_ms']['first_attempt_p95'])} |",
              f"| wall time / throughput | {t['wall_s']} s / {t['examples_per_s']} examples/s |", ""]
    if t["explain"]["not_checkable_reasons"]:
        lines += ["Not checkable on the EXPLAIN backend: " + "; ".join(t["explain"]["not_checkable_reasons"]), ""]
    if report["gates"]:
        lines += ["## Thresholds", "", "| flag | value | limit | result |", "|---|---:|---:|---|"]
        lines += [f"| {g['flag']} | {pct(g['value'])} | {pct(g['limit'])} | {'pass' if g['passed'] else '**FAIL**'} |"
                  for g in report["gates"]]
        lines.append("")
    lines += ["## Per example", "", "| id | first | final | retried | exact (final) | latency ms | final reason |",
              "|---|---|---|---|---|---:|---|"]
    for r in report["examples"]:
        reason = "; ".join(r["attempts"][-1]["reasons"])[:160].replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {r['id']} | {', '.join(r['categories_first']) or 'ok'} | "
                     f"{', '.join(r['categories_final']) or 'ok'} | {'yes' if r['retried'] else 'no'} | "
                     f"{'yes' if r['exact_match_final'] else 'no'} | {ms(r['latency_ms'])} | {reason} |")
    return "\n".join(lines) + "\n"


def write_chart(path, totals):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = [CATEGORY_LABELS[c] for c in CATEGORIES]
    first = [100 * totals[f"{c}_rate"]["first"] for c in CATEGORIES]
    final = [100 * totals[f"{c}_rate"]["final"] for c in CATEGORIES]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    xs = range(len(CATEGORIES))
    ax.bar([x - 0.2 for x in xs], first, width=0.4, label="first attempt")
    ax.bar([x + 0.2 for x in xs], final, width=0.4, label="final (after retry)")
    ax.set_xticks(list(xs), labels, rotation=20, ha="right")
    ax.set_ylabel("% of examples")
    ax.set_ylim(0, 100)
    ax.set_title(f"Failure categories ({totals['examples']} examples)")
    ax.legend()
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------------ main
def build_parser():
    p = argparse.ArgumentParser(prog="eval_oracle_nl2sql.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--eval_data", required=True, help="conversations JSON from the dataset builder (e.g. "
                                                      "runs/data/ebs_holdout.json): list of {id, question, sql, context}")
    p.add_argument("--catalog", required=True, help="schema catalog JSON {TABLE: {COLUMN: TYPE}} (or ALL_TAB_COLUMNS "
                                                    "CSV) for the hallucination check and the DuckDB mirror")
    p.add_argument("--base_url", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 (/v1 is added "
                                      "when missing; not with --predictions)")
    p.add_argument("--model", help="served model name (required with --base_url)")
    p.add_argument("--api_key_env", help="environment variable holding the endpoint's API key (never on the "
                                         "command line)")
    p.add_argument("--predictions", help='JSONL of precomputed answers {"id", "text"[, "retry_text"]} to check '
                                         "instead of querying a server; retry_text is the answer to the retry prompt")
    p.add_argument("--policy", help="guardrail policy YAML (default: inference/guardrail_policy.yaml)")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight (default 4 = vLLM max-num-seqs)")
    p.add_argument("--max_tokens", type=int, default=512, help="generation limit per attempt (default 512)")
    p.add_argument("--timeout", type=float, default=300.0, help="HTTP timeout per request in seconds (default 300)")
    p.add_argument("--oracle_dsn", help="staging Oracle DSN for EXPLAIN PLAN (user/password from ORACLE_USER / "
                                        "ORACLE_PASSWORD); default: the embedded DuckDB catalog mirror")
    p.add_argument("--explain_timeout", type=float, default=10.0, help="Oracle connect/EXPLAIN timeout (s)")
    p.add_argument("--out_dir", default="runs/eval", help="where report.json, report.md and failure_categories.png "
                                                          "go (default runs/eval)")
    p.add_argument("--limit", type=int, help="evaluate only the first N examples")
    for flag, cat in MAX_GATES.items():
        p.add_argument(f"--max_{flag}_rate", type=float, metavar="X",
                       help=f"fail (exit 1) when the final-answer {CATEGORY_LABELS[cat]} rate exceeds X (0..1)")
    p.add_argument("--min_exact_match", type=float, metavar="X",
                   help="fail (exit 1) when the final-answer exact-match rate is below X (0..1)")
    return p


def validate_args(args):
    if bool(args.predictions) == bool(args.base_url):
        raise StageError("give exactly one of --base_url (query a server) or --predictions (precomputed answers)")
    if args.base_url and not args.model:
        raise StageError("--base_url needs --model (the served model name)")
    if args.concurrency < 1 or (args.limit is not None and args.limit < 1) or args.max_tokens < 1:
        raise StageError("--concurrency, --limit and --max_tokens must be >= 1")
    for flag in [f"max_{f}_rate" for f in MAX_GATES] + ["min_exact_match"]:
        v = getattr(args, flag)
        if v is not None and not 0 <= v <= 1:
            raise StageError(f"--{flag} must be between 0 and 1 (got {v})")


def api_base(url):
    """OpenAI base URL: vLLM serves the API under /v1; accept the server root as well."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def make_runner(args, catalog, policy, explain_arg, preds):
    """example -> ask()-shaped result {attempts: [{raw_output, finish_reason, latency_ms, verdict}]}."""
    if preds is not None:
        def run(ex):
            filters = ex["context"].get("security_filters") or []
            item, attempts = preds[ex["id"]], []
            for text in (item.get("text"), item.get("retry_text")):
                v = sql_guardrail.check_sql(text, catalog=catalog, policy=policy, security_filters=filters,
                                            explain=explain_arg)
                attempts.append({"raw_output": text, "finish_reason": None, "latency_ms": None, "verdict": v})
                if v["ok"] or "retry_text" not in item:
                    break
            return {"attempts": attempts}
        return run, None
    import openai
    api_key = os.environ.get(args.api_key_env) if args.api_key_env else None
    if args.api_key_env and api_key is None:
        raise StageError(f"--api_key_env {args.api_key_env} is not set in the environment")
    base_url = api_base(args.base_url)
    client = openai.OpenAI(base_url=base_url, api_key=api_key or "EMPTY", timeout=args.timeout, max_retries=0)
    check_endpoint(client, args.model)

    def run(ex):
        return sql_guardrail.ask(base_url, args.model, ex["question"], ex["context"], catalog, policy,
                                 max_tokens=args.max_tokens, timeout=args.timeout, explain=explain_arg,
                                 client=client)
    return run, client


def run_eval(args):
    validate_args(args)
    examples = load_eval_data(args.eval_data, args.limit)
    catalog = sql_guardrail.load_catalog(args.catalog)
    policy = sql_guardrail.load_policy(args.policy)
    preds = load_predictions(args.predictions, examples) if args.predictions else None

    if args.oracle_dsn:
        user = os.environ.get("ORACLE_USER") or os.environ.get("ORACLE_GUARD_USER")
        password = os.environ.get("ORACLE_PASSWORD", os.environ.get("ORACLE_GUARD_PASSWORD"))
        if not user or password is None:
            raise StageError("--oracle_dsn given but ORACLE_USER / ORACLE_PASSWORD are not set")
        explainer = OracleExplainer(args.oracle_dsn, user, password, args.explain_timeout)
        explain_arg, explain_in_loop = explainer.config, True
        backend = f"Oracle {dsn_host(args.oracle_dsn)}"
    else:
        explainer = DuckDBMirror(catalog)
        explain_in_loop = guardrail_takes_explain_callable()
        explain_arg = explainer.feedback if explain_in_loop else None
        backend = "DuckDB mirror (embedded default)"

    run, _ = make_runner(args, catalog, policy, explain_arg, preds)
    cfg = {"explainer": explainer, "explain_in_loop": explain_in_loop}
    from tqdm import tqdm
    rows, t0 = {}, time.perf_counter()
    pool = ThreadPoolExecutor(max_workers=args.concurrency)
    try:
        futures = {pool.submit(evaluate_example, ex, run, cfg): ex["id"] for ex in examples}
        for fut in tqdm(as_completed(futures), total=len(futures), desc="eval", unit="ex", file=sys.stderr):
            rows[futures[fut]] = fut.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # a fatal error must not wait for the whole queue
    wall = time.perf_counter() - t0
    rows = [rows[ex["id"]] for ex in examples]
    totals = summarize(rows, wall)
    gates = [{"flag": f, "value": v, "limit": lim, "passed": ok} for f, v, lim, ok in gate(totals, args)]
    from prompting import template_sha256
    report = {
        "config": {"eval_data": str(args.eval_data), "catalog": str(args.catalog), "policy": policy["_path"],
                   "mode": "predictions file" if preds is not None else "live endpoint",
                   "base_url": args.base_url, "model": args.model or f"predictions:{Path(args.predictions).name}",
                   "predictions": args.predictions, "concurrency": args.concurrency, "limit": args.limit,
                   "max_tokens": args.max_tokens, "explain_backend": backend, "explain_in_loop": explain_in_loop,
                   "execution_match_note": "no data: the DuckDB mirror's tables are empty and the harness never "
                                           "executes queries on Oracle" if not args.oracle_dsn else
                                           "the harness only EXPLAINs on Oracle, it never executes queries",
                   "sqlglot": sql_guardrail.SQLGLOT_IMPL["name"] + " " + sql_guardrail.SQLGLOT_IMPL["version"],
                   "template_sha256": template_sha256(),
                   "versions": library_versions("sqlglot", "duckdb", "openai"),
                   "rate_definitions": "rate = examples with the category / examples; first = first attempt, "
                                       "final = answer returned to the user (retry's when retried); EXPLAIN runs "
                                       "only on attempts that passed layers 1-4; thresholds gate on final"},
        "totals": totals, "gates": gates, "examples": rows,
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", render_markdown(report))
    write_chart(out / "failure_categories.png", totals)
    return report, out


def print_summary(report, out):
    t = report["totals"]
    print(f"\nEXPLAIN backend: {report['config']['explain_backend']}   examples: {t['examples']}")
    print(f"{'metric':<34}{'first':>10}{'final':>10}")
    for cat in CATEGORIES:
        r = t[f"{cat}_rate"]
        print(f"{CATEGORY_LABELS[cat] + ' rate':<34}{pct(r['first']):>10}{pct(r['final']):>10}")
    print(f"{'guardrail pass':<34}{pct(t['ok_rate']['first']):>10}{pct(t['ok_rate']['final']):>10}")
    print(f"{'exact match':<34}{pct(t['exact_match']['first']):>10}{pct(t['exact_match']['final']):>10}")
    print(f"retry rate {pct(t['retry_rate'])}, retry success {pct(t['retry_success'])}; EXPLAIN not checkable "
          f"{t['explain']['not_checkable']}; latency p50/p95 {ms(t['latency_ms']['p50'])}/{ms(t['latency_ms']['p95'])} ms")
    print(f"reports: {out / 'report.json'}  {out / 'report.md'}  {out / 'failure_categories.png'}")


def main(argv=None):
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
