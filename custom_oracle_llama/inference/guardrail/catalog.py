"""The schema catalog the name checks resolve against: {TABLE: {COLUMN: TYPE}}, optionally per owner (schema).

Sources (load_catalog picks by suffix):
  .json    {TABLE: {COLUMN: TYPE}} (small catalogs, the demo, the builder's output)
  .csv     an ALL_TAB_COLUMNS export with TABLE_NAME, COLUMN_NAME, DATA_TYPE and optionally OWNER
  .sqlite  an indexed catalog built once from either (`sql_guardrail.py catalog --from X --out Y.sqlite`): opened
           read-only, tables looked up on demand, so a check costs what the query touches, not the catalog size
           (a real EBS instance: ~30k tables, ~1.2M columns).
Names are kept exactly as the dictionary stores them (unquoted Oracle names are upper-case there; a quoted
lower-case name stays lower-case and only matches a quoted reference). A table name defined by several owners
with different columns is ambiguous unqualified: `columns()` says so instead of merging them.
"""
import csv
import json
import os
import sqlite3
import threading
from functools import lru_cache
from pathlib import Path

from artifacts import StageError

_NEED = ("TABLE_NAME", "COLUMN_NAME", "DATA_TYPE")


class Catalog:
    """Read-only lookups: columns(table, owner) -> {COLUMN: TYPE} | None; owners(table) -> [owner, ...]."""

    def __init__(self, tables=None, index_path=None):
        self._tables = tables  # {TABLE: {OWNER or "": {COLUMN: TYPE}}}
        self._db, self._lock = None, threading.Lock()
        if index_path is not None:
            self._db = sqlite3.connect(f"file:{index_path}?mode=ro", uri=True, check_same_thread=False)
            self._by_owner = lru_cache(maxsize=4096)(self._query)

    @classmethod
    def from_mapping(cls, mapping) -> "Catalog":
        if isinstance(mapping, Catalog):
            return mapping
        return cls({t: {"": dict(cols)} for t, cols in mapping.items()})

    def _query(self, table):
        with self._lock:
            rows = self._db.execute("SELECT owner, column_name, data_type FROM columns WHERE table_name = ? "
                                    "ORDER BY owner, position", (table,)).fetchall()
        out = {}
        for owner, col, typ in rows:
            out.setdefault(owner, {})[col] = typ
        return out

    def by_owner(self, table) -> dict:
        if self._db is not None:
            return self._by_owner(table)
        return self._tables.get(table, {})

    def owners(self, table) -> list:
        return sorted(self.by_owner(table))

    def columns(self, table, owner=""):
        """{COLUMN: TYPE} of TABLE (in OWNER when given and known), or None when unknown or ambiguous."""
        found = self.by_owner(table)
        if not found:
            return None
        if owner and owner in found:
            return found[owner]
        variants = {json.dumps(c, sort_keys=True) for c in found.values()}
        return next(iter(found.values())) if len(variants) == 1 else None

    def ambiguous(self, table, owner="") -> bool:
        found = self.by_owner(table)
        return not (owner and owner in found) and len({json.dumps(c, sort_keys=True) for c in found.values()}) > 1

    # Mapping protocol for callers that treat the catalog as {TABLE: {COLUMN: TYPE}} (small catalogs).
    def __contains__(self, table):
        return bool(self.by_owner(table))

    def __getitem__(self, table):
        cols = self.columns(table)
        if cols is None:
            raise KeyError(table)
        return cols

    def get(self, table, default=None):
        cols = self.columns(table)
        return default if cols is None else cols

    def __iter__(self):
        if self._db is not None:
            with self._lock:
                names = [r[0] for r in self._db.execute("SELECT DISTINCT table_name FROM columns ORDER BY 1")]
            return iter(names)
        return iter(self._tables)

    def items(self):
        return ((t, self[t]) for t in self if self.columns(t) is not None)

    def __len__(self):
        return sum(1 for _ in self)

    def __bool__(self):
        return True


def _rows_from_csv(path, text=None):
    """(owner, table, column, type, position) rows of an ALL_TAB_COLUMNS CSV export."""
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = {(k or "").strip().upper(): k for k in reader.fieldnames or []}
        if not all(n in header for n in _NEED):
            raise StageError(f"catalog {path}: CSV needs a header with {list(_NEED)} (and optionally OWNER)")
        for pos, row in enumerate(reader):
            get = lambda n: (row.get(header[n]) or "").strip() if n in header else ""  # noqa: E731
            if get("TABLE_NAME") and get("COLUMN_NAME"):
                yield get("OWNER"), get("TABLE_NAME"), get("COLUMN_NAME"), get("DATA_TYPE"), pos


def _rows_from_json(path):
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise StageError(f"catalog {path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict) or not raw or not all(
            isinstance(cols, dict) and all(isinstance(t, str) for t in cols.values()) for cols in raw.values()):
        raise StageError(f"catalog {path} must be a non-empty JSON object {{TABLE: {{COLUMN: TYPE}}}}")
    for table, cols in raw.items():
        owner, _, name = table.rpartition(".") if "." in table and not table.startswith('"') else ("", "", table)
        for pos, (col, typ) in enumerate(cols.items()):
            yield owner, name, col, typ, pos


def _rows(path):
    path = Path(path)
    if not path.is_file():
        raise StageError(f"cannot read catalog {path}: no such file")
    return _rows_from_csv(path) if path.suffix.lower() == ".csv" else _rows_from_json(path)


def load_catalog(path) -> Catalog:
    """Catalog from .json / .csv (held in memory) or an indexed .sqlite (looked up on demand)."""
    path = Path(path)
    try:
        if path.suffix.lower() in (".sqlite", ".db"):
            if not path.is_file():
                raise StageError(f"cannot read catalog {path}: no such file")
            return Catalog(index_path=path)
        tables: dict = {}
        for owner, table, col, typ, _ in _rows(path):
            tables.setdefault(table, {}).setdefault(owner, {})[col] = typ
    except OSError as e:
        raise StageError(f"cannot read catalog {path}: {e.strerror or e}") from None
    except sqlite3.Error as e:
        raise StageError(f"catalog {path} is not a catalog index: {e}") from None
    if not tables:
        raise StageError(f"catalog {path} has no columns")
    return Catalog(tables)


def build_catalog_index(source, out) -> dict:
    """Write an indexed .sqlite catalog from a .json/.csv one (atomically). Returns {tables, columns}."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        db = sqlite3.connect(tmp)
        db.execute("CREATE TABLE columns (owner TEXT, table_name TEXT, column_name TEXT, data_type TEXT, "
                   "position INTEGER)")
        db.executemany("INSERT INTO columns VALUES (?, ?, ?, ?, ?)", _rows(source))
        db.execute("CREATE INDEX columns_by_table ON columns (table_name)")
        n_tables, n_cols = db.execute("SELECT COUNT(DISTINCT table_name), COUNT(*) FROM columns").fetchone()
        db.commit()
        db.close()
        if not n_cols:
            raise StageError(f"catalog {source} has no columns")
        os.replace(tmp, out)
    except OSError as e:
        raise StageError(f"cannot write catalog index {out}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return {"tables": n_tables, "columns": n_cols}
