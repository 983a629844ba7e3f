"""Deterministic synthetic rows for the DuckDB catalog mirror, so that queries can be executed, not only EXPLAINed.

Built from a schema file in the shape of demo/ebs_schema.json (typed, described columns; joins; security filters):
- keys that join: a join "CHILD.COL = PARENT.KEY" makes KEY a generated key of PARENT (unique ids when numeric) and
  COL a foreign key that copies the values of one PARENT row (all columns a child takes from one parent come from
  the same parent row, so composite keys such as invoice line (INVOICE_ID, LINE_NUMBER) join too);
- several operating units (--org_count, default 3): the MOAC bind :org_ids is given all but the last one, so a query
  that forgets its ORG_ID filter returns a different answer;
- dates spread over four years up to `today` (+ a few weeks ahead for due/need-by dates), with a share in the last
  weeks so "this week"/"this month" questions have rows;
- codes: the values a column's description lists ("Invoice type: STANDARD, CREDIT, ..."), 'Y'/'N' for one-character
  flags, and the literals the given SQL texts compare the column with (`COL = 'X'`, `COL IN (...)`): the
  literal-seeding idea of test-suite accuracy (Zhong et al., 2020), so that gold queries filtering on a named
  supplier or invoice number find it. Literals are shared across every column the joins connect (one key domain).
Everything random comes from one seed (random.Random + Faker.seed_instance): same schema, SQL, seed and `today` ->
the same rows.

    data = synthetic_rows(schema, seed=0, today=date(2026, 12, 1), sqls=[gold_sql, ...])
    data["AP_INVOICES_ALL"] -> {"columns": [...], "rows": [(...), ...]};  bind_values(schema, data) -> {"org_ids": [...]}
"""
import datetime as dt
import fnmatch
import random
import re
from collections import defaultdict

# Rows per table: master tables (no foreign key) stay small so that GROUP BY supplier/unit has several rows per group.
MASTER_ROWS = 12
CHILD_ROWS = 400
# Share of NULLs in ordinary columns, and in columns that record an event most rows have not had yet.
NULL_SHARE = 0.05
RARE_EVENT_COLUMNS = ("*CANCEL*DATE", "*CANCELLED_DATE", "RELEASE_*", "INACTIVE_DATE", "END_DATE*", "*CLOSED_DATE",
                      "DISABLE_DATE", "*_REASON", "PO_HEADER_ID@AP_INVOICE_LINES_ALL")
RARE_EVENT_NULL_SHARE = 0.6
# Date columns that lie in the future as often as in the past (due dates, promised dates, discount dates).
FUTURE_DATE_COLUMNS = ("*DUE_DATE", "*NEED_BY_DATE", "*PROMISED_DATE", "DISCOUNT_DATE", "EXPECTED_RECEIPT_DATE")
MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")


def _base_type(oracle_type):
    t = (oracle_type or "").upper()
    if t.startswith(("NUMBER", "INTEGER", "FLOAT", "BINARY")):
        return "number"
    if t.startswith(("DATE", "TIMESTAMP")):
        return "date"
    return "text"


def _width(oracle_type):
    m = re.search(r"\((\d+)", oracle_type or "")
    return int(m.group(1)) if m else 240


def _columns(schema):
    return {t: {c: spec["type"] for c, spec in info["columns"].items()} for t, info in schema["tables"].items()}


def join_edges(schema):
    """[(child_table, child_col, parent_table, parent_col)] from "CHILD.COL = PARENT.COL" strings."""
    edges = []
    for j in schema.get("joins", []):
        left, right = (side.strip().split(".") for side in j.split("="))
        edges.append((left[0].upper(), left[1].upper(), right[0].upper(), right[1].upper()))
    return edges


