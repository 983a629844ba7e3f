"""Read-only: one query and nothing inside it that writes, locks, reaches another database or reads the past.

    FOR UPDATE                          -> unsafe "FOR UPDATE locks rows ..."
    SELECT ... INTO v                   -> unsafe "SELECT INTO is PL/SQL ..."
    FROM ap_invoices_all @ prod_link    -> unsafe "database link ..." (any '@' outside strings, quoted names, comments)
    seq.NEXTVAL                         -> unsafe "sequence access ..."
    AS OF SCN / VERSIONS BETWEEN        -> unsafe "flashback ..." (policy allow_flashback)
    /*+ PARALLEL(8) */                  -> unsafe "optimizer hint ..." (policy allow_optimizer_hints)
Statement-level refusals (DML/DDL/PL-SQL, WITH FUNCTION) happen before parsing, in check.py.
"""
import re

from sqlglot import exp
from sqlglot.tokens import TokenType

from guardrail.query import Finding, Query, ident

STATEMENT_NODES = tuple(c for c in (getattr(exp, n, None) for n in (
    "DML", "DDL", "Insert", "Update", "Delete", "Merge", "MultitableInserts", "Create", "Drop", "Alter", "Grant",
    "Revoke", "TruncateTable", "Set", "Transaction", "Commit", "Rollback", "Analyze", "Comment", "Use", "Pragma",
    "LoadData", "Kill", "Execute", "Refresh", "Cache", "Uncache", "Describe", "Show", "Summarize", "Copy", "Command",
)) if c is not None)
DML_NODES = (exp.Insert, exp.Update, exp.Delete, exp.Merge)
ORACLE_NAME = re.compile(r"\A[A-Za-z][A-Za-z0-9_$#]*\Z")  # an unquoted Oracle name (full-width letters are not)


def check(q: Query) -> list:
    out = []
    for prev, tok in zip([None] + q.tokens, q.tokens):
        if tok.token_type == TokenType.PARAMETER:  # '@' is only ever a database link in Oracle SQL
            out.append(Finding("unsafe", f"database link (@ at line {tok.line}): remote objects are not allowed"))
        elif tok.token_type == TokenType.BETWEEN and prev is not None and prev.text.upper() == "VERSIONS" \
                and not q.policy["allow_flashback"]:
            out.append(Finding("unsafe", "flashback version query (VERSIONS BETWEEN) reads past row versions: not "
                                         "allowed by the policy (allow_flashback)"))
    for node in q.tree.walk():
        if node is not q.tree and isinstance(node, STATEMENT_NODES) and not (
                q.allow_dml and isinstance(node, DML_NODES)):
            out.append(Finding("unsafe", f"nested {node.key.upper()} statement inside the query"))
        elif isinstance(node, exp.Lock):
            out.append(Finding("unsafe", "FOR UPDATE locks rows: not allowed in a read-only query"))
        elif isinstance(node, exp.Select) and node.args.get("into"):
            out.append(Finding("unsafe", "SELECT INTO is PL/SQL, not a query"))
        elif isinstance(node, exp.Identifier) and not node.quoted and "@" in node.this:
            out.append(Finding("unsafe", f"database link in {node.this}: remote objects are not allowed"))
        elif isinstance(node, exp.Identifier) and not node.quoted and not ORACLE_NAME.match(node.this) \
                and not isinstance(node.parent, exp.Placeholder):
            out.append(Finding("unsafe", f"invalid unquoted identifier {node.this!r}: Oracle names are ASCII "
                                         "letters, digits, _ $ #"))
        elif isinstance(node, exp.Version) and not q.policy["allow_flashback"]:
            out.append(Finding("unsafe", f"flashback query ({node.sql(dialect='oracle')}) reads deleted or "
                                         "corrected data: not allowed by the policy (allow_flashback)"))
        elif isinstance(node, exp.Column) and isinstance(node.this, exp.Identifier) and node.table \
                and ident(node.this) in ("NEXTVAL", "CURRVAL"):
            out.append(Finding("unsafe", f"sequence access {ident(node.args['table'])}.{ident(node.this)} is not "
                                         "allowed"))
        elif isinstance(node, exp.Hint) and not q.policy["allow_optimizer_hints"]:
            out.append(Finding("unsafe", f"optimizer hint {node.sql(dialect='oracle')} is not allowed by the policy "
                                         "(allow_optimizer_hints)"))
        elif isinstance(node, exp.Select) and not q.policy["allow_optimizer_hints"] and any(
                c.lstrip().startswith("+") for c in node.comments or []):
            # Oracle reads `SELECT --+ hint` as a hint; sqlglot keeps it as the SELECT's comment. A `--+` comment
            # elsewhere in the query is only a comment.
            out.append(Finding("unsafe", "optimizer hint comment (--+ / /*+) is not allowed by the policy "
                                         "(allow_optimizer_hints)"))
    return out
