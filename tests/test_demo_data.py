"""The shipped demo data (custom_oracle_llama/demo): schema, catalog and raw question/SQL records.

The checks are written here from scratch with sqlglot (not imported from make_demo_raw.py or the guardrail),
so a bug in the generator cannot hide itself.
"""
import importlib.util
import json
import re
from pathlib import Path

import pytest
import sqlglot
from sqlglot import exp
from sqlglot.optimizer.qualify import qualify

DEMO = Path(__file__).resolve().parents[1] / "custom_oracle_llama" / "demo"
SCHEMA = json.loads((DEMO / "ebs_schema.json").read_text(encoding="utf-8"))
RECORDS = [json.loads(line) for line in (DEMO / "raw_questions.jsonl").read_text(encoding="utf-8").splitlines()]
WRITE_NODES = (exp.Insert, exp.Update, exp.Delete, exp.Merge, exp.Create, exp.Drop, exp.Alter, exp.Command,
               exp.Lock, exp.Into, exp.TruncateTable)
ORACLE_TYPE = re.compile(r"^(NUMBER|DATE|VARCHAR2\(\d+\))$")


# ---------- check helpers (independent of the generator and the guardrail) ----------

def read_only_problem(sql: str) -> str | None:
    try:
        statements = sqlglot.parse(sql, read="oracle")
    except sqlglot.errors.SqlglotError as e:
        return f"parse error: {e}"
    if len(statements) != 1:
        return f"{len(statements)} statements"
    tree = statements[0]
    if not isinstance(tree, (exp.Select, exp.Union)):
        return f"root is {type(tree).__name__}"
    if tree.find(*WRITE_NODES):
        return "contains a write/lock node"
    return None


def tables_used(tree: exp.Expression) -> set[str]:
    ctes = {c.alias_or_name.upper() for c in tree.find_all(exp.CTE)}
    return {t.name.upper() for t in tree.find_all(exp.Table)} - ctes


def unknown_names(sql: str, context: dict) -> str | None:
    """Tables outside the context, or columns not in their context table (aliases resolved by qualify)."""
    tree = sqlglot.parse_one(sql, read="oracle")
    allowed = {t["name"]: {c["name"]: c["type"] for c in t["columns"]} for t in context["tables"]}
    extra = tables_used(tree) - set(allowed)
    if extra:
        return f"tables not in context: {sorted(extra)}"
    try:
        qualify(tree, schema=allowed, dialect="oracle", validate_qualify_columns=True, identify=False)
    except sqlglot.errors.SqlglotError as e:
        return f"column outside context: {e}"
    return None


def _and_terms(node) -> list:
    if node is None:
        return []
    if isinstance(node, exp.Paren):
        return _and_terms(node.this)
    if isinstance(node, exp.And):
        return _and_terms(node.left) + _and_terms(node.right)
    return [node]


def _is_bind_filter(term, alias: str, column: str) -> bool:
    return (isinstance(term, exp.In) and isinstance(term.this, exp.Column)
            and term.this.table.upper() == alias and term.this.name.upper() == column
            and len(term.expressions) == 1 and isinstance(term.expressions[0], exp.Placeholder)
            and term.expressions[0].name == "org_ids")


def unfiltered_tables(sql: str, filters: dict) -> list[str]:
    """Each reference to a filtered table needs `<alias>.<col> IN (:org_ids)` as an AND term of the WHERE or a
    JOIN ON of the very SELECT whose FROM/JOIN holds it (not under OR, not in another subquery)."""
    tree = sqlglot.parse_one(sql, read="oracle")
    bad = []
    for table in tree.find_all(exp.Table):
        name = table.name.upper()
        if name not in filters:
            continue
        select = table.find_ancestor(exp.Select)
        terms = _and_terms(select.args["where"].this if select.args.get("where") else None)
        for join in select.args.get("joins") or []:
            terms += _and_terms(join.args.get("on"))
        alias = table.alias_or_name.upper()
        if not any(_is_bind_filter(t, alias, filters[name]["column"].upper()) for t in terms):
            bad.append(f"{name} {alias}")
    return bad


