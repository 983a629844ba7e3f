"""Guardrail v2, one table per rule family: attack classes (each row asserts the reason code and a reason fragment),
real read-only EBS SQL that must pass, MOAC required by the policy, real-size catalogs, and a property test that
injects unsafe fragments into random read-only queries over the catalog.

The attack rows stand for classes: several spellings of each are listed so that a fix of one example fails here.
"""
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sql_guardrail as g
from artifacts import StageError
from guardrail.codes import CODES
from test_sql_guardrail import CATALOG
from test_guardrail_cli import fake_server  # noqa: F401 (fixture)
from serving import send_json

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "custom_oracle_llama" / "inference" / "sql_guardrail.py"
DEMO_CATALOG = g.load_catalog(ROOT / "custom_oracle_llama" / "demo" / "ebs_catalog.json")
F = "org_id IN (:org_ids)"  # the MOAC predicate the shipped policy requires on every *_ALL table with ORG_ID


@pytest.fixture(scope="module")
def policy():
    return g.load_policy()


def check(sql, policy, catalog=CATALOG, filters=None):
    return g.check_sql(sql, catalog=catalog, policy=policy, security_filters=filters)


# ------------------------------------------------------------------------------------------ attack classes
ATTACKS = [
    # package functions without parentheses (Oracle calls A.B when no source A is in scope)
    ("niladic package", "SELECT XX_PAY_PKG.RELEASE_ALL_HOLDS FROM dual", "unsafe", "XX_PAY_PKG.RELEASE_ALL_HOLDS"),
    ("niladic package, apps-qualified", "SELECT apps.xx_pay_pkg.release_all_holds FROM dual", "unsafe",
     "XX_PAY_PKG.RELEASE_ALL_HOLDS"),
    ("niladic package in where", f"SELECT invoice_num FROM ap_invoices_all WHERE {F} AND xx_ap.purge_all IS NULL",
     "unsafe", "XX_AP.PURGE_ALL"),
    ("niladic package in order by", f"SELECT invoice_num FROM ap_invoices_all WHERE {F} ORDER BY xx.run_job", "unsafe",
     "XX.RUN_JOB"),
    ("undefined alias is a function call", f"SELECT x.invoice_num FROM ap_invoices_all ai WHERE ai.{F}", "unsafe",
     "no table or alias X in scope"),
    ("package call with parentheses", "SELECT xx_pay_pkg.release_all_holds(1) FROM dual", "unsafe", "allowlist"),
    ("quoted package", 'SELECT "XX_PAY_PKG"."RELEASE" FROM dual', "unsafe", "XX_PAY_PKG.RELEASE"),
    # database links, however spaced
    ("db link with spaces", f"SELECT invoice_num FROM ap_invoices_all @ prod_link WHERE {F}", "unsafe", "database link"),
    ("db link no spaces", f"SELECT invoice_num FROM ap_invoices_all@prod_link WHERE {F}", "unsafe", "database link"),
    ("db link in subquery", f"SELECT 1 FROM dual WHERE EXISTS (SELECT 1 FROM fnd_user @ x)", "unsafe", "database link"),
    ("db link, aliased", f"SELECT a.invoice_num FROM ap_invoices_all @prod a WHERE a.{F}", "unsafe", "database link"),
    # star expansion anywhere over a table with secret columns
    ("json_object(*)", "SELECT JSON_OBJECT(*) FROM fnd_user", "unsafe", "would expose blocked column"),
    ("json_arrayagg(json_object(*))", "SELECT JSON_ARRAYAGG(JSON_OBJECT(*)) FROM fnd_user", "unsafe",
     "would expose blocked column"),
    ("t.* over fnd_user", "SELECT fu.* FROM fnd_user fu", "unsafe", "would expose blocked column"),
    ("star in inline view", "SELECT x.user_name FROM (SELECT * FROM fnd_user) x", "unsafe", "would expose"),
    ("secret column by name in function", "SELECT LENGTH(encrypted_user_password) FROM fnd_user", "unsafe",
     "holds secrets"),
    # query languages inside strings
    ("xquery collection", "SELECT x.c FROM XMLTABLE('for $i in fn:collection(\"oradb:/APPLSYS/FND_USER\") return $i' "
                          "COLUMNS c VARCHAR2(100) PATH 'USER_NAME') x", "unsafe", "XQuery"),
    ("xquery ora:view", "SELECT x.c FROM XMLTABLE('ora:view(\"FND_USER\")' COLUMNS c VARCHAR2(100) PATH 'X') x",
     "unsafe", "XQuery"),
    ("xquery doc()", "SELECT x.c FROM XMLTABLE('doc(\"/public/x.xml\")/a' COLUMNS c VARCHAR2(9) PATH 'b') x",
     "unsafe", "XQuery"),
    ("xquery unknown function", "SELECT x.c FROM XMLTABLE('xx:read(\"t\")' COLUMNS c VARCHAR2(9) PATH 'b') x",
     "unsafe", "XQuery"),
    ("xml external entity", "SELECT XMLTYPE('<!DOCTYPE x [<!ENTITY e SYSTEM \"http://evil/x\">]><x>&e;</x>') "
                            "FROM dual", "unsafe", "DTD/entity"),
    ("xml built from pieces", "SELECT XMLTYPE('<' || CHR(33) || 'DOCTYPE x><x/>') FROM dual", "unsafe",
     "built from pieces"),
    # columns nobody checked
    ("pivot aggregate column", "SELECT * FROM (SELECT vendor_id, invoice_currency_code, invoice_amount FROM "
                               f"ap_invoices_all WHERE {F}) PIVOT (SUM(invoice_amountx) FOR invoice_currency_code IN "
                               "('USD' AS usd)) p", "unknown_column", "INVOICE_AMOUNTX"),
    ("unpivot column", "SELECT vendor_id, kind, v FROM (SELECT vendor_id, invoice_amount FROM ap_invoices_all WHERE "
                       f"{F}) UNPIVOT (v FOR kind IN (invoice_amount AS 'I', amount_due AS 'D'))", "unknown_column",
     "AMOUNT_DUE"),
    ("using column", f"SELECT ai.invoice_num FROM ap_invoices_all ai JOIN ap_invoice_lines_all l USING (invoice_idx) "
                     f"WHERE ai.{F} AND l.{F}", "unknown_column", "INVOICE_IDX"),
    ("having column", f"SELECT vendor_id FROM ap_invoices_all WHERE {F} GROUP BY vendor_id HAVING "
                      "SUM(secret_amount) > 0", "unknown_column", "SECRET_AMOUNT"),
    # flashback
    ("as of scn", f"SELECT invoice_num FROM ap_invoices_all AS OF SCN 1234 WHERE {F}", "unsafe", "flashback"),
    ("as of timestamp", f"SELECT invoice_num FROM ap_invoices_all AS OF TIMESTAMP SYSDATE - 1 WHERE {F}", "unsafe",
     "flashback"),
    ("versions between", f"SELECT invoice_num FROM ap_invoices_all VERSIONS BETWEEN SCN MINVALUE AND MAXVALUE "
                         f"WHERE {F}", "unsafe", "VERSIONS BETWEEN"),
    # secrets through allowlisted helpers
    ("profile password", "SELECT FND_PROFILE.VALUE('GUEST_USER_PWD') FROM dual", "unsafe", "GUEST_USER_PWD"),
    ("profile password, lower case", "SELECT apps.fnd_profile.value('guest_user_pwd') FROM dual", "unsafe",
     "GUEST_USER_PWD"),
    ("profile option from a bind", "SELECT fnd_profile.value(:p) FROM dual", "unsafe", "literal"),
    ("sys_context host", "SELECT SYS_CONTEXT('USERENV', 'HOST') FROM dual", "unsafe", "USERENV.HOST"),
    ("sys_context ip", "SELECT SYS_CONTEXT('userenv', 'ip_address') FROM dual", "unsafe", "USERENV.IP_ADDRESS"),
    ("sys_context os user", "SELECT SYS_CONTEXT('USERENV', 'OS_USER') FROM dual", "unsafe", "OS_USER"),
    ("userenv terminal", "SELECT USERENV('TERMINAL') FROM dual", "unsafe", "USERENV.TERMINAL"),
    # inline PL/SQL
    ("with function", "WITH FUNCTION f RETURN NUMBER IS BEGIN RETURN 1; END; SELECT f FROM dual", "unsafe",
     "inline PL/SQL"),
    ("with procedure", "WITH PROCEDURE p IS BEGIN NULL; END; SELECT 1 FROM dual", "unsafe", "inline PL/SQL"),
    # blocked packages however written
    ("dbms_random without parentheses", "SELECT DBMS_RANDOM.VALUE FROM dual", "unsafe", "DBMS_RANDOM"),
    ("dbms_lob write function", "SELECT DBMS_LOB.WRITEAPPEND(x, 1, 'a') FROM dual", "unsafe", "DBMS_LOB"),
    ("utl_http", "SELECT UTL_HTTP.REQUEST('http://evil') FROM dual", "unsafe", "UTL_HTTP"),
    # dictionary views that reveal code, grants and links (also without a catalog)
    ("all_source", "SELECT text FROM all_source WHERE name = 'XX_PAY_PKG'", "unsafe", "ALL_SOURCE"),
    ("user_role_privs", "SELECT * FROM user_role_privs", "unsafe", "USER_ROLE_PRIVS"),
    ("quoted v$", 'SELECT * FROM "V$SESSION"', "unsafe", "V$SESSION"),
    # obfuscated spellings of blocked names
    ("comments inside a dotted name", "SELECT DBMS_RANDOM/**/./**/VALUE FROM dual", "unsafe", "DBMS_RANDOM"),
    ("quoted blocked package", 'SELECT "DBMS_RANDOM"."VALUE" FROM dual', "unsafe", "DBMS_RANDOM"),
    ("quoted sys_context", "SELECT \"SYS_CONTEXT\"('USERENV', 'HOST') FROM dual", "unsafe", "USERENV.HOST"),
    ("package inside TABLE()", "SELECT * FROM TABLE(xx_pkg.get_rows)", "unsafe", "XX_PKG.GET_ROWS"),
    ("blind secret extraction in WHERE", "SELECT 1 FROM dual WHERE 1 = (SELECT COUNT(*) FROM fnd_user WHERE "
                                         "encrypted_user_password LIKE 'A%')", "unsafe", "holds secrets"),
    # object methods and unknown functions
    ("uri type fetch", "SELECT HTTPURITYPE('http://evil/x').GETCLOB() FROM dual", "unsafe", "HTTPURITYPE"),
    ("unknown function", "SELECT xx_purge(1) FROM dual", "unsafe", "XX_PURGE"),
]


