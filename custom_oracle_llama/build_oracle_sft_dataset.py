"""Raw EBS question/SQL records (+ retrieved schema context) -> XiYan `conversations` SFT JSON.

Every record is checked with the same guardrail the served model's answers go through (one read-only Oracle
query, only tables/columns from its context and the catalog, MOAC/RLS filters applied), de-duplicated, split into
train/holdout without leakage (records sharing a normalized SQL stay on one side), and, with --tokenizer, measured
in exact tokens through the model's chat template: too long is rejected with its count, never truncated.

    python custom_oracle_llama/build_oracle_sft_dataset.py --input_raw raw.jsonl --output_sft sft.json \
        --dataset_id ebs_v1 --tokenizer MODEL_DIR --holdout_fraction 0.1 --holdout_out holdout.json
"""
import argparse
import hashlib
import json
import re
import statistics
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "inference"))

from artifacts import (StageError, atomic_write_json, atomic_write_json_records, atomic_write_text,  # noqa: E402
                       library_versions, sha256_file)
from prompting import chat_messages, template_sha256  # noqa: E402
import sql_guardrail  # noqa: E402


# ---- raw record schema (documented in the README) -------------------------------------------------------------
class Column(BaseModel):
    name: str = Field(min_length=1)
    type: str = ""
    description: str = ""


class Table(BaseModel):
    name: str = Field(min_length=1)
    description: str = ""
    columns: list[Column] = Field(min_length=1)


class SecurityFilter(BaseModel):
    table: str = Field(min_length=1)
    column: str = Field(min_length=1)
    predicate: str = Field(min_length=1)


class Context(BaseModel):
    tables: list[Table] = Field(min_length=1)
    joins: list[str] = []
    columns: list[str] = []
    synonyms: dict[str, str] = {}
    security_filters: list[SecurityFilter] = []


class RawRecord(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str | None = None
    question: str = Field(min_length=1)
    sql: str | None = None
    sql_gold: str | None = None
    context: Context
    split: Literal["train", "holdout"] | None = None
    tags: list[str] = []

    @model_validator(mode="after")
    def _one_sql(self):
        if not (self.sql or self.sql_gold):
            raise ValueError("needs 'sql' (or its alias 'sql_gold')")
        if not self.question.strip():
            raise ValueError("question is blank")
        return self


# ---- pure functions -------------------------------------------------------------------------------------------
def context_catalog(context: dict, catalog: dict | None) -> dict:
    """What the record may reference: its context's tables/columns, narrowed to the global catalog when given."""
    out = {}
    for t in context["tables"]:
        name = t["name"].upper()
        if catalog is not None and name not in catalog:
            continue
        cols = {c["name"].upper(): c.get("type", "") for c in t["columns"]}
        if catalog is not None:
            cols = {c: typ for c, typ in cols.items() if c in catalog[name]}
        out[name] = cols
    return out


def normalize_question(q: str) -> str:
    return re.sub(r"\s+", " ", q.strip().lower()).rstrip("?.! ")


def holdout_bucket(key: str, seed: int) -> float:
    """Stable pseudo-random number in [0, 1) per group key: the split does not depend on input order."""
    return int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:12], 16) / 16 ** 12


def hashed_side(norm_sql: str, holdout_fraction: float, seed: int) -> str:
    """The split of a record without an explicit one: decided by its normalized SQL, so rephrasings stay together."""
    return "holdout" if holdout_bucket(norm_sql, seed) < holdout_fraction else "train"


