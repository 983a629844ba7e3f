"""The embedded EXPLAIN / execution backend: a DuckDB in-memory mirror of the catalog, beside oracle_explain.py.

Oracle SQL is transpiled with sqlglot (oracle -> duckdb, ErrorLevel.RAISE) plus fix-ups for the usual EBS idioms
(TRUNC(date, fmt), ADD_MONTHS, TO_CHAR(date, fmt), (+) joins, ROWNUM, SYSDATE, binds). Constructs DuckDB cannot
express (CONNECT BY, package functions, pseudo-columns) and DuckDB/Oracle type-system differences are "not
checkable", never errors.

- EXPLAIN: `mirror.explain(sql)` -> {status: clean|error|not_checkable, detail, duckdb_sql, fixups} on the catalog's
  tables (empty unless data was loaded). `mirror.feedback` is check_sql's explain callable.
- Execution: with `data` (duckdb_mirror_data.synthetic_rows) the tables hold deterministic synthetic rows;
  `mirror.execute(sql, row_cap, timeout_s)` -> {status: ok|error|not_checkable|timeout|too_many_rows, columns, rows,
  detail, elapsed_ms}. Binds take `binds` values (:org_ids -> a list expands the IN list) and SYSDATE is pinned to
  `today`, so a run is reproducible. A query over the timeout is interrupted; more rows than row_cap is a result in
  its own right ("too_many_rows"), never a silent truncation.
"""
import re
import threading
import time

import sqlglot
from sqlglot import exp
from sqlglot.errors import ErrorLevel


class NotCheckable(Exception):
    """The query uses Oracle features the DuckDB mirror cannot express: no verdict, never an error."""


def first_line(error) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def duckdb_type(oracle_type) -> str:
    """Oracle column type -> DuckDB type. DATE stays DATE so Oracle date arithmetic (d - d, d + n) binds alike."""
    t = (oracle_type or "").upper().strip()
    if t.startswith(("NUMBER", "FLOAT", "BINARY_DOUBLE", "BINARY_FLOAT")):
        m = re.match(r"NUMBER\((\d+)(?:,\s*(-?\d+))?\)", t)
        if m and (m.group(2) in (None, "0")) and int(m.group(1)) <= 18:
            return "BIGINT"
        return "DOUBLE"
    if t.startswith(("INTEGER", "INT", "SMALLINT", "PLS_INTEGER")):
        return "BIGINT"
    if t == "DATE":
        return "DATE"
    if t.startswith("TIMESTAMP"):
        return "TIMESTAMP"
    if t in ("BLOB", "RAW", "LONG RAW") or t.startswith("RAW"):
        return "BLOB"
    return "VARCHAR"  # VARCHAR2, NVARCHAR2, CHAR, CLOB, LONG, ROWID, unknown


# Oracle TRUNC/ROUND date format -> DuckDB date_trunc part.
TRUNC_UNITS = {"YYYY": "year", "YEAR": "year", "YYY": "year", "YY": "year", "Y": "year", "SYYYY": "year",
               "SYEAR": "year", "IYYY": "year", "Q": "quarter", "MM": "month", "MON": "month", "MONTH": "month",
               "RM": "month", "WW": "week", "IW": "week", "W": "week", "D": "week", "DY": "week", "DAY": "week",
               "DD": "day", "DDD": "day", "J": "day", "HH": "hour", "HH12": "hour", "HH24": "hour", "MI": "minute"}
# Oracle TO_CHAR date format elements -> strftime (longest first); anything else keeps CAST(x AS VARCHAR).
TO_CHAR_DATE = {"YYYY": "%Y", "MONTH": "%B", "HH24": "%H", "HH12": "%I", "MON": "%b", "DAY": "%A", "DY": "%a",
                "YY": "%y", "MM": "%m", "DD": "%d", "HH": "%I", "MI": "%M", "SS": "%S"}
_TO_CHAR_TOKEN = re.compile("|".join(sorted(TO_CHAR_DATE, key=len, reverse=True)) + r"|[-/ :.,]")
PSEUDO_NOT_CHECKABLE = {"LEVEL", "CONNECT_BY_ISLEAF", "CONNECT_BY_ISCYCLE", "ORA_ROWSCN", "ROWID"}


def _as_date(node):
    return exp.Cast(this=node, to=exp.DataType.build("DATE"))


def strftime_format(oracle_format):
    """'YYYY-MM' -> '%Y-%m'; None when the format has elements without a strftime equivalent."""
    fmt = oracle_format.upper()
    tokens = _TO_CHAR_TOKEN.findall(fmt)
    if "".join(tokens) != fmt:
        return None
    return "".join(TO_CHAR_DATE.get(t, t) for t in tokens)


