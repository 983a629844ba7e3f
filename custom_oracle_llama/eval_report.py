"""The eval's report: totals over the per-example rows, the threshold gates, report.md, the chart, the summary.

Functions of the rows / totals / report dicts that eval_oracle_nl2sql.py builds; all pure but write_chart (the
PNG, atomically) and print_summary (stdout). The report holds, first attempt and final answer side by side: the
rate of each failure category (the guardrail's, guardrail/codes.py, plus endpoint_error), guardrail pass, exact
match after normalization and execution match (EX, over the examples where it could be decided); retry rate and
success, EXPLAIN outcomes, latency p50/p95 (nearest rank), throughput, EX@1 vs EX with --candidates selection, and
one {flag, value, limit, passed} per threshold given.

    >>> percentile([10, 20, 30, 40], 50), pct(0.3333), ms(None), yes_no(False)
    (20, '33.3%', 'n/a', 'no')
"""
import io
import math
import os

from guardrail.codes import CATEGORIES as GUARD_CATEGORIES, CATEGORY_LABELS as GUARD_LABELS

# The guardrail's report categories + the eval's own: a request the endpoint failed (timeout, 5xx).
CATEGORIES = (*GUARD_CATEGORIES, "endpoint_error")
CATEGORY_LABELS = {**GUARD_LABELS, "endpoint_error": "endpoint error"}
# --max_<name>_rate flag -> the category it gates (always the FINAL-answer rate).
MAX_GATES = {"parse_error": "parse_error", "hallucination": "hallucination", "unsafe": "unsafe",
             "security_violation": "security_filter", "explain_error": "explain_error",
             "endpoint_error": "endpoint_error"}
# --min_<name> flag -> the totals entry it gates.
MIN_GATES = {"exact_match": lambda t: t["exact_match"]["final"], "execution_match": lambda t: t["execution"]["rate"]}


# ------------------------------------------------------------------------------------------------ totals
def percentile(values, q):
    """Nearest-rank percentile (no interpolation: every figure is a latency that was actually observed)."""
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return None
    return vals[max(0, math.ceil(q / 100 * len(vals)) - 1)]


def summarize(rows, wall_s, backend):
    """report.json's "totals": rates over the examples (first / final), execution, latency, throughput."""
    n = len(rows)

    def rate(pred, among=rows):
        return round(sum(1 for r in among if pred(r)) / len(among), 4) if among else None

    totals = {"examples": n}
    for cat in CATEGORIES:
        totals[f"{cat}_rate"] = {"first": rate(lambda r, c=cat: c in r["categories_first"]),
                                 "final": rate(lambda r, c=cat: c in r["categories_final"])}
    totals["ok_rate"] = {"first": rate(lambda r: r["ok_first"]), "final": rate(lambda r: r["ok_final"])}
    totals["exact_match"] = {"first": rate(lambda r: r["exact_match_first"]),
                             "final": rate(lambda r: r["exact_match_final"])}
    retried = [r for r in rows if r["retried"]]
    totals["retry_rate"] = rate(lambda r: r["retried"])
    totals["retry_success"] = rate(lambda r: r["ok_final"], retried)
    totals["retried"] = len(retried)
    attempts = [a for r in rows for a in r["attempts"]]
    totals["explain"] = {s: sum(1 for a in attempts if a["explain"]["status"] == s)
                         for s in ("clean", "error", "not_checkable", "not_run")}
    totals["explain"]["not_checkable_reasons"] = sorted({a["explain"]["detail"] for a in attempts
                                                         if a["explain"]["status"] == "not_checkable"})
    decided = [r for r in rows if r["exec_match"] is not None]
    decided_first = [r for r in rows if r["exec_match_first"] is not None]
    gold_ok = [r for r in rows if r.get("gold_status") == "ok"]
    totals["execution"] = {
        "backend": backend["name"] if backend["execute"] else None,
        "executed": sum(1 for r in gold_ok if r["pred_status"] == "ok"),
        "matched": sum(1 for r in decided if r["exec_match"]), "decided": len(decided),
        "rate": rate(lambda r: r["exec_match"], decided), "rate_first": rate(lambda r: r["exec_match_first"],
                                                                             decided_first),
        "gold_executed": len(gold_ok), "gold_nonempty": rate(lambda r: r["gold_rows"], gold_ok),
        "undecided_reasons": sorted({r["exec_reason"] for r in rows if r["exec_match"] is None})[:20]}
    sel = [r for r in rows if "selection" in r]
    if sel:
        decided_sel = [r for r in sel if r["exec_match_selected"] is not None]
        totals["candidates"] = {"rate_at_1": rate(lambda r: r["exec_match"], [r for r in sel if r in decided]),
                                "rate_selected": rate(lambda r: r["exec_match_selected"], decided_sel),
                                "latency_ms_p50": percentile([r["selection"]["latency_ms"] for r in sel], 50),
                                "latency_ms_p95": percentile([r["selection"]["latency_ms"] for r in sel], 95)}
    lat = [r["latency_ms"] for r in rows]
    totals["latency_ms"] = {"p50": percentile(lat, 50), "p95": percentile(lat, 95),
                            "first_attempt_p50": percentile([r["latency_first_ms"] for r in rows], 50),
                            "first_attempt_p95": percentile([r["latency_first_ms"] for r in rows], 95)}
    totals["wall_s"] = round(wall_s, 2)
    totals["examples_per_s"] = round(n / wall_s, 3) if wall_s > 0 else None
    return totals


