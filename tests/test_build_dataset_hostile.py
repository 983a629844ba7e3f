"""Dataset builder under hostile input (issue 18): bad lines mixed among valid demo records, run through the CLI as
a user runs it. Each test asserts the exact rejected line numbers and reasons, that every good record is kept, that
no input or earlier output changed, and that no traceback appears."""
import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
import unicodedata

import pytest

from conftest import PKG, ROOT
import build_oracle_sft_dataset as builder
from dataset_records import gold_sql_key

SCRIPT = PKG / "build_oracle_sft_dataset.py"
CATALOG = PKG / "demo" / "ebs_catalog.json"
DEMO = [json.loads(x) for x in (PKG / "demo" / "raw_questions.jsonl").read_text(encoding="utf-8").splitlines()]


def good(i: int, **kw) -> str:
    """Demo record i as one raw line (ensure_ascii=False: raw Unicode, as exports from other tools write it)."""
    return json.dumps({**DEMO[i], **kw}, ensure_ascii=False)


def bad_sql(i: int, sql: str, **kw) -> str:
    return good(i, **{"id": f"bad-{i}", "question": f"variant {i} of {DEMO[i]['question']}", "sql": sql, **kw})


def with_filters(i: int, *filters) -> str:
    ctx = {**DEMO[i]["context"], "security_filters": [*DEMO[i]["context"]["security_filters"], *filters]}
    return good(i, id=f"flt-{i}", question=f"filtered {i}: {DEMO[i]['question']}", context=ctx)


