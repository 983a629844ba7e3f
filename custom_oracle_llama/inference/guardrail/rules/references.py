"""Every name resolves: tables to the catalog (or a CTE / DUAL), columns to a source in scope, qualified names
whose qualifier is no source to an allowlisted package function (Oracle calls A.B as a function when no table or
alias A is in scope, parentheses or not).

    SELECT XX_PAY_PKG.RELEASE_ALL_HOLDS FROM dual -> unsafe (package function without parentheses, not allowlisted)
    FROM ap_invoice_headers                       -> unknown_table "unknown table AP_INVOICE_HEADERS"
    SELECT ai.vendor_nm FROM ap_invoices_all ai   -> unknown_column "unknown column AP_INVOICES_ALL.VENDOR_NM"
Checked everywhere a column can appear: select lists, WHERE, HAVING, ORDER BY (select-list aliases and, after a
set operation, the first branch's output names), JOIN ... USING (col), PIVOT/UNPIVOT clauses, CONNECT BY.
Without a catalog only the qualifier/package resolution runs (`skipped` says so).
"""
from sqlglot import exp
from sqlglot.optimizer.scope import Scope, build_scope

from guardrail.query import Finding, Query, glob, ident
from guardrail.rules.functions import package_call_reason


def query_names(query):
    """Output column names of a query, or None when a star or unnamed expression makes them unknowable."""
    while isinstance(query, exp.Subquery):
        query = query.this
    if isinstance(query, exp.SetOperation):
        return query_names(query.left)
    if not isinstance(query, exp.Select):
        return None
    names = []
    for e in query.expressions:
        if isinstance(e, exp.Star) or (isinstance(e, exp.Column) and isinstance(e.this, exp.Star)):
            return None
        names.append(ident(e.args["alias"].this) if isinstance(e, exp.Alias) else ident(e) if isinstance(
            e, exp.Column) else e.alias_or_name.upper())
    return names


def _pivot_outputs(pivot):
    """Names a PIVOT/UNPIVOT adds to its source's columns (UNPIVOT: its value and FOR columns)."""
    names = {ident(c) for c in pivot.args.get("columns") or [] if isinstance(c, exp.Identifier)}
    if pivot.args.get("unpivot"):
        for e in pivot.expressions:
            names |= {ident(e)} if isinstance(e, exp.Identifier) else {ident(c.this) for c in e.find_all(exp.Column)}
        for f in pivot.args.get("fields") or []:
            target = f.this if isinstance(f, exp.In) else None
            if isinstance(target, exp.Identifier):
                names.add(ident(target))
            elif isinstance(target, exp.Column):
                names.add(ident(target.this))
            elif isinstance(target, exp.Tuple):
                names |= {ident(c.this if isinstance(c, exp.Column) else c) for c in target.expressions}
    else:
        for f in pivot.args.get("fields") or []:
            for a in f.find_all(exp.PivotAlias):
                alias = a.args.get("alias")
                names.add(ident(alias) if isinstance(alias, exp.Identifier) else a.this.name.upper())
    return names


