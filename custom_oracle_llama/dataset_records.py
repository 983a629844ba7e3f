"""The dataset builder's record rules, pure: one raw line -> an accepted record or a reject (line, reason, detail),
then the de-duplication and the train/holdout split of the accepted ones, and their exact token counts.

    rec, rej = validate_record(3, '{"question": "Unpaid invoices", "sql": "SELECT ...", "context": {...}}',
                               catalog=None, policy=sql_guardrail.load_policy())
    # rec: {"line": 3, "id": "line-3", "norm_sql": "SELECT ...", ...}, rej: None
    # or rec: None, rej: {"line": 3, "reason": "unknown_column", "detail": "..."}
    train, holdout, rejects = dedupe_and_split(accepted, holdout_fraction=0.1, seed=0)

Only sqlglot, pydantic and the guardrail are used; no file is opened (read_lines reads the file it is given).
The split of a record without an explicit one hashes `split_key(sql)`: other stages that must reproduce the
builder's split (demo/make_tiny_llama.py, retrieve_context.py eval) call that one function.
"""
import functools
import hashlib
import json
import re
import sys
import unicodedata
from pathlib import Path
from typing import Literal

import sqlglot
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from sqlglot import exp
from sqlglot.errors import ErrorLevel, ParseError, TokenError
from sqlglot.tokens import TokenType

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "inference"))

from artifacts import StageError  # noqa: E402
from prompting import chat_messages  # noqa: E402
import sql_guardrail  # noqa: E402

MAX_LINE_BYTES = 1 << 20      # a raw line above this is not even parsed (a whole 8k-token prompt is ~40 kB)
MAX_QUESTION_CHARS = 4000     # checked before any tokenizing: a question is a sentence or a paragraph, not a file
UTF8_BOM = b"\xef\xbb\xbf"
ORACLE = sqlglot.Dialect.get_or_raise("oracle")
# A gold answer is incomplete when one of these tokens has nothing after it (sqlglot's parser is lenient there:
# "SELECT a, FROM t" and "... JOIN u ON" parse).
NEEDS_OPERAND = {TokenType.SELECT, TokenType.DISTINCT, TokenType.FROM, TokenType.JOIN, TokenType.ON,
                 TokenType.WHERE, TokenType.HAVING, TokenType.GROUP_BY, TokenType.ORDER_BY, TokenType.COMMA,
                 TokenType.AND, TokenType.OR, TokenType.NOT, TokenType.IN, TokenType.LIKE, TokenType.BETWEEN,
                 TokenType.IS, TokenType.EQ, TokenType.NEQ, TokenType.LT, TokenType.GT, TokenType.LTE,
                 TokenType.GTE, TokenType.PLUS, TokenType.DASH, TokenType.SLASH, TokenType.DPIPE,
                 TokenType.CONNECT_BY, TokenType.START_WITH}
ENDS_OPERAND = {TokenType.FROM, TokenType.WHERE, TokenType.GROUP_BY, TokenType.ORDER_BY, TokenType.HAVING,
                TokenType.R_PAREN, TokenType.COMMA, TokenType.UNION, TokenType.EXCEPT, TokenType.INTERSECT,
                TokenType.SEMICOLON, TokenType.CONNECT_BY, TokenType.START_WITH}


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


# ---- one raw line -> accepted record or reject ----------------------------------------------------------------
def read_lines(f, max_line_bytes: int = MAX_LINE_BYTES):
    """(line number, bytes or None when over max_line_bytes, bytes consumed) per line of a binary file. Lines end
    at b"\\n" only (CRLF tolerated), so numbers are what `wc -l` and editors show; a UTF-8 BOM before line 1 is
    dropped; an over-long line is skipped in chunks, never held whole."""
    line_no = 0
    while raw := f.readline(max_line_bytes + 2):
        line_no += 1
        if line_no == 1 and raw.startswith(UTF8_BOM):
            raw = raw[len(UTF8_BOM):]
        consumed = len(raw)
        if not raw.endswith(b"\n") and consumed >= max_line_bytes + 2:
            while more := f.readline(1 << 20):
                consumed += len(more)
                if more.endswith(b"\n"):
                    break
            yield line_no, None, consumed
            continue
        body = raw[:-1] if raw.endswith(b"\n") else raw
        body = body[:-1] if body.endswith(b"\r") else body
        yield line_no, (body if len(body) <= max_line_bytes else None), consumed