def snapshot(root) -> dict:
    """{relative path: sha256} of every file (and symlink target) under root: inputs and earlier outputs."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run(tmp_path, lines, *extra, raw_name="raw.jsonl", out="out/sft.json", catalog=True, env=None,
        preexec_fn=None, timeout=300):
    """Write the raw file (str lines joined by \\n, or raw bytes), run the builder, return (proc, kept, rejects)."""
    raw = tmp_path / raw_name
    if lines is not None:
        raw.write_bytes(lines if isinstance(lines, bytes) else ("\n".join(lines) + "\n").encode("utf-8"))
    args = [sys.executable, str(SCRIPT), "--input_raw", str(raw), "--output_sft", str(tmp_path / out),
            "--dataset_id", "hostile", *(["--catalog", str(CATALOG)] if catalog else []), *extra]
    r = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=timeout, env=env,
                       preexec_fn=preexec_fn)
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr
    sft = tmp_path / out
    kept = json.loads(sft.read_text()) if r.returncode == 0 else None
    rejects_path = sft.with_suffix(".rejects.jsonl")
    rejects = ([json.loads(x) for x in rejects_path.read_text().splitlines()] if r.returncode == 0 else None)
    return r, kept, rejects


def assert_outcome(r, kept, rejects, expect_rejects: dict, good_ids: set):
    assert r.returncode == 0, r.stderr
    got = {x["line"]: x["reason"] for x in rejects}
    for line, reason in expect_rejects.items():
        ok = reason if isinstance(reason, (set, frozenset)) else {reason}
        assert got.get(line) in ok, (line, got.get(line), [x for x in rejects if x["line"] == line])
    assert set(got) == set(expect_rejects), rejects
    assert set(got.values()) <= set(builder.REASONS), "every reason is listed in the builder's REASONS"
    assert {k["id"] for k in kept} == good_ids


def no_leftovers(root):
    """No temp file or staging folder anywhere under root."""
    left = [p for p in root.rglob("*") if p.name.endswith((".partial", ".tmp"))]
    assert not left, left


# ---- 1. clobbering ------------------------------------------------------------------------------------------------
def _clobber_cases(tmp_path):
    raw, cat = tmp_path / "raw.jsonl", tmp_path / "cat.json"
    (tmp_path / "link.json").symlink_to(raw)
    os.link(raw, tmp_path / "hard.jsonl")
    return {
        "output is the input": ["--output_sft", str(raw)],
        "output is a symlink to the input": ["--output_sft", str(tmp_path / "link.json")],
        "output is a hard link of the input": ["--output_sft", str(tmp_path / "hard.jsonl")],
        "holdout is the output": ["--holdout_out", str(tmp_path / "out" / "sft.json")],
        "holdout is the output via ..": ["--holdout_out", str(tmp_path / "out" / ".." / "out" / "sft.json")],
        "catalog_out is the output": ["--catalog_out", str(tmp_path / "out" / "sft.json")],
        "catalog_out is the input catalog": ["--catalog", str(cat), "--catalog_out", str(cat)],
        "holdout is the rejects report": ["--holdout_out", str(tmp_path / "out" / "sft.rejects.jsonl")],
        "holdout is the manifest": ["--holdout_out", str(tmp_path / "out" / "sft.manifest.json")],
        "catalog_out is the input": ["--catalog_out", str(raw)],
    }


CLOBBER = ["output is the input", "output is a symlink to the input", "output is a hard link of the input",
           "holdout is the output", "holdout is the output via ..", "catalog_out is the output",
           "catalog_out is the input catalog", "holdout is the rejects report", "holdout is the manifest",
           "catalog_out is the input"]


@pytest.mark.slow
@pytest.mark.parametrize("case", CLOBBER)
def test_two_flags_naming_one_file_are_refused_before_anything_is_touched(tmp_path, case):
    (tmp_path / "raw.jsonl").write_text("\n".join([good(0), good(1)]) + "\n")
    (tmp_path / "cat.json").write_text(CATALOG.read_text())
    (tmp_path / "out").mkdir()
    # an earlier complete output set, which must survive too
    r0 = subprocess.run([sys.executable, str(SCRIPT), "--input_raw", str(tmp_path / "raw.jsonl"), "--output_sft",
                         str(tmp_path / "out" / "sft.json"), "--dataset_id", "old"], capture_output=True, text=True)
    assert r0.returncode == 0, r0.stderr
    extra = _clobber_cases(tmp_path)[case]
    before = snapshot(tmp_path)
    args = [sys.executable, str(SCRIPT), "--input_raw", str(tmp_path / "raw.jsonl"), "--output_sft",
            str(tmp_path / "out" / "sft.json"), "--dataset_id", "t", "--force", *extra]
    # the later flag wins in argparse: --output_sft given twice means the case's value
    r = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "same file" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert snapshot(tmp_path) == before


# ---- 2. line splitting --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_lines_are_split_on_newline_only_and_numbered_like_wc(tmp_path):
    lines = [
        b"\xef\xbb\xbf" + good(0).encode(),                                   # 1 BOM before record 1: kept
        good(1, question=DEMO[1]["question"] + "\u2028(paragraph)").encode(),  # 2 U+2028 inside a string: kept
        b"\x0b\x0c\x1c\x1d",                                                  # 3 VT/FF/FS/GS only: one blank line
        good(2, question=DEMO[2]["question"] + "\u0085\u2029").encode(),       # 4 NEL, U+2029 inside: kept
        good(3).encode()[:-3] + b"\xff" + good(3).encode()[-3:],              # 5 one invalid UTF-8 byte
        good(4).encode() + b"\r",                                             # 6 CRLF line ending: kept
        "  ".encode(),                                                        # 7 spaces: blank
        good(5).encode(),                                                     # 8 last line, no final newline
    ]
    data = b"\n".join(lines)
    r, kept, rejects = run(tmp_path, data)
    assert_outcome(r, kept, rejects, {3: "empty_line", 5: "invalid_utf8", 7: "empty_line"},
                   {DEMO[i]["id"] for i in (0, 1, 2, 4, 5)})
    manifest = json.loads((tmp_path / "out" / "sft.manifest.json").read_text())
    assert manifest["counts"]["lines"] == data.count(b"\n") + 1 == 8   # wc -l + the unterminated last line
    assert "0xff" in [x for x in rejects if x["line"] == 5][0]["detail"]
    assert "\u2028" in [k for k in kept if k["id"] == DEMO[1]["id"]][0]["question"]


# ---- 3. invalid SQL as training answers ---------------------------------------------------------------------------
GOLD_CASES = [  # sql -> builder reason (None = a valid gold answer)
    ("SELECT", "parse_error"),
    ("SELECT *", "parse_error"),
    ("SELECT FROM AP_SUPPLIERS", "parse_error"),
    ("((SELECT))", "parse_error"),
    ("SELECT S.VENDOR_NAME, FROM AP_SUPPLIERS S", "parse_error"),
    ("SELECT S.VENDOR_NAME FROM AP_SUPPLIERS S GROUP BY", "parse_error"),
    ("SELECT S.VENDOR_NAME FROM AP_SUPPLIERS S JOIN AP_INVOICES_ALL I ON", "parse_error"),
    ("SELECT COUNT() FROM AP_SUPPLIERS", "parse_error"),
    ("SELECT S.VENDOR_NAME FROM AP_SUPPLIERS S WHERE S.VENDOR_ID IN (1, )", "parse_error"),
    ("SELECT 1", "parse_error"),
    ("SELECT (SELECT 1 FROM DUAL) FROM", "parse_error"),
    ("WITH X AS (SELECT 1 AS N FROM DUAL) SELECT N FROM X", None),
    ("SELECT 1 FROM DUAL", None),
    ("SELECT S.VENDOR_NAME FROM AP_SUPPLIERS S", None),
    ("SELECT X.N FROM (SELECT 1 AS N FROM DUAL) X", None),
    ("WITH X AS (SELECT 1 AS N FROM AP_NOT_HERE) SELECT N FROM X", "no_table"),
    ("SELECT V.N FROM SOME_VIEW V", "no_table"),
]


@pytest.mark.parametrize("sql, reason", GOLD_CASES, ids=[c[0] for c in GOLD_CASES])
def test_gold_sql_must_be_a_complete_query_reading_a_table(sql, reason):
    problem, detail = gold_sql_key(sql, ["AP_SUPPLIERS", "AP_INVOICES_ALL"])
    assert problem == reason, detail


@pytest.mark.slow
def test_incomplete_gold_sql_rejected_in_a_real_file(tmp_path):
    bad = ["SELECT", "SELECT *", "SELECT FROM AP_SUPPLIERS", "((SELECT))", "SELECT S.VENDOR_NAME, FROM AP_SUPPLIERS S",
           "SELECT S.VENDOR_NAME FROM AP_SUPPLIERS S GROUP BY", "SELECT COUNT() FROM AP_SUPPLIERS"]
    lines = [good(0)] + [bad_sql(0, sql) for sql in bad] + [good(1)]
    r, kept, rejects = run(tmp_path, lines)
    # the guardrail may catch some first (contract / parse_error / unknown_column); none may be kept
    assert_outcome(r, kept, rejects, {n: {"parse_error", "contract", "unknown_column"} for n in range(2, 9)},
                   {DEMO[0]["id"], DEMO[1]["id"]})


# ---- 4. security filters that cannot be applied ------------------------------------------------------------------
@pytest.mark.slow
def test_filters_naming_unknown_tables_or_bad_predicates_reject_the_record(tmp_path):
    org = {"column": "ORG_ID", "predicate": "ORG_ID IN (:org_ids)"}
    ctx_extra = {**DEMO[0]["context"], "tables": [*DEMO[0]["context"]["tables"],
                                                  {"name": "XX_CUSTOM_ALL", "columns": [{"name": "ORG_ID"}]}],
                 "security_filters": [*DEMO[0]["context"]["security_filters"], {"table": "XX_CUSTOM_ALL", **org}]}
    lines = [good(0),
             with_filters(0, {"table": "AP_INVOICE_ALL", **org}),                       # 2 typo
             with_filters(0, {"table": "AP.AP_INVOICES_ALL", **org}),                   # 3 schema-qualified
             good(0, id="flt-cat", question="filter on a table not in the catalog", context=ctx_extra),  # 4
             with_filters(0, {"table": "AP_INVOICES_ALL", "column": "ORG_IDD", "predicate": "ORG_IDD = 1"}),  # 5
             with_filters(0, {"table": "AP_INVOICES_ALL", "column": "ORG_ID", "predicate": "ORG_ID IN ("}),  # 6
             good(2)]
    r, kept, rejects = run(tmp_path, lines)
    assert_outcome(r, kept, rejects, {n: "security_filter" for n in (2, 3, 4, 5, 6)},
                   {DEMO[0]["id"], DEMO[2]["id"]})
    detail = {x["line"]: x["detail"] for x in rejects}
    assert "AP_INVOICE_ALL" in detail[2] and "not in the record's context" in detail[2]
    assert "AP.AP_INVOICES_ALL" in detail[3]
    assert "XX_CUSTOM_ALL" in detail[4] and "not in the catalog" in detail[4]
    assert "ORG_IDD" in detail[5] and "does not parse" in detail[6]


# ---- 5. crashes that lost every good record ------------------------------------------------------------------------
@pytest.mark.slow
def test_pathological_lines_are_rejected_one_by_one(tmp_path):
    deep_sql = "SELECT N FROM " + "(SELECT N FROM " * 400 + "DUAL" + ")" * 400
    lines = [good(0),
             '{"a": ' * 10000 + "1" + "}" * 10000,                                       # 2 deep JSON
             '{"question": "q", "n": ' + "9" * 5000 + "}",                               # 3 5,000 digits
             bad_sql(1, deep_sql),                                                      # 4 400 subqueries
             "[" * 100000,                                                              # 5 unclosed
             good(1)]
    r, kept, rejects = run(tmp_path, lines)
    assert_outcome(r, kept, rejects, {2: "invalid_json", 3: "invalid_json", 4: {"parse_error", "contract"},
                                      5: "invalid_json"}, {DEMO[0]["id"], DEMO[1]["id"]})


@pytest.mark.slow
@pytest.mark.parametrize("case", ["parent is a file", "output is a directory", "disk full"])
def test_filesystem_errors_are_one_line_and_touch_nothing(tmp_path, case):
    (tmp_path / "out").mkdir()
    (tmp_path / "afile").write_text("x")
    out = {"parent is a file": "afile/sft.json", "output is a directory": "out", "disk full": "out/sft.json"}[case]
    preexec = None
    if case == "disk full":  # a 64 kB file-size cap: writes fail with EFBIG exactly like a full disk (ENOSPC)
        def preexec():
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))
    lines = [good(i) for i in range(60)]
    (tmp_path / "raw.jsonl").write_text("\n".join(lines) + "\n")
    before = snapshot(tmp_path)
    r, _, _ = run(tmp_path, None, out=out, preexec_fn=preexec)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    errors = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1, r.stderr
    assert {"parent is a file": "not a directory", "output is a directory": "is a directory",
            "disk full": "file too large"}[case] in errors[0].lower()
    assert snapshot(tmp_path) == before
    no_leftovers(tmp_path)


# ---- 6. order of checks --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_dedupe_counts_only_accepted_records(tmp_path):
    q = DEMO[0]["question"]
    lines = [bad_sql(0, "SELECT", question=q, id="first-bad"),   # 1 invalid, same question as line 2
             good(0),                                            # 2 kept: the first *accepted* one
             good(0, id="dup", question=q.upper()),              # 3 duplicate of line 2
             good(1)]
    r, kept, rejects = run(tmp_path, lines)
    assert_outcome(r, kept, rejects, {1: {"parse_error", "contract"}, 3: "duplicate"},
                   {DEMO[0]["id"], DEMO[1]["id"]})


@pytest.mark.slow
def test_too_long_record_does_not_shadow_its_good_twin(tmp_path, tiny_model_dir):
    big_ctx = {**DEMO[0]["context"], "tables": DEMO[0]["context"]["tables"] + [
        {"name": f"XX_PAD_{i}", "description": "padding " * 40, "columns": [{"name": "C"}]} for i in range(20)]}
    lines = [good(0, id="long", context=big_ctx), good(0), good(1)]
    r, kept, rejects = run(tmp_path, lines, "--tokenizer", str(tiny_model_dir), "--model_max_length", "1500",
                           catalog=False)
    assert_outcome(r, kept, rejects, {1: "too_long"}, {DEMO[0]["id"], DEMO[1]["id"]})


# ---- 8. leaks and near-duplicates -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_spelling_variants_of_one_query_stay_on_one_side(tmp_path):
    sql = DEMO[0]["sql"]
    quoted = sql.replace("AP_INVOICES_ALL I", '"AP_INVOICES_ALL" I').replace("S.VENDOR_NAME,", 's."VENDOR_NAME",', 1)
    lines = [good(0, split="train"),
             good(0, id="quoted", question="Unpaid invoice count per supplier", sql=quoted, split="holdout"),
             good(0, id="comment", question="Count unpaid invoices by vendor", sql="/* from team B */ " + sql,
                  split="holdout"),
             good(0, id="spaced", question="Per supplier: how many invoices unpaid",
                  sql=sql.replace(" FROM ", "\n  FROM  "), split="holdout"),
             good(1)]
    r, kept, rejects = run(tmp_path, lines)
    assert_outcome(r, kept, rejects, {2: "split_leak", 3: "split_leak", 4: "split_leak"},
                   {DEMO[0]["id"], DEMO[1]["id"]})


@pytest.mark.slow
def test_near_duplicate_questions_and_ids(tmp_path):
    q = DEMO[0]["question"]
    fullwidth = "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in q)
    cafe = "Which suppliers in the café region were paid?"
    lines = [good(0),                                               # 1
             good(1, id="fw", question=fullwidth),                  # 2 full-width letters of line 1
             good(2, id="zw", question=q.replace(" ", " \u200b")),  # 3 zero-width spaces
             good(3, id="nfc", question=unicodedata.normalize("NFC", cafe)),  # 4
             good(4, id="nfd", question=unicodedata.normalize("NFD", cafe)),  # 5 same after NFKC
             good(5, id=DEMO[0]["id"]),                             # 6 same id as line 1
             good(6, id="line-8"),                                  # 7 explicit id = line 8's generated one
             json.dumps({k: v for k, v in DEMO[7].items() if k != "id"}),      # 8 no id: gets line-8.2
             good(8)]
    r, kept, rejects = run(tmp_path, lines)
    assert_outcome(r, kept, rejects, {2: "duplicate", 3: "duplicate", 5: "duplicate", 6: "duplicate_id"},
                   {DEMO[0]["id"], "nfc", "line-8", "line-8.2", DEMO[8]["id"]})


# ---- 9. size limits ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_oversized_fields_rejected_before_tokenizing(tmp_path):
    lines = [good(0),
             good(1, question="Total invoices " + "x" * 200_000),    # 2 200k-character question
             good(2, question="q " + "y" * (20 << 20)),              # 3 a 20 MB line
             good(3)]
    r, kept, rejects = run(tmp_path, lines)
    assert_outcome(r, kept, rejects, {2: "too_large", 3: "too_large"}, {DEMO[0]["id"], DEMO[3]["id"]})
    detail = {x["line"]: x["detail"] for x in rejects}
    assert "--max_question_chars" in detail[2] and "--max_line_bytes" in detail[3]


# ---- 10. all lines invalid ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_all_invalid_names_the_lines_and_writes_nothing(tmp_path):
    lines = ["{bad", "[1, 2]", "{bad", "{bad", "", bad_sql(0, "SELECT")]
    (tmp_path / "raw.jsonl").write_text("\n".join(lines) + "\n")
    before = snapshot(tmp_path)
    r, _, _ = run(tmp_path, None)
    assert r.returncode == 2
    error = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(error) == 1 and "invalid_json: lines 1, 3-4" in error[0] and "schema: lines 2" in error[0], r.stderr
    assert "empty_line: lines 5" in error[0] and "lines 6" in error[0] and "first: line 1 invalid_json" in error[0]
    assert snapshot(tmp_path) == before


# ---- 7. the output set is atomic -------------------------------------------------------------------------------------
def demo_lines(n: int, tag: str = "") -> list[str]:
    return [json.dumps({**DEMO[i % len(DEMO)], "id": f"{tag}r{i}",
                        "question": f"{DEMO[i % len(DEMO)]['question']} ({tag}v{i})"}) for i in range(n)]


def set_args(raw, out_dir):
    return [sys.executable, str(SCRIPT), "--input_raw", str(raw), "--output_sft", str(out_dir / "sft.json"),
            "--dataset_id", "kill", "--catalog", str(CATALOG), "--holdout_fraction", "0.2",
            "--holdout_out", str(out_dir / "holdout.json"), "--catalog_out", str(out_dir / "catalog.json"), "--force"]


def staging_folders(out_dir):
    return list(out_dir.glob(".sft.json.build-*.partial"))


def start_and_wait_for_staging(args, out_dir):
    """Popen the build and return (proc, seconds until its staging folder appeared: imports and checks done)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    while not staging_folders(out_dir) and proc.poll() is None:
        time.sleep(0.01)
    return proc, time.monotonic() - t0