class Resolver:
    """'does SOURCE expose COLUMN': physical tables (catalog), CTEs, inline views. None means 'cannot tell'."""

    def __init__(self, catalog, policy, cte_cols):
        self.catalog, self.cte_cols = catalog, cte_cols
        self.pseudo = policy["_sets"]["pseudo_columns"]

    def table_columns(self, table):
        name = ident(table.this) if isinstance(table.this, exp.Identifier) else None
        if name is None:
            return None
        if not table.args.get("db") and name in self.cte_cols:
            return self.cte_cols[name]
        if name == "DUAL":
            return {"DUMMY"}
        cols = self.catalog.columns(name, ident(table.args.get("db"))) if self.catalog is not None else None
        return set(cols) if cols is not None else None

    def columns_of(self, source):
        if isinstance(source, Scope):
            expr, parent = source.expression, source.expression.parent
            if isinstance(parent, (exp.Subquery, exp.CTE)) and parent.args.get("alias") \
                    and parent.args["alias"].columns:
                cols = {ident(c) for c in parent.args["alias"].columns}
            else:
                names = query_names(expr)
                cols = set(names) if names is not None else self._star_columns(source)
            pivots = parent.args.get("pivots") if isinstance(parent, exp.Subquery) else None
        elif isinstance(source, exp.Table):
            cols, pivots = self.table_columns(source), source.args.get("pivots")
        else:
            return None
        if cols is not None and pivots:
            for p in pivots:
                cols = cols | _pivot_outputs(p)
        return cols

    def _star_columns(self, scope):
        query = scope.expression
        while isinstance(query, exp.SetOperation):
            query = query.left
        if not isinstance(query, exp.Select):
            return None
        out = set()
        for e in query.expressions:
            if isinstance(e, exp.Star) or (isinstance(e, exp.Column) and isinstance(e.this, exp.Star)):
                srcs = list(scope.sources.values()) if isinstance(e, exp.Star) else \
                    [scope.sources.get(ident(e.args.get("table")))]
                for src in srcs:
                    cols = self.columns_of(src) if src is not None else None
                    if cols is None:
                        return None
                    out |= cols
            else:
                out.add(ident(e.args["alias"].this) if isinstance(e, exp.Alias) else
                        ident(e) if isinstance(e, exp.Column) else e.alias_or_name.upper())
        return out


def _cte_columns(tree):
    out = {}
    for cte in tree.find_all(exp.CTE):
        alias = cte.args.get("alias")
        cols = [ident(c) for c in (alias.columns if alias else [])] or query_names(cte.this)
        out[ident(alias.this) if alias else cte.alias_or_name.upper()] = set(cols) if cols is not None else None
    return out


def _pivot_alias_source(scope, name):
    """The source a PIVOT/UNPIVOT named NAME applies to (`FROM (...) PIVOT (...) p`: p.col reads it)."""
    for src in scope.sources.values():
        node = src.expression.parent if isinstance(src, Scope) else src
        for p in (node.args.get("pivots") or []) if node is not None else []:
            alias = p.args.get("alias")
            if alias is not None and ident(alias.this if isinstance(alias, exp.TableAlias) else alias) == name:
                return src
    return None


def _scoped_columns(root):
    """(scope, column) for every column: sqlglot's scope.columns, innermost scopes first, plus the columns it leaves
    out (HAVING aggregates, PIVOT clauses), judged in the SELECT that holds them."""
    scopes = list(root.traverse())
    for scope in scopes:
        for col in scope.columns:
            yield scope, col
    for scope in scopes:
        for col in scope.expression.find_all(exp.Column):
            if col.find_ancestor(exp.Select, exp.SetOperation) is scope.expression:
                yield scope, col


def _set_operation_order(col):
    """The set operation whose ORDER BY holds this column, if any."""
    order = col.find_ancestor(exp.Order)
    return order.parent if order is not None and isinstance(order.parent, exp.SetOperation) else None


