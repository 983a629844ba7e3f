"""The serving half of `make demo` (after dataset -> train -> package): every step is a stage script, run as a user.

1. vLLM serves the 4-bit package (inference/serve.py: capacity plan, then the real server, CPU YAML);
2. a few holdout questions go through the guarded round trip (`sql_guardrail.py ask`) with contexts retrieved for
   the question alone (`retrieve_context.py --batch` on demo/ebs_schema.json, budget = what the server leaves for the
   prompt), as a user who only has a question would ask them;
3. the eval gate runs on the holdout, and on 10 TRAINING questions: the learned-model check (the fine-tuned model
   must reproduce >= 8 of 10 gold SQL through the full quantized vLLM path);
4. the server is stopped and the merged bf16 model is served for the same 10 questions, to show what 4-bit costs;
5. a table says where every artifact is.
Exit 1 when the learned-model check fails.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PKG = HERE.parent
sys.path[:0] = [str(PKG), str(PKG / "inference")]

from artifacts import StageError, atomic_write_json  # noqa: E402
from serve import running_server  # noqa: E402

GUARD = PKG / "inference" / "sql_guardrail.py"
EVAL = PKG / "eval_oracle_nl2sql.py"
RETRIEVE = PKG / "retrieve_context.py"
SCHEMA = HERE / "ebs_schema.json"
ASK_PROMPT_TOKENS = 1536  # vllm_config_cpu.yaml: max-model-len 2048 minus the 512-token output cap


# vLLM reads VLLM_API_KEY itself; the clients are told which variable holds it (never the key on a command line)
KEY_ENV = "VLLM_API_KEY" if os.environ.get("VLLM_API_KEY") else None


def run_eval(srv: dict, data: Path, catalog: Path, out_dir: Path, *extra: str) -> dict:
    key = ["--api_key_env", KEY_ENV] if KEY_ENV else []
    r = subprocess.run([sys.executable, str(EVAL), "--eval_data", str(data), "--base_url", srv["base_url"],
                        "--model", srv["model"], "--catalog", str(catalog), "--out_dir", str(out_dir), *key, *extra],
                       capture_output=True, text=True)
    if r.returncode == 2:
        raise StageError(f"eval failed on {data}: {r.stderr.strip().splitlines()[-1]}")
    return json.loads((out_dir / "report.json").read_text())["totals"]


def retrieve_contexts(questions: list[str], tokenizer_dir: Path) -> list[dict]:
    """One retrieved context per question: the retrieval stage script, one index build for all of them."""
    r = subprocess.run([sys.executable, str(RETRIEVE), "--schema", str(SCHEMA), "--batch", "--tokenizer",
                        str(tokenizer_dir), "--max_context_tokens", str(ASK_PROMPT_TOKENS)],
                       input="".join(json.dumps({"question": q}) + "\n" for q in questions), capture_output=True,
                       text=True)
    if r.returncode != 0:
        raise StageError(f"retrieval failed: {r.stderr.strip().splitlines()[-1]}")
    return [json.loads(line) for line in r.stdout.splitlines()]


def ask(srv: dict, record: dict, catalog: Path, tmp: Path) -> dict:
    context = tmp / f"context-{record['id']}.json"
    context.write_text(json.dumps(record["context"]))
    r = subprocess.run([sys.executable, str(GUARD), "ask", "--base-url", f"{srv['base_url']}/v1", "--model",
                        srv["model"], "--question", record["question"], "--context", str(context), "--catalog",
                        str(catalog), *(["--api-key-env", KEY_ENV] if KEY_ENV else [])], capture_output=True, text=True)
    if r.returncode == 2:
        raise StageError(f"ask failed: {r.stderr.strip().splitlines()[-1]}")
    return json.loads(r.stdout.strip().splitlines()[0])


def main(argv=None) -> int:
    import stage_env  # offline flags and caches as `make` sets them, without overriding the user's
    stage_env.apply()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="runs", help="the pipeline's run folder (data/, merged/, quant/)")
    ap.add_argument("--config", default=str(PKG / "inference" / "vllm_config_cpu.yaml"), help="vLLM YAML")
    ap.add_argument("--n_train", type=int, default=10, help="training questions in the learned-model check")
    ap.add_argument("--min_learned", type=float, default=0.8, help="required exact-match share on them")
    ap.add_argument("--n_ask", type=int, default=3, help="holdout questions shown through `ask`")
    args = ap.parse_args(argv)
    runs = Path(args.runs)
    data, quant, merged = runs / "data", runs / "quant", runs / "merged"
    catalog, out = data / "ebs_catalog.json", runs / "demo"
    try:
        for p in (data / "ebs_sft.json", data / "ebs_holdout.json", quant / "oracle_manifest.json", merged):
            if not p.exists():
                raise StageError(f"{p} missing: run `make package` first")
        out.mkdir(parents=True, exist_ok=True)
        holdout = json.loads((data / "ebs_holdout.json").read_text())
        learned = ("--limit", str(args.n_train), "--min_exact_match", str(args.min_learned))
        with running_server(quant, args.config, out / "vllm-quant.log") as srv:
            print(f"vLLM serving {quant} at {srv['base_url']} (up in {srv['startup_s']:.0f} s)")
            asked = holdout[:args.n_ask]
            for rec, ctx in zip(asked, retrieve_contexts([r["question"] for r in asked], quant)):
                res = ask(srv, {**rec, "context": ctx}, catalog, out)
                final = res["final"]
                print(f"\nQ: {rec['question']}\n   retrieved: {', '.join(t['name'] for t in ctx['tables'])}"
                      f"\n-> {'OK' if final['ok'] else 'REJECTED'}"
                      f"{' after retry' if res['retried'] else ''}: {final['sql'] or final['reasons']}")
            holdout_totals = run_eval(srv, data / "ebs_holdout.json", catalog, runs / "eval" / "holdout")
            quant_totals = run_eval(srv, data / "ebs_sft.json", catalog, runs / "eval" / "train10-quant", *learned)
        with running_server(merged, args.config, out / "vllm-merged.log") as srv:
            merged_totals = run_eval(srv, data / "ebs_sft.json", catalog, runs / "eval" / "train10-merged", *learned)
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = args.n_train
    summary = {"learned_quant": round(quant_totals["exact_match"]["final"] * n),
               "learned_merged": round(merged_totals["exact_match"]["final"] * n), "n_train": n,
               "holdout": {k: holdout_totals[k] for k in ("ok_rate", "exact_match", "parse_error_rate",
                                                          "hallucination_rate", "unsafe_rate", "retry_rate")}}
    atomic_write_json(out / "demo_summary.json", summary)
    rows = [("dataset", f"{data}/ebs_sft.json (+ manifest, catalog, rejects, holdout)"),
            ("adapter", f"{runs}/adapter (training_manifest.json, loss_curve.png)"),
            ("merged bf16", f"{merged} (oracle_manifest.json)"), ("4-bit", f"{quant} (oracle_manifest.json)"),
            ("eval reports", f"{runs}/eval/*/report.md, failure_categories.png"),
            ("learned: gold SQL reproduced, 4-bit via vLLM", f"{summary['learned_quant']} / {n}"),
            ("learned: gold SQL reproduced, merged bf16 via vLLM", f"{summary['learned_merged']} / {n}"),
            ("holdout: guardrail pass (first -> final)", f"{holdout_totals['ok_rate']['first']:.0%} -> "
                                                          f"{holdout_totals['ok_rate']['final']:.0%}"),
            ("holdout: exact match (final)", f"{holdout_totals['exact_match']['final']:.0%}")]
    width = max(len(a) for a, _ in rows)
    print("\n" + "\n".join(f"{a:<{width}}  {b}" for a, b in rows))
    if summary["learned_quant"] < args.min_learned * n:
        print(f"error: the 4-bit model reproduced only {summary['learned_quant']}/{n} training SQL", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