def _rownum_limit(select):
    """`WHERE ... AND ROWNUM <= n` on a SELECT -> (where without it, n); None when ROWNUM is used otherwise."""
    where = select.args.get("where")
    if where is None:
        return None
    conj = list(where.this.flatten()) if isinstance(where.this, exp.And) else [where.this]
    for c in conj:
        if isinstance(c, (exp.LTE, exp.LT)) and isinstance(c.this, exp.Column) and not c.this.table \
                and c.this.name.upper() == "ROWNUM" and isinstance(c.expression, exp.Literal) \
                and not c.expression.is_string:
            n = int(float(c.expression.this)) - (1 if isinstance(c, exp.LT) else 0)
            rest = [x for x in conj if x is not c]
            return (exp.and_(*rest) if rest else None), max(n, 0)
    return None


class DuckDBMirror:
    """DuckDB tables shaped like the catalog (empty, or filled with `data`)."""

    def __init__(self, catalog, data=None, binds=None, today=None):
        import duckdb
        self.catalog, self.binds, self.today = catalog, dict(binds or {}), today
        self.executes = data is not None
        self._lock = threading.Lock()  # EXPLAIN takes ~1 ms on one shared connection: a lock is simpler than cursors
        self.con = duckdb.connect(":memory:")
        for table, cols in catalog.items():
            cols_sql = ", ".join(f'"{c}" {duckdb_type(t)}' for c, t in cols.items())
            self.con.execute(f'CREATE TABLE "{table}" ({cols_sql})')
        if "DUAL" not in catalog:  # Oracle's one-row table exists everywhere; catalogs exported from EBS omit it
            self.con.execute('CREATE TABLE "DUAL" ("DUMMY" VARCHAR)')
            self.con.execute("INSERT INTO \"DUAL\" VALUES ('X')")
        for table, d in (data or {}).items():
            self._load(table, d)
        # The mirror must never read files or the network, whatever the query names (read_csv, ATTACH, ...).
        self.con.execute("SET enable_external_access = false")
        self.con.execute("SET lock_configuration = true")
        self._cache = {}

    def _load(self, table, d):
        """Insert rows through Arrow (one call per table); columns the catalog does not have are dropped."""
        import pyarrow as pa
        cols = [c for c in d["columns"] if c in self.catalog.get(table, {})]
        if table not in self.catalog or not d["rows"] or not cols:
            return
        idx = [d["columns"].index(c) for c in cols]
        arrow = pa.table({c: [r[i] for r in d["rows"]] for c, i in zip(cols, idx)})  # noqa: F841 (read by DuckDB)
        col_list = ", ".join(f'"{c}"' for c in cols)
        self.con.execute(f'INSERT INTO "{table}" ({col_list}) SELECT {col_list} FROM arrow')

    # -- Oracle AST -> DuckDB-bindable AST
    def _column_type(self, col, aliases):
        """Oracle type of a column reference, from the catalog through the query's table aliases (None if unknown)."""
        name = col.name.upper()
        if col.table:
            table = aliases.get(col.table.upper())
            return (self.catalog.get(table) or {}).get(name) if table else None
        types = {self.catalog[t][name] for t in set(aliases.values()) if name in self.catalog.get(t, {})}
        return types.pop() if len(types) == 1 else None

    def _is_date(self, node, aliases):
        if isinstance(node, exp.Column):
            return (self._column_type(node, aliases) or "").upper().startswith(("DATE", "TIMESTAMP"))
        return isinstance(node, (exp.CurrentTimestamp, exp.CurrentDate, exp.DateTrunc, exp.TimestampTrunc)) or (
            isinstance(node, exp.Cast) and node.to.this in (exp.DataType.Type.DATE, exp.DataType.Type.TIMESTAMP))

    def to_duckdb(self, sql, execute=False):
        """(duckdb_sql, fixups). Raises NotCheckable for constructs DuckDB cannot express.

        execute=True: binds take their values (else NULL), SYSDATE is `today`, ROWNUM <= n becomes LIMIT n (EXPLAIN
        only needs ROWNUM to bind as a number)."""
        try:
            tree = sqlglot.parse_one(sql, read="oracle", error_level=ErrorLevel.RAISE)
        except Exception as e:  # the guardrail parsed it; failing here is a sqlglot limitation, not the model's
            raise NotCheckable(f"sqlglot cannot re-parse it: {first_line(e)}") from None
        if not isinstance(tree, exp.Query):
            raise NotCheckable(f"{tree.key.upper()} is not a query")
        fixups = []
        if tree.find(exp.Connect):
            raise NotCheckable("CONNECT BY hierarchical query")
        for dot in tree.find_all(exp.Dot):
            if isinstance(dot.expression, (exp.Anonymous, exp.Func)):
                raise NotCheckable(f"package function {dot.sql(dialect='oracle')[:60]}")
        for col in tree.find_all(exp.Column):
            if not col.table and col.name.upper() in PSEUDO_NOT_CHECKABLE:
                raise NotCheckable(f"pseudo-column {col.name.upper()}")
        aliases = {}
        for t in tree.find_all(exp.Table):
            aliases[(t.alias or t.name).upper()] = t.name.upper()
            aliases.setdefault(t.name.upper(), t.name.upper())

        if any(c.args.get("join_mark") for c in tree.find_all(exp.Column)):
            from sqlglot.transforms import eliminate_join_marks
            try:
                tree = eliminate_join_marks(tree)
            except Exception as e:
                raise NotCheckable(f"(+) outer join sqlglot cannot rewrite: {e}") from None
            fixups.append("(+) outer joins -> LEFT JOIN")
        if execute:
            for select in list(tree.find_all(exp.Select)):
                cut = _rownum_limit(select)
                if cut is not None:
                    where, n = cut
                    select.set("where", exp.Where(this=where) if where is not None else None)
                    select.set("limit", exp.Limit(expression=exp.Literal.number(n)))
                    fixups.append("WHERE ROWNUM <= n -> LIMIT n")
            if any(c.name.upper() == "ROWNUM" and not c.table for c in tree.find_all(exp.Column)):
                raise NotCheckable("ROWNUM other than a top-N filter")

        def fix(node):
            if isinstance(node, exp.In) and execute and any(isinstance(e, exp.Placeholder) and
                                                            isinstance(self.binds.get(e.name.lower()), list)
                                                            for e in node.expressions):
                values = []
                for e in node.expressions:
                    if isinstance(e, exp.Placeholder) and isinstance(self.binds.get(e.name.lower()), list):
                        values += [exp.convert(v) for v in self.binds[e.name.lower()]]
                        fixups.append(f"bind :{e.name} -> {self.binds[e.name.lower()]}")
                    else:
                        values.append(e)
                node.set("expressions", values)
                return node
            if isinstance(node, exp.Placeholder):
                value = self.binds.get(node.name.lower()) if execute else None
                if isinstance(value, list):
                    return node  # a list bind: the enclosing IN (...) expands it (visited after its children)
                fixups.append(f"bind :{node.name} -> {value if value is not None else 'NULL'}")
                return exp.convert(value) if value is not None and not isinstance(value, list) else exp.Null()
            if isinstance(node, exp.CurrentTimestamp) and node.args.get("sysdate"):
                if execute and self.today is not None:
                    fixups.append(f"SYSDATE -> DATE '{self.today.isoformat()}'")
                    return _as_date(exp.Literal.string(self.today.isoformat()))
                fixups.append("SYSDATE -> CURRENT_DATE")
                return exp.CurrentDate()
            if isinstance(node, exp.Column) and not node.table and node.name.upper() == "ROWNUM":
                fixups.append("ROWNUM -> 1 (numeric pseudo-column)")
                return exp.Literal.number(1)
            if isinstance(node, (exp.DateTrunc, exp.TimestampTrunc)):
                unit = node.args.get("unit")
                key = (unit.name if unit is not None else "DD").upper()
                if key not in TRUNC_UNITS:
                    raise NotCheckable(f"TRUNC format {key!r}")
                fixups.append(f"TRUNC(date, '{key}') -> CAST(date_trunc('{TRUNC_UNITS[key]}') AS DATE)")
                return _as_date(exp.DateTrunc(this=node.this, unit=exp.Literal.string(TRUNC_UNITS[key])))
            if isinstance(node, exp.Anonymous) and str(node.this).upper() == "TRUNC" and len(node.expressions) == 1:
                arg = node.expressions[0]
                if self._is_date(arg, aliases):
                    fixups.append("TRUNC(date) -> CAST(date_trunc('day') AS DATE)")
                    return _as_date(exp.DateTrunc(this=arg, unit=exp.Literal.string("day")))
                return node
            if isinstance(node, exp.AddMonths):
                fixups.append("ADD_MONTHS -> CAST(date + INTERVAL n MONTH AS DATE)")
                months = exp.Interval(this=exp.Paren(this=node.expression), unit=exp.var("MONTH"))
                return _as_date(exp.Add(this=node.this, expression=months))
            if isinstance(node, exp.ToNumber):
                fixups.append("TO_NUMBER(x[, fmt]) -> CAST(x AS DOUBLE)")
                return exp.Cast(this=node.this, to=exp.DataType.build("DOUBLE"))
            if isinstance(node, exp.ToChar):
                fmt = node.args.get("format")
                strf = strftime_format(fmt.name) if isinstance(fmt, exp.Literal) else None
                if strf is not None and self._is_date(node.this, aliases):
                    fixups.append(f"TO_CHAR(date, '{fmt.name}') -> strftime(date, '{strf}')")
                    out = exp.Anonymous(this="strftime", expressions=[node.this, exp.Literal.string(strf)])
                    return exp.Upper(this=out) if "%b" in strf or "%a" in strf else out
                # Oracle number format models do not map onto strftime; TO_CHAR is VARCHAR either way.
                fixups.append("TO_CHAR(x, fmt) -> CAST(x AS VARCHAR)")
                return exp.Cast(this=node.this, to=exp.DataType.build("VARCHAR"))
            return node

        # Children first (reversed pre-order), so a rewritten parent wraps already rewritten arguments.
        for node in reversed(list(tree.walk())):
            new = fix(node)
            if new is not node:
                node.replace(new)
        if any(True for _ in tree.find_all(exp.Placeholder)):
            raise NotCheckable("a list bind outside IN (...)")
        try:
            out = tree.sql(dialect="duckdb", unsupported_level=ErrorLevel.RAISE)
        except Exception as e:
            raise NotCheckable(f"sqlglot cannot write it for DuckDB: {first_line(e)}") from None
        return out, sorted(set(fixups))

    # -- DuckDB error -> verdict
    @staticmethod
    def classify(error):
        """'error' when the message proves the query is wrong on the catalog, else 'not_checkable'."""
        text = str(error)
        kind = type(error).__name__
        if kind == "CatalogException":
            return "not_checkable" if re.search(r"(Scalar|Aggregate|Table) Function with name", text) else "error"
        if kind == "BinderException":
            # Overload/cast failures come from DuckDB's stricter typing (Oracle converts implicitly): no verdict.
            if re.search(r"No function matches|Cannot compare|Cannot mix|explicit cast|could not be implicitly",
                         text, re.I):
                return "not_checkable"
            return "error"
        return "not_checkable"  # Parser/Conversion/NotImplemented: transpilation or type-system artefacts

    def explain(self, sql):
        """{status: clean|error|not_checkable, detail, duckdb_sql, fixups}; cached per SQL text."""
        if sql in self._cache:
            return self._cache[sql]
        result = {"status": "clean", "detail": "", "duckdb_sql": None, "fixups": []}
        try:
            result["duckdb_sql"], result["fixups"] = self.to_duckdb(sql)
            with self._lock:
                self.con.execute("EXPLAIN " + result["duckdb_sql"]).fetchall()
        except NotCheckable as e:
            result.update(status="not_checkable", detail=str(e))
        except Exception as e:
            result.update(status=self.classify(e), detail=first_line(e))
        self._cache[sql] = result
        return result

    def feedback(self, sql):
        """check_sql's explain callable contract: [] when accepted (or not checkable), else feedback lines."""
        r = self.explain(sql)
        return [f"EXPLAIN on the catalog mirror failed: {r['detail']}"] if r["status"] == "error" else []

    def execute(self, sql, row_cap=10000, timeout_s=10.0):
        """Run the query on the mirror's rows: {status, columns, rows, detail, elapsed_ms} (see module docstring)."""
        t0 = time.perf_counter()

        def done(status, detail="", columns=None, rows=None):
            return {"status": status, "detail": detail, "columns": columns, "rows": rows,
                    "elapsed_ms": round((time.perf_counter() - t0) * 1000, 1)}

        if not self.executes:
            return done("not_checkable", "the mirror has no rows (no --schema to generate them from)")
        try:
            duck_sql, _ = self.to_duckdb(sql, execute=True)
        except NotCheckable as e:
            return done("not_checkable", str(e))
        cur = self.con.cursor()  # its own connection to the same database: executions run in parallel
        timer = threading.Timer(timeout_s, cur.interrupt)
        timer.start()
        try:
            cur.execute(duck_sql)
            rows = cur.fetchmany(row_cap + 1)
            columns = [d[0] for d in cur.description or []]
        except Exception as e:
            if not timer.is_alive() or type(e).__name__ == "InterruptException":
                return done("timeout", f"no result within {timeout_s:g}s")
            status = self.classify(e)
            return done(status, first_line(e))
        finally:
            timer.cancel()
            cur.close()
        if len(rows) > row_cap:
            return done("too_many_rows", f"more than {row_cap} rows", columns)
        return done("ok", "", columns, [list(r) for r in rows])
