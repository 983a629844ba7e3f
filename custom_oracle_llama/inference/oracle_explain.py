"""Layer 5 of the SQL guardrail: EXPLAIN PLAN on a staging Oracle (python-oracledb thin mode), never executing the
statement: a read-only transaction, a connect deadline and a call timeout, ORA- errors mapped to feedback the model
can act on, infrastructure errors (login, listener, timeout) raised as one clear StageError. Credentials are never
printed. Called by sql_guardrail.check_sql(explain={...}) when layers 1-4 passed.

execute_oracle is the eval's execution-accuracy path on the same staging database: the query runs in a READ ONLY
transaction with the same call timeout, at most row_cap + 1 rows are fetched, and the transaction is rolled back.
"""
import re
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from artifacts import StageError  # noqa: E402


ORA_FEEDBACK = {
    "ORA-00904": "invalid identifier: a column or alias does not exist",
    "ORA-00942": "table or view does not exist (or the staging account cannot see it)",
    "ORA-00918": "column ambiguously defined: qualify it with its table alias",
    "ORA-00933": "SQL command not properly ended",
    "ORA-00936": "missing expression",
    "ORA-00907": "missing right parenthesis",
    "ORA-00911": "invalid character",
    "ORA-00923": "FROM keyword not found where expected",
    "ORA-00932": "inconsistent datatypes",
    "ORA-00937": "not a single-group group function: add the non-aggregated columns to GROUP BY",
    "ORA-00979": "not a GROUP BY expression",
    "ORA-00934": "group function is not allowed here (use HAVING for aggregate conditions)",
    "ORA-01722": "invalid number",
    "ORA-01719": "outer join operator (+) not allowed in an OR or IN operand",
    "ORA-01799": "a column may not be outer-joined to a subquery",
    "ORA-00920": "invalid relational operator",
    "ORA-00905": "missing keyword",
    "ORA-00957": "duplicate column name",
    "ORA-01031": "insufficient privileges on an object the query reads",
    "ORA-01039": "insufficient privileges on the underlying objects of a view",
    "ORA-06553": "PL/SQL function call failed to compile (wrong package function or arguments)",
    "ORA-30483": "window functions are not allowed here",
    "ORA-01436": "CONNECT BY loop in user data",
    "ORA-32039": "recursive WITH clause must have a column alias list",
    "ORA-00972": "identifier is too long",
    "ORA-01013": "EXPLAIN PLAN was cancelled: it exceeded the statement timeout",
}
# Errors about the connection/account, not the SQL: they must not be fed back to the model as its fault.
ORA_INFRA = {"ORA-01017", "ORA-12154", "ORA-12514", "ORA-12541", "ORA-12170", "ORA-28000", "ORA-28001",
             "ORA-01456", "ORA-02402", "ORA-01034", "ORA-12505", "ORA-03113", "ORA-03114", "ORA-12537"}
_STATEMENT_ID = re.compile(r"\A[A-Za-z0-9_]{1,30}\Z")


def explain_statements(sql, statement_id):
    """The exact statements explain_oracle sends, in order (the query itself is only ever explained)."""
    if not _STATEMENT_ID.match(statement_id):
        raise StageError(f"bad EXPLAIN statement id {statement_id!r}")
    return ["SET TRANSACTION READ ONLY", f"EXPLAIN PLAN SET STATEMENT_ID = '{statement_id}' FOR {sql}"]


def explain_connect_params(dsn, user, timeout_s):
    """oracledb.connect keyword arguments (password added by the caller) and the call timeout in ms."""
    if not dsn or not user:
        raise StageError("EXPLAIN needs a DSN and a user (ORACLE_DSN / ORACLE_USER)")
    if not timeout_s or timeout_s <= 0:
        raise StageError(f"EXPLAIN timeout must be > 0 seconds (got {timeout_s})")
    return {"dsn": dsn, "user": user, "tcp_connect_timeout": float(timeout_s), "retry_count": 0}, \
        max(1, int(round(timeout_s * 1000)))


def map_oracle_error(message, timeout_s=None):
    """One feedback line for the model from an Oracle/driver error message ('ORA-00904: "X": invalid identifier')."""
    text = str(message).strip().splitlines()[0] if str(message).strip() else "unknown Oracle error"
    m = re.search(r"\b(ORA|DPY|PLS)-(\d{4,5})", text)
    code = f"{m.group(1)}-{m.group(2)}" if m else None
    if code in ("DPY-4024", "ORA-01013") or "call timeout" in text.lower():
        return f"Oracle EXPLAIN PLAN exceeded the {timeout_s}s statement timeout: simplify the query"
    meaning = ORA_FEEDBACK.get(code)
    return f"Oracle rejected the query: {meaning} ({text})" if meaning else f"Oracle rejected the query: {text}"


def _is_infra(message):
    m = re.search(r"\b(ORA|DPY)-(\d{4,5})", str(message))
    if not m:
        return True
    code = f"{m.group(1)}-{m.group(2)}"
    return code in ORA_INFRA or (m.group(1) == "DPY" and code != "DPY-4024")


