"""Raw EBS question/SQL records (+ retrieved schema context) -> XiYan `conversations` SFT JSON.

Every record is checked with the same guardrail the served model's answers go through (one read-only Oracle
query, only tables/columns from its context and the catalog, MOAC/RLS filters applied), de-duplicated, split into
train/holdout without leakage (records sharing a normalized SQL stay on one side), and, with --tokenizer, measured
in exact tokens through the model's chat template: too long is rejected with its count, never truncated.
The gold SQL must also be a complete Oracle query reading a table (checked here with sqlglot, not left to the
guardrail). A bad line is a reject with its line number (`wc -l` numbering) and reason, never a crash; the whole
output set is staged beside the outputs and published in one step at the end (artifacts.atomic_file_set).
With --retrieve --schema, records without a context get the one retrieve_context.py retrieves.

    python custom_oracle_llama/build_oracle_sft_dataset.py --input_raw raw.jsonl --output_sft sft.json \
        --dataset_id ebs_v1 --tokenizer MODEL_DIR --holdout_fraction 0.1 --holdout_out holdout.json
"""
import argparse
import json
import signal
import statistics
import sys
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "inference"))

from artifacts import (StageError, atomic_file_set, atomic_write_json, atomic_write_json_records,  # noqa: E402
                       atomic_write_text, library_versions, read_json, recover_file_sets, sha256_file)
from dataset_records import (MAX_LINE_BYTES, MAX_QUESTION_CHARS, apply_token_limits,  # noqa: E402
                             catalog_from_contexts, chat_texts, count_tokens, dedupe_and_split, read_lines,
                             sft_record, validate_record)
from guardrail.codes import CODES  # noqa: E402
from prompting import template_sha256  # noqa: E402
import sql_guardrail  # noqa: E402

# ---- reject reasons: every one in one place (the limits and record rules are in dataset_records.py) -------------
REASONS = {
    "empty_line": "blank line (or whitespace only)",
    "invalid_utf8": "the line is not valid UTF-8 (only that line is rejected)",
    "too_large": "line over --max_line_bytes or question over --max_question_chars: rejected before parsing on",
    "invalid_json": "not one JSON value (syntax error, nesting too deep, a number too long)",
    "schema": "valid JSON that is not a raw record (see the README)",
    "no_table": "the gold SQL reads no table of its context/catalog (nor DUAL)",
    "retrieval_failed": "--retrieve found no relevant tables for the question",
    "check_error": "the guardrail could not check the record (its message is in the detail)",
    "too_long": "prompt + answer over --model_max_length tokens",
    "answer_too_long": "answer over --max_output_tokens tokens",
    "duplicate": "same question (after Unicode/case/space normalization) as an earlier accepted record",
    "duplicate_id": "same id as an earlier accepted record",
    "split_leak": "its SQL is already on the other side of the train/holdout split",
    **CODES,
}


