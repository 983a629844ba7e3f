"""Layer 5 (optional Oracle EXPLAIN PLAN): what runs without an Oracle server here, plus a real-DB test.

No Oracle server exists on this machine, so: the exact statements sent, the ORA-/DPY- mapping, the configured
timeouts (against a real listener that accepts and then stays silent, and a closed port), secrets never printed,
and that rejected SQL never opens a connection. test_real_oracle_* run only when ORACLE_DSN (and
ORACLE_USER / ORACLE_PASSWORD) point at a staging database.
"""
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import oracle_explain as ox
import sql_guardrail as g
from artifacts import StageError

SCRIPT = Path(__file__).resolve().parents[1] / "custom_oracle_llama" / "inference" / "sql_guardrail.py"
SECRET = "Tr0ub4dor&3-never-print"


def test_explain_statements_are_exact():
    sql = "SELECT ai.invoice_num FROM ap_invoices_all ai WHERE ai.org_id IN (:org_ids)"
    assert ox.explain_statements(sql, "GUARD_ABC123") == [
        "SET TRANSACTION READ ONLY",
        "EXPLAIN PLAN SET STATEMENT_ID = 'GUARD_ABC123' FOR "
        "SELECT ai.invoice_num FROM ap_invoices_all ai WHERE ai.org_id IN (:org_ids)",
    ]


@pytest.mark.parametrize("sid", ["", "x'; DROP TABLE t --", "A" * 31, "a b"])
def test_statement_id_cannot_inject(sid):
    with pytest.raises(StageError, match="statement id"):
        ox.explain_statements("SELECT 1 FROM dual", sid)


@pytest.mark.parametrize("timeout_s,call_ms", [(10, 10000), (0.25, 250), (2.5, 2500), (0.0004, 1)])
def test_timeouts_as_configured(timeout_s, call_ms):
    params, call_timeout = ox.explain_connect_params("db:1521/EBS", "apps_ro", timeout_s)
    assert params == {"dsn": "db:1521/EBS", "user": "apps_ro", "tcp_connect_timeout": float(timeout_s),
                      "retry_count": 0}
    assert call_timeout == call_ms and "password" not in params


@pytest.mark.parametrize("dsn,user,timeout_s,match", [
    ("", "u", 5, "DSN and a user"), ("db/X", "", 5, "DSN and a user"), ("db/X", "u", 0, "> 0"),
    ("db/X", "u", -1, "> 0"),
])
def test_bad_explain_config(dsn, user, timeout_s, match):
    with pytest.raises(StageError, match=match):
        ox.explain_connect_params(dsn, user, timeout_s)


ORA_CASES = [
    ('ORA-00904: "AI"."INVOICE_TOTAL": invalid identifier', "invalid identifier", '"AI"."INVOICE_TOTAL"'),
    ("ORA-00942: table or view does not exist", "table or view does not exist", "ORA-00942"),
    ("ORA-00918: column ambiguously defined", "qualify it with its table alias", "ORA-00918"),
    ("ORA-00979: not a GROUP BY expression", "not a GROUP BY expression", "ORA-00979"),
    ("ORA-00937: not a single-group group function", "add the non-aggregated columns", "ORA-00937"),
    ("ORA-01719: outer join operator (+) not allowed in operand of OR or IN", "outer join operator", "ORA-01719"),
    ("ORA-06553: PLS-306: wrong number or types of arguments in call to 'GET_STATUS'", "PL/SQL function",
     "GET_STATUS"),
    ("ORA-01013: user requested cancel of current operation", "exceeded the 3s statement timeout", "timeout"),
    ("DPY-4024: call timeout of 3000 ms exceeded", "exceeded the 3s statement timeout", "simplify"),
    ("ORA-99999: something new\nHelp: https://docs.oracle.com/error-help/db/ora-99999/", "ORA-99999: something new",
     "Oracle rejected the query"),
]


@pytest.mark.parametrize("message,meaning,detail", ORA_CASES)
def test_ora_errors_become_feedback(message, meaning, detail):
    text = ox.map_oracle_error(message, timeout_s=3)
    assert meaning in text and detail in text
    assert "\n" not in text and "docs.oracle.com" not in text


@pytest.mark.parametrize("message,infra", [
    ("ORA-01017: invalid credential or not authorized; logon denied", True),
    ("ORA-12541: Cannot connect. No listener at host db port 1521.", True),
    ("ORA-01456: may not perform insert/delete/update operation inside a READ ONLY transaction", True),
    ("ORA-02402: PLAN_TABLE not found", True),
    ("DPY-6005: cannot connect to database", True),
    ("DPY-4024: call timeout of 3000 ms exceeded", False),
    ('ORA-00904: "X": invalid identifier', False),
    ("ORA-00942: table or view does not exist", False),
])
def test_infrastructure_errors_are_not_blamed_on_the_model(message, infra):
    assert ox._is_infra(message) is infra


