#!/usr/bin/env python
"""SQL guardrail for model-generated Oracle EBS SQL, plus the guarded one-retry client (`ask`).

Nothing the model writes reaches an EBS database unless every layer below passes. Layers and reason codes:

  1. contract        SQL-only answer: one markdown fence and one trailing ';' are stripped (listed in
                     `normalized`); prose around the SQL, several statements, an empty or over-long answer are
                     rejected. Unparseable text gets `parse_error`.
  2. unsafe          Read-only allowlist on the sqlglot AST (dialect oracle, never regex or prefix checks): exactly
                     one query (SELECT / WITH / set operation). DML (incl. INSERT ALL, MERGE), DDL, GRANT/REVOKE,
                     ALTER SESSION/SYSTEM, CALL/EXEC, PL/SQL blocks, EXECUTE IMMEDIATE, transactions, LOCK, EXPLAIN
                     PLAN, SAVEPOINT/PURGE (sqlglot parses those as a bare alias expression) are rejected. Inside
                     the query: FOR UPDATE, SELECT INTO, database links (@), sequence NEXTVAL/CURRVAL, blocked
                     packages (DBMS_*, UTL_*, SYS.*; also checked on the token stream so comments and string
                     contents never decide anything), package functions not on the policy allowlist, unknown
                     unqualified functions, blocked schemas/tables/columns, optimizer hints (policy).
                     `allow_dml=True` additionally admits INSERT/UPDATE/DELETE/MERGE; DDL is never admitted.
  3. unknown_table / unknown_column
                     Hallucination check against a catalog {TABLE: {COLUMN: TYPE}}: every unknown table and every
                     unknown column is listed ("TABLE.COLUMN"; a bare "COLUMN" when several tables are in scope and
                     none has it). CTEs (also recursive ones), inline views, aliases, schema prefixes (AP., APPS.),
                     DUAL, ROWNUM, SYSDATE, LEVEL and the other pseudo-columns are resolved without false alarms.
                     Skipped (and listed in `skipped`) without a catalog.
  4. security_filter Each table of the request's security filters (context["security_filters"]: {table, column,
                     predicate}) must be constrained, in the WHERE or the join ON of the SELECT that reads it, by a
                     top-level AND conjunct equal to the expected predicate (e.g. ORG_ID IN (:org_ids)) on that
                     table's column.
  5. explain_error   Optional EXPLAIN PLAN on a staging Oracle (python-oracledb thin mode, oracle_explain.py):
                     read-only transaction, call timeout, the statement is never executed, ORA- errors become
                     feedback. Runs only when layers 1-4 passed.

Verdict (check_sql): {"ok", "sql" (normalized SQL, None unless ok), "candidate_sql" (what was checked), "reasons",
"codes", "normalized", "unknown_tables", "unknown_columns", "checks" (layers run), "skipped", "sqlglot"}.

Retry format (`ask`): the SAME template as training (prompting.chat_messages) rendered with previous_sql = the
rejected answer (normalized SQL, or the raw answer when it could not be normalized) and reasons = the verdict's
reasons; the template appends them as "## Previous answer (rejected)" and "## Why it was rejected" (one "- reason"
line each). Exactly one retry; the final verdict is the retry's.

Catalog from ALL_TAB_COLUMNS (see guardrail_policy.yaml for the JSON variant):
    SELECT table_name, column_name, data_type FROM all_tab_columns
     WHERE owner IN ('AP', 'PO', 'GL', 'AR', 'HR', 'INV', 'FND', 'APPS') ORDER BY table_name, column_id;
spooled as CSV with header -> pass the .csv as --catalog (or a JSON {TABLE: {COLUMN: TYPE}}).

sqlglot: the sqlglotc wheel overlays mypyc-compiled .so files onto the `sqlglot` package itself (no `sqlglotc`
module exists), so when installed it is active automatically. ORACLE_GUARD_PURE_SQLGLOT=1 (set before this module
is imported) loads the pure-Python sources instead; the verdict's "sqlglot" field says which one ran.

EXPLAIN credentials come from the environment only (ORACLE_GUARD_USER, ORACLE_GUARD_PASSWORD; DSN from
--explain-dsn or ORACLE_GUARD_DSN) and are never printed.
"""
import argparse
import fnmatch
import functools
import importlib.abc
import importlib.machinery
import json
import logging
import os
import re
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

from artifacts import StageError  # noqa: E402
from oracle_explain import explain_connect_params, explain_oracle  # noqa: E402