@pytest.mark.parametrize("name,sql,code,fragment", ATTACKS, ids=[r[0] for r in ATTACKS])
def test_attack_classes_are_rejected_with_their_code(name, sql, code, fragment, policy):
    v = check(sql, policy)
    assert not v["ok"] and v["sql"] is None
    assert code in v["codes"], (v["codes"], v["reasons"])
    assert any(fragment.upper() in r.upper() for r in v["reasons"]), v["reasons"]
    assert set(v["codes"]) <= set(CODES)


@pytest.mark.parametrize("name,sql,code,fragment",
                         [r for r in ATTACKS if r[2] == "unsafe" and "secret" not in r[0]],
                         ids=[r[0] for r in ATTACKS if r[2] == "unsafe" and "secret" not in r[0]])
def test_attack_classes_are_rejected_without_a_catalog(name, sql, code, fragment, policy):
    """Deny by default does not depend on the catalog for anything that is not a table/column existence question."""
    v = g.check_sql(sql, policy=policy)
    assert not v["ok"] and "unsafe" in v["codes"], v["reasons"]


# ------------------------------------------------------------------------------- real read-only EBS SQL passes
REAL = [
    ("exact allowlist entry beats DBMS_* block", f"SELECT DBMS_LOB.SUBSTR(description, 100, 1), "
                                                 f"DBMS_LOB.GETLENGTH(description) FROM ap_invoices_all WHERE {F}"),
    ("numeric binds", f"SELECT invoice_num FROM ap_invoices_all WHERE {F} AND invoice_id = :1 AND vendor_id = :2"),
    ("alias named like a blocked schema", "SELECT sys.invoice_num FROM ap_invoices_all sys WHERE sys.org_id IN "
                                          "(:org_ids)"),
    ("alias matching a blocked glob", "SELECT owa_l.invoice_num FROM ap_invoices_all owa_l WHERE owa_l.org_id IN "
                                      "(:org_ids)"),
    ("quoted column alias with @", f'SELECT invoice_num "inv@num" FROM ap_invoices_all WHERE {F}'),
    ("connect by prior (expr)", "SELECT person_id FROM per_all_assignments_f START WITH supervisor_id IS NULL "
                                "CONNECT BY PRIOR (person_id) = supervisor_id"),
    ("built-in REVERSE", f"SELECT REVERSE(invoice_num) FROM ap_invoices_all WHERE {F}"),
    ("--+ comment mid-query is a comment", f"SELECT invoice_num --+ not a hint\nFROM ap_invoices_all WHERE {F}"),
    ("union all order by output alias", f"SELECT invoice_num AS n FROM ap_invoices_all WHERE {F} UNION ALL "
                                        f"SELECT invoice_num FROM ap_invoices_all WHERE {F} ORDER BY n"),
    ("union order by position", f"SELECT invoice_num FROM ap_invoices_all WHERE {F} UNION SELECT segment1 FROM "
                                f"po_headers_all WHERE {F} ORDER BY 1"),
    ("curated EBS helpers", f"SELECT FND_DATE.DATE_TO_CANONICAL(invoice_date), FND_MESSAGE.GET_STRING('SQLAP', "
                            "'AP_X'), GL_CURRENCY_API.GET_RATE(invoice_currency_code, 'USD', invoice_date, 'Corporate'), "
                            "HR_GENERAL.DECODE_LOOKUP('YES_NO', 'Y') FROM ap_invoices_all WHERE " + F),
    ("flex xml publisher api", "SELECT FND_FLEX_XML_PUBLISHER_APIS.PROCESS_KFF_COMBINATION_1('x', 'SQLGL', 'GL#', 101, "
                               "gcc.chart_of_accounts_id, gcc.code_combination_id, 'ALL', 'Y', 'VALUE') FROM "
                               "gl_code_combinations gcc"),
    ("allowed profile and sys_context", "SELECT FND_PROFILE.VALUE('GL_SET_OF_BKS_ID'), SYS_CONTEXT('USERENV', "
                                        "'LANG'), USERENV('LANGUAGE') FROM dual"),
    ("lines filtered through their header's org_id", "SELECT ph.segment1, pl.line_num FROM po_headers_all ph JOIN "
                                                     "po_lines_all pl ON pl.po_header_id = ph.po_header_id AND "
                                                     f"pl.org_id = ph.org_id WHERE ph.{F}"),
    ("bind name case", "SELECT invoice_num FROM ap_invoices_all WHERE org_id IN (:ORG_IDS)"),
    ("quoted upper-case names", 'SELECT "INVOICE_NUM" FROM "AP_INVOICES_ALL" WHERE "ORG_ID" IN (:org_ids)'),
    ("xml navigation", "SELECT x.c FROM XMLTABLE('/rows/row' PASSING XMLTYPE('<rows><row><c>1</c></row></rows>') "
                       "COLUMNS c VARCHAR2(9) PATH 'c/text()') x"),
]