# ---- main: parse args -> read + validate + token limits -> dedupe/split -> summary -> write atomically --------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input_raw", required=True, help="raw records, one JSON object per line (see README)")
    ap.add_argument("--output_sft", required=True, help="output JSON list in XiYan conversations format (train split)")
    ap.add_argument("--dataset_id", required=True, help="name recorded in the manifest and downstream artifacts")
    ap.add_argument("--catalog", help="schema catalog JSON {TABLE: {COLUMN: TYPE}}; SQL must also fit it")
    ap.add_argument("--catalog_out", help="write the catalog the records were checked against (for the guardrail)")
    ap.add_argument("--policy", help="guardrail policy YAML (default: inference/guardrail_policy.yaml)")
    ap.add_argument("--tokenizer", help="model/tokenizer dir: exact token counts through its chat template")
    ap.add_argument("--model_max_length", type=int, default=8192, help="max prompt+answer tokens (default 8192)")
    ap.add_argument("--max_output_tokens", type=int, default=512,
                    help="max answer tokens; must match the server's output cap (default 512)")
    ap.add_argument("--holdout_fraction", type=float, default=0.0, help="share of SQL groups held out for eval")
    ap.add_argument("--holdout_out", help="output JSON for the holdout split (required if any record is holdout)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the hash-based split")
    ap.add_argument("--max_line_bytes", type=int, default=MAX_LINE_BYTES,
                    help=f"a longer raw line is rejected unparsed as too_large (default {MAX_LINE_BYTES})")
    ap.add_argument("--max_question_chars", type=int, default=MAX_QUESTION_CHARS,
                    help=f"a longer question is rejected as too_large before tokenizing (default {MAX_QUESTION_CHARS})")
    ap.add_argument("--retrieve", action="store_true",
                    help="give a record without a 'context' the one retrieve_context.py retrieves from --schema "
                         "(a record for which nothing relevant is found is rejected as retrieval_failed)")
    ap.add_argument("--schema", help="schema JSON for --retrieve (shape of demo/ebs_schema.json)")
    ap.add_argument("--max_context_tokens", type=int,
                    help="--retrieve: token budget of the whole rendered prompt (default: retrieve_context's, 2048)")
    ap.add_argument("--force", action="store_true", help="replace an existing output set (never an input)")
    args = ap.parse_args(argv)
    if not 0.0 <= args.holdout_fraction < 1.0:
        ap.error("--holdout_fraction must be in [0, 1)")
    if args.retrieve != bool(args.schema):
        ap.error("--retrieve and --schema go together")
    if args.max_context_tokens is not None and not args.retrieve:
        ap.error("--max_context_tokens needs --retrieve")
    for flag in ("max_line_bytes", "max_question_chars", "model_max_length", "max_output_tokens"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag} must be a positive integer")
    return args


class Stopped(BaseException):
    """SIGTERM/SIGINT: a BaseException, so no per-record `except Exception` (here or in the guardrail) can turn
    the stop into one more rejected line."""


def _stop(signum, frame):
    raise Stopped(f"stopped by {signal.Signals(signum).name}: the previous outputs are unchanged (or, if "
                  "publishing had begun, the complete new set)")


def main(argv=None) -> int:
    args = parse_args(argv)
    in_main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, _stop) for s in (signal.SIGTERM, signal.SIGINT)} if in_main else {}
    try:
        return build(args)
    except (StageError, Stopped) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def build(args) -> int:
    raw_path = Path(args.input_raw)
    outputs = output_paths(args)
    check_paths({"--input_raw": raw_path, "--catalog": args.catalog, "--policy": args.policy,
                 "--schema": args.schema}, outputs)
    finals = [p for p in outputs.values() if p is not None]
    out_path, rejects_path, manifest_path = finals[0], finals[-2], finals[-1]
    tag = out_path.name
    for done in recover_file_sets(list(dict.fromkeys(p.absolute().parent for p in finals)), tag):
        print(f"note: {done}", file=sys.stderr)
    if not args.force and (existing := [str(p) for p in finals if p.exists()]):
        raise StageError(f"output exists: {existing[0]} (pass --force to overwrite)")
    if not raw_path.is_file():
        raise StageError(f"input not found: {raw_path}")
    catalog = sql_guardrail.load_catalog(args.catalog) if args.catalog else None
    policy = sql_guardrail.load_policy(args.policy)
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer
        try:
            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        except (OSError, ValueError) as e:
            raise StageError(f"cannot load tokenizer from {args.tokenizer}: {str(e).splitlines()[0]}")
    retrieval = None
    if args.retrieve:
        import retrieve_context
        index = retrieve_context.build_index(retrieve_context.load_schema(args.schema))
        budget = args.max_context_tokens or retrieve_context.DEFAULT_MAX_CONTEXT_TOKENS
        retrieval = {"retriever": lambda q: retrieve_context.retrieve(index, q, tokenizer=tokenizer,
                                                                      max_context_tokens=budget),
                     "manifest": {"schema": args.schema, "schema_file_sha256": sha256_file(args.schema),
                                  "settings": retrieve_context.retrieval_settings(index, budget, tokenizer)}}
    try:
        with atomic_file_set(finals, tag) as staged:
            result = build_into(args, raw_path, catalog, policy, tokenizer, staged, outputs, retrieval)
    except OSError as e:
        raise StageError(f"cannot write the outputs: {e.strerror or e}" + (f": {e.filename}" if e.filename else "")
                         + " (nothing published; the previous outputs are unchanged)") from None
    print(f"wrote {out_path} ({result['train']} train, {result['holdout']} holdout), rejects {rejects_path}, "
          f"manifest {manifest_path}")
    return 0


