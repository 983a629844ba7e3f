"""Objects the policy never lets a query touch: blocked schemas, dictionary/performance views, secret columns.

    FROM sys.user$ / v$session / dba_users           -> unsafe "schema SYS is blocked" / "table V$SESSION is blocked"
    SELECT encrypted_user_password FROM fnd_user     -> unsafe "column FND_USER.ENCRYPTED_USER_PASSWORD ... blocked"
    SELECT JSON_OBJECT(*) FROM fnd_user              -> unsafe "* over FND_USER would expose ..." (a star anywhere:
                                                        select list, inside functions, t.*; COUNT(*) is fine)
"""
from sqlglot import exp

from guardrail.query import Finding, Query, glob, ident


def check(q: Query) -> list:
    policy, out = q.policy, []
    tables = {}
    for t in q.tree.find_all(exp.Table):
        if not isinstance(t.this, exp.Identifier):
            continue
        schema, table = ident(t.args.get("db")), ident(t.this)
        tables.setdefault(table, set()).add(ident(t.args["alias"].this) if t.alias else table)
        if schema and schema in policy["_sets"]["blocked_schemas"] and table != "DUAL":  # SYS.DUAL is everyone's
            out.append(Finding("unsafe", f"schema {schema} is blocked ({schema}.{table})"))
        elif glob(table, policy["blocked_table_patterns"]):
            out.append(Finding("unsafe", f"table {table} is blocked by the policy (dictionary/performance view)"))
    stars = [s for s in q.tree.find_all(exp.Star) if not isinstance(s.parent, exp.Count)]
    names = {ident(c.this) for c in q.tree.find_all(exp.Column) if isinstance(c.this, exp.Identifier)}
    for entry in sorted(policy["_sets"]["blocked_columns"]):
        table, _, column = entry.partition(".")
        if table not in tables:
            continue
        if column in names:
            out.append(Finding("unsafe", f"column {entry} holds secrets and is blocked by the policy"))
        if stars:
            out.append(Finding("unsafe", f"* over {table} (anywhere, also inside functions such as JSON_OBJECT(*)) "
                                         f"would expose blocked column {entry}: list the columns"))
    return out
