#!/usr/bin/env python
"""SQL guardrail for model-generated Oracle EBS SQL: `check`, `check --batch`, `ask` (guarded one-retry round trip),
`catalog` (build an indexed catalog for a real-size EBS dictionary).

Deny by default: every name in the query must resolve to a catalog table/column (or a CTE, inline view, alias or
select-list alias), an Oracle built-in from the policy's list, or an allowlisted read-only package function (with or
without parentheses); anything else is rejected with a precise reason. The checks, in order:

  contract        SQL-only answer: one markdown fence and one trailing ';' are stripped (listed in `normalized`);
                  prose, several statements, an empty or over-long answer are rejected; unparseable text is
                  `parse_error`. DML/DDL/PL-SQL/WITH FUNCTION are refused here with `unsafe`.
  RULES           guardrail/rules/__init__.py lists the rule modules in order, each `check(q) -> [Finding]`:
                  read_only, functions, embedded_languages, blocked_objects, references, security_filters.
  explain_error   optional EXPLAIN PLAN on a staging Oracle (oracle_explain.py), only when everything else passed.
Reason codes: guardrail/codes.py. Policy keys: guardrail_policy.yaml (each documented there).

Verdict: {"ok", "sql", "candidate_sql", "reasons", "codes", "normalized", "unknown_tables", "unknown_columns",
"binds", "checks", "skipped", "sqlglot", "elapsed_ms"}.

sqlglot: the sqlglotc wheel overlays mypyc-compiled .so files onto the `sqlglot` package itself, so when installed it
is active automatically. ORACLE_GUARD_PURE_SQLGLOT=1 (set before this module is imported) loads the pure-Python
sources instead; the verdict's "sqlglot" field says which one ran.

EXPLAIN credentials come from the environment only (ORACLE_USER, ORACLE_PASSWORD; DSN from --explain-dsn or
ORACLE_DSN) and are never printed.
"""
import argparse
import importlib.abc
import importlib.machinery
import json
import logging
import os
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]


