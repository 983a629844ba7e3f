"""`make bench`: the speed and memory targets, measured side by side in one run as ratios (never timed tests).

1. dataset builder vs the raw fast tokenizer on the same texts (>= 5,000 records with ~3k-token contexts; target >= 0.7)
2. guardrail layers 1-4 p50/p99 per SQL over the demo SQL, pure-Python sqlglot vs sqlglotc (target p99 <= 5 ms);
   and on a real-size catalog (30k tables, 1.2M columns): indexed .sqlite vs in-memory CSV, load + check and peak RSS
   (target <= 1 s, <= 300 MB)
3. streaming merge: peak RSS vs the largest shard of a multi-shard checkpoint (target <= 2x)
4. eval throughput against the real vLLM server on the tiny model, concurrency 4 vs 1 (target >= 3x); by default the
   fine-tuned 4-bit package, whose answers are whole SQL queries (the base model stops after a few tokens)
5. capacity-planner figures for LLaMA-3.3-70B (1xA100-80GB serving, 8xA100-80GB ZeRO-3 training)
6. the guarded SQL service's added latency over calling vLLM + guardrail (ask) directly (target <= 5% at p50)
7. a 20,000-record dataset build (no tokenizer, demo catalog, 10% holdout): wall time and peak RSS of the CLI, beside
   the guardrail alone on the same records (the floor the builder cannot beat)
8. schema retrieval on a synthetic 30,000-table schema that contains the demo tables: index build time, per-question
   p50/p99 latency with the exact token budget, peak RSS, and the demo questions' recall among 30k tables
   (target p99 <= 50 ms)

Writes <out>/bench.json and <out>/bench.md (the README's table) and prints the table.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PKG = HERE.parent
ROOT = PKG.parent
sys.path[:0] = [str(PKG), str(PKG / "inference")]

from artifacts import atomic_write_json, atomic_write_text  # noqa: E402

RAW = HERE / "raw_questions.jsonl"
SCHEMA = HERE / "ebs_schema.json"


def big_context(schema: dict, tables: list[str]) -> dict:
    """A retrieval result with many whole tables: the ~3k-token contexts of the builder benchmark."""
    inc = set(tables)
    return {"tables": [{"name": t, "description": schema["tables"][t]["description"],
                        "columns": [{"name": c, **v} for c, v in schema["tables"][t]["columns"].items()]}
                       for t in tables],
            "joins": [j for j in schema["joins"] if all(s.strip().split(".")[0] in inc for s in j.split("="))],
            "synonyms": {k: v for k, v in schema["synonyms"].items() if v.split(".")[0] in inc},
            "security_filters": [{"table": t, **f} for t, f in schema["security_filters"].items() if t in inc]}


def bench_builder(tokenizer_dir: Path, n: int, n_tables: int) -> dict:
    import build_oracle_sft_dataset as builder
    from transformers import AutoTokenizer

    schema = json.loads(SCHEMA.read_text())
    demo = [json.loads(line) for line in RAW.read_text().splitlines()]
    names = sorted(schema["tables"])
    lines = []
    for i in range(n):
        rec = demo[i % len(demo)]
        used = {t["name"] for t in rec["context"]["tables"]}
        start = i % len(names)
        tables = sorted(used | set((names * 2)[start:start + n_tables]))
        lines.append(json.dumps({"id": f"b{i}", "question": f"{rec['question']} (variant {i})", "sql": rec["sql"],
                                 "context": big_context(schema, tables)}))
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.jsonl"
        raw.write_text("\n".join(lines) + "\n")
        args = builder.parse_args(["--input_raw", str(raw), "--output_sft", f"{tmp}/sft.json", "--dataset_id", "bench",
                                   "--tokenizer", str(tokenizer_dir), "--model_max_length", "100000"])
        t0 = time.perf_counter()
        builder.build(args)
        t_build = time.perf_counter() - t0
        sft = json.loads((Path(tmp) / "sft.json").read_text())
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    texts = [tok.apply_chat_template(r["conversations"], tokenize=False) for r in sft]
    t0 = time.perf_counter()
    for i in range(0, len(texts), 256):
        tok(texts[i:i + 256], add_special_tokens=False)
    t_raw = time.perf_counter() - t0
    tokens = statistics.median(r["n_tokens"] for r in sft) if sft and "n_tokens" in sft[0] else None
    return {"records": len(sft), "median_tokens": tokens, "builder_examples_per_s": len(sft) / t_build,
            "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM", "unset"),
            "raw_tokenizer_examples_per_s": len(texts) / t_raw,
            "ratio": (len(sft) / t_build) / (len(texts) / t_raw)}


GUARD_SNIPPET = r"""
import json, statistics, sys, time
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/inference"]
import sql_guardrail as g
recs = [json.loads(l) for l in open(sys.argv[2])]
catalog, policy = g.load_catalog(sys.argv[3]), g.load_policy()
for r in recs[:20]:  # warm-up: imports, caches
    g.check_sql(r["sql"], catalog=catalog, policy=policy, security_filters=r["context"]["security_filters"])