def check(q: Query) -> list:
    policy, catalog, out = q.policy, q.catalog, []
    cte_cols = _cte_columns(q.tree)
    resolver = Resolver(catalog, policy, cte_cols)
    seen_keys = set()

    def add(code, key, reason):
        if key not in seen_keys:
            seen_keys.add(key)
            out.append(Finding(code, reason, key))

    def rejected_elsewhere(name):  # other rules own these names; listing them again only adds noise
        return "@" in name or glob(name, policy["blocked_table_patterns"]) \
            or glob(name, policy["blocked_package_patterns"]) or name in policy["_sets"]["blocked_schemas"]

    if catalog is not None:
        for table in q.tree.find_all(exp.Table):
            if not isinstance(table.this, exp.Identifier):
                continue
            name, owner = ident(table.this), ident(table.args.get("db"))
            if (not owner and name in cte_cols) or name == "DUAL" or rejected_elsewhere(name) \
                    or rejected_elsewhere(owner):
                continue
            if catalog.ambiguous(name, owner):
                add("unknown_table", name, f"table {name} exists in several schemas ({', '.join(catalog.owners(name))}) "
                                           "with different columns: qualify it with its schema")
            elif resolver.table_columns(table) is None:
                add("unknown_table", name, f"unknown table {name}" + (f" (schema {owner})" if owner else ""))

    root = build_scope(q.tree)
    if root is None:
        return out
    seen = set()
    for scope, col in _scoped_columns(root):
        if True:
            # sqlglot also lists a subquery's unresolved columns in the enclosing scope: judge each column once.
            if id(col) in seen or not isinstance(col.this, exp.Identifier):
                continue  # t.* : the qualifier is checked by its table
            seen.add(id(col))
            name, qualifier, db = ident(col.this), ident(col.args.get("table")), ident(col.args.get("db"))
            if "@" in name or name in ("NEXTVAL", "CURRVAL") or (qualifier and rejected_elsewhere(qualifier)):
                continue
            if qualifier:
                found, s = None, scope
                while s is not None and found is None:
                    found = s.sources.get(qualifier) or _pivot_alias_source(s, qualifier)
                    s = s.parent
                if found is None and (qualifier in q.source_names or (catalog is not None and qualifier in catalog)):
                    add("unknown_column", f"{qualifier}.{name}", f"unknown column {qualifier}.{name}: no table or "
                                                                 f"alias {qualifier} in scope here")
                    continue
                if found is None:
                    names = [n for n in (ident(col.args.get("catalog")), db, qualifier, name) if n]
                    reason = package_call_reason(names, policy, written="without parentheses")
                    if reason:
                        add("unsafe", ".".join(names), f"{'.'.join(names)} does not resolve: no table or alias "
                                                       f"{qualifier} in scope, so Oracle would call it as a function; "
                                                       + reason)
                    continue
                cols = resolver.columns_of(found)  # None for a physical table without a catalog
                if cols is not None and name not in cols and name not in resolver.pseudo:
                    label = ident(found.this) if isinstance(found, exp.Table) else qualifier
                    add("unknown_column", f"{label}.{name}", f"unknown column {label}.{name}" + (
                        f" (alias {qualifier})" if label != qualifier else ""))
                continue
            if name in resolver.pseudo:
                continue
            setop = _set_operation_order(col)
            if setop is not None:
                branch_names = query_names(setop.left)
                if branch_names is None or name in branch_names:
                    continue
            resolved, s, innermost = False, scope, None
            while s is not None and not resolved:
                innermost = innermost or s
                known = [resolver.columns_of(src) for src in s.sources.values()]
                select = s.expression if isinstance(s.expression, exp.Select) else None
                aliases = {ident(e.args["alias"].this) for e in select.expressions
                           if isinstance(e, exp.Alias)} if select is not None else set()
                if any(c is None or name in c for c in known) or name in aliases:
                    resolved = True
                s = s.parent
            if not resolved:
                tables = [ident(src.this) if isinstance(src, exp.Table) else alias or "(inline view)"
                          for alias, src in innermost.sources.items()]
                key = f"{tables[0]}.{name}" if len(tables) == 1 else name
                add("unknown_column", key, f"unknown column {key}" if len(tables) == 1 else
                    f"unknown column {name} (not in any of: {', '.join(tables) or 'no tables'})")
    if catalog is not None:
        out += _using_columns(q.tree, resolver)
    return out


def _using_columns(tree, resolver):
    """JOIN ... USING (col): the column must exist in the joined table (and Oracle needs it on the left too)."""
    out = []
    for join in tree.find_all(exp.Join):
        for c in join.args.get("using") or []:
            name = ident(c.this if isinstance(c, exp.Column) else c)
            cols = resolver.columns_of(join.this) if isinstance(join.this, exp.Table) else None
            if cols is not None and name not in cols:
                label = ident(join.this.this)
                out.append(Finding("unknown_column", f"unknown column {label}.{name} (in USING)", f"{label}.{name}"))
    return out