class _PureSqlglotFinder(importlib.abc.MetaPathFinder):
    """Resolve sqlglot.* to the .py sources, skipping the compiled .so overlays that sqlglotc installs."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "sqlglot" and not fullname.startswith("sqlglot."):
            return None
        for entry in (path if path is not None else sys.path):
            finder = importlib.machinery.FileFinder(
                entry or ".", (importlib.machinery.SourceFileLoader, importlib.machinery.SOURCE_SUFFIXES))
            spec = finder.find_spec(fullname)
            if spec is not None:
                return spec
        return None


if os.environ.get("ORACLE_GUARD_PURE_SQLGLOT") == "1" and "sqlglot" not in sys.modules:
    sys.meta_path.insert(0, _PureSqlglotFinder())

from sqlglot import tokenizer_core as _tokenizer_core  # noqa: E402

from artifacts import StageError  # noqa: E402
from ask_client import EndpointError, ask, openai_base_url  # noqa: E402,F401
from guardrail.catalog import Catalog, build_catalog_index, load_catalog  # noqa: E402,F401
from guardrail.check import SQLGLOT_IMPL, check_sql, first_line, normalize_answer, normalized_sql  # noqa: E402,F401
from guardrail.codes import CODES  # noqa: E402,F401
from guardrail.policy import POLICY_PATH, load_policy  # noqa: E402,F401
from oracle_explain import explain_connect_params, explain_oracle  # noqa: E402,F401

# sqlglot logs "falling back to Command" warnings for every ALTER/CALL; the verdict already says why.
logging.getLogger("sqlglot").setLevel(logging.CRITICAL)
SQLGLOT_IMPL["compiled"] = not str(getattr(_tokenizer_core, "__file__", "x.py")).endswith(".py")
SQLGLOT_IMPL["name"] = "sqlglotc (compiled)" if SQLGLOT_IMPL["compiled"] else "sqlglot (pure python)"
CONTEXT_KEYS = {"tables", "joins", "columns", "synonyms", "security_filters"}


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.print_usage(sys.stderr)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def _explain_config(args):
    dsn = args.explain_dsn or os.environ.get("ORACLE_DSN")
    if not dsn:
        return None
    user, password = os.environ.get("ORACLE_USER"), os.environ.get("ORACLE_PASSWORD")
    if not user or password is None:
        raise StageError("EXPLAIN DSN given but ORACLE_USER / ORACLE_PASSWORD are not set in the environment")
    explain_connect_params(dsn, user, args.explain_timeout)
    return {"dsn": dsn, "user": user, "password": password, "timeout_s": args.explain_timeout}


def validate_context(ctx, where) -> dict:
    """A context object as the builder, the template and retrieval use it; a whole raw record or anything else of
    the wrong shape is refused (it would silently drop the context's security filters)."""
    if not isinstance(ctx, dict):
        raise StageError(f"{where} must be a JSON object with keys from {sorted(CONTEXT_KEYS)}")
    if "question" in ctx or "sql" in ctx or "context" in ctx:
        raise StageError(f"{where} looks like a whole raw record: pass its \"context\" object, not the record")
    unknown = sorted(set(ctx) - CONTEXT_KEYS)
    if unknown:
        raise StageError(f"{where}: unknown context keys {unknown} (expected {sorted(CONTEXT_KEYS)})")
    if not isinstance(ctx.get("tables", []), list):
        raise StageError(f"{where}: tables must be a list")
    _validate_filters(ctx.get("security_filters"), where)
    return ctx


def _load_context(path):
    if not path:
        return {}
    try:
        ctx = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise StageError(f"cannot read context {path}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StageError(f"context {path} is not valid JSON: {e}") from None
    return validate_context(ctx, f"context {path}")


def _validate_filters(filters, where):
    if filters is None:
        return
    if not isinstance(filters, list) or not all(
            isinstance(f, dict) and isinstance(f.get("table"), str) and isinstance(f.get("column"), str)
            and isinstance(f.get("predicate", ""), str) for f in filters):
        raise StageError(f"{where}: security_filters must be a list of {{table, column, predicate}} objects")


def _cmd_check(args, policy, catalog):
    explain = _explain_config(args)
    base_filters = _load_context(args.context).get("security_filters") or []
    if not args.batch:
        verdict = check_sql(sys.stdin.read(), catalog=catalog, policy=policy, security_filters=base_filters,
                            allow_dml=args.allow_dml, explain=explain)
        print(json.dumps(verdict, ensure_ascii=True))
        return 0 if verdict["ok"] else 1
    items = []
    for n, line in enumerate(sys.stdin, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise StageError(f"--batch line {n} is not JSON: {e}") from None
        if not isinstance(item, dict) or not isinstance(item.get("text"), (str, type(None))) or "text" not in item:
            raise StageError(f'--batch line {n} must be an object with a "text" string')
        _validate_filters(item.get("security_filters"), f"--batch line {n}")
        items.append(item)
    rejected = 0
    for item in items:
        filters = base_filters + (item.get("security_filters") or [])
        verdict = check_sql(item["text"], catalog=catalog, policy=policy, security_filters=filters,
                            allow_dml=args.allow_dml, explain=explain)
        if "id" in item:
            verdict = {"id": item["id"], **verdict}
        rejected += not verdict["ok"]
        # ASCII-escaped: a U+2028 inside SQL must not split a line for JSON-lines readers.
        print(json.dumps(verdict, ensure_ascii=True), flush=True)
    print(f"checked {len(items)} answers: {len(items) - rejected} ok, {rejected} rejected "
          f"[{SQLGLOT_IMPL['name']}]", file=sys.stderr)
    return 0 if rejected == 0 else 1


def _retrieved_context(args):
    """The context for a question: --context FILE, else retrieval over --schema (the same builder as training)."""
    if args.context:
        return _load_context(args.context), None
    if not args.schema:
        raise StageError("ask needs --context FILE or --schema FILE (to retrieve the context for the question)")
    import retrieve_context as rc
    index = rc.build_index(rc.load_schema(args.schema))
    tokenizer = rc.load_tokenizer(args.tokenizer) if args.tokenizer else None
    budget = args.max_context_tokens or rc.DEFAULT_MAX_CONTEXT_TOKENS
    context = rc.retrieve(index, args.question, tokenizer=tokenizer, max_context_tokens=budget)
    return validate_context(context, "retrieved context"), rc.retrieval_settings(index, budget, tokenizer)


def _ask_with_candidates(args, context, catalog, policy, api_key):
    """Self-consistency: --candidates samples, guardrail, execution on the DuckDB mirror of --schema (deterministic
    synthetic rows, the eval's), the majority result wins (ties: model log-probability). No retry round."""
    if not args.schema:
        raise StageError("--candidates executes the candidates on the DuckDB mirror of --schema: give --schema")
    if args.temperature <= 0:
        raise StageError("--candidates N > 1 samples N answers: give --temperature > 0 (greedy decoding gives N "
                         "copies of one answer; vLLM refuses n > 1 with temperature 0)")
    import openai
    import retrieve_context as rc
    from candidates import ask_with_candidates
    from duckdb_explain import DuckDBMirror
    from duckdb_mirror_data import bind_values, synthetic_rows
    schema = rc.load_schema(args.schema)
    data = synthetic_rows(schema, seed=0)
    mirror = DuckDBMirror(catalog, data, bind_values(schema, data))
    client = openai.OpenAI(base_url=openai_base_url(args.base_url), api_key=api_key or "EMPTY",
                           timeout=args.timeout, max_retries=0)
    return ask_with_candidates(client, args.model, args.question, context, catalog, policy, args.candidates,
                               args.temperature, mirror.execute, max_tokens=args.max_tokens,
                               explain=_explain_config(args))


def _cmd_ask(args, policy, catalog):
    if catalog is None:
        raise StageError("ask needs --catalog: without it table/column checks and the policy's required MOAC "
                         "filters cannot run")
    context, retrieval = _retrieved_context(args)
    api_key = os.environ.get(args.api_key_env) if args.api_key_env else None
    if args.api_key_env and api_key is None:
        raise StageError(f"--api-key-env {args.api_key_env} is not set in the environment")
    if args.candidates > 1:
        result = _ask_with_candidates(args, context, catalog, policy, api_key)
    else:
        result = ask(args.base_url, args.model, args.question, context, catalog, policy, api_key=api_key,
                     max_tokens=args.max_tokens, timeout=args.timeout, allow_dml=args.allow_dml,
                     explain=_explain_config(args))
    if retrieval is not None:
        result["retrieval"] = retrieval
    print(json.dumps(result, ensure_ascii=False))
    for i, a in enumerate(result.get("attempts") or result.get("candidates") or [], 1):
        v = a["verdict"]
        print(f"{'attempt' if 'attempts' in result else 'candidate'} {i}: {'ok' if v['ok'] else 'rejected'}"
              + ("" if v["ok"] else f" ({'; '.join(v['reasons'])[:300]})"), file=sys.stderr)
    if "selection" in result:
        print(f"selection: {result['selection'].get('reason')}", file=sys.stderr)
    return 0 if result["ok"] else 1


def _cmd_catalog(args, policy, catalog):
    counts = build_catalog_index(args.source, args.out)
    print(f"catalog index {args.out}: {counts['tables']:,} tables, {counts['columns']:,} columns "
          f"(from {args.source})", file=sys.stderr)
    return 0


def build_parser():
    p = _Parser(prog="sql_guardrail.py", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="Exit codes: 0 ok, 1 rejected, 2 usage/config error. Environment: ORACLE_DSN, ORACLE_USER, "
                       "ORACLE_PASSWORD (EXPLAIN), ORACLE_GUARD_PURE_SQLGLOT=1 (pure python sqlglot).")
    p.add_argument("--version", action="version",
                   version=f"sql_guardrail with sqlglot {SQLGLOT_IMPL['version']}, {SQLGLOT_IMPL['name']}",
                   help="print the sqlglot version and implementation (compiled sqlglotc or pure python), then exit")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    def common(sp):
        sp.add_argument("--catalog", help="schema catalog: JSON {TABLE: {COLUMN: TYPE}}, an ALL_TAB_COLUMNS CSV "
                                          "export, or an indexed .sqlite built by the `catalog` command; without it "
                                          "table/column checks and required MOAC filters are skipped (and listed)")
        sp.add_argument("--policy", help=f"policy YAML (default: {POLICY_PATH.name} beside this script)")
        sp.add_argument("--allow-dml", action="store_true",
                        help="also accept INSERT/UPDATE/DELETE/MERGE (never DDL). Off by default: never against EBS")
        sp.add_argument("--context", help="context JSON (the `context` object of a raw record: tables, joins, "
                                          "columns, synonyms, security_filters); its security_filters add to the "
                                          "policy's required ones")
        sp.add_argument("--explain-dsn", help="staging Oracle DSN for EXPLAIN PLAN (or ORACLE_DSN); user and "
                                              "password come from ORACLE_USER / ORACLE_PASSWORD")
        sp.add_argument("--explain-timeout", type=float, default=10.0,
                        help="seconds for the Oracle connect and for the EXPLAIN call (default 10)")

    c = sub.add_parser("check", help="validate a model answer read from stdin; prints one JSON verdict",
                       description="Read the model's raw answer on stdin, print one JSON verdict "
                                   "({ok, sql, reasons, codes, ...}). Exit 0 ok, 1 rejected, 2 usage/config error.")
    common(c)
    c.add_argument("--batch", action="store_true",
                   help='stdin is JSON lines {"text": ..., optional "security_filters": [...], optional "id"}; '
                        "one ASCII-escaped verdict per line, in order; exit 1 if any is rejected")
    a = sub.add_parser("ask", help="guarded round trip against an OpenAI-compatible endpoint (vLLM), one retry",
                       description="Render the training prompt, call the model, validate, retry once with the "
                                   "reasons; print the result JSON with both attempts. Needs --catalog.")
    common(a)
    a.add_argument("--base-url", required=True, help="vLLM base URL, with or without /v1 "
                                                      "(http://127.0.0.1:8000 or http://127.0.0.1:8000/v1)")
    a.add_argument("--model", required=True, help="served model name")
    a.add_argument("--question", required=True, help="the user's question")
    a.add_argument("--schema", help="schema file (demo/ebs_schema.json shape): retrieve the context for the "
                                    "question when --context is not given (the same retriever as the dataset)")
    a.add_argument("--tokenizer", help="tokenizer folder for retrieval's token budget (default: no token count)")
    a.add_argument("--max-context-tokens", type=int, help="retrieval's context token budget (default: "
                                                          "retrieve_context.py's)")
    a.add_argument("--api-key-env", help="name of the environment variable holding the API key (never on the "
                                         "command line)")
    a.add_argument("--max-tokens", type=int, default=512, help="generation limit per attempt (default 512)")
    a.add_argument("--candidates", type=int, default=1,
                   help="N > 1: sample N answers in one request, drop guardrail rejects, execute the rest on the "
                        "DuckDB mirror of --schema and answer with the majority result (ties: log-probability); "
                        "default 1 = one answer + one retry with the reasons")
    a.add_argument("--temperature", type=float, default=0.7, help="sampling temperature with --candidates "
                                                                  "(default 0.7)")
    a.add_argument("--timeout", type=float, default=120.0, help="HTTP timeout per attempt in seconds (default 120)")
    k = sub.add_parser("catalog", help="build an indexed catalog (.sqlite) from a JSON or ALL_TAB_COLUMNS CSV "
                                       "catalog, for real-size EBS dictionaries",
                       description="Index a catalog once; checks then look up only the tables a query touches.")
    k.add_argument("--from", dest="source", required=True, help="catalog JSON or ALL_TAB_COLUMNS CSV (with OWNER "
                                                                 "to keep same-named tables of two schemas apart)")
    k.add_argument("--out", required=True, help="output .sqlite file (written atomically)")
    return p


def main(argv=None):
    import stage_env  # offline flags and caches as `make` sets them, without overriding the user's
    stage_env.apply()
    args = build_parser().parse_args(argv)
    try:
        policy = load_policy(args.policy) if args.cmd != "catalog" else None
        catalog = load_catalog(args.catalog) if getattr(args, "catalog", None) else None
        return {"check": _cmd_check, "ask": _cmd_ask, "catalog": _cmd_catalog}[args.cmd](args, policy, catalog)
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