def context_catalog(context: dict, catalog: dict | None) -> dict:
    """What the record may reference: its context's tables/columns, narrowed to the global catalog when given."""
    out = {}
    for t in context["tables"]:
        name = t["name"].upper()
        known = catalog.get(name) if catalog is not None else None  # None: unknown (or ambiguous across owners)
        if catalog is not None and known is None:
            continue
        cols = {c["name"].upper(): c.get("type", "") for c in t["columns"]}
        out[name] = cols if known is None else {c: typ for c, typ in cols.items() if c in known}
    return out


def normalize_question(q: str) -> str:
    """The duplicate key of a question: NFKC (full-width letters, compatibility forms), no zero-width/format
    characters, case-folded, one space, no trailing punctuation."""
    q = "".join(ch for ch in unicodedata.normalize("NFKC", q) if unicodedata.category(ch) != "Cf")
    return re.sub(r"\s+", " ", q.casefold()).strip().rstrip("?.!;: ")


def filter_problems(context: dict, catalog: dict | None) -> list[str]:
    """A security filter that cannot be applied is a hole, not a no-op: its table must be in the record's context
    (and in the catalog), its column in that table, and its predicate must parse."""
    tables = {t["name"].upper(): {c["name"].upper() for c in t["columns"]} for t in context["tables"]}
    out = []
    for i, f in enumerate(context["security_filters"]):
        name, table, column = f"security_filters[{i}] ({f['table']}.{f['column']})", f["table"].upper(), f["column"]
        if table not in tables:
            out.append(f"{name}: table {f['table']!r} is not in the record's context")
        elif catalog is not None and catalog.get(table) is None:
            out.append(f"{name}: table {f['table']!r} is not in the catalog")
        elif column.upper() not in tables[table] or (catalog is not None and column.upper() not in catalog.get(table)):
            out.append(f"{name}: column {column!r} is not in table {table}")
        elif problem := predicate_problem(f["predicate"]):
            out.append(f"{name}: predicate {f['predicate']!r} does not parse: {problem}")
    return out


@functools.lru_cache(maxsize=4096)
def predicate_problem(predicate: str) -> str | None:
    """Why a security predicate does not parse, or None (cached: a site has a handful of predicates)."""
    try:
        sqlglot.parse_one(predicate, read=ORACLE, error_level=ErrorLevel.IMMEDIATE)
    except (ParseError, TokenError, RecursionError) as e:
        return str(e).splitlines()[0][:200] if str(e) else type(e).__name__
    return None


def gold_sql_key(sql: str, tables) -> tuple[str | None, str]:
    """-> (None, split key) for a complete Oracle query that reads one of `tables` or DUAL (tables=None: any),
    else (reason, detail). The split key is the query without comments, quoting or case: records sharing it are one
    group (for plain upper-case SQL it equals the guardrail's normalized_sql)."""
    try:
        tokens = ORACLE.tokenize(sql)
        trees = [t for t in ORACLE.parser(error_level=ErrorLevel.IMMEDIATE).parse(tokens, sql) if t is not None]
        if len(trees) != 1 or not isinstance(trees[0], exp.Query):
            return "parse_error", "not exactly one SELECT / WITH query"
        for tok, nxt in zip(tokens, tokens[1:] + [None]):
            if tok.token_type in NEEDS_OPERAND and (nxt is None or nxt.token_type in ENDS_OPERAND):
                return "parse_error", (f"incomplete query: nothing after {tok.text!r} (line {tok.line}, "
                                       f"column {tok.col})")
        tree, ctes = trees[0], set()
        for node in tree.walk():
            if isinstance(node, exp.Select) and not (node.expressions and (node.args.get("from_") or node.args.get("from"))):
                return "parse_error", "incomplete query: a SELECT without a select list or FROM (Oracle needs both)"
            if isinstance(node, exp.Group) and not any(node.args.get(k) for k in node.arg_types):
                return "parse_error", "incomplete query: GROUP BY with nothing after it"
            if isinstance(node, exp.Count) and node.this is None and not node.expressions:
                return "parse_error", "incomplete query: COUNT() without an argument"
            if isinstance(node, exp.CTE):
                ctes.add(node.alias_or_name.upper())
            node.comments = None
        read = {t.name.upper() for t in tree.find_all(exp.Table)} - ctes
        if tables is not None and not read & ({str(t).upper() for t in tables} | {"DUAL"}):
            return "no_table", f"reads no table of its context/catalog (reads: {', '.join(sorted(read)) or 'none'})"
        for ident in tree.find_all(exp.Identifier):
            ident.set("this", ident.name.upper())
            ident.set("quoted", False)
        return None, tree.sql(dialect=ORACLE)
    except (ParseError, TokenError) as e:
        return "parse_error", f"not valid Oracle SQL: {str(e).splitlines()[0][:200]}"
    except RecursionError:
        return "parse_error", "not valid Oracle SQL: nesting too deep to parse"