times = []
for _ in range(int(sys.argv[4])):
    for r in recs:
        t0 = time.perf_counter()
        v = g.check_sql(r["sql"], catalog=catalog, policy=policy, security_filters=r["context"]["security_filters"])
        times.append((time.perf_counter() - t0) * 1000)
        assert v["ok"], v
times.sort()
print(json.dumps({"engine": g.SQLGLOT_IMPL["name"], "n": len(times), "p50_ms": statistics.median(times),
                  "p99_ms": times[int(0.99 * (len(times) - 1))]}))
"""


def bench_guardrail(rounds: int) -> dict:
    out = {}
    for label, pure in (("pure", "1"), ("sqlglotc", "")):
        env = {**os.environ, "ORACLE_GUARD_PURE_SQLGLOT": pure}
        r = subprocess.run([sys.executable, "-c", GUARD_SNIPPET, str(PKG), str(RAW), str(HERE / "ebs_catalog.json"),
                            str(rounds)], env=env, capture_output=True, text=True, check=True)
        out[label] = json.loads(r.stdout.strip().splitlines()[-1])
    out["p99_speedup"] = out["pure"]["p99_ms"] / out["sqlglotc"]["p99_ms"]
    return out


CATALOG_SNIPPET = r"""
import json, resource, statistics, sys, time
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/inference"]
t0 = time.perf_counter()
import sql_guardrail as g
catalog, policy = g.load_catalog(sys.argv[3]), g.load_policy()
load_s = time.perf_counter() - t0
recs = [json.loads(l) for l in open(sys.argv[2])]
times = []
for r in recs:
    t = time.perf_counter()
    v = g.check_sql(r["sql"], catalog=catalog, policy=policy, security_filters=r["context"]["security_filters"])
    times.append((time.perf_counter() - t) * 1000)
    assert v["ok"], v