def data_hashes(out_dir) -> dict:
    return {n: hashlib.sha256((out_dir / n).read_bytes()).hexdigest()
            for n in ("sft.json", "holdout.json", "sft.rejects.jsonl", "catalog.json")}


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
@pytest.mark.parametrize("n", [800, 20_000])
def test_kill_halfway_leaves_the_old_or_the_new_set(tmp_path, n, sig):
    out, ref = tmp_path / "out", tmp_path / "ref"
    out.mkdir(), ref.mkdir()
    (tmp_path / "old.jsonl").write_text("\n".join(demo_lines(40, "old")) + "\n")
    (tmp_path / "new.jsonl").write_text("\n".join(demo_lines(n)) + "\n")
    # a complete run of the new input elsewhere: its data files, and how long its work after start-up takes
    t_begin = time.monotonic()
    proc, t_start = start_and_wait_for_staging(set_args(tmp_path / "new.jsonl", ref), ref)
    proc.communicate(timeout=1800)
    assert proc.returncode == 0
    delay, new = (time.monotonic() - t_begin - t_start) / 2, data_hashes(ref)

    for _ in range(4):  # the shared CPU's load changes: a run that finished before the signal is retried sooner
        assert subprocess.run(set_args(tmp_path / "old.jsonl", out), capture_output=True).returncode == 0
        old = snapshot(tmp_path)
        proc, _ = start_and_wait_for_staging(set_args(tmp_path / "new.jsonl", out), out)
        time.sleep(delay)
        if proc.poll() is None:
            break
        proc.communicate()
        delay /= 3
    else:
        pytest.fail("the build always finished before the signal")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert "Traceback" not in err
    if sig == signal.SIGTERM:
        assert proc.returncode == 2 and "stopped by SIGTERM" in err, err
        assert not staging_folders(out)
    else:
        assert proc.returncode == -signal.SIGKILL
    state = {k: v for k, v in snapshot(tmp_path).items() if not k.startswith(("out/.", "ref/"))}
    if state != {k: v for k, v in old.items() if not k.startswith("ref/")}:  # else: the complete new set
        assert data_hashes(out) == new and builder.check_dataset(out / "sft.json")["counts"]["lines"] == n
    if sig == signal.SIGKILL:  # what SIGKILL leaves is a hidden, locked-by-nobody folder, never an output
        assert all(p.name.startswith(".sft.json.build-") for p in out.iterdir() if p.name.startswith("."))
    again = subprocess.run(set_args(tmp_path / "new.jsonl", out), capture_output=True, text=True)
    assert again.returncode == 0 and "Traceback" not in again.stderr, again.stderr
    assert data_hashes(out) == new and builder.check_dataset(out / "sft.json")
    no_leftovers(tmp_path)


