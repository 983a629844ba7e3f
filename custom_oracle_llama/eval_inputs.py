"""What the eval reads, validated with one-line StageErrors: the examples, the precomputed answers, the schema, the
--bind values, question-only contexts (--retrieve), and the EXPLAIN / execution backend built from them.

    >>> parse_binds(["org_ids=204,205", "Status=OPEN"]), dsn_host("dbhost:1521/EBSPRD")
    ({'org_ids': [204, 205], 'status': ['OPEN']}, 'dbhost')
"""
import datetime as dt
import json
import os
import re
from pathlib import Path

from artifacts import StageError


def load_eval_data(path, limit=None):
    """The conversations JSON: a non-empty list of {id, question, sql, context}, ids unique; the first `limit`."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise StageError(f"cannot read --eval_data {path}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StageError(f"--eval_data {path} is not valid JSON: {e}") from None
    if not isinstance(data, list) or not data:
        raise StageError(f"--eval_data {path} must be a non-empty JSON list of examples")
    seen = set()
    for i, ex in enumerate(data):
        where = f"--eval_data {path} item {i}"
        if not isinstance(ex, dict):
            raise StageError(f"{where} is not an object")
        for key, typ in (("id", (str, int)), ("question", str), ("sql", str), ("context", dict)):
            if not isinstance(ex.get(key), typ):
                raise StageError(f'{where}: "{key}" is missing or not a {getattr(typ, "__name__", "string")}')
        if ex["id"] in seen:
            raise StageError(f"{where}: duplicate id {ex['id']!r}")
        seen.add(ex["id"])
        filters = ex["context"].get("security_filters")
        if filters is not None and not (isinstance(filters, list) and all(
                isinstance(f, dict) and isinstance(f.get("table"), str) and isinstance(f.get("column"), str)
                for f in filters)):
            raise StageError(f"{where}: security_filters must be a list of {{table, column, predicate}} objects")
    return data[:limit] if limit else data


def load_predictions(path, examples, candidates=False):
    """{id: {"text"[, "retry_text"][, "candidates": [{"text", "logprob"}]]}} for every example (with `candidates`,
    a non-empty "candidates" list on each)."""
    preds = {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise StageError(f"cannot read --predictions {path}: {e.strerror or e}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise StageError(f"--predictions {path} line {n} is not JSON: {e}") from None
        ok = isinstance(item, dict) and "id" in item and all(
            isinstance(item.get(k), (str, type(None))) for k in ("text", "retry_text")) and isinstance(
            item.get("candidates", []), list) and all(isinstance(c, dict) and isinstance(c.get("text"), str) for c in item.get("candidates", []))
        if not ok:
            raise StageError(f'--predictions {path} line {n} must be {{"id", "text"[, "retry_text"]'
                             f'[, "candidates": [{{"text", "logprob"}}]]}}')
        preds[item["id"]] = item
    missing = [ex["id"] for ex in examples if ex["id"] not in preds]
    if missing:
        raise StageError(f"--predictions {path} has no answer for {len(missing)} example(s), e.g. {missing[:3]}")
    if candidates and any(not preds[ex["id"]].get("candidates") for ex in examples):
        raise StageError("--candidates with --predictions needs a \"candidates\" list on every answer")
    return preds


def retrieve_contexts(examples, args):
    """--retrieve: each example's context from retrieve_context.py (what `ask` does for a bare question)."""
    import retrieve_context as rc
    index = rc.build_index(rc.load_schema(args.schema))
    tokenizer = rc.load_tokenizer(args.tokenizer) if args.tokenizer else None
    for ex in examples:
        try:
            ex["context"] = rc.retrieve(index, ex["question"], tokenizer, args.max_context_tokens)
        except StageError as e:  # e.g. "no relevant tables": the model is asked without context, and it shows
            ex["context"], ex["retrieval_error"] = {}, str(e)


def load_schema(path):
    """--schema, only its shape checked (the mirror's synthetic rows are generated from it)."""
    try:
        schema = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StageError(f"cannot read --schema {path}: {e}") from None
    if not isinstance(schema, dict) or not isinstance(schema.get("tables"), dict):
        raise StageError(f"--schema {path} must be an object with \"tables\" (the shape of demo/ebs_schema.json)")
    return schema


def parse_binds(items):
    """--bind org_ids=204,205 -> {"org_ids": [204, 205]} (numbers where they parse)."""
    out = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise StageError(f"--bind {item!r} must be NAME=VALUE[,VALUE...]")
        values = [int(v) if re.fullmatch(r"-?\d+", v) else v for v in value.split(",")]
        out[name.lower()] = values
    return out


def dsn_host(dsn):
    """The host of an Oracle DSN (easy connect or a DESCRIPTION), for the report: never the credentials."""
    m = re.search(r"HOST\s*=\s*([^)\s]+)", dsn, re.I)
    if m:
        return m.group(1)
    return re.split(r"[:/]", dsn.split("@")[-1].lstrip("/"), maxsplit=1)[0] or dsn


def make_backend(args, catalog, examples):
    """{"name", "explain" (check_sql's explain argument), "execute" (sql -> result, or None), "mirror"[, "binds"
    (the mirror's)]}."""
    if args.oracle_dsn:
        import oracle_explain
        user = os.environ.get("ORACLE_USER")
        password = os.environ.get("ORACLE_PASSWORD")
        if not user or password is None:
            raise StageError("--oracle_dsn given but ORACLE_USER / ORACLE_PASSWORD are not set")
        oracle_explain.explain_connect_params(args.oracle_dsn, user, args.explain_timeout)
        binds = parse_binds(args.bind)

        def execute(sql):
            return oracle_explain.execute_oracle(sql, args.oracle_dsn, user, password, args.exec_timeout,
                                                 args.row_cap, binds)
        return {"name": f"Oracle {dsn_host(args.oracle_dsn)}", "mirror": None, "execute": execute,
                "explain": {"dsn": args.oracle_dsn, "user": user, "password": password,
                            "timeout_s": args.explain_timeout}}
    from duckdb_explain import DuckDBMirror
    data, binds, today = None, {}, args.today or dt.date.today()
    if args.schema:
        import duckdb_mirror_data
        schema = load_schema(args.schema)
        data = duckdb_mirror_data.synthetic_rows(schema, seed=args.seed, today=today,
                                                 sqls=[ex["sql"] for ex in examples])
        binds = {**duckdb_mirror_data.bind_values(schema, data), **parse_binds(args.bind)}
    mirror = DuckDBMirror(catalog, data, binds, today)
    rows = f", synthetic rows seed {args.seed}, today {today}" if data else ", empty tables"
    return {"name": f"DuckDB mirror (embedded default{rows})", "mirror": mirror, "explain": mirror.feedback,
            "execute": (lambda sql: mirror.execute(sql, args.row_cap, args.exec_timeout)) if data else None,
            "binds": binds}