def gate(totals, args):
    """[{flag, value, limit, passed}] for every threshold given (a limit itself passes; an undecided value fails)."""
    out = []
    for flag, cat in MAX_GATES.items():
        limit = getattr(args, f"max_{flag}_rate")
        if limit is not None:
            value = totals[f"{cat}_rate"]["final"]
            out.append({"flag": f"--max_{flag}_rate", "value": value, "limit": limit, "passed": value <= limit})
    for flag, value_of in MIN_GATES.items():
        limit = getattr(args, f"min_{flag}")
        if limit is not None:
            value = value_of(totals)
            out.append({"flag": f"--min_{flag}", "value": value, "limit": limit,
                        "passed": value is not None and value >= limit})
    return out


# ------------------------------------------------------------------------------------------------ outputs
def pct(x):
    return "n/a" if x is None else f"{100 * x:.1f}%"


def ms(x):
    return "n/a" if x is None else f"{x:.0f}"


def yes_no(x):
    return "n/a" if x is None else ("yes" if x else "no")


def render_markdown(report):
    t, c, e = report["totals"], report["config"], report["totals"]["execution"]
    lines = [f"# Oracle EBS NL2SQL eval: {c['model']}", "",
             f"- eval data: `{c['eval_data']}` ({t['examples']} examples), mode: {c['mode']}",
             f"- backend (EXPLAIN, execution): {c['backend']}",
             f"- guardrail: {c['sqlglot']}, policy `{c['policy']}`, catalog `{c['catalog']}`",
             f"- prompt template sha256 {c['template_sha256'][:16]}..., concurrency {c['concurrency']}", "",
             "Rates are over examples. **first** = the model's first answer; **final** = the answer the user gets "
             "(the retry's when the first was rejected). Thresholds gate on final answers. Execution match is over "
             "the examples where it could be decided.", "",
             "| metric | first attempt | final |", "|---|---:|---:|"]
    for cat in CATEGORIES:
        r = t[f"{cat}_rate"]
        lines.append(f"| {CATEGORY_LABELS[cat]} rate | {pct(r['first'])} | {pct(r['final'])} |")
    lines += [f"| guardrail pass (ok) | {pct(t['ok_rate']['first'])} | {pct(t['ok_rate']['final'])} |",
              f"| exact match (normalized) | {pct(t['exact_match']['first'])} | {pct(t['exact_match']['final'])} |",
              f"| **execution match (EX)** | {pct(e['rate_first'])} | {pct(e['rate'])} |",
              "", "| metric | value |", "|---|---:|",
              f"| execution: matched / decided (examples) | {e['matched']} / {e['decided']} of {t['examples']} |",
              f"| gold queries returning rows | {pct(e['gold_nonempty'])} of {e['gold_executed']} executed |",
              f"| retry rate | {pct(t['retry_rate'])} ({t['retried']} of {t['examples']} examples) |",
              f"| retry success (final ok among retried) | {pct(t['retry_success'])} |",
              f"| EXPLAIN clean / error / not checkable / not run (attempts) | {t['explain']['clean']} / "
              f"{t['explain']['error']} / {t['explain']['not_checkable']} / {t['explain']['not_run']} |",
              f"| latency p50 / p95 per example (ms, both attempts) | {ms(t['latency_ms']['p50'])} / "
              f"{ms(t['latency_ms']['p95'])} |",
              f"| wall time / throughput | {t['wall_s']} s / {t['examples_per_s']} examples/s |"]
    if "candidates" in t:
        k = t["candidates"]
        lines += [f"| EX@1 (guarded greedy) vs EX with selection ({c['candidates']} candidates, temperature "
                  f"{c['temperature']}) | {pct(k['rate_at_1'])} vs {pct(k['rate_selected'])} |",
                  f"| extra latency of the candidates request p50 / p95 (ms) | {ms(k['latency_ms_p50'])} / "
                  f"{ms(k['latency_ms_p95'])} |"]
    lines.append("")
    if e["undecided_reasons"]:
        lines += ["Execution match undecided: " + "; ".join(e["undecided_reasons"]), ""]
    if t["explain"]["not_checkable_reasons"]:
        lines += ["Not checkable on the EXPLAIN backend: " + "; ".join(t["explain"]["not_checkable_reasons"]), ""]
    if report["gates"]:
        lines += ["## Thresholds", "", "| flag | value | limit | result |", "|---|---:|---:|---|"]
        lines += [f"| {g['flag']} | {pct(g['value'])} | {pct(g['limit'])} | {'pass' if g['passed'] else '**FAIL**'} |"
                  for g in report["gates"]]
        lines.append("")
    lines += ["## Per example", "", "| id | first | final | retried | exact (final) | EX (final) | latency ms | "
              "final reason |", "|---|---|---|---|---|---|---:|---|"]
    for r in report["examples"]:
        reason = "; ".join(r["attempts"][-1]["reasons"] or [r["exec_reason"]])[:160]
        reason = reason.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {r['id']} | {', '.join(r['categories_first']) or 'ok'} | "
                     f"{', '.join(r['categories_final']) or 'ok'} | {yes_no(r['retried'])} | "
                     f"{yes_no(r['exact_match_final'])} | {yes_no(r['exec_match'])} | {ms(r['latency_ms'])} | "
                     f"{reason} |")
    return "\n".join(lines) + "\n"