class _PureSqlglotFinder(importlib.abc.MetaPathFinder):
    """Resolve sqlglot.* to the .py sources, skipping the compiled .so overlays that sqlglotc installs."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "sqlglot" and not fullname.startswith("sqlglot."):
            return None
        for entry in (path if path is not None else sys.path):
            finder = importlib.machinery.FileFinder(
                entry or ".", (importlib.machinery.SourceFileLoader, importlib.machinery.SOURCE_SUFFIXES))
            spec = finder.find_spec(fullname)
            if spec is not None:
                return spec
        return None


if os.environ.get("ORACLE_GUARD_PURE_SQLGLOT") == "1" and "sqlglot" not in sys.modules:
    sys.meta_path.insert(0, _PureSqlglotFinder())

import sqlglot  # noqa: E402
import yaml  # noqa: E402
from sqlglot import exp  # noqa: E402
from sqlglot import tokenizer_core as _tokenizer_core  # noqa: E402
from sqlglot.dialects.dialect import Dialect  # noqa: E402
from sqlglot.errors import ErrorLevel, ParseError, TokenError  # noqa: E402
from sqlglot.optimizer.normalize_identifiers import normalize_identifiers  # noqa: E402
from sqlglot.optimizer.scope import Scope, build_scope  # noqa: E402
from sqlglot.tokens import TokenType  # noqa: E402

# sqlglot logs "falling back to Command" warnings for every ALTER/CALL; the verdict already says why.
logging.getLogger("sqlglot").setLevel(logging.CRITICAL)

POLICY_PATH = Path(__file__).resolve().parent / "guardrail_policy.yaml"
ORACLE = Dialect.get_or_raise("oracle")
SQLGLOT_IMPL = {
    "version": getattr(sqlglot, "__version__", "unknown"),
    "compiled": not str(getattr(_tokenizer_core, "__file__", "x.py")).endswith(".py"),
}
SQLGLOT_IMPL["name"] = "sqlglotc (compiled)" if SQLGLOT_IMPL["compiled"] else "sqlglot (pure python)"

_POLICY_DEFAULTS = {
    "version": 1, "max_sql_chars": 20000, "allow_optimizer_hints": False, "package_schemas": [],
    "allowed_package_functions": [], "blocked_package_patterns": [], "blocked_schemas": [],
    "blocked_table_patterns": [], "blocked_columns": [], "pseudo_columns": [], "builtin_functions": [],
}
_FENCE = re.compile(r"\A```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\r?\n(.*?)\r?\n?```\Z", re.S)
_ORACLE_NAME = re.compile(r"\A[A-Za-z][A-Za-z0-9_$#]*\Z")
_QUERY_START = {TokenType.SELECT, TokenType.WITH, TokenType.L_PAREN}
_STATEMENT_NODES = tuple(c for c in (getattr(exp, n, None) for n in (
    "DML", "DDL", "Insert", "Update", "Delete", "Merge", "MultitableInserts", "Create", "Drop", "Alter", "Grant",
    "Revoke", "TruncateTable", "Set", "Transaction", "Commit", "Rollback", "Analyze", "Comment", "Use", "Pragma",
    "LoadData", "Kill", "Execute", "Refresh", "Cache", "Uncache", "Describe", "Show", "Summarize", "Copy", "Command",
)) if c is not None)
# Statement keywords sqlglot cannot parse for Oracle (PL/SQL, LOCK, FLASHBACK, ...): named in the reason, so the
# model learns why, instead of a bare parse error.
_NON_QUERY_WORDS = {"BEGIN", "DECLARE", "EXEC", "EXECUTE", "CALL", "LOCK", "FLASHBACK", "PURGE", "SAVEPOINT",
                    "AUDIT", "NOAUDIT", "RENAME", "ALTER", "CREATE", "DROP", "TRUNCATE", "GRANT", "REVOKE", "INSERT",
                    "UPDATE", "DELETE", "MERGE", "COMMIT", "ROLLBACK", "SET", "EXPLAIN", "ANALYZE", "COMMENT",
                    "ASSOCIATE", "DISASSOCIATE", "UPSERT", "REPLACE", "SHUTDOWN", "STARTUP", "ADMINISTER"}
# Words the Oracle tokenizer leaves as plain names that may precede '(' without being a function call.
_NON_FUNCTION_WORDS = {"GROUP", "SAMPLE", "ROW", "ROWS", "PARTITION", "SUBPARTITION", "MEASURES", "PATTERN", "DEFINE",
                       "SEARCH", "CYCLE", "COLUMNS", "PASSING", "NESTED"}
_DML_NODES = (exp.Insert, exp.Update, exp.Delete, exp.Merge)
_NAME_TOKENS = {TokenType.VAR, TokenType.IDENTIFIER}


# ----------------------------------------------------------------------------------------------- configuration
def load_policy(path=None) -> dict:
    """Policy YAML -> dict with upper-cased name lists. Unknown keys are an error (a typo must not disable a rule)."""
    path = Path(path) if path else POLICY_PATH
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as e:
        raise StageError(f"cannot read policy {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise StageError(f"policy {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise StageError(f"policy {path} must be a mapping")
    unknown = sorted(set(raw) - set(_POLICY_DEFAULTS))
    if unknown:
        raise StageError(f"policy {path}: unknown keys {unknown}")
    policy = {**_POLICY_DEFAULTS, **raw}
    for key, default in _POLICY_DEFAULTS.items():
        if isinstance(default, list):
            if not isinstance(policy[key], list) or not all(isinstance(x, str) for x in policy[key]):
                raise StageError(f"policy {path}: {key} must be a list of strings")
            policy[key] = [x.upper() for x in policy[key]]
    if not isinstance(policy["max_sql_chars"], int) or policy["max_sql_chars"] <= 0:
        raise StageError(f"policy {path}: max_sql_chars must be a positive integer")
    if not isinstance(policy["allow_optimizer_hints"], bool):
        raise StageError(f"policy {path}: allow_optimizer_hints must be true or false")
    policy["_sets"] = {k: frozenset(policy[k]) for k in (
        "package_schemas", "allowed_package_functions", "blocked_schemas", "blocked_columns", "pseudo_columns",
        "builtin_functions")}
    policy["_path"] = str(path)
    return policy


def load_catalog(path) -> dict:
    """{TABLE: {COLUMN: TYPE}} from JSON, or from an ALL_TAB_COLUMNS CSV export (TABLE_NAME, COLUMN_NAME, DATA_TYPE)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise StageError(f"cannot read catalog {path}: {e.strerror or e}") from None
    if path.suffix.lower() == ".csv":
        import csv
        rows = list(csv.DictReader(text.splitlines()))
        need = {"TABLE_NAME", "COLUMN_NAME", "DATA_TYPE"}
        if not rows or not need <= {k.strip().upper() for k in rows[0]}:
            raise StageError(f"catalog {path}: CSV needs a header with {sorted(need)}")
        catalog: dict = {}
        for row in rows:
            row = {k.strip().upper(): (v or "").strip() for k, v in row.items()}
            catalog.setdefault(row["TABLE_NAME"].upper(), {})[row["COLUMN_NAME"].upper()] = row["DATA_TYPE"]
        return catalog
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise StageError(f"catalog {path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict) or not raw or not all(
            isinstance(cols, dict) and all(isinstance(t, str) for t in cols.values()) for cols in raw.values()):
        raise StageError(f"catalog {path} must be a non-empty JSON object {{TABLE: {{COLUMN: TYPE}}}}")
    return {t.upper(): {c.upper(): ty for c, ty in cols.items()} for t, cols in raw.items()}


