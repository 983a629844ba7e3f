#!/usr/bin/env python
"""The demo's figures over several runs (`make demo-seeds`): per run and as min-max, never one lucky run.

Reads RUN/demo/demo_summary.json (written by run_demo.py) of every run folder given, plus the sha256 of each run's
adapter and 4-bit weights, so a reader can see which runs are the same bits (same seed -> same adapter) and which
differ (another training seed). Writes OUT.json and OUT.md atomically and prints the table.
Exit codes: 0, 1 when the WORST run's 4-bit learned figure is below --min_learned, 2 bad input.
"""
import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from artifacts import StageError, atomic_write_json, atomic_write_text, read_json, sha256_file  # noqa: E402


def run_figures(run: Path) -> dict:
    """One run folder -> its figures and the hashes that identify what produced them."""
    summary = read_json(run / "demo" / "demo_summary.json")
    training = read_json(run / "adapter" / "training_manifest.json")
    quant = sorted((run / "quant").glob("*.safetensors"))
    if not quant:
        raise StageError(f"{run / 'quant'} holds no .safetensors: not a finished `make demo` run")
    h = summary["holdout"]
    return {"run": str(run), "seed": training["training_args"]["seed"],
            "adapter_sha256": sha256_file(run / "adapter" / "adapter_model.safetensors"),
            "quant_sha256": sha256_file(quant[0]), "final_loss": training["final_loss"], "n_train": summary["n_train"],
            "learned_quant": summary["learned_quant"], "learned_merged": summary["learned_merged"],
            "holdout_pass_first": h["ok_rate"]["first"], "holdout_pass_final": h["ok_rate"]["final"],
            "holdout_exact_final": h["exact_match"]["final"]}


FIGURES = [("learned_quant", "training SQL reproduced, 4-bit via vLLM", "{:.0f}"),
           ("learned_merged", "training SQL reproduced, merged bf16 via vLLM", "{:.0f}"),
           ("holdout_pass_first", "holdout guardrail pass, first answer", "{:.0%}"),
           ("holdout_pass_final", "holdout guardrail pass, after the retry", "{:.0%}"),
           ("holdout_exact_final", "holdout exact match", "{:.0%}"),
           ("final_loss", "final training loss", "{:.3f}")]


def min_max(runs: list[dict]) -> dict:
    return {key: [min(r[key] for r in runs), max(r[key] for r in runs)] for key, _, _ in FIGURES}


def render(runs: list[dict], ranges: dict) -> str:
    n = runs[0]["n_train"]
    head = "| figure | " + " | ".join(f"seed {r['seed']} (adapter {r['adapter_sha256'][:8]})" for r in runs)
    lines = [head + " | min - max |", "|---|" + "---:|" * (len(runs) + 1)]
    for key, label, fmt in FIGURES:
        unit = f" / {n}" if key.startswith("learned") else ""
        cells = [fmt.format(r[key]) + unit for r in runs]
        lo, hi = (fmt.format(v) for v in ranges[key])
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {lo} - {hi}{unit} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="run folders of finished `make demo RUNS=...` runs")
    ap.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.md")
    ap.add_argument("--min_learned", type=float, default=0.8,
                    help="exit 1 when the worst run's 4-bit learned share is below this (default 0.8)")
    args = ap.parse_args(argv)
    try:
        runs = [run_figures(r) for r in args.runs]
    except (StageError, KeyError, TypeError) as e:
        print(f"error: {e if isinstance(e, StageError) else f'a demo_summary.json lacks {e}'}", file=sys.stderr)
        return 2
    ranges = min_max(runs)
    table = render(runs, ranges)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out.with_suffix(".json"), {"runs": runs, "min_max": ranges})
    atomic_write_text(args.out.with_suffix(".md"), table)
    print(table + f"\nwritten: {args.out.with_suffix('.json')}  {args.out.with_suffix('.md')}")
    worst, n = ranges["learned_quant"][0], runs[0]["n_train"]
    if worst < args.min_learned * n:
        print(f"error: the worst run reproduced {worst}/{n} training SQL through 4-bit (gate {args.min_learned:.0%})",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