times.sort()
print(json.dumps({"load_s": load_s, "first_check_ms": times[0], "p50_ms": statistics.median(times),
                  "p99_ms": times[int(0.99 * (len(times) - 1))], "peak_rss_mb": resource.getrusage(
                      resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def bench_catalog_scale(tables: int, columns_per_table: int) -> dict:
    """A real-size EBS dictionary (30k tables, 1.2M columns, the demo tables among them): index build once, then
    load + check the demo SQL from the indexed .sqlite vs the same catalog as an in-memory CSV, each in a fresh
    process (peak RSS is the whole process: Python, sqlglot, policy and catalog)."""
    import csv
    folder = ROOT / ".cache" / "bench-catalog"
    folder.mkdir(parents=True, exist_ok=True)
    src, index = folder / "all_tab_columns.csv", folder / "catalog.sqlite"
    demo = json.loads((HERE / "ebs_catalog.json").read_text())
    with open(src, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["OWNER", "TABLE_NAME", "COLUMN_NAME", "DATA_TYPE"])
        for t, cols in demo.items():
            w.writerows(("APPS", t, c, ty) for c, ty in cols.items())
        for i in range(tables - len(demo)):
            w.writerows(("XX", f"XX_TABLE_{i:05d}_ALL", f"COLUMN_{j:03d}", "VARCHAR2") for j in range(columns_per_table))
    t0 = time.perf_counter()
    import sql_guardrail
    counts = sql_guardrail.build_catalog_index(src, index)
    out = {"tables": counts["tables"], "columns": counts["columns"], "index_build_s": time.perf_counter() - t0}
    for label, path in (("indexed", index), ("csv_in_memory", src)):
        r = subprocess.run([sys.executable, "-c", CATALOG_SNIPPET, str(PKG), str(RAW), str(path)],
                           capture_output=True, text=True, check=True)
        out[label] = json.loads(r.stdout.strip().splitlines()[-1])
    out["rss_ratio"] = out["indexed"]["peak_rss_mb"] / out["csv_in_memory"]["peak_rss_mb"]
    return out


def bench_merge_rss(shards: int) -> dict:
    import lora_merge
    return lora_merge.bench_merge(shards, ROOT / ".cache" / "bench-merge")


def bench_planner() -> dict:
    import plan_capacity as pc
    cfg = pc.load_json(HERE / "llama33_70b_config.json")
    serve = pc.plan_serve(cfg, pc.load_yaml(PKG / "inference" / "vllm_config.yaml"), 80 * 2**30, 1.935e12, 312e12)
    train = pc.plan_train(cfg, 8, 80 * 2**30, 8192, 32, 1, 312e12)
    return {"serve": serve, "train": train}


def bench_eval(model_dir: Path, eval_data: Path, catalog: Path, limit: int) -> dict:
    """Same eval harness, same server, same examples: --concurrency 1 then 4."""
    from serve import running_server
    out = {}
    with tempfile.TemporaryDirectory() as tmp, running_server(model_dir, PKG / "inference" / "vllm_config_cpu.yaml",
                                                              Path(tmp) / "vllm.log") as srv:
        for conc in (1, 4):
            r = subprocess.run([sys.executable, str(PKG / "eval_oracle_nl2sql.py"), "--eval_data", str(eval_data),
                                "--base_url", srv["base_url"], "--model", srv["model"], "--catalog", str(catalog),
                                "--concurrency", str(conc), "--limit", str(limit), "--out_dir", f"{tmp}/c{conc}"],
                               capture_output=True, text=True)
            if r.returncode not in (0, 1):
                raise RuntimeError(f"eval failed: {r.stderr[-2000:]}")
            # the harness's own wall clock over the requests (not the process start-up)
            totals = json.loads((Path(tmp) / f"c{conc}" / "report.json").read_text())["totals"]
            out[f"c{conc}_examples_per_s"] = totals["examples_per_s"]
            out[f"c{conc}_latency_ms"] = totals["latency_ms"]
    out["ratio"] = out["c4_examples_per_s"] / out["c1_examples_per_s"]
    out["model"], out["examples"] = model_dir.name, totals["examples"]
    return out


def bench_service(model_dir: Path, catalog: Path, n: int, rounds: int) -> dict:
    """The guarded service's added latency: the same questions through sql_service (HTTP, auth, queue, audit,
    scope check) and through sql_guardrail.ask against the same vLLM directly, interleaved, concurrency 1."""
    import httpx
    import openai
    import yaml
    import sql_guardrail
    from serve import free_port, running_server, stop_tree
    recs = [json.loads(line) for line in RAW.read_text().splitlines()][:n]
    policy, cat = sql_guardrail.load_policy(), sql_guardrail.load_catalog(catalog)
    with tempfile.TemporaryDirectory() as tmp, running_server(model_dir, PKG / "inference" / "vllm_config_cpu.yaml",
                                                              Path(tmp) / "vllm.log") as srv:
        key = subprocess.run([sys.executable, str(PKG / "inference" / "service_keys.py"), "add-user", "--keys_file",
                              f"{tmp}/keys.yaml", "--user", "bench", "--org_ids", "204"],
                             capture_output=True, text=True, check=True).stdout.strip()
        port, url = free_port(), srv["base_url"] + "/v1"
        cfg = {"port": port, "backends": [url], "model": srv["model"], "catalog": str(catalog),
               "keys_file": f"{tmp}/keys.yaml", "audit_log": f"{tmp}/audit.jsonl"}
        Path(tmp, "service.yaml").write_text(yaml.safe_dump(cfg))
        with open(Path(tmp) / "service.log", "wb") as log:
            proc = subprocess.Popen([sys.executable, str(PKG / "inference" / "sql_service.py"), "--config",
                                     f"{tmp}/service.yaml"], stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        try:
            base = f"http://127.0.0.1:{port}"
            for _ in range(120):
                try:
                    if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.5)
            else:
                raise RuntimeError(f"sql_service did not start: {(Path(tmp) / 'service.log').read_text()[-2000:]}")
            client = openai.OpenAI(base_url=url, api_key="EMPTY", timeout=120, max_retries=0)
            http = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=300)

            def direct(r):
                t0 = time.perf_counter()
                sql_guardrail.ask(url, srv["model"], r["question"], r["context"], cat, policy, client=client)
                return (time.perf_counter() - t0) * 1000

            def service(r):
                t0 = time.perf_counter()
                resp = http.post("/v1/sql", json={"question": r["question"], "context": r["context"]})
                if resp.status_code != 200:
                    raise RuntimeError(f"service answered {resp.status_code}: {resp.text[:300]}")
                return (time.perf_counter() - t0) * 1000

            for r in recs:  # warm-up: both paths then hit the same prefix cache
                direct(r), service(r)
            d_ms, s_ms = [], []
            for i in range(rounds):
                for j, r in enumerate(recs):
                    pair = (direct, service) if (i + j) % 2 == 0 else (service, direct)
                    first, second = pair[0](r), pair[1](r)
                    d, s = (first, second) if pair[0] is direct else (second, first)
                    d_ms.append(d)
                    s_ms.append(s)
            http.close()
        finally:
            stop_tree(proc, grace_s=10)
    added = statistics.median(s - d for s, d in zip(s_ms, d_ms))
    return {"requests": len(d_ms), "direct_p50_ms": statistics.median(d_ms), "service_p50_ms": statistics.median(s_ms),
            "added_p50_ms": added, "added_share": added / statistics.median(s_ms), "model": model_dir.name}


def bench_build_records(n: int) -> dict:
    """(7) The builder CLI on n demo-derived records in a subprocess: wall time and its own peak RSS (wait4)."""
    from dataset_records import context_catalog
    import sql_guardrail

    demo = [json.loads(line) for line in RAW.read_text().splitlines()]
    recs = [{**demo[i % len(demo)], "id": f"b{i}", "question": f"{demo[i % len(demo)]['question']} (v{i})"}
            for i in range(n)]
    catalog_path = HERE / "ebs_catalog.json"
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.jsonl"
        raw.write_text("".join(json.dumps(r) + "\n" for r in recs))
        cmd = [sys.executable, str(PKG / "build_oracle_sft_dataset.py"), "--input_raw", str(raw), "--output_sft",
               f"{tmp}/out/sft.json", "--dataset_id", "bench", "--catalog", str(catalog_path),
               "--holdout_fraction", "0.1", "--holdout_out", f"{tmp}/out/holdout.json"]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        t_build = time.perf_counter() - t0
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"builder failed on the benchmark records ({status})")
        raw_mb = raw.stat().st_size / 2**20
    catalog, policy = sql_guardrail.load_catalog(catalog_path), sql_guardrail.load_policy()
    sample = recs[:2000]  # the floor per record, from a sample
    t0 = time.perf_counter()
    for r in sample:
        sql_guardrail.check_sql(r["sql"], catalog=context_catalog(r["context"], catalog), policy=policy,
                                security_filters=r["context"]["security_filters"])
    guard_per_rec = (time.perf_counter() - t0) / len(sample)
    return {"records": n, "raw_mb": raw_mb, "build_s": t_build, "records_per_s": n / t_build,
            "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mb": usage.ru_maxrss / 1024, "guardrail_only_s": guard_per_rec * n,
            "build_over_guardrail": t_build / (guard_per_rec * n)}


def bench_retrieval(tokenizer_dir: Path, n_tables: int) -> dict:
    """In its own process, so its peak RSS is the retriever's (schema + index + tokenizer), not the bench's."""
    snippet = ("import json, sys; sys.path[:0] = sys.argv[1:3]; import retrieve_context as rc; "
               "print(json.dumps(rc.bench_retrieval(sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6])))")
    r = subprocess.run([sys.executable, "-c", snippet, str(PKG), str(PKG / "inference"), str(SCHEMA), str(RAW),
                        str(n_tables), str(tokenizer_dir)], capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def markdown(res: dict) -> str:
    b, g, m, e, p = (res.get(k) for k in ("builder", "guardrail", "merge", "eval", "planner"))
    sv = res.get("service")
    rows = [("what", "measured", "target")]
    if b:
        rows.append(("dataset builder vs raw fast tokenizer", f"{b['builder_examples_per_s']:.0f} vs "
                     f"{b['raw_tokenizer_examples_per_s']:.0f} examples/s = **{b['ratio']:.2f}x** "
                     f"({b['records']} records, median {b['median_tokens']:.0f} tokens, "
                     f"TOKENIZERS_PARALLELISM={b['tokenizers_parallelism']})", ">= 0.7x"))
    if g:
        rows.append(("guardrail layers 1-4, p50 / p99 per SQL", f"pure {g['pure']['p50_ms']:.2f} / "
                     f"{g['pure']['p99_ms']:.2f} ms; sqlglotc {g['sqlglotc']['p50_ms']:.2f} / "
                     f"**{g['sqlglotc']['p99_ms']:.2f} ms** ({g['p99_speedup']:.1f}x at p99)", "p99 <= 5 ms"))
    c = res.get("catalog")
    if c:
        i, v = c["indexed"], c["csv_in_memory"]
        rows.append((f"guardrail on a real-size catalog ({c['tables']:,} tables, {c['columns']:,} columns; index "
                     f"built once in {c['index_build_s']:.0f} s)", f"indexed: load {i['load_s']:.2f} s, check p50 / "
                     f"p99 {i['p50_ms']:.1f} / {i['p99_ms']:.1f} ms, peak RSS **{i['peak_rss_mb']:.0f} MB** vs CSV in "
                     f"memory: load {v['load_s']:.1f} s, {v['peak_rss_mb']:.0f} MB (= {c['rss_ratio']:.2f}x)",
                     "load + check <= 1 s, <= 300 MB"))
    if m:
        rows.append(("streaming merge peak RSS vs largest shard", f"{m['peak_rss_extra_bytes'] / 2**20:.0f} MiB vs "
                     f"{m['largest_shard_bytes'] / 2**20:.0f} MiB = **{m['peak_rss_over_largest_shard']:.2f}x** "
                     f"({m['shards']} shards)", "<= 2x"))
    if e:
        rows.append((f"eval throughput, concurrency 4 vs 1 (real vLLM, {e['model']}, {e['examples']} examples)",
                     f"{e['c4_examples_per_s']:.2f} vs {e['c1_examples_per_s']:.2f} examples/s = "
                     f"**{e['ratio']:.2f}x**", ">= 3x"))
    if sv:
        rows.append((f"guarded service's added latency over ask() on the same vLLM ({sv['model']}, {sv['requests']} "
                     "requests, concurrency 1, interleaved)", f"p50 via service {sv['service_p50_ms']:.0f} ms, direct "
                     f"{sv['direct_p50_ms']:.0f} ms; p50 of the paired differences +{sv['added_p50_ms']:.1f} ms = "
                     f"**{100 * sv['added_share']:.1f}%** of end to end", "<= 5%"))
    d = res.get("build_records")
    if d:
        rows.append((f"dataset build, {d['records']:,} records ({d['raw_mb']:.0f} MB raw, no tokenizer, catalog, 10% "
                     "holdout), CLI end to end", f"**{d['build_s']:.0f} s** ({d['records_per_s']:.0f} records/s, CPU "
                     f"{d['cpu_s']:.0f} s), peak "
                     f"RSS **{d['peak_rss_mb']:.0f} MB**; guardrail alone on the same SQL {d['guardrail_only_s']:.0f} s "
                     f"(= {d['build_over_guardrail']:.2f}x)", "measured"))
    rv = res.get("retrieval")
    if rv:
        rows.append((f"schema retrieval, synthetic {rv['tables']:,}-table schema ({rv['columns']:,} columns, "
                     f"{rv['joins']:,} joins), {rv['questions']} demo questions, exact token budget",
                     f"index build {rv['index_build_s']:.0f} s; p50 / p99 **{rv['latency_ms']['p50']:.0f} / "
                     f"{rv['latency_ms']['p99']:.0f} ms** per question; peak RSS {rv['peak_rss_mib']:,} MiB; all gold "
                     f"tables {rv['table_recall']:.0%}, columns {rv['column_recall']:.0%}", "p99 <= 50 ms"))
    if p:
        s, t = p["serve"], p["train"]
        rows.append(("70B serving plan, 1xA100-80GB (W4A16 g128)", f"weights {s['weights_bytes'] / 1e9:.1f} GB, KV "
                     f"{s['kv_bytes_per_token'] / 1024:.0f} KiB/token = {s['kv_bytes_total'] / 2**30:.1f} GiB for 4x8192, "
                     f"{'FITS' if s['fits'] else 'DOES NOT FIT'}, decode floor {s['decode_floor_ms']:.1f} ms/step",
                     "fits"))
        rows.append(("70B LoRA training plan, 8xA100-80GB ZeRO-3 @ 8192", f"{t['total_per_gpu_bytes'] / 1e9:.1f} GB/GPU "
                     f"(sharded weights {t['sharded_weights_bytes'] / 1e9:.1f} GB), compute floor "
                     f"{t['compute_floor_tokens_per_s']:.0f} tok/s at 100% MFU", "fits"))
    lines = [f"| {a} | {b_} | {c} |" for a, b_, c in rows]
    lines.insert(1, "|---|---|---|")
    return "\n".join(lines) + f"\n\nMachine: {res['machine']}\n"


def main(argv=None) -> int:
    import stage_env  # offline flags and caches as `make` sets them, without overriding the user's
    stage_env.apply()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny_model", default=str(ROOT / ".cache" / "tiny-llama"), help="tokenizer for (1)")
    ap.add_argument("--eval_model", default=str(ROOT / "runs" / "quant"),
                    help="model folder vLLM serves for (4): the fine-tuned 4-bit package of `make package`")
    ap.add_argument("--eval_data", default=str(ROOT / "runs" / "data" / "ebs_holdout.json"), help="eval examples (4)")
    ap.add_argument("--catalog", default=str(HERE / "ebs_catalog.json"), help="catalog for the eval (4)")
    ap.add_argument("--records", type=int, default=5000, help="builder records (1)")
    ap.add_argument("--context_tables", type=int, default=12, help="whole tables per builder context (1)")
    ap.add_argument("--build_records", type=int, default=20000, help="records of the dataset build (7)")
    ap.add_argument("--guard_rounds", type=int, default=5, help="passes over the demo SQL (2)")
    ap.add_argument("--catalog_tables", type=int, default=30000, help="tables of the synthetic dictionary (catalog)")
    ap.add_argument("--catalog_columns", type=int, default=40, help="columns per synthetic table (catalog)")
    ap.add_argument("--merge_shards", type=int, default=4, help="shards of the merge checkpoint (3)")
    ap.add_argument("--eval_limit", type=int, default=16, help="eval examples per concurrency level (4)")
    ap.add_argument("--service_questions", type=int, default=8, help="demo questions through the service (6)")
    ap.add_argument("--service_rounds", type=int, default=3, help="passes over them, each path (6)")
    ap.add_argument("--retrieval_tables", type=int, default=30000, help="tables of the synthetic schema (8)")
    ap.add_argument("--skip", default="",
                    help="comma-separated parts to skip: builder,guardrail,catalog,merge,eval,planner,service,"
                         "build_records,retrieval")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench"), help="output folder")
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    res = {"machine": f"{os.cpu_count()} cores, {round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)}"
                      f" GiB RAM, {platform.processor() or platform.machine()}, Python {platform.python_version()}"}
    parts = {"builder": lambda: bench_builder(Path(args.tiny_model), args.records, args.context_tables),
             "guardrail": lambda: bench_guardrail(args.guard_rounds),
             "catalog": lambda: bench_catalog_scale(args.catalog_tables, args.catalog_columns),
             "merge": lambda: bench_merge_rss(args.merge_shards),
             "eval": lambda: bench_eval(Path(args.eval_model), Path(args.eval_data), Path(args.catalog),
                                        args.eval_limit),
             "build_records": lambda: bench_build_records(args.build_records),
             "planner": bench_planner,
             "retrieval": lambda: bench_retrieval(Path(args.tiny_model), args.retrieval_tables),
             "service": lambda: bench_service(Path(args.eval_model), Path(args.catalog), args.service_questions,
                                              args.service_rounds)}
    for name, run in parts.items():
        if name not in skip:
            print(f"bench: {name} ...", file=sys.stderr, flush=True)
            res[name] = run()
    md = markdown(res)
    atomic_write_json(Path(args.out) / "bench.json", res)
    atomic_write_text(Path(args.out) / "bench.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