def validate_record(line_no: int, text: str, catalog: dict | None, policy: dict) -> tuple[dict | None, dict | None]:
    """-> (accepted record, None) or (None, reject). Pure apart from sqlglot."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return None, {"line": line_no, "reason": "invalid_json", "detail": f"invalid JSON: {e.msg} at column {e.colno}"}
    try:
        rec = RawRecord.model_validate(obj)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "record"
        return None, {"line": line_no, "reason": "schema", "detail": f"{where}: {err['msg']}"}
    context = rec.context.model_dump()
    verdict = sql_guardrail.check_sql(rec.sql or rec.sql_gold, catalog=context_catalog(context, catalog),
                                      policy=policy, security_filters=context["security_filters"])
    if not verdict["ok"]:
        return None, {"line": line_no, "id": rec.id, "reason": verdict["codes"][0], "detail": "; ".join(verdict["reasons"])}
    return {"line": line_no, "id": rec.id or f"line-{line_no}", "question": rec.question.strip(),
            "sql": verdict["sql"], "norm_sql": sql_guardrail.normalized_sql(verdict["sql"]),
            "context": context, "split": rec.split, "tags": rec.tags}, None


def dedupe_and_split(records: list[dict], holdout_fraction: float, seed: int) -> tuple[list, list, list]:
    """-> (train, holdout, rejects). Same question twice: later one rejected. Same normalized SQL: same side."""
    seen_q, group_side, train, holdout, rejects = {}, {}, [], [], []
    for r in records:
        q = normalize_question(r["question"])
        if q in seen_q:
            rejects.append({"line": r["line"], "id": r["id"], "reason": "duplicate",
                            "detail": f"same question as line {seen_q[q]}"})
            continue
        side = r["split"] or group_side.get(r["norm_sql"]) or hashed_side(r["norm_sql"], holdout_fraction, seed)
        if group_side.setdefault(r["norm_sql"], side) != side:
            rejects.append({"line": r["line"], "id": r["id"], "reason": "split_leak",
                            "detail": f"its SQL is already in the {group_side[r['norm_sql']]} split"})
            continue
        seen_q[q] = r["line"]
        (holdout if side == "holdout" else train).append(r)
    return train, holdout, rejects


def sft_record(r: dict) -> dict:
    """XiYan conversations format; the assistant turn is the SQL only. context/question kept for later stages."""
    return {"id": r["id"], "conversations": chat_messages(r["question"], r["context"], answer_sql=r["sql"]),
            "sql_type": "oracle", "question": r["question"], "sql": r["sql"], "context": r["context"],
            "tags": r["tags"]}


def chat_texts(tokenizer, sft: list[dict]) -> tuple[list[str], list[int]]:
    """Rendered conversations and, per record, the character length of its prompt (the generation-prompt boundary)."""
    full = [tokenizer.apply_chat_template(r["conversations"], tokenize=False) for r in sft]
    prompt_chars = [len(tokenizer.apply_chat_template(r["conversations"][:1], tokenize=False,
                                                      add_generation_prompt=True)) for r in sft]
    return full, prompt_chars


def count_tokens(backend, full: list[str], prompt_chars: list[int]) -> list[tuple[int, int]]:
    """(prompt+answer tokens, answer tokens) per rendered conversation, exactly as apply_chat_template(tokenize=True)
    counts them: one batched pass of the Rust tokenizer (no second BOS: the template already has it); the prompt
    length is the index of the token at the prompt/answer boundary instead of a second pass. All Rust, so it runs in
    a thread beside the Python validation (the tokenizer releases the GIL)."""
    out = []
    for enc, n_chars in zip(backend.encode_batch(full, add_special_tokens=False), prompt_chars):
        idx = enc.char_to_token(n_chars)
        # a token that straddles the boundary counts as prompt, like every token that starts before it
        n_prompt = len(enc) if idx is None else idx + int(enc.token_to_chars(idx)[0] < n_chars)
        out.append((len(enc), len(enc) - n_prompt))
    return out


def apply_token_limits(sft, counts, model_max_length, max_output_tokens):
    kept, rejects = [], []
    for r, (total, answer) in zip(sft, counts):
        if total > model_max_length:
            rejects.append({"line": r["_line"], "id": r["id"], "reason": "too_long",
                            "detail": f"{total} tokens > model_max_length {model_max_length}"})
        elif answer > max_output_tokens:
            rejects.append({"line": r["_line"], "id": r["id"], "reason": "answer_too_long",
                            "detail": f"answer {answer} tokens > max_output_tokens {max_output_tokens}"})
        else:
            kept.append({**r, "n_tokens": total})
    return kept, rejects


def catalog_from_contexts(records: list[dict]) -> dict:
    cat = {}
    for r in records:
        for t in r["context"]["tables"]:
            cols = cat.setdefault(t["name"].upper(), {})
            cols.update({c["name"].upper(): c.get("type", "") for c in t["columns"]})
    return {t: dict(sorted(c.items())) for t, c in sorted(cat.items())}


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


# ---- main -----------------------------------------------------------------------------------------------------
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
    ap.add_argument("--force", action="store_true", help="overwrite existing outputs")
    args = ap.parse_args(argv)
    if not 0.0 <= args.holdout_fraction < 1.0:
        ap.error("--holdout_fraction must be in [0, 1)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return build(args)
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def build(args) -> int:
    from tqdm import tqdm

    raw_path, out_path = Path(args.input_raw), Path(args.output_sft)
    stem = out_path.with_suffix("")
    rejects_path, manifest_path = Path(f"{stem}.rejects.jsonl"), Path(f"{stem}.manifest.json")
    outputs = [out_path, rejects_path, manifest_path] + [Path(p) for p in (args.holdout_out, args.catalog_out) if p]
    if not args.force and (existing := [str(p) for p in outputs if p.exists()]):
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
    try:
        lines = raw_path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise StageError(f"cannot read {raw_path}: {e}")

    accepted, rejects, counting, chunk = [], [], [], []
    with ThreadPoolExecutor(max_workers=1) as pool:
        def count_later(recs):  # the Rust tokenizer counts this chunk in the thread while Python validates on
            counting.append(pool.submit(count_tokens, tokenizer.backend_tokenizer, *chat_texts(tokenizer, recs)))

        for line_no, text in enumerate(tqdm(lines, desc="validate", unit="rec", disable=len(lines) < 2000), start=1):
            if not text.strip():
                rejects.append({"line": line_no, "reason": "empty_line", "detail": "blank line"})
                continue
            rec, rej = validate_record(line_no, text, catalog, policy)
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
        if chunk:
            count_later(chunk)
        counts = [c for f in counting for c in f.result()]
    for rec, c in zip(accepted, counts):
        rec["counts"] = c
    train, holdout, split_rejects = dedupe_and_split(accepted, args.holdout_fraction, args.seed)
    rejects += split_rejects
    if holdout and not args.holdout_out:
        raise StageError(f"{len(holdout)} records are in the holdout split: pass --holdout_out")

    splits = {"train": [{**r["sft"], "_line": r["line"]} for r in train],
              "holdout": [{**r["sft"], "_line": r["line"]} for r in holdout]}
    lengths = []
    if tokenizer is not None:
        for name, side in (("train", train), ("holdout", holdout)):
            kept, too_long = apply_token_limits(splits[name], [r["counts"] for r in side], args.model_max_length,
                                                args.max_output_tokens)
            splits[name], rejects = kept, rejects + too_long
            lengths += [r["n_tokens"] for r in kept]
    rejects.sort(key=lambda r: r["line"])
    n_ok = len(splits["train"]) + len(splits["holdout"])
    assert n_ok + len(rejects) == len(lines), "every line is either accepted or rejected"
    reason_counts = Counter(r["reason"] for r in rejects)
    print_summary(reason_counts, len(lines), len(splits["train"]), len(splits["holdout"]), lengths)
    if not splits["train"]:
        raise StageError(f"no valid training records in {raw_path} ({len(rejects)} rejected, see the table above)")

    for recs in splits.values():
        for r in recs:
            r.pop("_line")
    atomic_write_text(rejects_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects))
    atomic_write_json_records(out_path, splits["train"])
    if args.holdout_out:
        atomic_write_json_records(args.holdout_out, splits["holdout"])
    seen_catalog = catalog if catalog is not None else catalog_from_contexts(splits["train"] + splits["holdout"])
    if args.catalog_out:
        atomic_write_json(args.catalog_out, seen_catalog)
    manifest = {
        "dataset_id": args.dataset_id,
        "input_raw": str(raw_path), "input_sha256": sha256_file(raw_path),
        "output_sft": str(out_path), "output_sha256": sha256_file(out_path),
        "holdout_out": args.holdout_out, "holdout_sha256": sha256_file(args.holdout_out) if args.holdout_out else None,
        "catalog_in_sha256": sha256_file(args.catalog) if args.catalog else None,
        "catalog_out_sha256": sha256_file(args.catalog_out) if args.catalog_out else None,
        "prompt_template": "prompts/oracle_nl2sql_v1.jinja", "prompt_template_sha256": template_sha256(),
        "counts": {"lines": len(lines), "train": len(splits["train"]), "holdout": len(splits["holdout"]),
                   "rejected": dict(sorted(reason_counts.items()))},
        "tokens": ({"tokenizer": args.tokenizer, "min": min(lengths), "median": statistics.median(lengths),
                    "max": max(lengths), "model_max_length": args.model_max_length,
                    "max_output_tokens": args.max_output_tokens} if lengths else None),
        "holdout_fraction": args.holdout_fraction, "seed": args.seed,
        "sql_engine": sql_guardrail.SQLGLOT_IMPL["name"],
        "versions": library_versions("sqlglot", "sqlglotc", "pydantic", "transformers", "tokenizers", "jinja2"),
    }
    atomic_write_json(manifest_path, manifest)
    print(f"wrote {out_path} ({len(splits['train'])} train), rejects {rejects_path}, manifest {manifest_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