@pytest.mark.parametrize("name,sql", REAL, ids=[r[0] for r in REAL])
def test_real_read_only_sql_is_not_blocked(name, sql, policy):
    v = check(sql, policy)
    assert v["ok"], v["reasons"]


def _report_queries():
    text = (ROOT / "tests" / "data" / "ebs_read_only_reports.sql").read_text()
    return [(b.partition("\n")[0], b.partition("\n")[2].strip()) for b in text.split("-- name: ")[1:]]


REPORTS = _report_queries()


@pytest.mark.parametrize("name,sql", REPORTS, ids=[r[0] for r in REPORTS])
def test_ebs_report_fixtures_pass_on_the_demo_catalog(name, sql, policy):
    """tests/data/ebs_read_only_reports.sql: read-only EBS reports in the styles real sites write (old outer joins,
    ROLLUP/GROUPING SETS, analytics, PIVOT/UNPIVOT, hierarchies, curated helpers, positional binds), MOAC applied."""
    v = g.check_sql(sql, catalog=DEMO_CATALOG, policy=policy)
    assert v["ok"], v["reasons"]


def test_report_fixtures_fail_once_their_moac_filter_is_dropped(policy):
    """The same reports with every `IN (:org_ids)` widened to a literal list are all refused: the fixtures exercise
    the MOAC rule, they do not pass because nothing is checked."""
    secured = [(n, s) for n, s in REPORTS if "(:org_ids)" in s and "hr_operating_units" not in s]
    assert len(secured) >= 25
    for name, sql in secured:
        v = g.check_sql(sql.replace("(:org_ids)", "(81, 204)"), catalog=DEMO_CATALOG, policy=policy)
        assert not v["ok"] and "security_filter" in v["codes"], name