def _connect_with_deadline(oracledb, params, password, timeout_s, scrub):
    """oracledb.connect bounded by timeout_s end to end.

    tcp_connect_timeout only bounds the TCP connect: a listener that accepts and then stays silent hangs the thin
    handshake forever (seen here), so the connect runs in a daemon thread and is abandoned at the deadline.
    """
    import threading
    box = {}

    def run():
        try:
            box["conn"] = oracledb.connect(password=password, **params)
        except Exception as e:  # reported by the caller thread
            box["error"] = e

    worker = threading.Thread(target=run, name="oracle-explain-connect", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise StageError(f"cannot connect to Oracle DSN {params['dsn']} as {params['user']}: no answer within "
                         f"{timeout_s}s")
    if "error" in box:
        raise StageError(f"cannot connect to Oracle DSN {params['dsn']} as {params['user']}: "
                         f"{scrub(box['error'])}") from None
    return box["conn"]


def explain_oracle(sql, dsn, user, password, timeout_s) -> list:
    """EXPLAIN PLAN the query on a staging Oracle; [] when Oracle accepts it, else feedback lines.

    Read-only transaction, call timeout, rollback at the end; the query is never executed. Connection/account
    problems raise StageError (they are not the model's fault). The password never appears in any message.
    """
    import oracledb
    params, call_timeout_ms = explain_connect_params(dsn, user, timeout_s)
    statements = explain_statements(sql, f"GUARD_{uuid.uuid4().hex[:20].upper()}")

    def scrub(e):
        lines = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines() or [type(e).__name__]
        text = " / ".join(line.strip() for line in lines if line.strip())[:500]
        return text.replace(password, "***") if password else text

    conn = _connect_with_deadline(oracledb, params, password, timeout_s, scrub)
    try:
        conn.call_timeout = call_timeout_ms
        cur = conn.cursor()
        cur.execute(statements[0])
        cur.prepare(statements[1])
        # EXPLAIN PLAN does not need bind values, but the driver requires every placeholder to be bound.
        cur.execute(None, {name: None for name in cur.bindnames()})
        return []
    except oracledb.Error as e:
        if "ORA-01456" in str(e):
            raise StageError(f"{dsn} refuses EXPLAIN PLAN inside a READ ONLY transaction (it must insert into "
                             f"PLAN_TABLE): disable --explain-dsn for this database ({scrub(e)})") from None
        if _is_infra(e):
            raise StageError(f"EXPLAIN on {dsn} failed for a reason unrelated to the query: {scrub(e)}") from None
        return [map_oracle_error(scrub(e), timeout_s)]
    finally:
        # The plan rows go with the rollback; a dead link at the end must not mask the verdict.
        for end in (conn.rollback, conn.close):
            try:
                end()
            except oracledb.Error:
                pass


# ------------------------------------------------------------------------------- execute-and-fetch (eval EX)
def expand_list_binds(sql, binds):
    """`COL IN (:org_ids)` with a list value -> `COL IN (:org_ids_0, :org_ids_1)` and the flat bind dict.

    Oracle binds one scalar per placeholder; the eval's MOAC bind is a list of operating units."""
    import sqlglot
    from sqlglot import exp
    binds = {k.lower(): v for k, v in (binds or {}).items()}
    tree = sqlglot.parse_one(sql, read="oracle")
    flat = {}
    for ph in list(tree.find_all(exp.Placeholder)):
        value = binds.get(ph.name.lower())
        if isinstance(value, (list, tuple)):
            if not isinstance(ph.parent, exp.In):
                raise StageError(f"list bind :{ph.name} used outside IN (...)")
            names = [f"{ph.name.lower()}_{i}" for i in range(len(value))]
            flat.update(zip(names, value))
            rest = [e for e in ph.parent.expressions if e is not ph]
            ph.parent.set("expressions", rest + [exp.Placeholder(this=n) for n in names])
        else:
            flat[ph.name.lower()] = value
    return tree.sql(dialect="oracle"), flat


def execute_oracle(sql, dsn, user, password, timeout_s, row_cap=10000, binds=None) -> dict:
    """Run a query on a staging Oracle: read-only transaction, call timeout, at most row_cap + 1 rows fetched.

    Returns the execution-result shape of duckdb_explain.DuckDBMirror.execute: {status: ok|error|timeout|
    too_many_rows, columns, rows, detail, elapsed_ms}. Connection/account problems raise StageError.
    """
    import time
    import oracledb
    t0 = time.perf_counter()
    params, call_timeout_ms = explain_connect_params(dsn, user, timeout_s)
    text, flat = expand_list_binds(sql, binds)

    def scrub(e):
        lines = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines() or [type(e).__name__]
        out = " / ".join(line.strip() for line in lines if line.strip())[:500]
        return out.replace(password, "***") if password else out

    def done(status, detail="", columns=None, rows=None):
        return {"status": status, "detail": detail, "columns": columns, "rows": rows,
                "elapsed_ms": round((time.perf_counter() - t0) * 1000, 1)}

    conn = _connect_with_deadline(oracledb, params, password, timeout_s, scrub)
    try:
        conn.call_timeout = call_timeout_ms
        cur = conn.cursor()
        cur.execute("SET TRANSACTION READ ONLY")
        cur.arraysize = min(row_cap + 1, 1000)
        cur.prepare(text)
        cur.execute(None, {name: flat.get(name.lower()) for name in cur.bindnames()})
        rows = cur.fetchmany(row_cap + 1)
        columns = [d[0] for d in cur.description or []]
        if len(rows) > row_cap:
            return done("too_many_rows", f"more than {row_cap} rows", columns)
        return done("ok", "", columns, [list(r) for r in rows])
    except oracledb.Error as e:
        if _is_infra(e):
            raise StageError(f"query on {dsn} failed for a reason unrelated to the query: {scrub(e)}") from None
        timed_out = re.search(r"\b(DPY-4024|ORA-01013)\b", str(e)) or "call timeout" in str(e).lower()
        return done("timeout" if timed_out else "error", map_oracle_error(scrub(e), timeout_s))
    finally:
        for end in (conn.rollback, conn.close):
            try:
                end()
            except oracledb.Error:
                pass