_DEFAULT_POLICY = None


def _default_policy() -> dict:
    global _DEFAULT_POLICY
    if _DEFAULT_POLICY is None:
        _DEFAULT_POLICY = load_policy()
    return _DEFAULT_POLICY


# -------------------------------------------------------------------------------------- layer 1: SQL-only contract
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


def _parse(sql):
    """(tokens, statements) or raises ParseError/TokenError/RecursionError."""
    tokens = ORACLE.tokenize(sql)
    statements = ORACLE.parser(error_level=ErrorLevel.IMMEDIATE).parse(tokens, sql)
    return tokens, [s for s in statements if s is not None]


def _first_line(message) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", str(message)).strip().splitlines()[0][:300]


# ---------------------------------------------------------------------------------------- layer 2: read-only AST
def _ident(node) -> str:
    """Oracle name of an identifier-ish node: unquoted names are upper-cased, quoted kept as written."""
    if node is None:
        return ""
    if isinstance(node, exp.Identifier):
        return node.this if node.quoted else node.this.upper()
    if isinstance(node, str):
        return node.upper()
    return node.name.upper() if node.name else ""


def _glob(name, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _dot_parts(node):
    """Flatten a Dot chain (apps.fnd_profile.value(...)) into name parts and the trailing function node."""
    parts = []
    while isinstance(node, exp.Dot):
        parts.insert(0, node.expression)
        node = node.this
    parts.insert(0, node)
    names = []
    for p in parts:
        if isinstance(p, exp.Anonymous):
            names.append(p.this.upper() if isinstance(p.this, str) else _ident(p.this))
        elif isinstance(p, exp.Func):
            names.append(p.sql_name().upper())
        else:
            names.append(_ident(p))
    return names


def _package_call_reason(names, policy):
    """None when PACKAGE.FUNCTION (optionally SCHEMA.-prefixed) is allowlisted, else the rejection reason."""
    sets = policy["_sets"]
    qualified = ".".join(names)
    core = names[1:] if len(names) == 3 and names[0] in sets["package_schemas"] else names
    blocked = [n for n in names[:-1] if _glob(n, policy["blocked_package_patterns"]) or n in sets["blocked_schemas"]]
    if blocked:
        return f"call to blocked package/schema {blocked[0]} in {qualified}"
    if len(core) == 2 and ".".join(core) in sets["allowed_package_functions"]:
        return None
    return f"package function {qualified} is not on the policy allowlist of read-only helpers"


def _check_tokens(tokens, policy):
    """Token-level defence in depth: a blocked package/schema followed by '.' anywhere outside strings/comments."""
    reasons = []
    for tok, nxt in zip(tokens, tokens[1:]):
        if nxt.token_type == TokenType.DOT and tok.token_type in _NAME_TOKENS:
            name = tok.text if tok.token_type == TokenType.IDENTIFIER else tok.text.upper()
            if _glob(name, policy["blocked_package_patterns"]) or name in policy["_sets"]["blocked_schemas"]:
                reasons.append(f"reference to blocked package/schema {name} (line {tok.line})")
    return reasons


def _function_reason(name):
    return f"function {name} is not an allowed Oracle built-in or allowlisted package function"


def _check_function_tokens(stmt, tokens, policy):
    """Every unqualified NAME( as written must be an Oracle built-in from the policy.

    The AST alone is not enough: sqlglot turns names it knows from other dialects (MD5, DATE_ADD, ...) into
    typed nodes, which in Oracle would resolve to user functions in APPS with unknown side effects.
    """
    local = {_ident(i) for node in stmt.find_all(exp.CTE, exp.Table, exp.TableAlias)
             for i in [node.args.get("alias") if isinstance(node, exp.CTE) else node.this] if i is not None
             for i in ([i.this] if isinstance(i, exp.TableAlias) else [i]) if isinstance(i, exp.Identifier)}
    allowed = policy["_sets"]["builtin_functions"] | _NON_FUNCTION_WORDS | local
    reasons = []
    for prev, tok, nxt in zip([None] + tokens, tokens, tokens[1:]):
        if nxt.token_type != TokenType.L_PAREN or tok.token_type not in _NAME_TOKENS:
            continue
        if prev is not None and prev.token_type == TokenType.DOT:
            continue  # PACKAGE.FUNCTION( is judged on the AST against the package allowlist
        name = tok.text if tok.token_type == TokenType.IDENTIFIER else tok.text.upper()
        if name not in allowed:
            reasons.append(_function_reason(name))
    return reasons


def _not_a_query(words, allow_dml):
    allowed = "SELECT / WITH queries" + (" or INSERT/UPDATE/DELETE/MERGE" if allow_dml else "")
    return f"statement {words} ... is not allowed: only read-only {allowed}"


def _check_safety(stmt, tokens, policy, allow_dml):
    """Layer 2 reasons (all of them, not just the first)."""
    reasons = []
    if isinstance(stmt, exp.Query):
        pass
    elif allow_dml and isinstance(stmt, _DML_NODES):
        pass
    else:
        words = " ".join(t.text for t in tokens[:2]).upper()
        if tokens[0].token_type == TokenType.WITH:  # WITH x AS (...) DELETE ...: name the real statement
            words = f"{words} ... {stmt.key.upper()}"
        return [_not_a_query(words, allow_dml)]
    reasons += _check_tokens(tokens, policy)
    reasons += _check_function_tokens(stmt, tokens, policy)
    for node in stmt.walk():
        if node is not stmt and isinstance(node, _STATEMENT_NODES) and not (
                allow_dml and isinstance(node, _DML_NODES)):
            reasons.append(f"nested {node.key.upper()} statement inside the query")
        elif isinstance(node, exp.Lock):
            reasons.append("FOR UPDATE locks rows: not allowed in a read-only query")
        elif isinstance(node, exp.Select) and node.args.get("into"):
            reasons.append("SELECT INTO is PL/SQL, not a query")
        elif isinstance(node, exp.Identifier) and "@" in node.this:
            reasons.append(f"database link in {node.this}: remote objects are not allowed")
        elif isinstance(node, exp.Identifier) and not node.quoted and not _ORACLE_NAME.match(node.this) \
                and not isinstance(node.parent, exp.Placeholder):
            reasons.append(f"invalid unquoted identifier {node.this!r}: Oracle names are ASCII letters, digits, _ $ #")
        elif isinstance(node, exp.Hint) and not policy["allow_optimizer_hints"]:
            reasons.append(f"optimizer hint {node.sql(dialect='oracle')} is not allowed by the policy")
        elif isinstance(node, exp.Column) and isinstance(node.this, exp.Identifier) and node.table \
                and _ident(node.this) in ("NEXTVAL", "CURRVAL"):
            reasons.append(f"sequence access {_ident(node.args['table'])}.{_ident(node.this)} is not allowed")
        elif isinstance(node, exp.Dot) and not isinstance(node.parent, exp.Dot) \
                and isinstance(node.expression, exp.Func):
            reason = _package_call_reason(_dot_parts(node), policy)
            if reason:
                reasons.append(reason)
        elif isinstance(node, exp.Anonymous) and not isinstance(node.parent, exp.Dot):
            name = node.this.upper() if isinstance(node.this, str) else _ident(node.this)
            if name not in policy["_sets"]["builtin_functions"]:
                reasons.append(_function_reason(name))
        elif isinstance(node, exp.Table) and isinstance(node.this, exp.Identifier):
            schema, table = _ident(node.args.get("db")), _ident(node.this)
            if schema and schema in policy["_sets"]["blocked_schemas"]:
                reasons.append(f"schema {schema} is blocked ({schema}.{table})")
            elif _glob(table, policy["blocked_table_patterns"]):
                reasons.append(f"table {table} is blocked by the policy (dictionary/performance view)")
        if not policy["allow_optimizer_hints"]:
            for comment in node.comments or []:
                if comment.startswith("+"):
                    reasons.append("optimizer hint comment (--+ / /*+) is not allowed by the policy")
    return reasons


# ---------------------------------------------------------------------------------- layer 3: hallucination check
def _cte_columns(tree):
    """{CTE name: [column names] or None}: the alias column list, else the anchor's named selects."""
    out = {}
    for cte in tree.find_all(exp.CTE):
        alias = cte.args.get("alias")
        cols = [_ident(c) for c in (alias.columns if alias else [])]
        if not cols:
            cols = _query_names(cte.this)
        out[_ident(alias.this) if alias else cte.alias_or_name.upper()] = cols
    return out


def _query_names(query):
    """Output column names of a query, or None when a star or unnamed expression makes them unknowable here."""
    while isinstance(query, exp.Subquery):
        query = query.this
    if isinstance(query, exp.SetOperation):
        return _query_names(query.left)
    if not isinstance(query, exp.Select):
        return None
    names = []
    for e in query.expressions:
        if isinstance(e, exp.Star) or (isinstance(e, exp.Column) and isinstance(e.this, exp.Star)):
            return None
        names.append(_ident(e.args["alias"].this) if isinstance(e, exp.Alias) else _ident(e) if isinstance(
            e, exp.Column) else e.alias_or_name.upper())
    return names


class _Resolver:
    """Answers 'does SOURCE expose COLUMN' for physical tables, CTEs, inline views; None means 'cannot tell'."""

    def __init__(self, catalog, policy, cte_cols):
        self.catalog, self.policy, self.cte_cols = catalog, policy, cte_cols
        self.pseudo = policy["_sets"]["pseudo_columns"]

    def table_name(self, table):
        return _ident(table.this) if isinstance(table.this, exp.Identifier) else None

    def columns_of(self, source):
        """set of names, or None when unknown (table function, pivot, unknown table, star over unknowns)."""
        if isinstance(source, Scope):
            expr = source.expression
            alias_cols = []
            parent = expr.parent
            if isinstance(parent, (exp.Subquery, exp.CTE)) and parent.args.get("alias"):
                alias_cols = [_ident(c) for c in parent.args["alias"].columns]
            if alias_cols:
                return set(alias_cols)
            names = _query_names(expr)
            if names is not None:
                return set(names)
            return self._star_columns(source)
        if isinstance(source, exp.Table):
            if source.args.get("pivots"):
                return None
            name = self.table_name(source)
            if name is None:
                return None
            if not source.args.get("db") and name in self.cte_cols:
                cols = self.cte_cols[name]
                return set(cols) if cols is not None else None
            if name == "DUAL":
                return {"DUMMY"}
            if name in self.catalog:
                return set(self.catalog[name])
            return None
        return None

    def _star_columns(self, scope):
        query = scope.expression
        while isinstance(query, exp.SetOperation):
            query = query.left
        if not isinstance(query, exp.Select):
            return None
        out = set()
        for e in query.expressions:
            if isinstance(e, exp.Star):
                for src in scope.sources.values():
                    cols = self.columns_of(src)
                    if cols is None:
                        return None
                    out |= cols
            elif isinstance(e, exp.Column) and isinstance(e.this, exp.Star):
                src = scope.sources.get(_ident(e.args.get("table")))
                cols = self.columns_of(src) if src is not None else None
                if cols is None:
                    return None
                out |= cols
            else:
                out.add(_ident(e.args["alias"].this) if isinstance(e, exp.Alias) else
                        _ident(e) if isinstance(e, exp.Column) else e.alias_or_name.upper())
        return out


def _pivot_aliases(scope):
    aliases, pivoted = set(), False
    for pivot in scope.expression.find_all(exp.Pivot):
        if pivot.find_ancestor(exp.Select) is scope.expression:
            pivoted = True
            if pivot.alias:
                aliases.add(pivot.alias.upper())
    return pivoted, aliases


def _check_references(tree, catalog, policy):
    """(unknown_tables, unknown_columns, reasons) for layer 3; tree is identifier-normalized."""
    cte_cols = _cte_columns(tree)
    resolver = _Resolver(catalog, policy, cte_cols)
    unknown_tables, unknown_columns, reasons = [], [], []

    # Every physical table node, not only scope sources: alias-qualified unknown tables must be caught too.
    def already_rejected(name):  # layer 2 reported it; listing it again as unknown only adds noise
        return "@" in name or _glob(name, policy["blocked_table_patterns"]) \
            or _glob(name, policy["blocked_package_patterns"]) or name in policy["_sets"]["blocked_schemas"]

    for table in tree.find_all(exp.Table):
        name = resolver.table_name(table)
        if name is None or (not table.args.get("db") and name in cte_cols) or name == "DUAL" \
                or already_rejected(name) or already_rejected(_ident(table.args.get("db"))):
            continue
        if name not in catalog and name not in unknown_tables:
            unknown_tables.append(name)
            reasons.append(f"unknown table {name}")

    root = build_scope(tree)
    if root is None:
        return unknown_tables, unknown_columns, reasons

    def add_unknown(key, why):
        if key not in unknown_columns:
            unknown_columns.append(key)
            reasons.append(why)

    seen = set()
    for scope in root.traverse():  # innermost scopes first
        pivoted, pivot_aliases = _pivot_aliases(scope)
        for col in scope.columns:
            # sqlglot also lists a subquery's unresolved columns in the enclosing scope: judge each column once,
            # in the innermost scope that contains it.
            if id(col) in seen or not isinstance(col.this, exp.Identifier):
                continue  # t.* : the qualifier is checked by its table
            seen.add(id(col))
            name, qualifier = _ident(col.this), _ident(col.args.get("table"))
            if "@" in name or name in ("NEXTVAL", "CURRVAL") or (qualifier and already_rejected(qualifier)):
                continue
            if qualifier:
                found, s = None, scope
                while s is not None and found is None:
                    found = s.sources.get(qualifier)
                    s = s.parent
                if found is None:
                    if qualifier in pivot_aliases or (pivoted and qualifier not in scope.sources):
                        continue
                    if f"{qualifier}.{name}" in policy["_sets"]["allowed_package_functions"]:
                        continue
                    if not catalog and qualifier in policy["_sets"]["package_schemas"]:
                        continue
                    add_unknown(f"{qualifier}.{name}",
                                f"unknown column {qualifier}.{name}: no table or alias {qualifier} in scope")
                    continue
                cols = resolver.columns_of(found)
                if cols is not None and name not in cols and name not in resolver.pseudo:
                    label = resolver.table_name(found) if isinstance(found, exp.Table) else qualifier
                    add_unknown(f"{label}.{name}", f"unknown column {label}.{name}" + (
                        f" (alias {qualifier})" if label != qualifier else ""))
                continue
            if name in resolver.pseudo or pivoted:
                continue
            resolved, s, innermost = False, scope, None
            while s is not None and not resolved:
                known = [resolver.columns_of(src) for src in s.sources.values()]
                if innermost is None:
                    innermost = s
                if any(c is None or name in c for c in known):
                    resolved = True
                s = s.parent
            if not resolved:
                tables = [resolver.table_name(src) if isinstance(src, exp.Table) else alias
                          for alias, src in innermost.sources.items()]
                if len(tables) == 1:
                    add_unknown(f"{tables[0]}.{name}", f"unknown column {tables[0]}.{name}")
                else:
                    add_unknown(name, f"unknown column {name} (not in any of: {', '.join(tables) or 'no tables'})")
    return unknown_tables, unknown_columns, reasons


def _check_blocked_columns(tree, policy):
    blocked = policy["_sets"]["blocked_columns"]
    if not blocked:
        return []
    tables = {_ident(t.this): t.alias_or_name.upper() for t in tree.find_all(exp.Table)
              if isinstance(t.this, exp.Identifier)}
    reasons = []
    for entry in sorted(blocked):
        table, _, column = entry.partition(".")
        if table in tables and any(_ident(c.this) == column for c in tree.find_all(exp.Column)
                                   if isinstance(c.this, exp.Identifier)):
            reasons.append(f"column {entry} holds secrets and is blocked by the policy")
        if table in tables and any(isinstance(s, exp.Star) or (
                isinstance(s, exp.Column) and isinstance(s.this, exp.Star))
                for sel in tree.find_all(exp.Select) for s in sel.expressions):
            reasons.append(f"SELECT * over {table} would expose blocked column {entry}: list the columns")
    return list(dict.fromkeys(reasons))


# ------------------------------------------------------------------------------------- layer 4: security filters
def _conjuncts(cond):
    out, stack = [], [cond]
    while stack:
        c = stack.pop()
        if c is None:
            continue
        if isinstance(c, exp.Paren):
            stack.append(c.this)
        elif isinstance(c, exp.And):
            stack += [c.expression, c.this]
        else:
            out.append(c)
    return out


def _strip_qualifiers(cond):
    cond = cond.copy()
    for col in cond.find_all(exp.Column):
        for key in ("table", "db", "catalog"):
            col.set(key, None)
        col.set("join_mark", None)
    return cond


@functools.lru_cache(maxsize=1024)
def _predicate_sql(predicate: str) -> str:
    """A security predicate in comparable form (qualifiers dropped). Cached: a policy has a handful of predicates."""
    try:
        expected = normalize_identifiers(sqlglot.parse_one(predicate, read=ORACLE), dialect=ORACLE)
    except (ParseError, TokenError) as e:
        raise StageError(f"security filter predicate {predicate!r} does not parse: {_first_line(e)}") from None
    return _strip_qualifiers(expected).sql(dialect=ORACLE)


def _check_security_filters(tree, filters, catalog):
    reasons = []
    for f in filters or []:
        table, column = str(f.get("table", "")).upper(), str(f.get("column", "")).upper()
        predicate = str(f.get("predicate") or f"{column} IN (:org_ids)")
        expected_sql = _predicate_sql(predicate)
        for occ in tree.find_all(exp.Table):
            if not isinstance(occ.this, exp.Identifier) or _ident(occ.this) != table:
                continue
            owner = occ.find_ancestor(exp.Select, exp.Update, exp.Delete)
            if owner is None:
                continue
            alias = occ.alias_or_name.upper() if not occ.alias else _ident(occ.args["alias"].this)
            sources = [t for t in owner.find_all(exp.Table)
                       if t.find_ancestor(exp.Select, exp.Update, exp.Delete) is owner]
            derived = [s for s in owner.find_all(exp.Subquery) if s.find_ancestor(exp.Select) is owner and s.alias]
            sole = len(sources) + len(derived) == 1
            if not sole and catalog:
                others = [t for t in sources if t is not occ and column in catalog.get(_ident(t.this), {})]
                sole = not others and not derived
            conds = _conjuncts(owner.args.get("where").this if owner.args.get("where") else None)
            for join in owner.args.get("joins") or []:
                # An ON conjunct filters a table only in an inner join, or when the table is the null-supplying
                # side of a LEFT join; on the preserved side of an outer join every row still comes back.
                if not join.side or (join.side == "LEFT" and join.this is occ):
                    conds += _conjuncts(join.args.get("on"))
            found = []
            for c in conds:
                refs = [col for col in c.find_all(exp.Column) if _ident(col.this) == column]
                if any(_ident(col.args.get("table")) == alias or (not col.table and sole) for col in refs):
                    found.append(c)
            where = f"{table}" + (f" (alias {alias})" if alias != table else "")
            if not found:
                reasons.append(f"missing security filter on {table}.{column} (expected {predicate}) for {where}")
            elif not any(_strip_qualifiers(c).sql(dialect=ORACLE) == expected_sql for c in found):
                got = "; ".join(c.sql(dialect=ORACLE) for c in found)
                reasons.append(f"security filter on {table}.{column} must be {predicate} (found {got}) for {where}")
    return list(dict.fromkeys(reasons))


# ------------------------------------------------------------------------------------------------- check_sql
def _verdict(**kw):
    base = {"ok": False, "sql": None, "candidate_sql": None, "reasons": [], "codes": [], "normalized": [],
            "unknown_tables": [], "unknown_columns": [], "checks": [], "skipped": [], "sqlglot": SQLGLOT_IMPL["name"]}
    base.update(kw)
    return base


def normalized_sql(sql: str) -> str:
    """One spelling per query (case, spacing, quoting): what exact-match and de-duplication compare.
    Text that does not parse keeps its own words (it can then only equal the same unparseable text)."""
    try:
        tree = normalize_identifiers(sqlglot.parse_one(sql, read=ORACLE), dialect=ORACLE)
    except (ParseError, TokenError):
        return " ".join(sql.split())
    return tree.sql(dialect=ORACLE)


def check_sql(text, catalog=None, policy=None, security_filters=None, allow_dml=False, explain=None) -> dict:
    """Validate one raw model answer through layers 1-4, + layer 5 when `explain` is {dsn, user, password,
    timeout_s} (Oracle EXPLAIN PLAN) or a callable sql -> [error strings] (another EXPLAIN backend)."""
    policy = policy or _default_policy()
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
        tokens, statements = _parse(sql)
    except (ParseError, TokenError) as e:
        try:
            head = ORACLE.tokenize(sql)[:2]
        except TokenError:
            head = []
        first = head[0] if head else None
        if first is not None and first.text.upper() in _NON_QUERY_WORDS:
            return done(codes=["unsafe"], normalized=normalized, candidate_sql=sql,
                        reasons=[_not_a_query(" ".join(t.text for t in head).upper(), allow_dml)])
        if first is not None and first.token_type == TokenType.VAR and not first.text.isupper():
            return done(codes=["contract"], normalized=normalized, candidate_sql=sql,
                        reasons=[f"text before the SQL ({first.text!r}...): answer with the SQL only"])
        return done(codes=["parse_error"], normalized=normalized, candidate_sql=sql,
                    reasons=[f"not valid Oracle SQL: {_first_line(e)}"])
    except RecursionError:
        return done(codes=["parse_error"], normalized=normalized, candidate_sql=sql,
                    reasons=["not valid Oracle SQL: nesting too deep to parse"])
    except Exception as e:  # a sqlglot internal error on odd input: fail closed
        return done(codes=["parse_error"], normalized=normalized, candidate_sql=sql,
                    reasons=[f"not valid Oracle SQL ({type(e).__name__}: {_first_line(e) if str(e) else '-'})"])
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
        isinstance(stmt, exp.Command) or not isinstance(stmt, _STATEMENT_NODES))
    if not_statement and tokens[0].text.upper() not in _NON_QUERY_WORDS:
        # sqlglot parses a bare word ("transactions", "was placed") as a column or alias: prose, not SQL.
        return done(codes=["contract"], normalized=normalized, candidate_sql=sql, reasons=[
            f"not an SQL query ({tokens[0].text!r}...): answer with exactly one Oracle SELECT / WITH query"])

    checks.append("read_only")
    try:
        safety = _check_safety(stmt, tokens, policy, allow_dml)
        if safety:
            reasons += list(dict.fromkeys(safety))
            codes.append("unsafe")
            if not isinstance(stmt, exp.Query) and not (allow_dml and isinstance(stmt, _DML_NODES)):
                return done(normalized=normalized, candidate_sql=sql)
        return _analyse(stmt, sql, normalized, catalog, policy, security_filters, explain, reasons, codes, checks,
                        done)
    except StageError:
        raise
    except Exception as e:  # fail closed: a query the analysis cannot handle is never passed
        return done(codes=list(dict.fromkeys(codes + ["parse_error"])), normalized=normalized, candidate_sql=sql,
                    reasons=reasons + [f"guardrail could not analyse this query ({type(e).__name__}: "
                                       f"{_first_line(e) if str(e) else 'no message'}): rewrite it more simply"])


