"""Dataset builder: one row per validation rule, real sqlglot, real tokenizer, real files, the CLI as users run it."""
import json
import subprocess
import sys

import pytest

from conftest import PKG, ROOT
import build_oracle_sft_dataset as builder
from dataset_records import (Context, chat_texts, count_tokens, dedupe_and_split, hashed_side, sft_record,
                             split_key, validate_record)
from prompting import chat_messages

SCRIPT = PKG / "build_oracle_sft_dataset.py"
CTX = {"tables": [
    {"name": "AP_INVOICES_ALL", "description": "AP invoice headers",
     "columns": [{"name": "INVOICE_ID", "type": "NUMBER"}, {"name": "INVOICE_NUM", "type": "VARCHAR2(50)"},
                 {"name": "VENDOR_ID", "type": "NUMBER"}, {"name": "INVOICE_AMOUNT", "type": "NUMBER"},
                 {"name": "ORG_ID", "type": "NUMBER"}]},
    {"name": "AP_SUPPLIERS", "columns": [{"name": "VENDOR_ID", "type": "NUMBER"},
                                         {"name": "VENDOR_NAME", "type": "VARCHAR2(240)"}]}],
    "joins": ["AP_INVOICES_ALL.VENDOR_ID = AP_SUPPLIERS.VENDOR_ID"],
    "columns": ["AP_INVOICES_ALL.INVOICE_AMOUNT"], "synonyms": {"supplier": "AP_SUPPLIERS.VENDOR_NAME"},
    "security_filters": [{"table": "AP_INVOICES_ALL", "column": "ORG_ID", "predicate": "ORG_ID IN (:org_ids)"}]}
GOOD_SQL = ("SELECT S.VENDOR_NAME, SUM(AI.INVOICE_AMOUNT) FROM AP_INVOICES_ALL AI JOIN AP_SUPPLIERS S "
            "ON AI.VENDOR_ID = S.VENDOR_ID WHERE AI.ORG_ID IN (:org_ids) GROUP BY S.VENDOR_NAME")


def rec(question="Total invoice amount by supplier", sql=GOOD_SQL, **kw):
    return json.dumps({"question": question, "sql": sql, "context": CTX, **kw})


# One row per validation rule: raw line -> expected reason (None = accepted).
CASES = [
    ("valid", rec(), None),
    ("sql_gold alias", json.dumps({"question": "q alias", "sql_gold": GOOD_SQL, "context": CTX}), None),
    ("trailing semicolon normalized", rec(sql=GOOD_SQL + ";"), None),
    ("invalid json", '{"question": "x", "sql": ', "invalid_json"),
    ("missing sql", json.dumps({"question": "q", "context": CTX}), "schema"),
    ("blank question", rec(question="   "), "schema"),
    ("no tables in context", json.dumps({"question": "q", "sql": GOOD_SQL, "context": {"tables": []}}), "schema"),
    ("bad split value", rec(split="test"), "schema"),
    ("unparseable sql", rec(sql="SELECT FROM WHERE ("), "parse_error"),
    ("DML", rec(sql="DELETE FROM AP_INVOICES_ALL WHERE ORG_ID IN (:org_ids)"), "unsafe"),
    ("two statements", rec(sql="SELECT 1 FROM DUAL; SELECT 2 FROM DUAL"), "contract"),
    ("unknown table", rec(sql="SELECT X.A FROM AP_HOLDS_ALL X"), "unknown_table"),
    ("unknown column", rec(sql="SELECT AI.INVOICE_TOTAL FROM AP_INVOICES_ALL AI WHERE AI.ORG_ID IN (:org_ids)"),
     "unknown_column"),
    ("missing MOAC filter", rec(sql="SELECT AI.INVOICE_NUM FROM AP_INVOICES_ALL AI"), "security_filter"),
]


@pytest.mark.parametrize("name, line, reason", CASES, ids=[c[0] for c in CASES])
def test_validation_rules(name, line, reason):
    accepted, rejected = validate_record(7, line, catalog=None, policy=builder.sql_guardrail.load_policy())
    if reason is None:
        assert rejected is None and accepted["sql"] == GOOD_SQL
    else:
        assert accepted is None and rejected["reason"] == reason and rejected["line"] == 7, rejected


def test_global_catalog_also_constrains():
    catalog = {"AP_INVOICES_ALL": {"INVOICE_ID": "NUMBER", "ORG_ID": "NUMBER", "VENDOR_ID": "NUMBER"},
               "AP_SUPPLIERS": {"VENDOR_ID": "NUMBER", "VENDOR_NAME": "VARCHAR2(240)"}}
    _, rejected = validate_record(1, rec(), catalog=catalog, policy=builder.sql_guardrail.load_policy())
    assert rejected["reason"] == "unknown_column" and "INVOICE_AMOUNT" in rejected["detail"]