@pytest.fixture
def silent_listener():
    """A real TCP listener that accepts connections and never answers (a hung or firewalled DB)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    accepted = []

    def loop():
        while True:
            try:
                accepted.append(srv.accept()[0])
            except OSError:
                return

    threading.Thread(target=loop, daemon=True).start()
    yield f"127.0.0.1:{srv.getsockname()[1]}/EBSDEV", accepted
    srv.close()
    for c in accepted:
        c.close()


def _closed_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_connect_timeout_is_enforced_on_a_silent_listener(silent_listener):
    dsn, accepted = silent_listener
    t0 = time.perf_counter()
    with pytest.raises(StageError, match=r"no answer within 1\.0s") as err:
        ox.explain_oracle("SELECT 1 FROM dual", dsn, "apps_ro", SECRET, 1.0)
    assert 0.9 <= time.perf_counter() - t0 < 4
    assert accepted and SECRET not in str(err.value)


def test_refused_connection_is_one_clear_error_without_the_password():
    dsn = f"127.0.0.1:{_closed_port()}/EBSDEV"
    with pytest.raises(StageError, match="cannot connect to Oracle DSN") as err:
        ox.explain_oracle("SELECT 1 FROM dual", dsn, "apps_ro", SECRET, 5)
    assert SECRET not in str(err.value) and "DPY-6005" in str(err.value)


def test_rejected_sql_never_reaches_the_database(silent_listener):
    dsn, accepted = silent_listener
    explain = {"dsn": dsn, "user": "apps_ro", "password": SECRET, "timeout_s": 1.0}
    v = g.check_sql("DELETE FROM ap_invoices_all", explain=explain)
    assert not v["ok"] and "explain" not in v["checks"]
    v = g.check_sql("SELECT invoice_total FROM ap_invoices_all", catalog={"AP_INVOICES_ALL": {"INVOICE_ID": "N"}},
                    explain=explain)
    assert not v["ok"] and "explain" not in v["checks"]
    time.sleep(0.2)
    assert accepted == []
    # A query that passes layers 1-4 is explained: here the DB hangs, which is a config error, not a verdict.
    with pytest.raises(StageError, match="no answer within"):
        g.check_sql("SELECT 1 FROM dual", explain=explain)
    assert len(accepted) == 1


@pytest.mark.slow
def test_cli_explain_failure_exits_2_and_hides_password():
    r = subprocess.run([sys.executable, str(SCRIPT), "check", "--explain-dsn", f"127.0.0.1:{_closed_port()}/EBS",
                        "--explain-timeout", "3"], input="SELECT 1 FROM dual", capture_output=True, text=True,
                       timeout=60, env={**os.environ, "ORACLE_USER": "apps_ro",
                                        "ORACLE_PASSWORD": SECRET})
    assert r.returncode == 2 and r.stdout == ""
    assert "cannot connect to Oracle DSN" in r.stderr and SECRET not in r.stderr and "Traceback" not in r.stderr


REAL_DB = pytest.mark.skipif(not os.environ.get("ORACLE_DSN"),
                             reason="no Oracle server on this machine: set ORACLE_DSN, ORACLE_USER and "
                                    "ORACLE_PASSWORD to a staging database to run the real EXPLAIN tests")


def _real():
    return (os.environ["ORACLE_DSN"], os.environ.get("ORACLE_USER", ""),
            os.environ.get("ORACLE_PASSWORD", ""))


@REAL_DB
def test_real_oracle_explain_accepts_a_valid_query():
    dsn, user, password = _real()
    assert ox.explain_oracle("SELECT d.dummy, SYSDATE FROM dual d WHERE d.dummy = :x", dsn, user, password, 10) == []


@REAL_DB
@pytest.mark.parametrize("sql,code", [
    ("SELECT d.no_such_column FROM dual d", "ORA-00904"),
    ("SELECT 1 FROM no_such_table_guardrail_test", "ORA-00942"),
    ("SELECT dummy, COUNT(*) FROM dual", "ORA-00937"),
])
def test_real_oracle_explain_maps_errors(sql, code):
    dsn, user, password = _real()
    reasons = ox.explain_oracle(sql, dsn, user, password, 10)
    assert len(reasons) == 1 and code in reasons[0] and reasons[0].startswith("Oracle rejected the query")


def test_list_binds_expand_for_execution():
    from oracle_explain import expand_list_binds
    sql, flat = expand_list_binds("SELECT I.INVOICE_NUM FROM AP_INVOICES_ALL I WHERE I.ORG_ID IN (:org_ids) "
                                  "AND I.VENDOR_ID = :vendor", {"ORG_IDS": [204, 205], "vendor": 7})
    assert "IN (:org_ids_0, :org_ids_1)" in sql and flat == {"org_ids_0": 204, "org_ids_1": 205, "vendor": 7}
    with pytest.raises(StageError, match="outside IN"):
        expand_list_binds("SELECT :org_ids FROM DUAL", {"org_ids": [1, 2]})


def test_execute_on_unreachable_oracle_is_one_clear_error():
    from oracle_explain import execute_oracle
    with pytest.raises(StageError, match="cannot connect to Oracle DSN 127.0.0.1:9/EBSSTG") as e:
        execute_oracle("SELECT 1 FROM DUAL", "127.0.0.1:9/EBSSTG", "guard", "s3cret-pw", 3)
    assert "s3cret-pw" not in str(e.value)
