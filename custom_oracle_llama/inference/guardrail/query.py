"""What every rule reads: the parsed query, its tokens, the policy and catalog, plus small name helpers.

A rule is a module with `check(q: Query) -> list[Finding]`; rules/__init__.py lists them in order (RULES).
"""
import fnmatch
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

from sqlglot import exp


class Finding(NamedTuple):
    code: str      # one of codes.CODES
    reason: str    # one line the model's retry can act on
    detail: str = ""  # "unknown_table" / "unknown_column" entries carry the name here


@dataclass
class Query:
    sql: str                 # the candidate SQL as the model wrote it (after contract normalization)
    tokens: list             # sqlglot tokens of `sql` (strings and comments are single tokens: never inspected as code)
    stmt: exp.Expression     # the parsed statement, as written
    tree: exp.Expression     # identifier-normalized copy (unquoted names upper-cased): what rules resolve
    policy: dict
    catalog: Optional[object]  # catalog.Catalog or None
    security_filters: list   # from the request context: added to the policy's required filters
    allow_dml: bool = False
    skipped: list = field(default_factory=list)

    @property
    def source_names(self) -> set:
        """Every name the query itself declares as a row source: tables, aliases, CTEs, inline-view aliases."""
        if not hasattr(self, "_sources"):
            names = set()
            for node in self.tree.find_all(exp.Table, exp.TableAlias, exp.CTE, exp.Subquery):
                if isinstance(node, exp.Table) and isinstance(node.this, exp.Identifier):
                    names.add(ident(node.this))
                elif isinstance(node, exp.TableAlias) and isinstance(node.this, exp.Identifier):
                    names.add(ident(node.this))
                elif isinstance(node, (exp.CTE, exp.Subquery)) and node.alias:
                    names.add(ident(node.args["alias"].this))
            self._sources = names
        return self._sources


def ident(node) -> str:
    """Oracle name of an identifier-ish node: unquoted names upper-cased, quoted names kept exactly as written."""
    if node is None:
        return ""
    if isinstance(node, exp.Identifier):
        return node.this if node.quoted else node.this.upper()
    if isinstance(node, str):
        return node.upper()
    return node.name.upper() if node.name else ""


def token_name(tok) -> str:
    from sqlglot.tokens import TokenType
    return tok.text if tok.token_type == TokenType.IDENTIFIER else tok.text.upper()


def glob(name, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def func_name(node) -> str:
    """Upper-case name of a function node as written (Anonymous keeps the written name; typed nodes their SQL name)."""
    if isinstance(node, exp.Anonymous):
        return node.this.upper() if isinstance(node.this, str) else ident(node.this)
    return node.sql_name().upper()


def in_hint(node) -> bool:
    return node.find_ancestor(exp.Hint) is not None
