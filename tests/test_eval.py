"""Eval harness: the DuckDB catalog mirror (EXPLAIN layer), --predictions mode end to end with exact expected rates
and exit codes, bad input, and one live run against the real vLLM server on the untrained tiny model.

Real engines only: real sqlglot + guardrail, a real in-memory DuckDB, real files, a real vLLM process.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import datetime as dt

import candidates as cand
import duckdb_mirror_data as mirror_data
import eval_oracle_nl2sql as ev
from artifacts import StageError
from eval_inputs import dsn_host, parse_binds
from eval_report import CATEGORIES, gate, percentile
from duckdb_explain import DuckDBMirror, duckdb_type
from prompting import chat_messages
from sql_guardrail import check_sql

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "custom_oracle_llama" / "eval_oracle_nl2sql.py"
DEMO = ROOT / "custom_oracle_llama" / "demo"
CATALOG_PATH = DEMO / "ebs_catalog.json"
SCHEMA_PATH = DEMO / "ebs_schema.json"
SCHEMA = json.loads(SCHEMA_PATH.read_text())
TODAY = dt.date(2026, 12, 1)
RAW = [json.loads(line) for line in (DEMO / "raw_questions.jsonl").read_text().splitlines() if line.strip()]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def mirror():
    return DuckDBMirror(json.loads(CATALOG_PATH.read_text()))


@pytest.fixture(scope="module")
def data_mirror():
    """The mirror with the synthetic rows the eval generates (seeded with the demo gold SQL, as the eval does)."""
    data = mirror_data.synthetic_rows(SCHEMA, seed=0, today=TODAY, sqls=[r["sql"] for r in RAW])
    return DuckDBMirror(json.loads(CATALOG_PATH.read_text()), data, mirror_data.bind_values(SCHEMA, data), TODAY)


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def eval_set(records):
    """The dataset builder's conversations format, built from demo raw records."""
    return [{"id": r["id"], "conversations": chat_messages(r["question"], r["context"], answer_sql=r["sql"]),
             "sql_type": "oracle", "question": r["question"], "sql": r["sql"], "context": r["context"],
             "tags": r.get("tags", [])} for r in records]


# ------------------------------------------------------------------------------------------- DuckDB mirror
def test_mirror_explains_every_demo_sql_without_false_errors(mirror):
    results = {r["id"]: mirror.explain(r["sql"]) for r in RAW}
    clean = [i for i, r in results.items() if r["status"] == "clean"]
    errors = {i: r["detail"] for i, r in results.items() if r["status"] == "error"}
    not_checkable = {i: r["detail"] for i, r in results.items() if r["status"] == "not_checkable"}
    share = len(clean) / len(RAW)
    print(f"\nDuckDB mirror EXPLAIN on {len(RAW)} demo SQLs: {len(clean)} clean ({100 * share:.1f}%), "
          f"{len(not_checkable)} not checkable {not_checkable}, {len(errors)} errors")
    assert errors == {}, f"false EXPLAIN errors on valid gold SQL: {errors}"
    assert share >= 0.97


# One row per behaviour: Oracle SQL -> mirror status (and a fragment of the detail).
MIRROR_CASES = [
    ("valid join + bind + TRUNC(SYSDATE,'MM')", "SELECT I.INVOICE_NUM FROM AP_INVOICES_ALL I WHERE I.INVOICE_DATE >= "
     "TRUNC(SYSDATE, 'MM') AND I.ORG_ID IN (:org_ids)", "clean", ""),
    ("date arithmetic like Oracle (DATE - n, DATE - DATE)", "SELECT ROUND(AVG(SYSDATE - PS.DUE_DATE), 1) FROM "
     "AP_PAYMENT_SCHEDULES_ALL PS WHERE PS.DUE_DATE < TRUNC(SYSDATE) - 30", "clean", ""),
    ("ADD_MONTHS + TRUNC(date) + NVL + DECODE + TO_CHAR fmt", "SELECT TO_CHAR(I.INVOICE_DATE, 'YYYY-MM'), "
     "DECODE(I.PAYMENT_STATUS_FLAG, 'Y', 1, 0), NVL(I.AMOUNT_PAID, 0) FROM AP_INVOICES_ALL I WHERE "
     "TRUNC(I.INVOICE_DATE) >= ADD_MONTHS(TRUNC(SYSDATE, 'YYYY'), -12) + 1", "clean", ""),
    ("ROWNUM top-N", "SELECT * FROM (SELECT C.CHECK_NUMBER FROM AP_CHECKS_ALL C ORDER BY C.CHECK_DATE DESC) "
     "WHERE ROWNUM <= 20", "clean", ""),
    ("(+) outer join", "SELECT I.INVOICE_NUM, S.VENDOR_NAME FROM AP_INVOICES_ALL I, AP_SUPPLIERS S "
     "WHERE I.VENDOR_ID = S.VENDOR_ID(+)", "clean", ""),
    ("FROM DUAL", "SELECT SYSDATE FROM DUAL", "clean", ""),
    ("broken column", "SELECT I.INVOICE_NUM, I.INVOICE_TOTAL FROM AP_INVOICES_ALL I", "error", "INVOICE_TOTAL"),
    ("unknown table", "SELECT X.A FROM AP_INVOICE_HEADERS X", "error", "AP_INVOICE_HEADERS"),
    ("non-grouped column", "SELECT I.VENDOR_ID, I.INVOICE_NUM, COUNT(*) FROM AP_INVOICES_ALL I GROUP BY I.VENDOR_ID",
     "error", "GROUP BY"),
    ("ambiguous column", "SELECT VENDOR_ID FROM AP_INVOICES_ALL I, AP_SUPPLIERS S WHERE I.VENDOR_ID = S.VENDOR_ID",
     "error", "VENDOR_ID"),
    ("CONNECT BY", "SELECT PERSON_ID, LEVEL FROM PER_ALL_ASSIGNMENTS_F START WITH SUPERVISOR_ID IS NULL "
     "CONNECT BY PRIOR PERSON_ID = SUPERVISOR_ID", "not_checkable", "CONNECT BY"),
    ("package function", "SELECT FND_PROFILE.VALUE('ORG_ID') FROM DUAL", "not_checkable", "package function"),
    ("DuckDB stricter typing is not an error (Oracle converts implicitly)",
     "SELECT SUBSTR(I.INVOICE_AMOUNT, 1, 2) FROM AP_INVOICES_ALL I", "not_checkable", "No function matches"),
    ("file access stays disabled", "SELECT * FROM read_csv('/etc/passwd')", "not_checkable", "disabled"),
]


