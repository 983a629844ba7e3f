"""check_sql: contract -> parse -> statement kind -> RULES (rules/__init__.py) -> optional EXPLAIN. Fails closed.

Verdict: {"ok", "sql" (normalized SQL, None unless ok), "candidate_sql", "reasons", "codes", "normalized",
"unknown_tables", "unknown_columns", "binds" (bind names the SQL uses, lower-case: the app passes their values from
the caller's identity), "checks", "skipped", "sqlglot", "elapsed_ms"}.
"""
import re
import time

import sqlglot
from sqlglot import exp
from sqlglot.dialects.dialect import Dialect
from sqlglot.errors import ErrorLevel, ParseError, TokenError
from sqlglot.optimizer.normalize_identifiers import normalize_identifiers
from sqlglot.tokens import TokenType

from artifacts import StageError
from guardrail.catalog import Catalog
from guardrail.policy import default_policy
from guardrail.query import Query
from guardrail.rules import RULES
from guardrail.rules.read_only import DML_NODES, STATEMENT_NODES
from guardrail.rules.security_filters import filters_for

ORACLE = Dialect.get_or_raise("oracle")
SQLGLOT_IMPL = {"version": getattr(sqlglot, "__version__", "unknown")}
_FENCE = re.compile(r"\A```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\r?\n(.*?)\r?\n?```\Z", re.S)
# Statement keywords sqlglot cannot parse for Oracle (PL/SQL, LOCK, FLASHBACK, ...): named in the reason, so the
# model learns why, instead of a bare parse error.
NON_QUERY_WORDS = {"BEGIN", "DECLARE", "EXEC", "EXECUTE", "CALL", "LOCK", "FLASHBACK", "PURGE", "SAVEPOINT",
                   "AUDIT", "NOAUDIT", "RENAME", "ALTER", "CREATE", "DROP", "TRUNCATE", "GRANT", "REVOKE", "INSERT",
                   "UPDATE", "DELETE", "MERGE", "COMMIT", "ROLLBACK", "SET", "EXPLAIN", "ANALYZE", "COMMENT",
                   "ASSOCIATE", "DISASSOCIATE", "UPSERT", "REPLACE", "SHUTDOWN", "STARTUP", "ADMINISTER"}


def first_line(message) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", str(message)).strip().splitlines()[0][:300]


def normalize_answer(text):
    """(sql or None, normalized steps, contract reasons). Strips one fence and one trailing ';'."""
    if text is None or not text.strip():
        return None, [], ["empty answer: expected exactly one Oracle SQL query"]
    sql, normalized = text.strip(), []
    fence = _FENCE.match(sql)
    if fence and "```" in fence.group(2):
        return None, [], ["several markdown fences: answer with exactly one SQL query"]
    if fence:
        sql, normalized = fence.group(2).strip(), [f"markdown fence ```{fence.group(1)}"]
    elif "```" in sql:
        return None, [], ["markdown fence with text outside it: answer with the SQL only"]
    if sql.endswith(";"):
        sql = sql[:-1].rstrip()
        normalized.append("trailing semicolon")
    if not sql:
        return None, normalized, ["empty answer: expected exactly one Oracle SQL query"]
    return sql, normalized, []


def _numeric_binds_named(sql, tokens):
    """Oracle positional binds (:1) renamed :B1 for the parser (sqlglot needs a name); positions from the tokens."""
    cuts = [(c.start, n.end) for c, n in zip(tokens, tokens[1:])
            if c.token_type == TokenType.COLON and n.token_type == TokenType.NUMBER and n.start == c.end + 1
            and n.text.isdigit()]
    for start, end in reversed(cuts):
        sql = f"{sql[:start]}:B{sql[start + 1:end + 1]}{sql[end + 1:]}"
    return sql


def parse(sql):
    """(tokens, statements) or raises ParseError/TokenError/RecursionError."""
    tokens = ORACLE.tokenize(sql)
    renamed = _numeric_binds_named(sql, tokens)
    if renamed != sql:
        sql, tokens = renamed, ORACLE.tokenize(renamed)
    statements = ORACLE.parser(error_level=ErrorLevel.IMMEDIATE).parse(tokens, sql)
    return tokens, [s for s in statements if s is not None]


def not_a_query(words, allow_dml):
    allowed = "SELECT / WITH queries" + (" or INSERT/UPDATE/DELETE/MERGE" if allow_dml else "")
    return f"statement {words} ... is not allowed: only read-only {allowed}"