def _analyse(stmt, sql, normalized, catalog, policy, security_filters, explain, reasons, codes, checks, done):
    """Layers 3-5 after the read-only check (split out so any analysis failure fails closed)."""
    tree = normalize_identifiers(stmt.copy(), dialect=ORACLE)
    blocked_cols = _check_blocked_columns(tree, policy)
    if blocked_cols:
        reasons += blocked_cols
        codes.append("unsafe")
    unknown_tables, unknown_columns, skipped = [], [], []
    if catalog:
        checks.append("catalog")
        unknown_tables, unknown_columns, ref_reasons = _check_references(tree, catalog, policy)
        reasons += ref_reasons
        codes += (["unknown_table"] if unknown_tables else []) + (["unknown_column"] if unknown_columns else [])
    else:
        skipped.append("catalog (no catalog given)")
    if security_filters:
        checks.append("security_filters")
        sec = _check_security_filters(tree, security_filters, catalog)
        if sec:
            reasons += sec
            codes.append("security_filter")
    else:
        skipped.append("security_filters (none in the request)")
    if explain and not reasons:
        checks.append("explain")
        # A callable is another EXPLAIN backend (e.g. the eval harness's DuckDB mirror): sql -> list of errors.
        ora = explain(sql) if callable(explain) else explain_oracle(
            sql, explain["dsn"], explain["user"], explain["password"], explain.get("timeout_s", 10))
        if ora:
            reasons += ora
            codes.append("explain_error")
    elif not explain:
        skipped.append("explain (no DSN configured)")
    ok = not reasons
    return done(ok=ok, sql=sql if ok else None, candidate_sql=sql, normalized=normalized,
                unknown_tables=unknown_tables, unknown_columns=unknown_columns, skipped=skipped)