CRASH_MID_PUBLISH = r"""
import os, sys
sys.path.insert(0, sys.argv[1])
import artifacts
finals = [os.path.join(sys.argv[2], n) for n in ("a.json", "b.json", "manifest.json")]
real_replace = os.replace
with artifacts.atomic_file_set(finals, "a.json") as staged:
    for final, tmp in staged.items():
        tmp.write_text("new " + os.path.basename(final))
    calls = []
    def replace(src, dst):  # the journal's rename, then one published file, then the power goes out
        calls.append(dst)
        if len(calls) == 3:
            os._exit(9)
        real_replace(src, dst)
    os.replace = replace
"""


@pytest.mark.slow
def test_kill_during_publish_is_finished_by_the_next_run(tmp_path):
    for n in ("a.json", "b.json", "manifest.json"):
        (tmp_path / n).write_text("old " + n)
    r = subprocess.run([sys.executable, "-c", CRASH_MID_PUBLISH, str(PKG), str(tmp_path)], capture_output=True)
    assert r.returncode == 9
    assert (tmp_path / "a.json").read_text() == "new a.json" and (tmp_path / "b.json").read_text() == "old b.json"
    from artifacts import recover_file_sets
    done = recover_file_sets([tmp_path], "a.json")
    assert done and "finished the interrupted publish" in done[0]
    assert {n: (tmp_path / n).read_text() for n in ("a.json", "b.json", "manifest.json")} == {
        n: "new " + n for n in ("a.json", "b.json", "manifest.json")}
    no_leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json", "manifest.json"]


@pytest.mark.slow
def test_a_running_build_is_never_cleaned_up_by_another(tmp_path):
    """A staging folder whose build is alive (its lock held) is not a stale one: a second build refuses to start."""
    from artifacts import atomic_file_set
    raw = tmp_path / "raw.jsonl"
    raw.write_text(good(0) + "\n")
    out = tmp_path / "sft.json"
    with atomic_file_set([out], "sft.json") as staged:
        r = subprocess.run([sys.executable, str(SCRIPT), "--input_raw", str(raw), "--output_sft", str(out),
                            "--dataset_id", "t"], capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 2 and "another build is writing these outputs" in r.stderr, r.stderr
        assert staged[out.absolute()].parent.is_dir()
        staged[out.absolute()].write_text("[]\n")
    assert out.read_text() == "[]\n"
    no_leftovers(tmp_path)