def validate_record(line_no: int, text: str, catalog: dict | None, policy: dict,
                    max_question_chars: int = MAX_QUESTION_CHARS, retriever=None) -> tuple[dict | None, dict | None]:
    """-> (accepted record, None) or (None, reject). Pure apart from sqlglot (and `retriever`: question -> context,
    StageError when nothing relevant, used for a record without a context); never raises on a bad line."""
    def reject(reason, detail, rec_id=None):
        return None, {"line": line_no, **({"id": rec_id} if rec_id else {}), "reason": reason, "detail": detail}

    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return reject("invalid_json", f"invalid JSON: {e.msg} at column {e.colno}")
    except (ValueError, RecursionError) as e:  # a 5,000-digit number, 10,000 nested brackets
        return reject("invalid_json", f"invalid JSON: {'nesting too deep' if isinstance(e, RecursionError) else e}")
    retrieved = False
    if retriever is not None and isinstance(obj, dict) and obj.get("context") is None:
        q = obj.get("question")
        if isinstance(q, str) and q.strip() and len(q) <= max_question_chars:
            try:
                obj = {**obj, "context": retriever(q)}
            except Exception as e:  # StageError: nothing relevant; anything else: still this line's problem only
                detail = str(e) if isinstance(e, StageError) else f"{type(e).__name__}: {e}"
                return reject("retrieval_failed", f"retrieval: {detail}"[:300],
                              obj["id"] if isinstance(obj.get("id"), str) else None)
            retrieved = True
    try:
        rec = RawRecord.model_validate(obj)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "record"
        return reject("schema", f"{where}: {err['msg']}")
    except RecursionError:
        return reject("schema", "record nested too deeply")
    if len(rec.question) > max_question_chars:
        return reject("too_large", f"question {len(rec.question)} characters > --max_question_chars "
                                   f"{max_question_chars}", rec.id)
    context = rec.context.model_dump()
    allowed = context_catalog(context, catalog)
    bad_filters = filter_problems(context, catalog)
    if bad_filters:
        return reject("security_filter", "; ".join(bad_filters), rec.id)
    try:
        verdict = sql_guardrail.check_sql(rec.sql or rec.sql_gold, catalog=allowed, policy=policy,
                                          security_filters=context["security_filters"])
    except StageError as e:  # the guardrail refuses a filter predicate it cannot apply
        return reject("security_filter", str(e), rec.id)
    except RecursionError:
        return reject("parse_error", "not valid Oracle SQL: nesting too deep to check", rec.id)
    except Exception as e:  # one odd record must not cost the others: reported with its line
        return reject("check_error", f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else '-'}",
                      rec.id)
    if not verdict["ok"]:
        return reject(verdict["codes"][0], "; ".join(verdict["reasons"]), rec.id)
    problem, key = gold_sql_key(verdict["sql"], allowed)
    if problem:
        return reject(problem, key, rec.id)
    return {"line": line_no, "id": rec.id or f"line-{line_no}", "generated_id": not rec.id,
            "question": rec.question.strip(), "sql": verdict["sql"], "norm_sql": key,
            "context": context, "split": rec.split, "tags": rec.tags, "retrieved": retrieved}, None