def test_flashback_switch_works(policy):
    sql = f"SELECT invoice_num FROM ap_invoices_all AS OF TIMESTAMP SYSDATE - 1 WHERE {F}"
    assert "unsafe" in check(sql, policy)["codes"]
    assert check(sql, {**policy, "allow_flashback": True})["ok"]


def test_optimizer_hints_switch_works(policy):
    sql = f"SELECT /*+ INDEX(ai ap_invoices_n1) LEADING(ai) */ ai.invoice_num FROM ap_invoices_all ai WHERE ai.{F}"
    v = check(sql, policy)
    assert not v["ok"] and "unsafe" in v["codes"] and "hint" in v["reasons"][0]
    assert check(sql, {**policy, "allow_optimizer_hints": True})["ok"]


# ------------------------------------------------------------------------------------ MOAC from the policy
MOAC = [
    ("no context, no filter", "SELECT invoice_num FROM ap_invoices_all", False),
    ("filter present", f"SELECT invoice_num FROM ap_invoices_all WHERE {F}", True),
    ("inside EXISTS", "SELECT vendor_name FROM ap_suppliers s WHERE EXISTS (SELECT 1 FROM ap_invoices_all i WHERE "
                      "i.vendor_id = s.vendor_id)", False),
    ("inside EXISTS, filtered", "SELECT vendor_name FROM ap_suppliers s WHERE EXISTS (SELECT 1 FROM ap_invoices_all "
                                f"i WHERE i.vendor_id = s.vendor_id AND i.{F})", True),
    ("in a CTE, filtered outside", f"WITH x AS (SELECT * FROM ap_invoices_all) SELECT invoice_num FROM x WHERE {F}",
     False),
    ("one UNION branch unfiltered", f"SELECT invoice_num FROM ap_invoices_all WHERE {F} UNION SELECT invoice_num FROM "
                                    "ap_invoices_all", False),
    ("neutralised by OR", f"SELECT invoice_num FROM ap_invoices_all WHERE {F} OR invoice_num = 'x'", False),
    ("widened list", "SELECT invoice_num FROM ap_invoices_all WHERE org_id IN (:org_ids, 999)", False),
    ("literal org", "SELECT invoice_num FROM ap_invoices_all WHERE org_id = 204", False),
    ("scalar subquery", f"SELECT (SELECT COUNT(*) FROM ap_checks_all c WHERE c.vendor_id = s.vendor_id) FROM "
                        "ap_suppliers s", False),
    ("table without ORG_ID is free", "SELECT vendor_name FROM ap_suppliers", True),
    ("non-_ALL table is free", "SELECT full_name FROM per_all_people_f", True),
]


