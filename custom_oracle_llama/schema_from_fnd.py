"""EBS data-dictionary CSV exports -> the schema file retrieval reads (shape of demo/ebs_schema.json).

Export the four CSVs with config/ebs_dictionary_export.sql (FND_TABLES/FND_COLUMNS descriptions, ALL_TAB_COLUMNS
types, FND_PRIMARY_KEYS and FND_FOREIGN_KEYS: EBS registers its logical keys there, the database declares almost
none), carry them to the air-gapped side, then:

    python custom_oracle_llama/schema_from_fnd.py --export_dir ebs_dict --out ebs_schema.json \
        [--synonyms site_synonyms.json] [--force]

- tables: every table of tables.csv that has columns in columns.csv (a table without columns is reported, skipped);
- joins: one `CHILD.COL = PARENT.COL` per foreign-key column pair whose both ends were exported;
- primary_key: the table's registered primary key (the first by name when several are registered);
- security_filters: MOAC, the same rule as the guardrail's required filters: every *_ALL table with an ORG_ID
  column gets `ORG_ID IN (:org_ids)`;
- synonyms: your site's business vocabulary, {"phrase": "TABLE.COLUMN" or "TABLE"} from --synonyms;
- source: sha256 of every input file. The result is validated with retrieve_context.validate_schema before it is
  written (atomically; an existing file only with --force).
"""
import argparse
import csv
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from artifacts import StageError, atomic_write_json, sha256_file  # noqa: E402
from retrieve_context import validate_schema  # noqa: E402

FILES = {  # file -> the header columns it must have (extra columns are ignored)
    "tables.csv": ("TABLE_NAME", "DESCRIPTION"),
    "columns.csv": ("TABLE_NAME", "COLUMN_NAME", "DATA_TYPE", "DESCRIPTION"),
    "primary_keys.csv": ("TABLE_NAME", "KEY_NAME", "COLUMN_NAME"),
    "foreign_keys.csv": ("TABLE_NAME", "COLUMN_NAME", "REF_TABLE_NAME", "REF_COLUMN_NAME"),
}
MOAC_COLUMN = "ORG_ID"
MOAC_PREDICATE = "ORG_ID IN (:org_ids)"


def read_csv(path: Path, required: tuple) -> list[dict]:
    """Rows with upper-case header keys and stripped values; StageError naming the file and what is missing."""
    if not path.is_file():
        raise StageError(f"{path} not found (export it with config/ebs_dictionary_export.sql)")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip().upper() for h in reader.fieldnames or []]
            missing = [c for c in required if c not in header]
            if missing:
                raise StageError(f"{path}: missing header columns {missing} (has {header})")
            return [{k.strip().upper(): (v or "").strip() for k, v in row.items() if k is not None}
                    for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise StageError(f"cannot read {path}: {e}") from None


def schema_from_rows(tables: list[dict], columns: list[dict], pks: list[dict], fks: list[dict],
                     synonyms: dict | None = None) -> tuple[dict, dict]:
    """-> (schema, counts of what was skipped and why). Pure: rows in, schema dict out."""
    skipped = {"tables_without_columns": 0, "columns_of_unlisted_tables": 0, "joins_to_unexported_tables": 0,
               "duplicate_joins": 0}
    described = {r["TABLE_NAME"].upper(): r["DESCRIPTION"] for r in tables if r["TABLE_NAME"]}
    cols: dict[str, dict] = {}
    for r in columns:
        t = r["TABLE_NAME"].upper()
        if t not in described:
            skipped["columns_of_unlisted_tables"] += 1
            continue
        cols.setdefault(t, {})[r["COLUMN_NAME"].upper()] = {"type": r["DATA_TYPE"], "description": r["DESCRIPTION"]}
    skipped["tables_without_columns"] = len(set(described) - set(cols))
    out_tables = {t: {"description": described[t], "columns": cols[t]} for t in sorted(cols)}
    keys: dict[str, dict[str, list]] = {}
    for r in pks:
        t, c = r["TABLE_NAME"].upper(), r["COLUMN_NAME"].upper()
        if t in out_tables and c in out_tables[t]["columns"]:
            keys.setdefault(t, {}).setdefault(r["KEY_NAME"], []).append(c)
    for t, by_name in keys.items():
        out_tables[t]["primary_key"] = by_name[sorted(by_name)[0]]
    joins, seen = [], set()
    for r in fks:
        left = (r["TABLE_NAME"].upper(), r["COLUMN_NAME"].upper())
        right = (r["REF_TABLE_NAME"].upper(), r["REF_COLUMN_NAME"].upper())
        exported = all(t in out_tables and c in out_tables[t]["columns"] for t, c in (left, right))
        if left[0] == right[0] or not exported:
            skipped["joins_to_unexported_tables"] += 1
            continue
        edge = frozenset((left, right))
        if edge in seen:
            skipped["duplicate_joins"] += 1
            continue
        seen.add(edge)
        joins.append(f"{left[0]}.{left[1]} = {right[0]}.{right[1]}")
    filters = {t: {"column": MOAC_COLUMN, "predicate": MOAC_PREDICATE}
               for t, spec in out_tables.items() if t.endswith("_ALL") and MOAC_COLUMN in spec["columns"]}
    schema = {"description": "Oracle EBS schema from the FND data dictionary (schema_from_fnd.py)",
              "tables": out_tables, "joins": joins, "synonyms": dict(synonyms or {}), "security_filters": filters}
    return schema, skipped


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="EBS data-dictionary CSV exports (config/ebs_dictionary_export.sql) -> "
                                             "schema JSON for retrieve_context.py")
    ap.add_argument("--export_dir", required=True, help=f"directory with {', '.join(FILES)}")
    ap.add_argument("--out", required=True, help="schema JSON to write")
    ap.add_argument("--synonyms", help='JSON {"business phrase": "TABLE.COLUMN" or "TABLE"} of your site')
    ap.add_argument("--force", action="store_true", help="replace an existing --out")
    args = ap.parse_args(argv)
    try:
        out = Path(args.out)
        if out.exists() and not args.force:
            raise StageError(f"{out} exists (pass --force to replace it)")
        export = Path(args.export_dir)
        rows = {name: read_csv(export / name, required) for name, required in FILES.items()}
        synonyms = {}
        if args.synonyms:
            try:
                synonyms = json.loads(Path(args.synonyms).read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise StageError(f"cannot read --synonyms {args.synonyms}: {e}") from None
            if not isinstance(synonyms, dict):
                raise StageError(f"--synonyms {args.synonyms}: expected a JSON object")
        schema, skipped = schema_from_rows(rows["tables.csv"], rows["columns.csv"], rows["primary_keys.csv"],
                                           rows["foreign_keys.csv"], synonyms)
        if not schema["tables"]:
            raise StageError(f"no table in {export / 'tables.csv'} has columns in {export / 'columns.csv'}")
        schema["source"] = {name: sha256_file(export / name) for name in FILES}
        if args.synonyms:
            schema["source"]["synonyms"] = sha256_file(args.synonyms)
        validate_schema(schema, where="converted schema")
        atomic_write_json(out, schema)
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n_cols = sum(len(t["columns"]) for t in schema["tables"].values())
    print(f"schema: {len(schema['tables'])} tables, {n_cols} columns, {len(schema['joins'])} joins, "
          f"{len(schema['security_filters'])} MOAC filters, {len(schema['synonyms'])} synonyms -> {out}")
    print("skipped: " + ", ".join(f"{k} {v}" for k, v in skipped.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