def style_problem(sql: str) -> str | None:
    if "\n" in sql or "\t" in sql or "  " in sql or sql != sql.strip():
        return "not one single-spaced line"
    if sql.rstrip().endswith(";"):
        return "trailing semicolon"
    bare = re.sub(r"'[^']*'", "''", sql).replace(":org_ids", "")
    if bare != bare.upper():
        return "lower case outside literals"
    return None


# ---------- the helpers themselves must be able to fail ----------

FILTERS = {"AP_INVOICES_ALL": {"column": "ORG_ID"}, "AP_CHECKS_ALL": {"column": "ORG_ID"}}
SECURITY_CASES = [
    ("SELECT I.INVOICE_ID FROM AP_INVOICES_ALL I WHERE I.ORG_ID IN (:org_ids)", []),
    ("SELECT AP_INVOICES_ALL.INVOICE_ID FROM AP_INVOICES_ALL WHERE AP_INVOICES_ALL.ORG_ID IN (:org_ids)", []),
    ("SELECT I.INVOICE_ID FROM AP_INVOICES_ALL I", ["AP_INVOICES_ALL I"]),
    ("SELECT I.INVOICE_ID FROM AP_INVOICES_ALL I WHERE I.ORG_ID IN (:org_ids) OR I.INVOICE_ID > 0",
     ["AP_INVOICES_ALL I"]),
    ("SELECT I.INVOICE_ID FROM AP_INVOICES_ALL I WHERE I.ORG_ID IN (101)", ["AP_INVOICES_ALL I"]),
    ("SELECT I.INVOICE_ID FROM AP_INVOICES_ALL I, AP_CHECKS_ALL C WHERE I.ORG_ID IN (:org_ids) "
     "AND I.ORG_ID IN (:org_ids)", ["AP_CHECKS_ALL C"]),
    ("SELECT C.CHECK_ID FROM AP_CHECKS_ALL C JOIN AP_INVOICES_ALL I ON I.ORG_ID IN (:org_ids) "
     "WHERE C.ORG_ID IN (:org_ids)", []),
    ("SELECT I.INVOICE_ID FROM AP_INVOICES_ALL I WHERE I.ORG_ID IN (:org_ids) AND I.VENDOR_ID IN "
     "(SELECT X.VENDOR_ID FROM AP_INVOICES_ALL X)", ["AP_INVOICES_ALL X"]),
]


@pytest.mark.parametrize("sql,expected", SECURITY_CASES)
def test_security_helper_verdicts(sql, expected):
    assert unfiltered_tables(sql, FILTERS) == expected


@pytest.mark.parametrize("sql,ok", [
    ("SELECT 1 FROM AP_INVOICES_ALL I", True),
    ("WITH T AS (SELECT 1 AS X FROM AP_INVOICES_ALL I) SELECT T.X FROM T", True),
    ("DELETE FROM AP_INVOICES_ALL", False),
    ("UPDATE AP_INVOICES_ALL SET INVOICE_AMOUNT = 0", False),
    ("SELECT I.INVOICE_ID FROM AP_INVOICES_ALL I FOR UPDATE", False),
    ("SELECT 1 FROM AP_INVOICES_ALL I; DELETE FROM AP_INVOICES_ALL", False),
])
def test_read_only_helper_verdicts(sql, ok):
    assert (read_only_problem(sql) is None) == ok


def test_unknown_names_helper_rejects_outside_context():
    ctx = {"tables": [{"name": "AP_INVOICES_ALL", "columns": [{"name": "INVOICE_ID", "type": "NUMBER"}]}]}
    assert unknown_names("SELECT I.INVOICE_ID FROM AP_INVOICES_ALL I", ctx) is None
    assert unknown_names("SELECT I.INVOICE_NUM FROM AP_INVOICES_ALL I", ctx)
    assert unknown_names("SELECT S.VENDOR_ID FROM AP_SUPPLIERS S", ctx)