# ------------------------------------------------------------------------------------------- ask (one retry)
def _chat_messages():
    from prompting import chat_messages
    return chat_messages


def _complete(client, model, messages, max_tokens):
    t0 = time.perf_counter()
    try:
        resp = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=max_tokens)
    except Exception as e:  # openai.APIError and transport errors: one line, not a traceback
        raise StageError(f"model endpoint call failed: {type(e).__name__}: {_first_line(e)}") from None
    latency = round((time.perf_counter() - t0) * 1000, 1)
    if not resp.choices:
        return "", None, latency
    choice = resp.choices[0]
    return choice.message.content or "", choice.finish_reason, latency


def ask(base_url, model, question, context, catalog, policy, api_key=None, max_tokens=512, timeout=120.0,
        allow_dml=False, explain=None, client=None) -> dict:
    """Guarded round trip: prompt (same template as training) -> model -> check_sql -> at most one retry."""
    import openai
    chat_messages = _chat_messages()
    context = context or {}
    filters = context.get("security_filters") or []
    client = client or openai.OpenAI(base_url=base_url, api_key=api_key or "EMPTY", timeout=timeout, max_retries=0)

    def attempt(messages):
        raw, finish, latency = _complete(client, model, messages, max_tokens)
        verdict = check_sql(raw, catalog=catalog, policy=policy, security_filters=filters, allow_dml=allow_dml,
                            explain=explain)
        if finish == "length":
            # A cut-off answer may still parse (e.g. a truncated WHERE); never accept it.
            verdict.update(ok=False, sql=None)
            verdict["reasons"] = verdict["reasons"] + [f"answer was cut off at max_tokens={max_tokens}: "
                                                       "write a shorter query"]
            verdict["codes"] = list(dict.fromkeys(verdict["codes"] + ["contract"]))
        return {"messages": messages, "raw_output": raw, "finish_reason": finish, "verdict": verdict,
                "latency_ms": latency}

    first = attempt(chat_messages(question, context))
    attempts = [first]
    if not first["verdict"]["ok"]:
        previous = first["verdict"]["candidate_sql"] or first["raw_output"].strip() or "(empty answer)"
        attempts.append(attempt(chat_messages(question, context, previous_sql=previous,
                                              reasons=first["verdict"]["reasons"])))
    final = attempts[-1]["verdict"]
    return {"ok": final["ok"], "sql": final["sql"] if final["ok"] else None, "final": final,
            "retried": len(attempts) > 1, "attempts": attempts,
            "latency_ms": round(sum(a["latency_ms"] for a in attempts), 1)}