def described_codes(description, base):
    """Codes a description lists: "Invoice type: STANDARD, CREDIT" / "e.g. 18 PO receipt, 35 WIP issue"."""
    m = re.search(r"(?:e\.g\.|:)\s*(.+)$", description or "")
    if not m:
        return []
    out = []
    for item in m.group(1).split(","):
        item = item.strip().rstrip(".")
        if base == "number":
            n = re.match(r"-?\d+", item)
            if n:
                out.append(int(n.group()))
        elif item and len(item) <= 30:
            out.append(item)
    return out


def sql_literals(sqls, columns):
    """{(TABLE, COLUMN): [literals]} for every `col = lit` / `col IN (lits)` in the given Oracle SQL texts."""
    import sqlglot
    from sqlglot import exp
    out = defaultdict(list)
    for sql in sqls:
        try:
            tree = sqlglot.parse_one(sql, read="oracle")
        except Exception:  # a text that does not parse seeds nothing
            continue
        aliases = {}
        for t in tree.find_all(exp.Table):
            aliases[(t.alias or t.name).upper()] = t.name.upper()
        for node in tree.find_all(exp.EQ, exp.In):
            col = node.this if isinstance(node.this, exp.Column) else node.expression
            if not isinstance(col, exp.Column):
                continue
            values = node.expressions if isinstance(node, exp.In) else [node.expression]
            lits = [v for v in values if isinstance(v, exp.Literal)]
            table = aliases.get(col.table.upper()) if col.table else None
            if table is None:  # unqualified: the one table of the query that has the column
                owners = [t for t in set(aliases.values()) if col.name.upper() in columns.get(t, {})]
                table = owners[0] if len(owners) == 1 else None
            if table is None or col.name.upper() not in columns.get(table, {}):
                continue
            for lit in lits:
                value = lit.this if lit.is_string else (int(lit.this) if lit.this.lstrip("-").isdigit()
                                                         else float(lit.this))
                if value not in out[(table, col.name.upper())]:
                    out[(table, col.name.upper())].append(value)
    return out


def _domains(columns, edges):
    """Union-find over join edges: (table, col) -> its key domain representative."""
    parent = {}

    def find(x):
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for ct, cc, pt, pc in edges:
        parent[find((ct, cc))] = find((pt, pc))
    return find


def _table_order(tables, edges):
    """Parents before children (a join cycle is broken at the edge that closes it)."""
    import networkx as nx
    g = nx.DiGraph()
    g.add_nodes_from(tables)
    for ct, _, pt, _ in edges:
        if ct != pt and ct in tables and pt in tables and not nx.has_path(g, ct, pt):
            g.add_edge(pt, ct)
    return list(nx.lexicographical_topological_sort(g))


def _matches(table, col, patterns):
    return any(fnmatch.fnmatch(col, p) if "@" not in p else (p == f"{col}@{table}") for p in patterns)