@pytest.mark.parametrize("name,sql,ok", MOAC, ids=[r[0] for r in MOAC])
def test_required_filters_come_from_the_policy(name, sql, ok, policy):
    v = check(sql, policy)  # no context filters at all: the policy alone decides
    assert v["ok"] is ok, v["reasons"]
    if not ok:
        assert v["codes"] == ["security_filter"] and all("ORG_ID" in r for r in v["reasons"])


def test_context_filters_add_to_the_policy_never_remove(policy):
    loose = [{"table": "AP_INVOICES_ALL", "column": "ORG_ID", "predicate": "ORG_ID = 204"}]
    v = check("SELECT invoice_num FROM ap_invoices_all WHERE org_id = 204", policy, filters=loose)
    assert not v["ok"] and "must be ORG_ID IN (:org_ids)" in " ".join(v["reasons"])
    v = check(f"SELECT invoice_num FROM ap_invoices_all WHERE {F} AND org_id = 204", policy, filters=loose)
    assert v["ok"], v["reasons"]


@pytest.mark.parametrize("predicate,sql", [
    ("ORG_ID = :p_org_id", "SELECT invoice_num FROM ap_invoices_all i WHERE :P_ORG_ID = i.org_id"),
    ("ORG_ID = FND_PROFILE.VALUE('ORG_ID')", "SELECT invoice_num FROM ap_invoices_all c WHERE c.org_id = "
                                             "fnd_profile.value('ORG_ID')"),
    ("ORG_ID IN (:org_ids)", 'SELECT invoice_num FROM ap_invoices_all a WHERE "A"."ORG_ID" IN (:Org_Ids)'),
])
def test_predicates_compare_semantically(predicate, sql, policy):
    custom = {**policy, "required_filters": [{"tables": ["*_ALL"], "column": "ORG_ID", "predicate": predicate}]}
    v = check(sql, custom)
    assert v["ok"], v["reasons"]