@pytest.mark.parametrize("sql,status,detail", [c[1:] for c in MIRROR_CASES], ids=[c[0] for c in MIRROR_CASES])
def test_mirror_cases(mirror, sql, status, detail):
    r = mirror.explain(sql)
    assert r["status"] == status, r
    assert detail.lower() in r["detail"].lower()


@pytest.mark.parametrize("oracle,duck", [("NUMBER", "DOUBLE"), ("NUMBER(15)", "BIGINT"), ("NUMBER(15,2)", "DOUBLE"),
                                         ("VARCHAR2(240)", "VARCHAR"), ("DATE", "DATE"),
                                         ("TIMESTAMP(6)", "TIMESTAMP"), ("CLOB", "VARCHAR")])
def test_duckdb_types(oracle, duck):
    assert duckdb_type(oracle) == duck


# ----------------------------------------------------------------------------------- --predictions end to end
BY_ID = {r["id"]: r for r in RAW}
GOLD1, GOLD2, GOLD3 = BY_ID["ebs-0001"]["sql"], BY_ID["ebs-0002"]["sql"], BY_ID["ebs-0003"]["sql"]
# id -> (prediction, expected first-attempt categories, expected final categories, exact match final)
PREDICTIONS = {
    "ebs-0001": ({"text": GOLD1}, [], [], True),
    "ebs-0002": ({"text": "DELETE FROM AP_INVOICES_ALL WHERE ORG_ID IN (:org_ids)"}, ["unsafe"], ["unsafe"], False),
    "ebs-0003": ({"text": GOLD3.replace("I.INVOICE_AMOUNT >", "I.INVOICE_TOTAL >")},
                 ["hallucination"], ["hallucination"], False),
    "ebs-0004": ({"text": BY_ID["ebs-0004"]["sql"].replace(" AND I.ORG_ID IN (:org_ids)", "")},
                 ["security_filter"], ["security_filter"], False),
    "ebs-0005": ({"text": f"Here is the query you asked for:\n{BY_ID['ebs-0005']['sql']}"},
                 ["contract"], ["contract"], False),
    # the retry prompt's answer (retry_text) fixes the hallucinated column
    "ebs-0006": ({"text": BY_ID["ebs-0006"]["sql"].replace("S.VENDOR_NAME", "S.SUPPLIER_NAME"),
                  "retry_text": BY_ID["ebs-0006"]["sql"]}, ["hallucination"], [], True),
    # fence + ';' are normalized by the guardrail: still an exact match
    "ebs-0007": ({"text": f"```sql\n{BY_ID['ebs-0007']['sql'].lower()};\n```"}, [], [], True),
    # passes layers 1-4 (every column exists) but cannot bind: only EXPLAIN catches it
    "ebs-0008": ({"text": GOLD2.replace("SELECT S.VENDOR_NAME,", "SELECT S.VENDOR_NAME, I.INVOICE_NUM,")},
                 ["explain_error"], ["explain_error"], False),
}