def records(*pairs):
    return [{"line": i + 1, "id": f"r{i}", "question": q, "sql": s, "norm_sql": s, "context": CTX, "split": sp,
             "tags": []} for i, (q, s, sp) in enumerate(pairs)]


def test_duplicates_and_leak_free_split():
    recs = records(("Q one", "S1", None), ("q  ONE?", "S2", None), ("Q two", "S1", None),
                   ("Q three", "S3", "holdout"), ("Q four", "S3", "train"))
    train, holdout, rejects = dedupe_and_split(recs, holdout_fraction=0.0, seed=0)
    assert [r["id"] for r in train] == ["r0", "r2"] and [r["id"] for r in holdout] == ["r3"]
    assert [(r["line"], r["reason"]) for r in rejects] == [(2, "duplicate"), (5, "split_leak")]


def test_split_is_grouped_by_sql_and_order_independent():
    recs = records(*[(f"question {i}", f"SQL{i % 20}", None) for i in range(200)])
    train, holdout, _ = dedupe_and_split(recs, holdout_fraction=0.3, seed=1)
    assert not {r["norm_sql"] for r in train} & {r["norm_sql"] for r in holdout}
    assert 0.1 < len(holdout) / 200 < 0.5
    train2, holdout2, _ = dedupe_and_split(list(reversed(recs)), holdout_fraction=0.3, seed=1)
    assert {r["id"] for r in holdout2} == {r["id"] for r in holdout}


# One gold query, spelled as a user might: split_key (what other stages hash) is the builder's own group key.
INVOICE_SQL = "SELECT AI.INVOICE_NUM FROM AP_INVOICES_ALL AI WHERE AI.ORG_ID IN (:org_ids)"
SPELLINGS = [INVOICE_SQL, INVOICE_SQL + ";", INVOICE_SQL + " -- open invoices", f"```sql\n{INVOICE_SQL}\n```",
             'SELECT "AI"."INVOICE_NUM" FROM AP_INVOICES_ALL AI WHERE AI.ORG_ID IN (:org_ids)',
             "select ai.invoice_num /* n */ from ap_invoices_all ai\nwhere ai.org_id in (:org_ids)"]


@pytest.mark.parametrize("sql", SPELLINGS)
def test_split_key_is_the_builders_group_key(sql):
    accepted, rejected = validate_record(1, rec(sql=sql), catalog=None, policy=builder.sql_guardrail.load_policy())
    assert rejected is None, rejected
    assert split_key(sql) == accepted["norm_sql"] == split_key(INVOICE_SQL)


def test_tiny_fixture_corpus_takes_the_builders_train_split(tmp_path):
    """make_tiny_llama.training_sql (the SQL the tiny model pre-trains on) is exactly the builder's train split, also
    for spellings where the guardrail's normalized_sql (comments, quoted case kept) would hash to the other side."""
    import make_tiny_llama
    from sql_guardrail import normalized_sql

    fraction, seed = 0.5, 13
    assert any(hashed_side(normalized_sql(s), fraction, seed) != hashed_side(split_key(s), fraction, seed)
               for s in SPELLINGS), "the case this test is about: the two keys disagree for this seed"
    sqls = SPELLINGS + [GOOD_SQL]
    lines = [rec(question=f"question {i}", sql=s) for i, s in enumerate(sqls)]
    (tmp_path / "raw.jsonl").write_text("".join(line + "\n" for line in lines))
    policy = builder.sql_guardrail.load_policy()
    accepted = [validate_record(n, line, None, policy)[0] for n, line in enumerate(lines, 1)]
    train, holdout, rejects = dedupe_and_split(accepted, fraction, seed)
    assert not rejects and train and holdout
    assert make_tiny_llama.training_sql(tmp_path / "raw.jsonl", fraction, seed) == [sqls[r["line"] - 1] for r in train]