def test_without_a_catalog_required_filters_are_listed_as_skipped(policy):
    v = g.check_sql("SELECT invoice_num FROM ap_invoices_all", policy=policy)
    assert any("required_filters" in s for s in v["skipped"])


def test_verdict_names_the_binds(policy):
    v = check(f"SELECT invoice_num FROM ap_invoices_all WHERE {F} AND invoice_id = :inv", policy)
    assert v["ok"] and v["binds"] == ["inv", "org_ids"]


def test_bad_required_filter_is_a_config_error(tmp_path):
    text = g.POLICY_PATH.read_text().replace('predicate: "ORG_ID IN (:org_ids)"', 'predicate: "ORG_ID IN ("')
    (tmp_path / "p.yaml").write_text(text)
    with pytest.raises(StageError, match="does not parse"):
        g.load_policy(tmp_path / "p.yaml")


# ------------------------------------------------------------------------------------------ catalogs
def test_indexed_catalog_matches_json_and_reads_lazily(tmp_path, policy):
    (tmp_path / "c.json").write_text(json.dumps(CATALOG))
    g.build_catalog_index(tmp_path / "c.json", tmp_path / "c.sqlite")
    indexed = g.load_catalog(tmp_path / "c.sqlite")
    assert indexed.columns("AP_INVOICES_ALL") == CATALOG["AP_INVOICES_ALL"] and "NOPE" not in indexed
    for sql in [r[1] for r in ATTACKS[:12]] + [r[1] for r in REAL[:6]]:
        a, b = check(sql, policy, catalog=CATALOG), check(sql, policy, catalog=indexed)
        assert (a["ok"], a["codes"], a["reasons"]) == (b["ok"], b["codes"], b["reasons"])
    with sqlite3.connect(tmp_path / "c.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM columns").fetchone()[0] == sum(map(len, CATALOG.values()))


def test_csv_with_owner_keeps_schemas_apart(tmp_path, policy):
    (tmp_path / "c.csv").write_text("OWNER,TABLE_NAME,COLUMN_NAME,DATA_TYPE\nAP,XX_T,A,NUMBER\nPO,XX_T,B,NUMBER\n"
                                    "AP,XX_U,C,NUMBER\nXX,lower_t,c,NUMBER\n")
    cat = g.load_catalog(tmp_path / "c.csv")
    v = check("SELECT a FROM xx_t", policy, catalog=cat)
    assert not v["ok"] and "several schemas" in v["reasons"][0] and v["codes"] == ["unknown_table"]
    assert check("SELECT t.a FROM ap.xx_t t", policy, catalog=cat)["ok"]
    assert check("SELECT t.b FROM po.xx_t t", policy, catalog=cat)["ok"]
    assert check("SELECT t.a FROM po.xx_t t", policy, catalog=cat)["unknown_columns"] == ["XX_T.A"]
    # quoted lower-case names are case-sensitive: only a quoted reference matches
    assert check('SELECT "c" FROM "lower_t"', policy, catalog=cat)["ok"]
    assert check("SELECT c FROM lower_t", policy, catalog=cat)["unknown_tables"] == ["LOWER_T"]