@pytest.fixture(scope="module")
def pred_inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("pred")
    (d / "eval.json").write_text(json.dumps(eval_set([BY_ID[i] for i in PREDICTIONS])))
    (d / "pred.jsonl").write_text("".join(json.dumps({"id": i, **p[0]}) + "\n" for i, p in PREDICTIONS.items()))
    return d


def pred_run(d, out, *extra):
    return run_cli("--eval_data", d / "eval.json", "--catalog", CATALOG_PATH, "--predictions", d / "pred.jsonl",
                   "--out_dir", out, *extra)


@pytest.mark.slow
def test_predictions_end_to_end(pred_inputs, tmp_path):
    r = pred_run(pred_inputs, tmp_path / "out", "--max_hallucination_rate", "0.125", "--max_unsafe_rate", "0.2",
                 "--max_parse_error_rate", "0", "--max_security_violation_rate", "0.125",
                 "--max_explain_error_rate", "0.125", "--min_exact_match", "0.375")
    assert r.returncode == 0, r.stderr + r.stdout
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    rows = {row["id"]: row for row in report["examples"]}
    for i, (_, first, final, exact) in PREDICTIONS.items():
        assert rows[i]["categories_first"] == first, (i, rows[i]["attempts"])
        assert rows[i]["categories_final"] == final, (i, rows[i]["attempts"])
        assert rows[i]["exact_match_final"] is exact, (i, rows[i]["attempts"])
    t = report["totals"]
    assert t["examples"] == 8
    assert t["unsafe_rate"] == {"first": 0.125, "final": 0.125}
    assert t["hallucination_rate"] == {"first": 0.25, "final": 0.125}
    assert t["security_filter_rate"] == {"first": 0.125, "final": 0.125}
    assert t["contract_rate"] == {"first": 0.125, "final": 0.125}
    assert t["explain_error_rate"] == {"first": 0.125, "final": 0.125}
    assert t["parse_error_rate"] == {"first": 0.0, "final": 0.0}
    assert t["ok_rate"] == {"first": 0.25, "final": 0.375}
    assert t["exact_match"] == {"first": 0.25, "final": 0.375}
    assert (t["retry_rate"], t["retried"], t["retry_success"]) == (0.125, 1, 1.0)
    assert t["explain"]["error"] == 1 and t["explain"]["clean"] == 3
    assert report["config"]["explain_backend"] == "DuckDB mirror (embedded default, empty tables)"
    assert rows["ebs-0008"]["attempts"][0]["explain"]["status"] == "error"
    md = (tmp_path / "out" / "report.md").read_text()
    assert "DuckDB mirror (embedded default, empty tables)" in md and "| ebs-0008 |" in md
    assert t["execution"]["rate"] is None and rows["ebs-0001"]["exec_match"] is None
    png = (tmp_path / "out" / "failure_categories.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 5000
    assert "backend: DuckDB mirror" in r.stdout


@pytest.mark.slow
def test_threshold_failure_exits_1_and_names_it(pred_inputs, tmp_path):
    r = pred_run(pred_inputs, tmp_path / "out", "--max_unsafe_rate", "0.1", "--max_hallucination_rate", "0.2",
                 "--min_exact_match", "0.5")
    assert r.returncode == 1, r.stderr
    failed = [line for line in r.stderr.splitlines() if line.startswith("threshold failed")]
    assert len(failed) == 2 and "--max_unsafe_rate" in failed[0] and "--min_exact_match" in failed[1], r.stderr
    assert "Traceback" not in r.stderr
    assert (tmp_path / "out" / "report.json").exists()  # the report is written either way


@pytest.mark.slow
def test_predictions_missing_answer_is_bad_input(pred_inputs, tmp_path):
    partial = tmp_path / "partial.jsonl"
    partial.write_text(json.dumps({"id": "ebs-0001", "text": GOLD1}) + "\n")
    r = run_cli("--eval_data", pred_inputs / "eval.json", "--catalog", CATALOG_PATH, "--predictions", partial,
                "--out_dir", tmp_path / "out")
    assert r.returncode == 2 and "no answer for 7 example(s)" in r.stderr
    # --limit 1 only needs the first example's answer
    r = run_cli("--eval_data", pred_inputs / "eval.json", "--catalog", CATALOG_PATH, "--predictions", partial,
                "--out_dir", tmp_path / "out", "--limit", "1", "--min_exact_match", "1")
    assert r.returncode == 0, r.stderr


def _bad_json(tmp):
    p = tmp / "bad.json"
    p.write_text("[{")
    return p


def _null_candidates(tmp, d):
    p = tmp / "null.jsonl"
    first = json.loads((d / "pred.jsonl").read_text().splitlines()[0])
    p.write_text(json.dumps({**first, "candidates": None}) + "\n")
    return p


BAD_INPUT = [
    ("missing eval file", lambda t, d: ["--eval_data", t / "nope.json", "--catalog", CATALOG_PATH,
                                        "--predictions", d / "pred.jsonl"], "cannot read --eval_data"),
    ("bad JSON", lambda t, d: ["--eval_data", _bad_json(t), "--catalog", CATALOG_PATH,
                               "--predictions", d / "pred.jsonl"], "is not valid JSON"),
    ("missing catalog", lambda t, d: ["--eval_data", d / "eval.json", "--catalog", t / "nope.json",
                                      "--predictions", d / "pred.jsonl"], "cannot read catalog"),
    ("unreachable server", lambda t, d: ["--eval_data", d / "eval.json", "--catalog", CATALOG_PATH,
                                         "--base_url", "http://127.0.0.1:9/v1", "--model", "m", "--timeout", "5"],
     "is not reachable"),
    ("neither server nor predictions", lambda t, d: ["--eval_data", d / "eval.json", "--catalog", CATALOG_PATH],
     "exactly one of --base_url"),
    ("threshold out of range", lambda t, d: ["--eval_data", d / "eval.json", "--catalog", CATALOG_PATH,
                                             "--predictions", d / "pred.jsonl", "--max_unsafe_rate", "5"],
     "between 0 and 1"),
    ("candidates with greedy decoding", lambda t, d: ["--eval_data", d / "eval.json", "--catalog", CATALOG_PATH,
                                                      "--predictions", d / "pred.jsonl", "--schema", SCHEMA_PATH,
                                                      "--candidates", "3", "--temperature", "0"],
     "give --temperature > 0"),
    ("candidates null in a predictions line", lambda t, d: ["--eval_data", d / "eval.json", "--catalog", CATALOG_PATH,
                                                            "--predictions", _null_candidates(t, d)],
     'line 1 must be {"id", "text"'),
    ("oracle DSN without credentials", lambda t, d: ["--eval_data", d / "eval.json", "--catalog", CATALOG_PATH,
                                                     "--predictions", d / "pred.jsonl", "--oracle_dsn", "db:1521/X"],
     "ORACLE_USER"),
]


@pytest.mark.slow
@pytest.mark.parametrize("make_args,message", [c[1:] for c in BAD_INPUT], ids=[c[0] for c in BAD_INPUT])
def test_bad_input_exits_2_with_one_line(pred_inputs, tmp_path, make_args, message, monkeypatch):
    for var in ("ORACLE_USER", "ORACLE_PASSWORD"):
        monkeypatch.delenv(var, raising=False)
    r = run_cli(*make_args(tmp_path, pred_inputs), "--out_dir", tmp_path / "out", timeout=120)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0, r.stderr
    assert not (tmp_path / "out" / "report.json").exists()


@pytest.mark.slow
def test_unreachable_oracle_for_explain_exits_2(pred_inputs, tmp_path):
    env = {**os.environ, "ORACLE_USER": "guard", "ORACLE_PASSWORD": "s3cret-pw"}
    r = subprocess.run([sys.executable, str(SCRIPT), "--eval_data", pred_inputs / "eval.json", "--catalog",
                        CATALOG_PATH, "--predictions", pred_inputs / "pred.jsonl", "--oracle_dsn",
                        "127.0.0.1:9/EBSSTG", "--explain_timeout", "3", "--out_dir", tmp_path / "out"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot connect to Oracle DSN 127.0.0.1:9/EBSSTG"), r.stderr
    assert "Traceback" not in r.stderr and "s3cret-pw" not in r.stderr


@pytest.mark.parametrize("dsn,host", [("dbhost.example.com:1521/EBSPRD", "dbhost.example.com"),
                                      ("(DESCRIPTION=(ADDRESS=(PROTOCOL=TCP)(HOST=ebs-stg)(PORT=1521)))", "ebs-stg")])
def test_dsn_host_label(dsn, host):
    assert dsn_host(dsn) == host


def test_percentile_is_nearest_rank():
    assert percentile([10, 20, 30, 40], 50) == 20 and percentile([10, 20, 30, 40], 95) == 40
    assert percentile([None], 50) is None


# (values, q) -> the nearest-rank percentile: always an observed value, never an interpolation
PERCENTILES = [([40, 10, 30, 20], 50, 20), ([40, 10, 30, 20], 51, 30), (list(range(1, 21)), 95, 19),
               (list(range(1, 21)), 96, 20), ([None, 7.5, None], 95, 7.5), ([5], 0, 5), ([], 50, None)]


@pytest.mark.parametrize("values,q,expected", PERCENTILES)
def test_percentile_table(values, q, expected):
    assert percentile(values, q) == expected


# one row per behaviour: --bind arguments -> the binds (or the StageError)
BINDS = [
    ("numbers where they parse", ["org_ids=204,-205"], {"org_ids": [204, -205]}),
    ("names lower-cased, text kept", ["Status=OPEN,1.5"], {"status": ["OPEN", "1.5"]}),
    ("the last of a repeated name wins", ["x=1", "X=2"], {"x": [2]}),
    ("no --bind", None, {}),
    ("no '='", ["org_ids"], StageError),
    ("not a bind name", ["1x=3"], StageError),
    ("not a bind name either", ["org-ids=3"], StageError),
]


@pytest.mark.parametrize("items,expected", [c[1:] for c in BINDS], ids=[c[0] for c in BINDS])
def test_parse_binds(items, expected):
    if expected is StageError:
        with pytest.raises(StageError, match="must be NAME=VALUE"):
            parse_binds(items)
    else:
        assert parse_binds(items) == expected


def _totals(exact=0.5, ex=0.5, **final):
    """The totals entries the gates read: every category's final rate (0 unless given), exact match, EX."""
    return {**{f"{c}_rate": {"first": None, "final": final.get(c, 0.0)} for c in CATEGORIES},
            "exact_match": {"first": None, "final": exact}, "execution": {"rate": ex}}


# one row per behaviour: threshold flags + measured totals -> [(flag, passed)], max gates first, in flag order
GATES = [
    ("a max limit itself passes", ["--max_unsafe_rate", "0.125"], _totals(unsafe=0.125),
     [("--max_unsafe_rate", True)]),
    ("above a max limit fails", ["--max_unsafe_rate", "0.125"], _totals(unsafe=0.1251),
     [("--max_unsafe_rate", False)]),
    ("security flag gates security_filter", ["--max_security_violation_rate", "0"], _totals(security_filter=0.01),
     [("--max_security_violation_rate", False)]),
    ("a min limit itself passes", ["--min_exact_match", "0.5"], _totals(exact=0.5), [("--min_exact_match", True)]),
    ("below a min limit fails", ["--min_exact_match", "0.5"], _totals(exact=0.4999), [("--min_exact_match", False)]),
    ("undecided EX fails even a 0 limit", ["--min_execution_match", "0"], _totals(ex=None),
     [("--min_execution_match", False)]),
    ("no flags, no gates", [], _totals(unsafe=1.0, exact=0.0), []),
    ("order", ["--min_exact_match", "0.9", "--max_hallucination_rate", "0.2", "--max_parse_error_rate", "0"],
     _totals(hallucination=0.2), [("--max_parse_error_rate", True), ("--max_hallucination_rate", True),
                                  ("--min_exact_match", False)]),
]


@pytest.mark.parametrize("flags,totals,expected", [c[1:] for c in GATES], ids=[c[0] for c in GATES])
def test_gate(flags, totals, expected):
    args = ev.build_parser().parse_args(["--eval_data", "e.json", "--catalog", "c.json", *flags])
    gates = gate(totals, args)
    assert [(g["flag"], g["passed"]) for g in gates] == expected
    assert all(set(g) == {"flag", "value", "limit", "passed"} for g in gates)


# ------------------------------------------------------------------------------- synthetic rows + execution
def test_synthetic_rows_are_deterministic_and_join():
    sqls = [r["sql"] for r in RAW]
    a = mirror_data.synthetic_rows(SCHEMA, seed=0, today=TODAY, sqls=sqls)
    assert a == mirror_data.synthetic_rows(SCHEMA, seed=0, today=TODAY, sqls=sqls)
    assert a != mirror_data.synthetic_rows(SCHEMA, seed=1, today=TODAY, sqls=sqls)
    inv, sup, ou = a["AP_INVOICES_ALL"], a["AP_SUPPLIERS"], a["HR_OPERATING_UNITS"]
    col = lambda d, c: [r[d["columns"].index(c)] for r in d["rows"]]  # noqa: E731
    assert set(col(inv, "VENDOR_ID")) <= set(col(sup, "VENDOR_ID"))  # keys that join
    assert len(set(col(sup, "VENDOR_ID"))) == len(sup["rows"])  # generated keys are unique
    assert set(col(inv, "ORG_ID")) == set(col(ou, "ORGANIZATION_ID")) and len(ou["rows"]) == 3
    assert mirror_data.bind_values(SCHEMA, a)["org_ids"] == col(ou, "ORGANIZATION_ID")[:2]  # one unit outside
    years = {d.year for d in col(inv, "INVOICE_DATE") if d}
    assert {TODAY.year - 3, TODAY.year - 2, TODAY.year} <= years  # dates over years
    assert set(col(inv, "INVOICE_TYPE_LOOKUP_CODE")) - {None} == {"STANDARD", "CREDIT", "DEBIT", "PREPAYMENT"}
    assert {"Acme Corp", "Global Office Supplies"} <= set(col(sup, "VENDOR_NAME"))  # literals of the gold SQL
    assert set(col(a["AP_PAYMENT_SCHEDULES_ALL"], "HOLD_FLAG")) - {None} == {"Y", "N"}


def test_gold_queries_mostly_return_rows(data_mirror):
    results = {r["id"]: data_mirror.execute(r["sql"]) for r in RAW}
    failed = {i: (x["status"], x["detail"]) for i, x in results.items() if x["status"] != "ok"}
    nonempty = sum(1 for x in results.values() if x["status"] == "ok" and x["rows"])
    print(f"\ngold queries with rows on the synthetic mirror: {nonempty}/{len(RAW)}; not executed: {failed}")
    assert len(failed) <= 3, failed
    assert nonempty / len(RAW) >= 0.8


def _result(mirror, sql):
    r = mirror.execute(sql)
    assert r["status"] == "ok", r
    return r


# (name, prediction built from the gold, expected exec match)
REWRITES = [
    ("gold itself", lambda g: g, True),
    ("wrapped in SELECT * FROM (...)", lambda g: f"SELECT * FROM ({g})", True),
    ("COUNT(*) of the gold", lambda g: f"SELECT COUNT(*) FROM ({g})", False),
    ("changed filter", lambda g: g.replace("PAYMENT_STATUS_FLAG = 'N'", "PAYMENT_STATUS_FLAG = 'Y'"), False),
    ("MOAC filter to another unit", lambda g: g.replace("I.ORG_ID IN (:org_ids)", "I.ORG_ID NOT IN (:org_ids)"),
     False),
]


@pytest.mark.parametrize("make,expected", [c[1:] for c in REWRITES], ids=[c[0] for c in REWRITES])
def test_execution_match_rewrites(data_mirror, make, expected):
    gold = BY_ID["ebs-0001"]["sql"]
    ordered = cand.ordered_comparison(BY_ID["ebs-0001"]["question"], gold)
    match, reason = cand.compare_results(_result(data_mirror, gold), data_mirror.execute(make(gold)), ordered)
    assert match is expected, reason


def test_comparison_rules():
    res = lambda cols, rows: {"status": "ok", "columns": cols, "rows": rows, "detail": ""}  # noqa: E731
    gold = res(["A", "B"], [["x", 1], ["y", 2.5]])
    assert cand.compare_results(gold, res(["P", "Q"], [["y", 2.5000000000001], ["x", 1.0]]))[0] is True
    assert cand.compare_results(gold, res(["B", "A"], [[1, "x"], [2.5, "y"]])) == (False, "different rows")
    assert cand.compare_results(gold, res(["A", "B"], [["y", 2.5], ["x", 1]]), ordered=True)[1] == \
        "same rows in another order (the question asks for an order)"
    assert cand.compare_results(gold, res(["A", "B"], [["x", 1], ["x", 1], ["y", 2.5]]))[0] is False  # multiset
    assert cand.compare_results(gold, None) == (False, "no SQL answer (rejected or empty)")
    assert cand.compare_results({"status": "error", "detail": "x", "rows": None, "columns": None}, gold)[0] is None
    assert cand.ordered_comparison("What are the 10 largest invoices?", BY_ID["ebs-0004"]["sql"])
    assert not cand.ordered_comparison("How many unpaid invoices does each supplier have?", BY_ID["ebs-0001"]["sql"])


SLOW_SQL = ("SELECT SUM(A.INVOICE_AMOUNT * B.INVOICE_AMOUNT + C.INVOICE_AMOUNT * D.INVOICE_AMOUNT) FROM "
            "AP_INVOICES_ALL A, AP_INVOICES_ALL B, AP_INVOICES_ALL C, AP_INVOICES_ALL D WHERE A.ORG_ID IN (:org_ids) "
            "AND B.ORG_ID IN (:org_ids) AND C.ORG_ID IN (:org_ids) AND D.ORG_ID IN (:org_ids)")


def test_timeout_and_row_cap_are_results_not_hangs(data_mirror):
    import time
    t0 = time.perf_counter()
    r = data_mirror.execute(SLOW_SQL, timeout_s=1.0)
    assert r["status"] == "timeout" and time.perf_counter() - t0 < 10, r
    big = data_mirror.execute("SELECT I.INVOICE_ID FROM AP_INVOICES_ALL I", row_cap=50)
    assert big["status"] == "too_many_rows" and big["rows"] is None and "more than 50 rows" in big["detail"]
    gold = _result(data_mirror, BY_ID["ebs-0001"]["sql"])
    assert cand.compare_results(gold, r) == (False, "prediction timeout: no result within 1s")
    assert cand.compare_results(gold, big)[0] is False


def test_candidate_selection_picks_the_majority(data_mirror):
    catalog = json.loads(CATALOG_PATH.read_text())
    gold = BY_ID["ebs-0001"]["sql"]
    texts = [("DELETE FROM AP_INVOICES_ALL WHERE ORG_ID IN (:org_ids)", -0.1),   # rejected by the guardrail
             (gold.replace("'N'", "'Y'"), -0.5),                                   # most probable executable
             (f"SELECT * FROM ({gold})", -3.0), (gold, -2.0)]                       # the majority: same result
    cands = [{"text": t, "logprob": lp, "verdict": check_sql(t, catalog=catalog)} for t, lp in texts]
    assert [c["verdict"]["ok"] for c in cands] == [False, True, True, True]
    sel = cand.select_candidate(cands, data_mirror.execute)
    assert (sel["index"], sel["votes"], sel["groups"]) == (3, 2, 2), sel
    # a tie (one vote each) goes to the higher log-probability
    sel = cand.select_candidate(cands[:3], data_mirror.execute)
    assert sel["index"] == 1 and "tied" in sel["reason"], sel
    assert cand.select_candidate(cands[:1], data_mirror.execute)["index"] is None


EX_PREDICTIONS = {  # id -> (prediction, expected exec match of the final answer)
    "ebs-0001": ({"text": BY_ID["ebs-0001"]["sql"]}, True),
    "ebs-0002": ({"text": f"SELECT * FROM ({BY_ID['ebs-0002']['sql']})"}, True),
    "ebs-0005": ({"text": f"SELECT COUNT(*) FROM ({BY_ID['ebs-0005']['sql']})"}, False),
    "ebs-0010": ({"text": BY_ID["ebs-0010"]["sql"].replace("HOLD_FLAG = 'Y'", "HOLD_FLAG = 'N'")}, False),
    "ebs-0018": ({"text": "DELETE FROM AP_HOLDS_ALL WHERE ORG_ID IN (:org_ids)"}, False),
    "ebs-0037": ({"text": SLOW_SQL}, False),
}


@pytest.fixture(scope="module")
def ex_inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("ex")
    (d / "eval.json").write_text(json.dumps(eval_set([BY_ID[i] for i in EX_PREDICTIONS])))
    (d / "gold.jsonl").write_text("".join(json.dumps({"id": i, "text": BY_ID[i]["sql"]}) + "\n"
                                          for i in EX_PREDICTIONS))
    (d / "pred.jsonl").write_text("".join(json.dumps({"id": i, **p[0]}) + "\n" for i, p in EX_PREDICTIONS.items()))
    return d


def ex_run(d, preds, out, *extra):
    return run_cli("--eval_data", d / "eval.json", "--catalog", CATALOG_PATH, "--schema", SCHEMA_PATH,
                   "--predictions", d / preds, "--today", TODAY.isoformat(), "--exec_timeout", "2",
                   "--out_dir", out, *extra)


@pytest.mark.slow
def test_gold_as_predictions_matches_100_percent(ex_inputs, tmp_path):
    r = ex_run(ex_inputs, "gold.jsonl", tmp_path / "out", "--min_execution_match", "1")
    assert r.returncode == 0, r.stderr + r.stdout
    e = json.loads((tmp_path / "out" / "report.json").read_text())["totals"]["execution"]
    assert (e["matched"], e["decided"], e["rate"], e["gold_nonempty"]) == (6, 6, 1.0, 1.0), e
    assert e["backend"].startswith("DuckDB mirror (embedded default, synthetic rows seed 0, today 2026-12-01")


@pytest.mark.slow
def test_execution_match_end_to_end_and_gate(ex_inputs, tmp_path):
    r = ex_run(ex_inputs, "pred.jsonl", tmp_path / "out", "--min_execution_match", "0.5")
    assert r.returncode == 1, r.stderr + r.stdout
    assert "threshold failed: --min_execution_match 0.5 (measured 0.3333)" in r.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    rows = {row["id"]: row for row in report["examples"]}
    for i, (_, expected) in EX_PREDICTIONS.items():
        assert rows[i]["exec_match"] is expected, (i, rows[i]["exec_reason"])
    assert rows["ebs-0018"]["exec_reason"] == "no SQL answer (rejected or empty)"
    assert rows["ebs-0037"]["exec_reason"] == "prediction timeout: no result within 2s"
    e = report["totals"]["execution"]
    assert (e["matched"], e["decided"], e["executed"]) == (2, 6, 4), e
    md_text = (tmp_path / "out" / "report.md").read_text()
    assert "| **execution match (EX)** | 33.3% | 33.3% |" in md_text
    assert "EX" in r.stdout and "33.3%" in r.stdout


@pytest.mark.slow
def test_candidates_offline_report_ex_at_1_and_selection(ex_inputs, tmp_path):
    gold = BY_ID["ebs-0001"]["sql"]
    lines = []
    for i in EX_PREDICTIONS:
        g = BY_ID[i]["sql"]
        lines.append({"id": i, "text": f"SELECT COUNT(*) FROM ({g})",  # the greedy answer is wrong ...
                      "candidates": [{"text": f"SELECT COUNT(*) FROM ({g})", "logprob": -0.2},
                                     {"text": g, "logprob": -1.0}, {"text": f"SELECT * FROM ({g})", "logprob": -2.0}]})
    (tmp_path / "cands.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    r = run_cli("--eval_data", ex_inputs / "eval.json", "--catalog", CATALOG_PATH, "--schema", SCHEMA_PATH,
                "--predictions", tmp_path / "cands.jsonl", "--candidates", "3", "--today", TODAY.isoformat(),
                "--out_dir", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    k = report["totals"]["candidates"]
    assert (k["rate_at_1"], k["rate_selected"]) == (0.0, 1.0), k  # ... the majority of the samples is right
    row = report["examples"][0]
    assert row["selection"]["votes"] == 2 and row["exec_match_selected"] is True
    assert "EX@1 0.0% -> with selection 100.0%" in r.stdout
    assert gold  # the constructed case is built from the demo gold SQL


@pytest.mark.slow
def test_execution_needs_a_backend(ex_inputs, tmp_path):
    r = run_cli("--eval_data", ex_inputs / "eval.json", "--catalog", CATALOG_PATH, "--predictions",
                ex_inputs / "gold.jsonl", "--min_execution_match", "0.5", "--out_dir", tmp_path / "out")
    assert r.returncode == 2 and "give --schema" in r.stderr and r.stderr.count("\n") == 1


# ------------------------------------------------------------------------------------------ live (real vLLM)
@pytest.mark.slow
def test_live_tiny_model_all_outputs(vllm_tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("EVAL_TEST_API_KEY", vllm_tiny["api_key"] or "")
    data = tmp_path / "eval.json"
    data.write_text(json.dumps(eval_set(RAW[:4])))
    out = tmp_path / "out"
    r = run_cli("--eval_data", data, "--catalog", CATALOG_PATH, "--base_url", vllm_tiny["base_url"],
                "--model", vllm_tiny["model"], "--limit", "4", "--concurrency", "4", "--max_tokens", "64",
                "--api_key_env", "EVAL_TEST_API_KEY", "--out_dir", out, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    print(r.stdout)
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["mode"] == "live endpoint" and report["totals"]["examples"] == 4
    for row in report["examples"]:
        assert 1 <= len(row["attempts"]) <= 2 and row["retried"] == (len(row["attempts"]) == 2)
        for a in row["attempts"]:
            assert a["latency_ms"] and a["latency_ms"] > 0 and isinstance(a["raw_output"], str)
            # every rejected attempt is explained by at least one failure category
            assert a["ok"] or a["categories"], a
        assert row["ok_final"] == (row["categories_final"] == [])
    t = report["totals"]
    assert t["latency_ms"]["p50"] > 0 and t["latency_ms"]["p95"] >= t["latency_ms"]["p50"]
    assert (out / "report.md").read_text().count("| ebs-000") == 4
    assert (out / "failure_categories.png").read_bytes().startswith(PNG_MAGIC)


@pytest.mark.slow
def test_retrieve_evaluates_the_question_only_path(ex_inputs, tmp_path):
    r = ex_run(ex_inputs, "gold.jsonl", tmp_path / "out", "--retrieve")
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["config"]["retrieve"] is True
    # the gold SQL checked against retrieved contexts: the MOAC filters of the retrieved tables still hold
    assert report["totals"]["ok_rate"]["final"] >= 0.8, [x["attempts"][-1]["reasons"] for x in report["examples"]]


# ------------------------------------------------------------------------- EX through vLLM: fine-tuned vs base
def live_ex(srv, data, catalog, out, n=10):
    key_env = {"EVAL_TEST_API_KEY": srv["api_key"] or ""}
    r = subprocess.run([sys.executable, str(SCRIPT), "--eval_data", str(data), "--catalog", str(catalog),
                        "--schema", str(SCHEMA_PATH), "--base_url", srv["base_url"], "--model", srv["model"],
                        "--limit", str(n), "--max_tokens", "256", "--api_key_env", "EVAL_TEST_API_KEY",
                        "--today", TODAY.isoformat(), "--out_dir", str(out)],
                       capture_output=True, text=True, timeout=1800, cwd=ROOT, env={**os.environ, **key_env})
    assert r.returncode == 0, r.stderr[-3000:]
    print(r.stdout)
    return json.loads((out / "report.json").read_text())["totals"]["execution"]


@pytest.mark.slow
def test_live_ex_base_model_is_low(vllm_tiny, demo_dataset, tmp_path):
    e = live_ex(vllm_tiny, demo_dataset["train"], demo_dataset["catalog"], tmp_path / "base")
    assert e["gold_nonempty"] >= 0.8 and e["rate"] is not None and e["rate"] <= 0.3, e


@pytest.mark.slow
def test_live_ex_fine_tuned_4bit_is_high(vllm_quant, demo_dataset, tmp_path):
    e = live_ex(vllm_quant, demo_dataset["train"], demo_dataset["catalog"], tmp_path / "quant")
    assert e["rate"] >= 0.8 and e["decided"] >= 8, e