def _inline_plsql(tokens):
    """WITH FUNCTION / WITH PROCEDURE anywhere: inline PL/SQL declarations run code inside the query."""
    return any(a.token_type == TokenType.WITH and b.text.upper() in ("FUNCTION", "PROCEDURE")
               for a, b in zip(tokens, tokens[1:]))


def _statement_kind_reasons(stmt, tokens, allow_dml):
    if isinstance(stmt, exp.Query) or (allow_dml and isinstance(stmt, DML_NODES)):
        return []
    words = " ".join(t.text for t in tokens[:2]).upper()
    if tokens[0].token_type == TokenType.WITH:  # WITH x AS (...) DELETE ...: name the real statement
        words = f"{words} ... {stmt.key.upper()}"
    return [not_a_query(words, allow_dml)]


def _verdict(**kw):
    base = {"ok": False, "sql": None, "candidate_sql": None, "reasons": [], "codes": [], "normalized": [],
            "unknown_tables": [], "unknown_columns": [], "binds": [], "checks": [], "skipped": [],
            "sqlglot": SQLGLOT_IMPL.get("name", "sqlglot")}
    base.update(kw)
    return base


def check_sql(text, catalog=None, policy=None, security_filters=None, allow_dml=False, explain=None) -> dict:
    """Validate one raw model answer. `catalog`: guardrail.catalog.Catalog or {TABLE: {COLUMN: TYPE}}; `explain`:
    {dsn, user, password, timeout_s} for Oracle EXPLAIN PLAN, or a callable sql -> [error strings]."""
    policy = policy or default_policy()
    catalog = Catalog.from_mapping(catalog) if catalog else None
    t0 = time.perf_counter()
    checks, reasons, codes = ["contract"], [], []

    def done(**kw):
        kw.setdefault("codes", list(dict.fromkeys(codes)))
        kw.setdefault("reasons", reasons)
        return _verdict(checks=checks, elapsed_ms=round((time.perf_counter() - t0) * 1000, 3), **kw)

    if text is not None and len(text) > policy["max_sql_chars"] + 64:
        reasons.append(f"answer too long: {len(text)} characters > policy max_sql_chars {policy['max_sql_chars']}")
        return done(codes=["contract"])
    sql, normalized, contract = normalize_answer(text)
    if contract:
        return done(codes=["contract"], reasons=contract, normalized=normalized)
    if len(sql) > policy["max_sql_chars"]:
        return done(codes=["contract"], normalized=normalized, reasons=[
            f"answer too long: {len(sql)} characters > policy max_sql_chars {policy['max_sql_chars']}"])
    try:
        head = ORACLE.tokenize(sql)
    except TokenError as e:
        return done(codes=["parse_error"], normalized=normalized, candidate_sql=sql,
                    reasons=[f"not valid Oracle SQL: {first_line(e)}"])
    if _inline_plsql(head):
        return done(codes=["unsafe"], normalized=normalized, candidate_sql=sql,
                    reasons=["inline PL/SQL (WITH FUNCTION / WITH PROCEDURE) is not allowed: write a plain query"])
    try:
        tokens, statements = parse(sql)
    except (ParseError, TokenError) as e:
        first = head[0] if head else None
        if first is not None and first.text.upper() in NON_QUERY_WORDS:
            return done(codes=["unsafe"], normalized=normalized, candidate_sql=sql,
                        reasons=[not_a_query(" ".join(t.text for t in head[:2]).upper(), allow_dml)])
        if any(t.token_type == TokenType.PARAMETER for t in head):
            return done(codes=["unsafe"], normalized=normalized, candidate_sql=sql,
                        reasons=["database link (@): remote objects are not allowed"])
        if any(a.text.upper() == "VERSIONS" and b.token_type == TokenType.BETWEEN for a, b in zip(head, head[1:])):
            return done(codes=["unsafe"], normalized=normalized, candidate_sql=sql, reasons=[
                "flashback version query (VERSIONS BETWEEN) reads past row versions: not allowed by the policy"])
        if first is not None and first.token_type == TokenType.VAR and not first.text.isupper():
            return done(codes=["contract"], normalized=normalized, candidate_sql=sql,
                        reasons=[f"text before the SQL ({first.text!r}...): answer with the SQL only"])
        return done(codes=["parse_error"], normalized=normalized, candidate_sql=sql,
                    reasons=[f"not valid Oracle SQL: {first_line(e)}"])
    except RecursionError:
        return done(codes=["parse_error"], normalized=normalized, candidate_sql=sql,
                    reasons=["not valid Oracle SQL: nesting too deep to parse"])
    except Exception as e:  # a sqlglot internal error on odd input: fail closed
        return done(codes=["parse_error"], normalized=normalized, candidate_sql=sql,
                    reasons=[f"not valid Oracle SQL ({type(e).__name__}: {first_line(e) if str(e) else '-'})"])
    if not statements:
        return done(codes=["contract"], normalized=normalized,
                    reasons=["empty answer: expected exactly one Oracle SQL query"])
    if len(statements) > 1 or any(t.token_type == TokenType.SEMICOLON for t in tokens):
        codes.append("contract")
        reasons.append(f"{len(statements)} statements ({', '.join(s.key.upper() for s in statements)}): answer "
                       "with exactly one query" if len(statements) > 1 else
                       "extra ';' after the query: answer with exactly one query and no ';'")
        for s in statements:
            if not isinstance(s, exp.Query):
                codes.append("unsafe")
                reasons.append(f"{s.key.upper()} statement is not allowed: only read-only SELECT / WITH queries")
        return done(normalized=normalized, candidate_sql=sql)
    stmt = statements[0]
    not_statement = not isinstance(stmt, exp.Query) and (
        isinstance(stmt, exp.Command) or not isinstance(stmt, STATEMENT_NODES))
    if not_statement and tokens[0].text.upper() not in NON_QUERY_WORDS:
        # sqlglot parses a bare word ("transactions", "was placed") as a column or alias: prose, not SQL.
        return done(codes=["contract"], normalized=normalized, candidate_sql=sql, reasons=[
            f"not an SQL query ({tokens[0].text!r}...): answer with exactly one Oracle SELECT / WITH query"])
    kind = _statement_kind_reasons(stmt, tokens, allow_dml)
    if kind:
        return done(codes=["unsafe"], normalized=normalized, candidate_sql=sql, reasons=kind)
    checks.append("read_only")
    try:
        return _run_rules(sql, tokens, stmt, catalog, policy, security_filters, allow_dml, explain, normalized,
                          checks, done)
    except StageError:
        raise
    except Exception as e:  # fail closed: a query the analysis cannot handle is never passed
        return done(codes=["parse_error"], normalized=normalized, candidate_sql=sql,
                    reasons=[f"guardrail could not analyse this query ({type(e).__name__}: "
                             f"{first_line(e) if str(e) else 'no message'}): rewrite it more simply"])