# ---------- schema and catalog ----------

def test_schema_shape():
    tables = SCHEMA["tables"]
    assert len(tables) >= 20
    for name, spec in tables.items():
        assert name == name.upper() and spec["description"]
        assert 8 <= len(spec["columns"]) <= 15, name
        for col, c in spec["columns"].items():
            assert col == col.upper() and ORACLE_TYPE.match(c["type"]) and c["description"], (name, col)
    for j in SCHEMA["joins"]:
        for side in j.split(" = "):
            t, c = side.split(".")
            assert c in tables[t]["columns"], j
    for term, target in SCHEMA["synonyms"].items():
        t, c = target.split(".")
        assert c in tables[t]["columns"], term


def test_every_moac_table_has_a_security_filter():
    moac = {t for t, spec in SCHEMA["tables"].items() if t.endswith("_ALL") and "ORG_ID" in spec["columns"]}
    assert moac and moac == set(SCHEMA["security_filters"])
    for f in SCHEMA["security_filters"].values():
        assert f == {"column": "ORG_ID", "predicate": "ORG_ID IN (:org_ids)"}


def test_catalog_matches_schema():
    catalog = json.loads((DEMO / "ebs_catalog.json").read_text(encoding="utf-8"))
    assert catalog == {t: {c: v["type"] for c, v in spec["columns"].items()}
                       for t, spec in SCHEMA["tables"].items()}


# ---------- raw records ----------

def test_record_count_ids_and_distinctness():
    assert len(RECORDS) >= 150
    ids = [r["id"] for r in RECORDS]
    assert len(set(ids)) == len(ids) and all(re.fullmatch(r"ebs-\d{4}", i) for i in ids)
    questions = [re.sub(r"[^a-z0-9]+", " ", r["question"].lower()).strip() for r in RECORDS]
    assert len(set(questions)) == len(questions)
    sqls = [" ".join(r["sql"].split()) for r in RECORDS]
    assert len(set(sqls)) == len(sqls)
    assert all("split" not in r for r in RECORDS)


@pytest.mark.parametrize("rec", RECORDS, ids=[r["id"] for r in RECORDS])
def test_record_sql_is_valid_and_grounded(rec):
    sql, ctx = rec["sql"], rec["context"]
    assert rec["question"].strip() and set(ctx) == {"tables", "joins", "columns", "synonyms", "security_filters"}
    assert read_only_problem(sql) is None, read_only_problem(sql)
    assert style_problem(sql) is None, style_problem(sql)
    assert unknown_names(sql, ctx) is None, unknown_names(sql, ctx)
    ctx_tables = {t["name"]: {c["name"] for c in t["columns"]} for t in ctx["tables"]}
    used = tables_used(sqlglot.parse_one(sql, read="oracle"))
    assert len(set(ctx_tables) - used) == 1, "context = used tables + exactly one distractor"
    for col in ctx["columns"]:
        t, c = col.split(".")
        assert t in used and c in ctx_tables[t], col
    # the record must carry the schema's filter for every context table that has one, and the SQL must apply it
    expected = sorted(t for t in ctx_tables if t in SCHEMA["security_filters"])
    assert sorted(f["table"] for f in ctx["security_filters"]) == expected
    filters = {f["table"]: f for f in ctx["security_filters"]}
    assert unfiltered_tables(sql, filters) == []


def test_raw_file_is_what_the_script_writes(tmp_path):
    spec = importlib.util.spec_from_file_location("make_demo_raw", DEMO / "make_demo_raw.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--out-dir", str(tmp_path)]) == 0
    for name in ("raw_questions.jsonl", "ebs_catalog.json"):
        assert (tmp_path / name).read_bytes() == (DEMO / name).read_bytes(), name