def write_chart(path, totals):
    """failure_categories.png: each category's rate, exact match and EX, first attempt beside final."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    e = totals["execution"]
    bars = [(CATEGORY_LABELS[c], totals[f"{c}_rate"]["first"], totals[f"{c}_rate"]["final"]) for c in CATEGORIES]
    bars += [("exact match", totals["exact_match"]["first"], totals["exact_match"]["final"]),
             ("execution match (EX)", e["rate_first"], e["rate"])]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    xs = range(len(bars))
    ax.bar([x - 0.2 for x in xs], [100 * (b[1] or 0) for b in bars], width=0.4, label="first attempt")
    ax.bar([x + 0.2 for x in xs], [100 * (b[2] or 0) for b in bars], width=0.4, label="final (after retry)")
    ax.axvline(len(CATEGORIES) - 0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(list(xs), [b[0] for b in bars], rotation=20, ha="right")
    ax.set_ylabel("% of examples")
    ax.set_ylim(0, 100)
    ax.set_title(f"Failure categories | exact and execution match ({totals['examples']} examples"
                 f"{'' if e['rate'] is not None else '; EX n/a: no execution backend'})")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)


def print_summary(report, out):
    """The table printed at the end of a run (stdout), and where the reports are."""
    t, e = report["totals"], report["totals"]["execution"]
    print(f"\nbackend: {report['config']['backend']}   examples: {t['examples']}")
    print(f"{'metric':<34}{'first':>10}{'final':>10}")
    for cat in CATEGORIES:
        r = t[f"{cat}_rate"]
        print(f"{CATEGORY_LABELS[cat] + ' rate':<34}{pct(r['first']):>10}{pct(r['final']):>10}")
    print(f"{'guardrail pass':<34}{pct(t['ok_rate']['first']):>10}{pct(t['ok_rate']['final']):>10}")
    print(f"{'exact match':<34}{pct(t['exact_match']['first']):>10}{pct(t['exact_match']['final']):>10}")
    print(f"{'execution match (EX)':<34}{pct(e['rate_first']):>10}{pct(e['rate']):>10}   "
          f"({e['matched']}/{e['decided']} decided; gold non-empty {pct(e['gold_nonempty'])})")
    if "candidates" in t:
        k = t["candidates"]
        print(f"EX@1 {pct(k['rate_at_1'])} -> with selection {pct(k['rate_selected'])}; extra latency p50 "
              f"{ms(k['latency_ms_p50'])} ms")
    print(f"retry rate {pct(t['retry_rate'])}, retry success {pct(t['retry_success'])}; EXPLAIN not checkable "
          f"{t['explain']['not_checkable']}; latency p50/p95 {ms(t['latency_ms']['p50'])}/"
          f"{ms(t['latency_ms']['p95'])} ms")
    print(f"reports: {out / 'report.json'}  {out / 'report.md'}  {out / 'failure_categories.png'}")