def _run_rules(sql, tokens, stmt, catalog, policy, security_filters, allow_dml, explain, normalized, checks, done):
    q = Query(sql=sql, tokens=tokens, stmt=stmt, tree=normalize_identifiers(stmt.copy(), dialect=ORACLE),
              policy=policy, catalog=catalog, security_filters=security_filters or [], allow_dml=allow_dml)
    findings = []
    for rule in RULES:
        findings += rule.check(q)
    findings = list(dict.fromkeys(findings))
    skipped = []
    if catalog is not None:
        checks.append("catalog")
    else:
        skipped.append("catalog (no catalog given: table/column existence and the policy's required_filters "
                       "were not checked)")
    if filters_for(q):
        checks.append("security_filters")
    elif not security_filters and catalog is None:
        skipped.append("security_filters (none in the request, and required_filters need a catalog)")
    reasons = list(dict.fromkeys(f.reason for f in findings))
    codes = list(dict.fromkeys(f.code for f in findings))
    if explain and not reasons:
        checks.append("explain")
        from oracle_explain import explain_oracle  # python-oracledb loads only when a DSN is configured
        ora = explain(sql) if callable(explain) else explain_oracle(
            sql, explain["dsn"], explain["user"], explain["password"], explain.get("timeout_s", 10))
        if ora:
            reasons += ora
            codes.append("explain_error")
    elif not explain:
        skipped.append("explain (no DSN configured)")
    binds = sorted({p.name.lower() for p in q.tree.find_all(exp.Placeholder) if p.name})
    ok = not reasons
    return done(ok=ok, sql=sql if ok else None, candidate_sql=sql, normalized=normalized, reasons=reasons,
                codes=codes, binds=binds,
                unknown_tables=[f.detail for f in findings if f.code == "unknown_table"],
                unknown_columns=[f.detail for f in findings if f.code == "unknown_column"], skipped=skipped)


def normalized_sql(sql: str) -> str:
    """One spelling per query (case, spacing, quoting): what exact-match and de-duplication compare.
    Text that does not parse keeps its own words (it can then only equal the same unparseable text)."""
    try:
        tree = normalize_identifiers(sqlglot.parse_one(sql, read=ORACLE), dialect=ORACLE)
    except (ParseError, TokenError, RecursionError):
        return " ".join(sql.split())
    return tree.sql(dialect=ORACLE)