@pytest.mark.slow
def test_catalog_cli_builds_an_index(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps(CATALOG))
    r = subprocess.run([sys.executable, str(SCRIPT), "catalog", "--from", str(tmp_path / "c.json"), "--out",
                        str(tmp_path / "c.sqlite")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "tables" in r.stderr and (tmp_path / "c.sqlite").is_file()
    r = subprocess.run([sys.executable, str(SCRIPT), "check", "--catalog", str(tmp_path / "c.sqlite")],
                       input="SELECT ai.nope FROM ap_invoices_all ai", capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and json.loads(r.stdout)["unknown_columns"] == ["AP_INVOICES_ALL.NOPE"]


@pytest.mark.slow
def test_batch_output_is_ascii_escaped(tmp_path):
    line = json.dumps({"text": f"SELECT invoice_num FROM ap_invoices_all WHERE description = 'a\u2028b' AND {F}"})
    r = subprocess.run([sys.executable, str(SCRIPT), "check", "--batch"], input=line + "\n", capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "\u2028" not in r.stdout and len(r.stdout.splitlines()) == 1 and json.loads(r.stdout)["ok"]


@pytest.mark.slow
@pytest.mark.parametrize("ctx,match", [
    ({"question": "q", "sql": "SELECT 1 FROM dual", "context": {}}, "whole raw record"),
    ({"tables": [], "filters": []}, "unknown context keys"),
    ([1, 2], "must be a JSON object"),
])
def test_context_file_of_the_wrong_shape_is_refused(ctx, match, tmp_path):
    (tmp_path / "ctx.json").write_text(json.dumps(ctx))
    r = subprocess.run([sys.executable, str(SCRIPT), "check", "--context", str(tmp_path / "ctx.json")],
                       input="SELECT 1 FROM dual", capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and match in r.stderr and "Traceback" not in r.stderr


# ------------------------------------------------------------------------------- property: inject unsafe parts
SAFE_TABLES = {t: sorted(c) for t, c in CATALOG.items() if t != "FND_USER"}
INJECTIONS = [  # (fragment placed in the select list, code it must produce)
    ("XX_PKG.DO_IT", "unsafe"), ("xx_pkg.do_it(1)", "unsafe"), ("DBMS_RANDOM.VALUE", "unsafe"),
    ("SYS_CONTEXT('USERENV', 'HOST')", "unsafe"), ("FND_PROFILE.VALUE('GUEST_USER_PWD')", "unsafe"),
    ("(SELECT COUNT(*) FROM v$session)", "unsafe"), ("(SELECT JSON_OBJECT(*) FROM fnd_user)", "unsafe"),
    ("(SELECT 1 FROM dual @ lnk)", "unsafe"), ("my_func(1)", "unsafe"), ("t0.no_such_column", "unknown_column"),
]


@st.composite
def read_only_query(draw):
    table = draw(st.sampled_from(sorted(SAFE_TABLES)))
    cols = draw(st.lists(st.sampled_from(SAFE_TABLES[table]), min_size=1, max_size=4, unique=True))
    where = [f"t0.{c} IS NOT NULL" for c in draw(st.lists(st.sampled_from(SAFE_TABLES[table]), max_size=2))]
    if "ORG_ID" in SAFE_TABLES[table] and table.endswith("_ALL"):
        where.append(f"t0.{F}")
    order = draw(st.booleans())
    sql = f"SELECT {', '.join('t0.' + c for c in cols)} FROM {table.lower()} t0"
    sql += (" WHERE " + " AND ".join(where)) if where else ""
    return sql + (f" ORDER BY t0.{cols[0]}" if order else "")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(read_only_query(), st.sampled_from(INJECTIONS))
def test_random_read_only_queries_pass_and_injections_are_caught(sql, injection):
    policy = g.load_policy()
    assert check(sql, policy)["ok"], sql
    fragment, code = injection
    injected = sql.replace("SELECT ", f"SELECT {fragment} AS x_, ", 1)
    v = check(injected, policy)
    assert not v["ok"] and code in v["codes"], (injected, v["reasons"])


@pytest.mark.slow
def test_ask_retrieves_the_context_when_none_is_given(fake_server, tmp_path):
    """No --context: the question's context comes from retrieval over the schema (the builder's retriever), and the
    prompt the model sees carries the retrieved tables."""
    url, srv = fake_server
    srv.answers = [(f"SELECT invoice_num FROM ap_invoices_all WHERE {F}", "stop")]
    demo = ROOT / "custom_oracle_llama" / "demo"
    r = subprocess.run([sys.executable, str(SCRIPT), "ask", "--base-url", url.removesuffix("/v1"), "--model", "ebs",
                        "--question", "How many unpaid invoices does each supplier have?", "--schema",
                        str(demo / "ebs_schema.json"), "--catalog", str(demo / "ebs_catalog.json")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["ok"] and out["retrieval"]["schema_sha256"]
    prompt = json.dumps(srv.requests[0])
    assert "AP_INVOICES_ALL" in prompt and "AP_SUPPLIERS" in prompt


@pytest.mark.slow
def test_ask_candidates_answers_with_the_majority_result(tmp_path):
    """--candidates 4: one request for 4 samples; the guardrail drops the unsafe one; of the three that run on the
    DuckDB mirror, the two that return the same rows (different SQL text) win over the higher-log-probability one."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    import threading
    texts = [("SELECT invoice_num FROM ap_invoices_all WHERE org_id IN (:org_ids) AND ROWNUM <= 1", -1.0),
             ("SELECT COUNT(*) FROM ap_invoices_all WHERE org_id IN (:org_ids)", -3.0),
             ("SELECT ai.invoice_num FROM ap_invoices_all ai WHERE ai.org_id IN (:org_ids) AND ROWNUM <= 1", -5.0),
             ("SELECT xx_pkg.purge(1) FROM dual", -0.5)]
    requests = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            requests.append(body)
            choices = [{"index": i, "finish_reason": "stop", "message": {"role": "assistant", "content": t},
                        "logprobs": {"content": [{"token": "x", "logprob": lp, "bytes": None, "top_logprobs": []}]}}
                       for i, (t, lp) in enumerate(texts[:body.get("n", 1)])]
            send_json(self, 200, {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                                  "choices": choices})

        def log_message(self, *a):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    demo = ROOT / "custom_oracle_llama" / "demo"
    try:
        r = subprocess.run([sys.executable, str(SCRIPT), "ask", "--base-url", f"http://127.0.0.1:{srv.server_address[1]}",
                            "--model", "ebs", "--question", "One invoice number", "--candidates", "4",
                            "--schema", str(demo / "ebs_schema.json"), "--catalog", str(demo / "ebs_catalog.json")],
                           capture_output=True, text=True, timeout=300)
    finally:
        srv.shutdown()
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(requests) == 1 and requests[0]["n"] == 4 and requests[0]["logprobs"] is True
    assert out["ok"] and out["selection"]["index"] in (0, 2) and out["selection"]["votes"] == 2
    assert [c["verdict"]["ok"] for c in out["candidates"]] == [True, True, True, False]
    assert "candidate 4: rejected" in r.stderr


@pytest.mark.slow
def test_ask_candidates_with_greedy_decoding_is_refused_before_any_request(tmp_path):
    demo = ROOT / "custom_oracle_llama" / "demo"
    r = subprocess.run([sys.executable, str(SCRIPT), "ask", "--base-url", "http://127.0.0.1:9", "--model", "ebs",
                        "--question", "One invoice number", "--candidates", "4", "--temperature", "0",
                        "--schema", str(demo / "ebs_schema.json"), "--catalog", str(demo / "ebs_catalog.json")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "give --temperature > 0" in r.stderr and "Traceback" not in r.stderr