def read_and_validate(args, raw_path, catalog, policy, tokenizer, retriever=None):
    """-> (accepted records with their token counts, rejects, lines read): one pass over the raw file."""
    from tqdm import tqdm

    accepted, rejects, counting, chunk, n_lines = [], [], [], [], 0
    try:
        f = raw_path.open("rb")
        size = raw_path.stat().st_size
    except OSError as e:
        raise StageError(f"cannot read {raw_path}: {e.strerror or e}") from None
    with f, ThreadPoolExecutor(max_workers=1) as pool, \
            tqdm(total=size, desc="validate", unit="B", unit_scale=True, disable=size < (8 << 20)) as bar:
        def count_later(recs):  # the Rust tokenizer counts this chunk in the thread while Python validates on
            counting.append(pool.submit(count_tokens, tokenizer.backend_tokenizer, *chat_texts(tokenizer, recs)))

        try:
            for n_lines, data, consumed in read_lines(f, args.max_line_bytes):
                bar.update(consumed)
                if data is None:
                    rejects.append({"line": n_lines, "reason": "too_large",
                                    "detail": f"line of {consumed} bytes > --max_line_bytes {args.max_line_bytes}"})
                    continue
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError as e:
                    rejects.append({"line": n_lines, "reason": "invalid_utf8",
                                    "detail": f"byte 0x{data[e.start]:02x} at byte {e.start + 1} is not UTF-8"})
                    continue
                if not text.strip():
                    rejects.append({"line": n_lines, "reason": "empty_line", "detail": "blank line"})
                    continue
                rec, rej = validate_record(n_lines, text, catalog, policy, args.max_question_chars, retriever)
                if rej:
                    rejects.append(rej)
                    continue
                rec["sft"] = sft_record(rec)
                accepted.append(rec)
                if tokenizer is not None:
                    chunk.append(rec["sft"])
                    if len(chunk) == 256:
                        count_later(chunk)
                        chunk = []
        except OSError as e:
            raise StageError(f"cannot read {raw_path}: {e.strerror or e}") from None
        if chunk:
            count_later(chunk)
        counts = [c for fut in counting for c in fut.result()]
    if tokenizer is not None:
        accepted, too_long = apply_token_limits(accepted, counts, args.model_max_length, args.max_output_tokens)
        rejects += too_long
    return accepted, rejects, n_lines