def test_token_counts_equal_chat_template(tiny_model_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    raw = [json.loads(line) for line in (PKG / "demo" / "raw_questions.jsonl").read_text().splitlines()[:20]]
    sft = [sft_record({"id": str(i), "question": r["question"], "sql": r["sql"], "context": r["context"],
                       "tags": []}) for i, r in enumerate(raw)]
    for r, (total, answer) in zip(sft, count_tokens(tok.backend_tokenizer, *chat_texts(tok, sft))):
        full = tok.apply_chat_template(r["conversations"], tokenize=True)["input_ids"]
        prompt = tok.apply_chat_template(r["conversations"][:1], tokenize=True, add_generation_prompt=True)["input_ids"]
        assert (total, answer) == (len(full), len(full) - len(prompt))


def test_build_counts_tokens_across_chunks_in_input_order(tmp_path, tiny_model_dir):
    """600 records = 3 chunks through the counting thread: every kept record's n_tokens is its chat-template count,
    and exactly the records above model_max_length are rejected as too_long."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    demo = [json.loads(line) for line in (PKG / "demo" / "raw_questions.jsonl").read_text().splitlines()]
    raw = [{**demo[i % len(demo)], "id": f"r{i}", "question": f"{demo[i % len(demo)]['question']} (v{i})"}
           for i in range(600)]
    (tmp_path / "raw.jsonl").write_text("".join(json.dumps(r) + "\n" for r in raw))
    args = ["--input_raw", str(tmp_path / "raw.jsonl"), "--output_sft", str(tmp_path / "sft.json"),
            "--dataset_id", "t", "--tokenizer", str(tiny_model_dir), "--model_max_length", "500",
            "--holdout_fraction", "0", "--seed", "0"]
    assert builder.main(args) == 0
    kept = {r["id"]: r for r in json.loads((tmp_path / "sft.json").read_text())}
    rejected = {r["id"] for r in map(json.loads, (tmp_path / "sft.rejects.jsonl").read_text().splitlines())
                if r["reason"] == "too_long"}
    assert kept and rejected and len(kept) + len(rejected) == 600
    for r in kept.values():
        assert r["n_tokens"] == len(tok.apply_chat_template(r["conversations"], tokenize=True)["input_ids"]) <= 500
    assert list(kept) == sorted(kept, key=lambda i: int(i[1:]))


def run_cli(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT, timeout=300)


def write_raw(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.slow
def test_cli_end_to_end_counts_rejects_and_limits(tmp_path, tiny_model_dir):
    long_q = "Total invoice amount by supplier " + "please " * 600
    lines = [rec(), "{broken", rec(question="Invoices per supplier", sql="DROP TABLE AP_SUPPLIERS"),
             rec(question=long_q), "", rec(question="total invoice amount by supplier?")]
    raw = write_raw(tmp_path / "raw.jsonl", lines)
    out = tmp_path / "out" / "sft.json"
    r = run_cli("--input_raw", str(raw), "--output_sft", str(out), "--dataset_id", "t1", "--tokenizer",
                str(tiny_model_dir), "--model_max_length", "1000", "--catalog_out", str(tmp_path / "cat.json"),
                "--max_question_chars", "10000")  # the long question must reach the token count
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert len(data) == 1 and data[0]["conversations"][1] == {"role": "assistant", "content": GOOD_SQL}
    assert data[0]["sql_type"] == "oracle" and data[0]["conversations"][0]["role"] == "user"
    rejects = [json.loads(x) for x in (tmp_path / "out" / "sft.rejects.jsonl").read_text().splitlines()]
    assert [(x["line"], x["reason"]) for x in rejects] == [
        (2, "invalid_json"), (3, "unsafe"), (4, "too_long"), (5, "empty_line"), (6, "duplicate")]
    assert "tokens > model_max_length 1000" in rejects[2]["detail"]
    manifest = json.loads((tmp_path / "out" / "sft.manifest.json").read_text())
    assert manifest["counts"]["lines"] == len(lines) == len(data) + len(rejects)
    assert manifest["output_sha256"] == builder.sha256_file(out)
    assert manifest["prompt_template_sha256"] == builder.template_sha256()
    assert json.loads((tmp_path / "cat.json").read_text())["AP_SUPPLIERS"]["VENDOR_NAME"] == "VARCHAR2(240)"
    # An existing output is never overwritten silently.
    again = run_cli("--input_raw", str(raw), "--output_sft", str(out), "--dataset_id", "t1")
    assert again.returncode == 2 and "output exists" in again.stderr and "Traceback" not in again.stderr


@pytest.mark.slow
def test_answer_longer_than_output_cap_rejected(tmp_path, tiny_model_dir):
    raw = write_raw(tmp_path / "raw.jsonl", [rec()])
    r = run_cli("--input_raw", str(raw), "--output_sft", str(tmp_path / "o.json"), "--dataset_id", "t",
                "--tokenizer", str(tiny_model_dir), "--max_output_tokens", "5")
    assert r.returncode == 2 and "no valid training records" in r.stderr and "answer_too_long" in r.stderr
    assert not list(tmp_path.glob("o*"))


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--input_raw", "missing.jsonl"], "input not found"),
    (["--input_raw", "RAW", "--tokenizer", "/nonexistent/tok"], "cannot load tokenizer"),
    (["--input_raw", "RAW", "--catalog", "/nonexistent/catalog.json"], "catalog"),
])
def test_bad_paths_one_line_no_output(tmp_path, args, message):
    raw = write_raw(tmp_path / "raw.jsonl", [rec()])
    args = [str(raw) if a == "RAW" else a for a in args]
    r = run_cli(*args, "--output_sft", str(tmp_path / "o.json"), "--dataset_id", "t")
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o.json").exists()


@pytest.mark.slow
def test_zero_valid_rows_fails_without_outputs(tmp_path):
    raw = write_raw(tmp_path / "raw.jsonl", ["{bad", "[1, 2]"])
    r = run_cli("--input_raw", str(raw), "--output_sft", str(tmp_path / "o.json"), "--dataset_id", "t")
    assert r.returncode == 2 and "no valid training records" in r.stderr
    assert not list(tmp_path.glob("o*"))


@pytest.mark.slow
def test_bad_flag_exits_2():
    r = run_cli("--input_raw", "x", "--output_sft", "y", "--dataset_id", "z", "--holdout_fraction", "1.5")
    assert r.returncode == 2 and "holdout_fraction" in r.stderr


@pytest.mark.slow
def test_make_dataset_on_demo_data(demo_dataset):
    manifest = json.loads(demo_dataset["manifest"].read_text())
    train = json.loads(demo_dataset["train"].read_text())
    holdout = json.loads(demo_dataset["holdout"].read_text())
    assert manifest["counts"]["train"] == len(train) >= 150 and len(holdout) >= 10
    assert manifest["counts"]["lines"] == 216 and manifest["counts"]["rejected"] == {}
    assert not {r["sql"] for r in train} & {r["sql"] for r in holdout}
    assert not {r["question"].lower() for r in train} & {r["question"].lower() for r in holdout}
    catalog = json.loads(demo_dataset["catalog"].read_text())
    assert "AP_INVOICES_ALL" in catalog and demo_dataset["rejects"].read_text() == ""


@pytest.mark.slow
def test_retrieve_gives_context_less_records_the_retrieved_context(tmp_path):
    """--retrieve --schema: records without a context get retrieve_context's; the manifest names them and the
    settings; a question that matches no table is rejected with its line number."""
    import retrieve_context
    schema_path = PKG / "demo" / "ebs_schema.json"
    demo = [json.loads(x) for x in (PKG / "demo" / "raw_questions.jsonl").read_text().splitlines()]
    lines = [json.dumps({k: v for k, v in r.items() if k != "context"}) for r in demo[:12]]
    lines.insert(3, json.dumps({"id": "nothing", "question": "zzqx blorf wibble", "sql": "SELECT 1 FROM DUAL"}))
    lines.append(json.dumps(demo[40]))  # has its own context: used as it is
    raw = write_raw(tmp_path / "raw.jsonl", lines)
    r = run_cli("--input_raw", str(raw), "--output_sft", str(tmp_path / "sft.json"), "--dataset_id", "t",
                "--retrieve", "--schema", str(schema_path), "--max_context_tokens", "3000")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "sft.manifest.json").read_text())
    rejects = [json.loads(x) for x in (tmp_path / "sft.rejects.jsonl").read_text().splitlines()]
    assert {"line": 4, "id": "nothing", "reason": "retrieval_failed",
            "detail": "retrieval: no relevant tables for this question"} in rejects
    index = retrieve_context.build_index(retrieve_context.load_schema(schema_path))
    assert manifest["retrieval"]["settings"] == json.loads(json.dumps(
        retrieve_context.retrieval_settings(index, 3000, None)))
    assert manifest["retrieval"]["retrieval_failed_lines"] == [4]
    kept = {x["id"]: x for x in json.loads((tmp_path / "sft.json").read_text())}
    retrieved = set(manifest["retrieval"]["retrieved_ids"])
    assert retrieved and retrieved <= {d["id"] for d in demo[:12]} and demo[40]["id"] in set(kept) - retrieved
    for rid in retrieved:  # the prompt trained on is the one serving renders from the same retrieval
        ctx = retrieve_context.retrieve(index, kept[rid]["question"], max_context_tokens=3000)
        assert kept[rid]["context"] == Context.model_validate(ctx).model_dump()
        assert kept[rid]["conversations"][0] == chat_messages(kept[rid]["question"], ctx)[0]
    assert kept[demo[40]["id"]]["context"] == Context.model_validate(demo[40]["context"]).model_dump()


@pytest.mark.slow
@pytest.mark.parametrize("flags", [["--retrieve"], ["--schema", "s.json"], ["--max_context_tokens", "900"]])
def test_retrieve_flags_go_together(flags):
    r = run_cli("--input_raw", "x", "--output_sft", "y", "--dataset_id", "z", *flags)
    assert r.returncode == 2 and ("--retrieve" in r.stderr) and "Traceback" not in r.stderr
