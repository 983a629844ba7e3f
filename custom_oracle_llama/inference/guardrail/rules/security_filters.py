"""MOAC / row-level security: every SELECT that reads a secured table filters it with the required predicate.

Required filters come from the policy (`required_filters`: e.g. every *_ALL table whose catalog entry has ORG_ID
must carry `ORG_ID IN (:org_ids)`) and the request context's security_filters add to them; neither the model nor a
request can remove one. The bind values come from the caller's identity when the app runs the SQL.

Enforced per table occurrence, in the SELECT that reads it (also in subqueries, EXISTS, CTEs, every set-operation
branch): a top-level AND conjunct of its WHERE (or of an inner-join ON, or the ON of the LEFT JOIN that makes it the
null-supplying side) equal to the predicate on that table's alias. An OR around it neutralises it: not accepted.
Compared semantically: qualifiers, bind-name case (:ORG_IDS = :org_ids), operand order of = and function-name case
do not matter.

    SELECT ... FROM ap_invoices_all                         -> security_filter "missing security filter ..."
    ... WHERE org_id IN (:org_ids) OR 1 = 1                 -> security_filter (neutralised by OR)
    ... WHERE org_id IN (81, 204)                           -> security_filter "must be ORG_ID IN (:org_ids)"
"""
import functools

import sqlglot
from sqlglot import exp
from sqlglot.errors import ParseError, TokenError
from sqlglot.optimizer.normalize_identifiers import normalize_identifiers

from artifacts import StageError
from guardrail.query import Finding, Query, glob, ident

ORACLE = "oracle"


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


def canonical(cond) -> str:
    """Comparable text of a predicate: qualifiers dropped, bind names lower-case, function names upper-case,
    operands of symmetric comparisons in a fixed order."""
    cond = cond.copy()
    for col in cond.find_all(exp.Column):
        for key in ("table", "db", "catalog"):
            col.set(key, None)
        col.set("join_mark", None)
    for node in list(cond.walk()):
        node.comments = None
        if isinstance(node, exp.Identifier) and node.quoted and node.this.isupper() and node.this.isidentifier():
            node.set("quoted", False)  # "ORG_ID" is ORG_ID
        if isinstance(node, exp.Placeholder) and isinstance(node.this, str):
            node.set("this", node.this.lower())
        elif isinstance(node, exp.Anonymous) and isinstance(node.this, str):
            node.set("this", node.this.upper())
        elif isinstance(node, exp.Identifier) and not node.quoted:
            node.set("this", node.this.upper())
        elif isinstance(node, exp.Paren) and isinstance(node.parent, (exp.EQ, exp.NEQ, exp.In)):
            node.replace(node.this)
    for node in list(cond.find_all(exp.EQ, exp.NEQ)):
        left, right = node.this, node.expression
        if left.sql(dialect=ORACLE) > right.sql(dialect=ORACLE):
            node.set("this", right.copy())
            node.set("expression", left.copy())
    return cond.sql(dialect=ORACLE)


@functools.lru_cache(maxsize=1024)
def predicate_key(predicate: str) -> str:
    """The canonical text of a configured predicate; StageError if it does not parse (a config error)."""
    try:
        expected = normalize_identifiers(sqlglot.parse_one(predicate, read=ORACLE), dialect=ORACLE)
    except (ParseError, TokenError) as e:
        raise StageError(f"security filter predicate {predicate!r} does not parse: "
                         f"{str(e).strip().splitlines()[0][:200]}") from None
    return canonical(expected)