def synthetic_rows(schema, seed=0, today=None, sqls=(), org_count=3, master_rows=MASTER_ROWS,
                   child_rows=CHILD_ROWS) -> dict:
    """{TABLE: {"columns": [...], "rows": [tuple, ...]}} for every table of the schema (see the module docstring)."""
    from faker import Faker
    today = today or dt.date.today()
    rng = random.Random(seed)
    fake = Faker("en_US")
    fake.seed_instance(seed)
    columns = _columns(schema)
    edges = [e for e in join_edges(schema) if e[0] in columns and e[2] in columns]
    domain = _domains(columns, edges)
    literals = sql_literals(sqls, columns)
    domain_literals = defaultdict(list)
    for (t, c), vals in sorted(literals.items()):
        for v in vals:
            if v not in domain_literals[domain((t, c))]:
                domain_literals[domain((t, c))].append(v)
    fk_cols = {(ct, cc) for ct, cc, _, _ in edges}
    key_cols = {(pt, pc) for _, _, pt, pc in edges} - fk_cols  # generated here, copied by children
    moac = {t for t, f in (schema.get("security_filters") or {}).items() if t in columns}
    start = today - dt.timedelta(days=4 * 365)

    def a_date(table, col):
        r = rng.random()
        if _matches(table, col, FUTURE_DATE_COLUMNS) and r < 0.35:
            return today + dt.timedelta(days=rng.randint(0, 45))
        if r < 0.06:
            return today
        if r < 0.35:  # the last weeks: "this week", "this month", "last 30 days"
            return today - dt.timedelta(days=rng.randint(0, 60))
        return start + dt.timedelta(days=rng.randint(0, (today - start).days))

    def period_name():
        d = a_date("", "")
        return f"{MONTHS[d.month - 1]}-{d.year % 100:02d}"

    def pool_for(table, col, base, description):
        """Categorical values of a column (codes, flags, literals), or None for free values."""
        values = list(literals.get((table, col), []))
        for v in described_codes(description, base) + list(domain_literals.get(domain((table, col)), [])):
            if v not in values:
                values.append(v)
        if base == "text" and _width(columns[table][col]) == 1 and not any(len(str(v)) > 1 for v in values):
            values += [v for v in ("Y", "N") if v not in values]
        if col == "PERIOD_NAME" or col.endswith("_PERIOD_NAME"):
            values += sorted({period_name() for _ in range(40)})
        if base == "number" and col.endswith("_ID") and (table, col) not in key_cols and values:
            values += [rng.randint(1, 9999) for _ in range(4)]  # e.g. AGENT_ID 25 among a few other buyers
        return values or None

    def free_value(table, col, base, i):
        name = col
        if base == "date":
            return a_date(table, col)
        if base == "number":
            if name in ("PERIOD_YEAR",):
                return rng.randint(today.year - 3, today.year)
            if name in ("QUARTER_NUM",):
                return rng.randint(1, 4)
            if name in ("PERIOD_NUM",):
                return rng.randint(1, 12)
            if name.endswith(("_NUM", "_NUMBER", "NUM")):
                return rng.randint(1, 10) if "LINE" in name or "SHIPMENT" in name or "DISTRIBUTION" in name \
                    else rng.randint(100000, 999999)
            if "QUANTITY" in name or name.startswith("QTY") or name.endswith("_QTY"):
                return rng.choice((0, rng.randint(1, 200), rng.randint(1, 200)))
            if any(k in name for k in ("AMOUNT", "PRICE", "TOTAL", "_DR", "_CR", "COST", "BALANCE")):
                if rng.random() < 0.15:
                    return 0
                return round(rng.lognormvariate(8, 1.5), 2)
            if name.endswith("_ID"):
                return rng.randint(1, 50)
            return rng.randint(0, 100)
        width = _width(columns[table][col])
        if "NAME" in name and "PERIOD" not in name:
            text = fake.company()
        elif name == "CITY":
            text = fake.city()
        elif name == "STATE":
            text = fake.state_abbr()
        elif name == "COUNTRY":
            text = fake.country_code()
        elif "ADDRESS" in name:
            text = fake.street_address()
        elif "CURRENCY" in name:
            text = rng.choice(("USD", "USD", "EUR", "GBP"))
        elif name.startswith("SEGMENT"):
            text = f"{rng.randint(1, 10 ** min(width, 6) - 1):0{min(width, 6)}d}" if width <= 6 else \
                f"{rng.randint(4500000, 4599999)}"
        elif any(k in name for k in ("DESCRIPTION", "COMMENTS", "REASON", "TEXT")):
            text = fake.sentence(nb_words=5).rstrip(".")
        elif name.endswith(("_NUM", "_NUMBER", "_CODE")):
            text = f"{name.split('_')[0][:3]}-{i + 1000}"
        else:
            text = fake.word().upper()
        return text[:width]

    def literal_text_values(table, col):
        """LIKE-free literal seeding for free text columns: the first rows carry the literals (a named supplier)."""
        return list(literals.get((table, col), [])) + [v for v in domain_literals.get(domain((table, col)), [])
                                                       if v not in literals.get((table, col), [])]

    data, orgs = {}, None
    parents = defaultdict(lambda: defaultdict(list))  # child -> parent -> [(child_col, parent_col)]
    for ct, cc, pt, pc in edges:
        parents[ct][pt].append((cc, pc))
    for table in _table_order(list(columns), edges):
        cols = list(columns[table])
        specs = schema["tables"][table]["columns"]
        own_keys = [c for c in cols if (table, c) in key_cols]
        parent_tables = [p for p in parents.get(table, {}) if p in data and p != table]
        if table == "HR_OPERATING_UNITS" or (not parent_tables and "ORG" in table and "OPERATING" in table):
            n = org_count
        elif not parent_tables:
            n = master_rows
        elif not own_keys and len(parent_tables) == 1:  # an extension of its parent (MTL_PARAMETERS): one row each
            n = len(data[parent_tables[0]]["rows"])
        else:
            n = child_rows
        # parents sharing more columns last: their values win (composite keys come from one parent row)
        parent_tables.sort(key=lambda p: len(parents[table][p]))
        pools = {c: pool_for(table, c, _base_type(columns[table][c]), specs[c].get("description", "")) for c in cols}
        rows = []
        for i in range(n):
            row = {}
            for c in cols:
                base = _base_type(columns[table][c])
                if (table, c) in key_cols:
                    lits = [v for v in domain_literals.get(domain((table, c)), []) if isinstance(v, (int, str))]
                    if base == "number":
                        nums = [v for v in lits if isinstance(v, int)]
                        row[c] = nums[i] if i < len(nums) else 10000 + 100 * len(data) + i
                    else:
                        row[c] = pools[c][i % len(pools[c])] if pools[c] else free_value(table, c, base, i)
                    continue
                nullable = NULL_SHARE if not _matches(table, c, RARE_EVENT_COLUMNS) else RARE_EVENT_NULL_SHARE
                if (table, c) not in fk_cols and rng.random() < nullable:
                    row[c] = None
                    continue
                seeded = literal_text_values(table, c) if base == "text" and pools[c] is None else []
                if seeded and (i < len(seeded) or (n > master_rows and rng.random() < 0.1)):
                    row[c] = seeded[i] if i < len(seeded) else rng.choice(seeded)
                elif pools[c] is not None:
                    row[c] = rng.choice(pools[c])
                else:
                    row[c] = free_value(table, c, base, i)
            for p in parent_tables:  # foreign keys: copy from one parent row
                prow = rng.choice(data[p]["rows"]) if n != len(data[p]["rows"]) else data[p]["rows"][i]
                pcols = data[p]["columns"]
                for cc, pc in parents[table][p]:
                    row[cc] = prow[pcols.index(pc)]
            if table in moac and orgs and "ORG_ID" in row and (table, "ORG_ID") not in fk_cols:
                row["ORG_ID"] = rng.choice(orgs)  # MOAC tables always belong to one of the operating units
            rows.append(tuple(row[c] for c in cols))
        data[table] = {"columns": cols, "rows": rows}
        if table == "HR_OPERATING_UNITS":
            orgs = [r[cols.index("ORGANIZATION_ID")] for r in rows]
    return data


def bind_values(schema, data) -> dict:
    """Values for the binds the policy requires: :org_ids = every operating unit but the last one."""
    ou = data.get("HR_OPERATING_UNITS")
    if ou and "ORGANIZATION_ID" in ou["columns"]:
        ids = [r[ou["columns"].index("ORGANIZATION_ID")] for r in ou["rows"]]
    else:  # no operating-unit table: the ORG_ID values the MOAC tables got
        ids = sorted({r[d["columns"].index("ORG_ID")] for t, d in data.items() if "ORG_ID" in d["columns"]
                      for r in d["rows"] if r[d["columns"].index("ORG_ID")] is not None})
    return {"org_ids": ids[:-1] if len(ids) > 1 else ids}