# ---- de-duplication and the train/holdout split ---------------------------------------------------------------
def holdout_bucket(key: str, seed: int) -> float:
    """Stable pseudo-random number in [0, 1) per group key: the split does not depend on input order."""
    return int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:12], 16) / 16 ** 12


def split_key(sql: str) -> str:
    """The builder's split key of one gold SQL text (what other stages must hash to reproduce its split): for a
    record the builder accepts, its `norm_sql`, i.e. gold_sql_key of the SQL after the guardrail's answer
    normalization (one markdown fence and one trailing ';' stripped), as validate_record computes it."""
    answer = sql_guardrail.normalize_answer(sql)[0]
    problem, key = gold_sql_key(answer, None) if answer else ("empty", "")
    return " ".join(sql.split()) if problem else key


def hashed_side(norm_sql: str, holdout_fraction: float, seed: int) -> str:
    """The split of a record without an explicit one: decided by its normalized SQL, so rephrasings stay together."""
    return "holdout" if holdout_bucket(norm_sql, seed) < holdout_fraction else "train"


def dedupe_and_split(records: list[dict], holdout_fraction: float, seed: int) -> tuple[list, list, list]:
    """-> (train, holdout, rejects), over accepted records only. Same question or same id as an earlier kept
    record: rejected. Same split key: same side. A generated id never takes an explicit one (suffix .2, .3...)."""
    explicit = {r["id"] for r in records if not r.get("generated_id")}
    seen_q, seen_id, group_side, train, holdout, rejects = {}, {}, {}, [], [], []
    for r in records:
        q = normalize_question(r["question"])
        if q in seen_q:
            rejects.append({"line": r["line"], "id": r["id"], "reason": "duplicate",
                            "detail": f"same question as line {seen_q[q]}"})
            continue
        if not r.get("generated_id") and r["id"] in seen_id:
            rejects.append({"line": r["line"], "id": r["id"], "reason": "duplicate_id",
                            "detail": f"same id as line {seen_id[r['id']]}"})
            continue
        side = r["split"] or group_side.get(r["norm_sql"]) or hashed_side(r["norm_sql"], holdout_fraction, seed)
        if group_side.setdefault(r["norm_sql"], side) != side:
            rejects.append({"line": r["line"], "id": r["id"], "reason": "split_leak",
                            "detail": f"its SQL is already in the {group_side[r['norm_sql']]} split"})
            continue
        if r.get("generated_id"):
            base, k = r["id"], 1
            while r["id"] in explicit or r["id"] in seen_id:
                k += 1
                r["id"] = f"{base}.{k}"
        seen_q[q], seen_id[r["id"]] = r["line"], r["line"]
        (holdout if side == "holdout" else train).append(r)
    return train, holdout, rejects


# ---- the SFT record and its exact token counts ----------------------------------------------------------------
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


def apply_token_limits(records, counts, model_max_length, max_output_tokens):
    """Before de-duplication: a too-long record must not make a later good twin a 'duplicate'."""
    kept, rejects = [], []
    for r, (total, answer) in zip(records, counts):
        if total > model_max_length:
            rejects.append({"line": r["line"], "id": r["id"], "reason": "too_long",
                            "detail": f"{total} tokens > model_max_length {model_max_length}"})
        elif answer > max_output_tokens:
            rejects.append({"line": r["line"], "id": r["id"], "reason": "answer_too_long",
                            "detail": f"answer {answer} tokens > max_output_tokens {max_output_tokens}"})
        else:
            kept.append({**r, "n_tokens": total})
    return kept, rejects


def catalog_from_contexts(records: list[dict]) -> dict:
    """{TABLE: {COLUMN: TYPE}} of every table the records' contexts name (the --catalog_out without --catalog)."""
    cat = {}
    for r in records:
        for t in r["context"]["tables"]:
            cols = cat.setdefault(t["name"].upper(), {})
            cols.update({c["name"].upper(): c.get("type", "") for c in t["columns"]})
    return {t: dict(sorted(c.items())) for t, c in sorted(cat.items())}