# ------------------------------------------------------------------------------------------------------ CLI
class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.print_usage(sys.stderr)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def _explain_config(args):
    dsn = args.explain_dsn or os.environ.get("ORACLE_GUARD_DSN")
    if not dsn:
        return None
    user, password = os.environ.get("ORACLE_GUARD_USER"), os.environ.get("ORACLE_GUARD_PASSWORD")
    if not user or password is None:
        raise StageError("EXPLAIN DSN given but ORACLE_GUARD_USER / ORACLE_GUARD_PASSWORD are not set")
    explain_connect_params(dsn, user, args.explain_timeout)
    return {"dsn": dsn, "user": user, "password": password, "timeout_s": args.explain_timeout}


def _load_context(path):
    if not path:
        return {}
    try:
        ctx = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise StageError(f"cannot read context {path}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise StageError(f"context {path} is not valid JSON: {e}") from None
    if not isinstance(ctx, dict):
        raise StageError(f"context {path} must be a JSON object (raw-record context)")
    _validate_filters(ctx.get("security_filters"), f"context {path}")
    return ctx


def _validate_filters(filters, where):
    if filters is None:
        return
    if not isinstance(filters, list) or not all(
            isinstance(f, dict) and isinstance(f.get("table"), str) and isinstance(f.get("column"), str)
            for f in filters):
        raise StageError(f"{where}: security_filters must be a list of {{table, column, predicate}} objects")


def _cmd_check(args, policy, catalog):
    explain = _explain_config(args)
    base_filters = _load_context(args.context).get("security_filters") or []
    if not args.batch:
        verdict = check_sql(sys.stdin.read(), catalog=catalog, policy=policy, security_filters=base_filters,
                            allow_dml=args.allow_dml, explain=explain)
        print(json.dumps(verdict, ensure_ascii=False))
        return 0 if verdict["ok"] else 1
    items = []
    for n, line in enumerate(sys.stdin, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise StageError(f"--batch line {n} is not JSON: {e}") from None
        if not isinstance(item, dict) or not isinstance(item.get("text"), (str, type(None))) or "text" not in item:
            raise StageError(f'--batch line {n} must be an object with a "text" string')
        _validate_filters(item.get("security_filters"), f"--batch line {n}")
        items.append(item)
    rejected = 0
    for item in items:
        filters = item["security_filters"] if "security_filters" in item else base_filters
        verdict = check_sql(item["text"], catalog=catalog, policy=policy, security_filters=filters,
                            allow_dml=args.allow_dml, explain=explain)
        if "id" in item:
            verdict = {"id": item["id"], **verdict}
        rejected += not verdict["ok"]
        print(json.dumps(verdict, ensure_ascii=False), flush=True)
    print(f"checked {len(items)} answers: {len(items) - rejected} ok, {rejected} rejected "
          f"[{SQLGLOT_IMPL['name']}]", file=sys.stderr)
    return 0 if rejected == 0 else 1


def _cmd_ask(args, policy, catalog):
    context = _load_context(args.context)
    api_key = os.environ.get(args.api_key_env) if args.api_key_env else None
    if args.api_key_env and api_key is None:
        raise StageError(f"--api-key-env {args.api_key_env} is not set in the environment")
    result = ask(args.base_url, args.model, args.question, context, catalog, policy, api_key=api_key,
                 max_tokens=args.max_tokens, timeout=args.timeout, allow_dml=args.allow_dml,
                 explain=_explain_config(args))
    print(json.dumps(result, ensure_ascii=False))
    for i, a in enumerate(result["attempts"], 1):
        v = a["verdict"]
        print(f"attempt {i}: {'ok' if v['ok'] else 'rejected'} in {a['latency_ms']} ms"
              + ("" if v["ok"] else f" ({'; '.join(v['reasons'])[:300]})"), file=sys.stderr)
    return 0 if result["ok"] else 1


def build_parser():
    p = _Parser(prog="sql_guardrail.py", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="Exit codes: 0 ok, 1 rejected, 2 usage/config error. Environment: ORACLE_GUARD_DSN, "
                       "ORACLE_GUARD_USER, ORACLE_GUARD_PASSWORD (EXPLAIN), ORACLE_GUARD_PURE_SQLGLOT=1 (pure "
                       "python sqlglot).")
    p.add_argument("--version", action="version",
                   version=f"sql_guardrail with sqlglot {SQLGLOT_IMPL['version']}, {SQLGLOT_IMPL['name']}",
                   help="print the sqlglot version and implementation (compiled sqlglotc or pure python), then exit")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    def common(sp):
        sp.add_argument("--catalog", help="schema catalog for the hallucination check: JSON {TABLE: {COLUMN: TYPE}} "
                                          "or ALL_TAB_COLUMNS CSV export; without it that layer is skipped")
        sp.add_argument("--policy", help=f"policy YAML (default: {POLICY_PATH.name} beside this script)")
        sp.add_argument("--allow-dml", action="store_true",
                        help="also accept INSERT/UPDATE/DELETE/MERGE (never DDL). Off by default: never against EBS")
        sp.add_argument("--context", help="raw-record context JSON; its security_filters are enforced")
        sp.add_argument("--explain-dsn", help="staging Oracle DSN for EXPLAIN PLAN (or ORACLE_GUARD_DSN); user "
                                              "and password come from ORACLE_GUARD_USER / ORACLE_GUARD_PASSWORD")
        sp.add_argument("--explain-timeout", type=float, default=10.0,
                        help="seconds for the Oracle connect and for the EXPLAIN call (default 10)")

    c = sub.add_parser("check", help="validate a model answer read from stdin; prints one JSON verdict",
                       description="Read the model's raw answer on stdin, print one JSON verdict "
                                   "({ok, sql, reasons, codes, ...}). Exit 0 ok, 1 rejected, 2 usage/config error.")
    common(c)
    c.add_argument("--batch", action="store_true",
                   help='stdin is JSON lines {"text": ..., optional "security_filters": [...], optional "id"}; '
                        "one verdict per line, in order; exit 1 if any is rejected")
    a = sub.add_parser("ask", help="guarded round trip against an OpenAI-compatible endpoint (vLLM), one retry",
                       description="Render the training prompt, call the model, validate, retry once with the "
                                   "reasons; print the result JSON with both attempts.")
    common(a)
    a.add_argument("--base-url", required=True, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    a.add_argument("--model", required=True, help="served model name")
    a.add_argument("--question", required=True, help="the user's question")
    a.add_argument("--api-key-env", help="name of the environment variable holding the API key (never on the "
                                         "command line)")
    a.add_argument("--max-tokens", type=int, default=512, help="generation limit per attempt (default 512)")
    a.add_argument("--timeout", type=float, default=120.0, help="HTTP timeout per attempt in seconds (default 120)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if args.cmd == "ask" and not args.context:
            raise StageError("ask needs --context FILE (the raw-record context for the question)")
        policy = load_policy(args.policy)
        catalog = load_catalog(args.catalog) if args.catalog else None
        return {"check": _cmd_check, "ask": _cmd_ask}[args.cmd](args, policy, catalog)
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