def build_into(args, raw_path, catalog, policy, tokenizer, staged: dict, outputs: dict, retrieval=None) -> dict:
    """Validate, de-duplicate, split and write the whole set into `staged` paths (published by the caller)."""
    accepted, rejects, n_lines = read_and_validate(args, raw_path, catalog, policy, tokenizer,
                                                   retrieval and retrieval["retriever"])
    train, holdout, split_rejects = dedupe_and_split(accepted, args.holdout_fraction, args.seed)
    rejects += split_rejects
    rejects.sort(key=lambda r: r["line"])
    if holdout and not args.holdout_out:
        raise StageError(f"{len(holdout)} records are in the holdout split: pass --holdout_out")
    splits = {name: [{**r["sft"], "id": r["id"], **({"n_tokens": r["n_tokens"]} if "n_tokens" in r else {})}
                     for r in side] for name, side in (("train", train), ("holdout", holdout))}
    lengths = [r["n_tokens"] for side in splits.values() for r in side if "n_tokens" in r]
    if len(train) + len(holdout) + len(rejects) != n_lines:
        raise StageError(f"internal error: {n_lines} lines but {len(train) + len(holdout)} kept + "
                         f"{len(rejects)} rejected")
    reason_counts = Counter(r["reason"] for r in rejects)
    print_summary(reason_counts, n_lines, len(train), len(holdout), lengths)
    if not train:
        by_reason = {}
        for r in rejects:
            by_reason.setdefault(r["reason"], []).append(r["line"])
        where = "; ".join(f"{reason}: lines {line_ranges(lines)}" for reason, lines in by_reason.items())
        first = (f"; first: line {rejects[0]['line']} {rejects[0]['reason']}: {rejects[0]['detail']}"
                 if rejects else "")
        raise StageError(f"no valid training records in {raw_path} ({len(rejects)} of {n_lines} lines rejected, "
                         f"{len(holdout)} holdout; {where or 'empty file'}{first[:400]}); nothing written")

    out_path, rejects_path, manifest_path = (outputs["--output_sft"], outputs["the rejects report (from --output_sft)"],
                                             outputs["the manifest (from --output_sft)"])
    s = {flag: staged[Path(p).absolute()] for flag, p in outputs.items() if p is not None}
    atomic_write_text(s["the rejects report (from --output_sft)"],
                      "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects))
    atomic_write_json_records(s["--output_sft"], splits["train"])
    if args.holdout_out:
        atomic_write_json_records(s["--holdout_out"], splits["holdout"])
    seen_catalog = ({t: dict(cols) for t, cols in catalog.items()} if catalog is not None
                    else catalog_from_contexts(splits["train"] + splits["holdout"]))
    if args.catalog_out:
        atomic_write_json(s["--catalog_out"], seen_catalog)
    manifest = {
        "dataset_id": args.dataset_id,
        "input_raw": str(raw_path), "input_sha256": sha256_file(raw_path),
        "output_sft": str(out_path), "output_sha256": sha256_file(s["--output_sft"]),
        "holdout_out": args.holdout_out,
        "holdout_sha256": sha256_file(s["--holdout_out"]) if args.holdout_out else None,
        "rejects": str(rejects_path), "rejects_sha256": sha256_file(s["the rejects report (from --output_sft)"]),
        "catalog_in_sha256": sha256_file(args.catalog) if args.catalog else None, "catalog_out": args.catalog_out,
        "catalog_out_sha256": sha256_file(s["--catalog_out"]) if args.catalog_out else None,
        "prompt_template": "prompts/oracle_nl2sql_v1.jinja", "prompt_template_sha256": template_sha256(),
        "counts": {"lines": n_lines, "train": len(train), "holdout": len(holdout),
                   "rejected": dict(sorted(reason_counts.items()))},
        "tokens": ({"tokenizer": args.tokenizer, "min": min(lengths), "median": statistics.median(lengths),
                    "max": max(lengths), "model_max_length": args.model_max_length,
                    "max_output_tokens": args.max_output_tokens} if lengths else None),
        "retrieval": (None if retrieval is None else {
            **retrieval["manifest"],
            "retrieved_ids": [r["id"] for side in (train, holdout) for r in side if r.get("retrieved")],
            "retrieval_failed_lines": [r["line"] for r in rejects if r["reason"] == "retrieval_failed"]}),
        "limits": {"max_line_bytes": args.max_line_bytes, "max_question_chars": args.max_question_chars},
        "holdout_fraction": args.holdout_fraction, "seed": args.seed,
        "sql_engine": sql_guardrail.SQLGLOT_IMPL["name"],
        "versions": library_versions("sqlglot", "sqlglotc", "pydantic", "transformers", "tokenizers", "jinja2"),
    }
    atomic_write_json(s["the manifest (from --output_sft)"], manifest)
    return {"train": len(train), "holdout": len(holdout)}


# ---- helpers --------------------------------------------------------------------------------------------------
def output_paths(args) -> dict:
    """{flag: path} of every file the build writes, in publishing order: the manifest last."""
    out = Path(args.output_sft)
    stem = out.with_suffix("")
    return {"--output_sft": out, "--holdout_out": Path(args.holdout_out) if args.holdout_out else None,
            "--catalog_out": Path(args.catalog_out) if args.catalog_out else None,
            "the rejects report (from --output_sft)": Path(f"{stem}.rejects.jsonl"),
            "the manifest (from --output_sft)": Path(f"{stem}.manifest.json")}


def check_paths(inputs: dict, outputs: dict) -> None:
    """Before anything is read or written: no two flags may name one file (also through a symlink or a hard
    link), and no output may be a directory. {flag: path or None} each."""
    seen = {}
    for role, path in [*inputs.items(), *outputs.items()]:
        if path is None:
            continue
        path = Path(path)
        keys = [("path", str(path.resolve()))]
        if path.exists():
            st = path.stat()
            keys.append(("file", st.st_dev, st.st_ino))
        for key in keys:
            if key in seen:
                raise StageError(f"{role} and {seen[key]} are the same file ({path}): nothing read or written")
        seen.update(dict.fromkeys(keys, role))
    for role, path in outputs.items():
        if path is not None and Path(path).is_dir():
            raise StageError(f"{role} {path} is a directory")
        if path is not None and (parent := next((p for p in Path(path).absolute().parents if p.exists()), None)) \
                and not parent.is_dir():
            raise StageError(f"{role} {path}: {parent} is not a directory")


def line_ranges(numbers: list[int], cap: int = 30) -> str:
    """[1, 2, 3, 7] -> "1-3, 7"; after `cap` ranges: "... and N more lines"."""
    ranges = []
    for n in sorted(numbers):
        if ranges and ranges[-1][1] == n - 1:
            ranges[-1][1] = n
        else:
            ranges.append([n, n])
    text = ", ".join(f"{a}-{b}" if b > a else str(a) for a, b in ranges[:cap])
    rest = sum(b - a + 1 for a, b in ranges[cap:])
    return text + (f" ... and {rest} more lines" if rest else "")


def print_summary(counts: Counter, n_lines: int, n_train: int, n_holdout: int, lengths: list[int]) -> None:
    from rich.console import Console
    from rich.table import Table as RichTable

    table = RichTable(title="dataset build")
    table.add_column("what")
    table.add_column("count", justify="right")
    table.add_row("lines read", str(n_lines))
    table.add_row("train", str(n_train))
    table.add_row("holdout", str(n_holdout))
    for reason, n in sorted(counts.items()):
        table.add_row(f"rejected: {reason}", str(n))
    if lengths:
        table.add_row("tokens min / median / max",
                      f"{min(lengths)} / {int(statistics.median(lengths))} / {max(lengths)}")
    Console(stderr=True).print(table)


def check_dataset(output_sft) -> dict:
    """For readers: the manifest beside `output_sft` if every file it names has its recorded sha256, else
    StageError (a set being published or left by a killed build: rerunning the builder finishes or replaces it)."""
    stem = Path(output_sft).with_suffix("")
    manifest_path = Path(f"{stem}.manifest.json")
    if not manifest_path.is_file():
        raise StageError(f"{output_sft}: no manifest {manifest_path.name} (not a finished builder output)")
    m = read_json(manifest_path)
    for path_key, hash_key in (("output_sft", "output_sha256"), ("holdout_out", "holdout_sha256"),
                               ("rejects", "rejects_sha256"), ("catalog_out", "catalog_out_sha256")):
        path = Path(output_sft) if path_key == "output_sft" else m.get(path_key)
        if path and m.get(hash_key) and (not Path(path).is_file() or sha256_file(path) != m[hash_key]):
            raise StageError(f"{path} does not match {manifest_path.name} (an interrupted or mixed output set)")
    return m


if __name__ == "__main__":
    sys.exit(main())