def filters_for(q: Query) -> list:
    """[{table, column, predicate}] that apply to this query: the policy's required filters for every table the
    query reads whose catalog entry has the column, plus the request context's filters."""
    out = []
    if q.catalog is not None and q.policy["required_filters"]:
        for t in q.tree.find_all(exp.Table):
            if not isinstance(t.this, exp.Identifier):
                continue
            name = ident(t.this)
            for rule in q.policy["required_filters"]:
                if glob(name, rule["tables"]):
                    cols = q.catalog.columns(name, ident(t.args.get("db"))) or {}
                    if rule["column"] in cols:
                        out.append({"table": name, "column": rule["column"], "predicate": rule["predicate"]})
    for f in q.security_filters or []:
        column = str(f.get("column", "")).upper()
        out.append({"table": str(f.get("table", "")).upper(), "column": column,
                    "predicate": str(f.get("predicate") or f"{column} IN (:org_ids)")})
    return [dict(t) for t in dict.fromkeys(tuple(sorted(f.items())) for f in out)]


def _filtering_conditions(owner, occ):
    conds = _conjuncts(owner.args.get("where").this if owner.args.get("where") else None)
    for join in owner.args.get("joins") or []:
        # An ON conjunct filters a table only in an inner join, or when the table is the null-supplying side of a
        # LEFT join; on the preserved side of an outer join every row still comes back.
        if not join.side or (join.side == "LEFT" and join.this is occ):
            conds += _conjuncts(join.args.get("on"))
    return conds


def _direct_match(conds, alias, column, sole, expected):
    found = [c for c in conds if any(ident(col.args.get("table")) == alias or (not col.table and sole)
                                     for col in c.find_all(exp.Column) if ident(col.this) == column)]
    return found, any(canonical(c) == expected for c in found)


def _equal_to_filtered(conds, alias, column, filtered):
    """`a.org_id = b.org_id` where b carries the predicate: a is filtered too (lines joined to their header)."""
    for c in conds:
        if isinstance(c, exp.EQ) and isinstance(c.this, exp.Column) and isinstance(c.expression, exp.Column) \
                and ident(c.this.this) == column and ident(c.expression.this) == column:
            sides = {ident(c.this.args.get("table")), ident(c.expression.args.get("table"))}
            if alias in sides and (sides - {alias}) & filtered:
                return True
    return False


def check(q: Query) -> list:
    out = []
    for f in filters_for(q):
        table, column, predicate = f["table"], f["column"], f["predicate"]
        expected = predicate_key(predicate)
        for occ in q.tree.find_all(exp.Table):
            if not isinstance(occ.this, exp.Identifier) or ident(occ.this) != table:
                continue
            owner = occ.find_ancestor(exp.Select, exp.Update, exp.Delete)
            if owner is None:
                continue
            alias = ident(occ.args["alias"].this) if occ.alias else table
            sources = [t for t in owner.find_all(exp.Table)
                       if t.find_ancestor(exp.Select, exp.Update, exp.Delete) is owner]
            derived = [s for s in owner.find_all(exp.Subquery) if s.find_ancestor(exp.Select) is owner and s.alias]
            sole = len(sources) + len(derived) == 1
            if not sole and q.catalog is not None:
                others = [t for t in sources if t is not occ and column in (
                    q.catalog.columns(ident(t.this)) or {} if isinstance(t.this, exp.Identifier) else {})]
                sole = not others and not derived
            conds = _filtering_conditions(owner, occ)
            found, ok = _direct_match(conds, alias, column, sole, expected)
            if not ok:
                filtered = {ident(t.args["alias"].this) if t.alias else ident(t.this) for t in sources
                            if t is not occ and isinstance(t.this, exp.Identifier)
                            and _direct_match(_filtering_conditions(owner, t), ident(t.args["alias"].this)
                                              if t.alias else ident(t.this), column, False, expected)[1]}
                ok = _equal_to_filtered(conds, alias, column, filtered)
            if ok:
                continue
            where = f"{table}" + (f" (alias {alias})" if alias != table else "")
            if not found:
                out.append(Finding("security_filter", f"missing security filter on {table}.{column} (expected "
                                                      f"{predicate}) for {where}"))
            else:
                got = "; ".join(c.sql(dialect=ORACLE) for c in found)
                out.append(Finding("security_filter", f"security filter on {table}.{column} must be {predicate} "
                                                      f"(found {got}) for {where}"))
    return list(dict.fromkeys(out))
