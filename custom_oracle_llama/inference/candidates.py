"""Execution match and candidate selection (self-consistency): shared by the eval and `ask`.

- `compare_results(gold, pred, ordered)`: two execution results (DuckDBMirror.execute / oracle_explain.execute_oracle
  shape: {status, columns, rows, detail}) -> (True|False|None, reason). Rows compared as multisets (as lists only
  when `ordered`); column names ignored, column order respected; numbers equal within FLOAT_DIGITS significant
  digits (1 == 1.0, sums in another order agree); a DATE at midnight equals the same day. None = undecidable (the
  gold did not execute, or the prediction uses what the backend cannot run).
- `ordered_comparison(question, gold_sql)`: order matters only when the gold query orders its output AND the
  question asks for an order ("top 10", "largest", "sorted by", ...): ORDER_WORDS.
- `sample_candidates(...)`: N samples in one request (n=N, temperature, per-token log-probabilities).
- `select_candidate(candidates, execute)`: drop guardrail rejects, execute the rest, answer with the query whose
  result most candidates agree on; ties -> the highest total log-probability.

Wiring it into `ask` (see the README "Evaluation gate" section): `ask_with_candidates(client, model, question,
context, catalog, policy, n, temperature, execute)`.
"""
import datetime as dt
import decimal
import re
import time
from collections import Counter

FLOAT_DIGITS = 10
ORDER_WORDS = ("top", "largest", "smallest", "highest", "lowest", "biggest", "most", "least", "rank", "ranked",
               "order", "ordered", "sort", "sorted", "first", "last", "latest", "earliest", "oldest", "newest",
               "ascending", "descending", "best", "worst")


from sql_guardrail import EndpointError, check_sql  # noqa: E402  (one endpoint-failure type with `ask`)


# ------------------------------------------------------------------------------------------- comparing results
def canonical(value):
    """One spelling per value: numbers to FLOAT_DIGITS significant digits, midnight datetimes as dates."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float, decimal.Decimal)):
        x = float(value)
        return 0.0 if x == 0 else float(f"{x:.{FLOAT_DIGITS}g}")
    if isinstance(value, dt.datetime):
        return value.date().isoformat() if value.time() == dt.time(0) else value.isoformat(sep=" ")
    if isinstance(value, dt.date):
        return value.isoformat()
    return value


def canonical_rows(rows):
    return [tuple(canonical(v) for v in row) for row in rows or []]


def result_key(result):
    """Hashable multiset signature of a result (what candidates vote with)."""
    return tuple(sorted(Counter(canonical_rows(result["rows"])).items(), key=repr))


def ordered_comparison(question, gold_sql) -> bool:
    import sqlglot
    from sqlglot import exp
    try:
        tree = sqlglot.parse_one(gold_sql, read="oracle")
    except Exception:
        return False
    orders = isinstance(tree, exp.Query) and tree.args.get("order") is not None
    words = set(re.findall(r"[a-z]+", (question or "").lower()))
    return orders and bool(words & set(ORDER_WORDS))


def compare_results(gold, pred, ordered=False):
    """(True|False|None, reason) for a predicted result against the gold result."""
    if gold is None or gold["status"] != "ok":
        return None, f"gold query did not execute ({gold['status']}: {gold['detail']})" if gold else "no gold result"
    if pred is None:
        return False, "no SQL answer (rejected or empty)"
    if pred["status"] == "not_checkable":
        return None, f"prediction not executable on this backend: {pred['detail']}"
    if pred["status"] != "ok":
        return False, f"prediction {pred['status']}: {pred['detail']}"
    g, p = canonical_rows(gold["rows"]), canonical_rows(pred["rows"])
    if len(gold["columns"] or []) != len(pred["columns"] or []):
        return False, f"{len(pred['columns'])} columns, gold has {len(gold['columns'])}"
    if len(g) != len(p):
        return False, f"{len(p)} rows, gold has {len(g)}"
    if ordered:
        return (True, "same rows in the same order") if g == p else \
            (False, "same number of rows, different rows or order" if Counter(g) != Counter(p) else
             "same rows in another order (the question asks for an order)")
    return (True, "same rows") if Counter(g) == Counter(p) else (False, "different rows")


# ------------------------------------------------------------------------------------------ candidate selection
def sample_candidates(client, model, messages, n, temperature, max_tokens):
    """[{"text", "logprob", "finish_reason"}] x n from one chat completion request (vLLM: n, logprobs)."""
    try:
        resp = client.chat.completions.create(model=model, messages=messages, n=n, temperature=temperature,
                                              max_tokens=max_tokens, logprobs=True)
    except Exception as e:  # openai.APIError and transport errors
        text = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise EndpointError(f"model endpoint call failed: {type(e).__name__}: {text}") from None
    out = []
    for choice in resp.choices:
        tokens = (choice.logprobs.content or []) if choice.logprobs is not None else []
        out.append({"text": choice.message.content or "", "finish_reason": choice.finish_reason,
                    "logprob": round(sum(t.logprob for t in tokens), 4) if tokens else None})
    return out


def select_candidate(candidates, execute):
    """Majority result among the guardrail-passing candidates.

    candidates: [{"text", "logprob", "verdict"}] (verdict from check_sql); execute: sql -> execution result.
    Returns {"index", "sql", "votes", "groups", "reason"}; index None when no candidate passed the guardrail.
    Candidates whose execution fails (error, timeout, too many rows) do not vote; when none executes, the
    highest-log-probability passing candidate is the answer.
    """
    def lp(i):
        v = candidates[i].get("logprob")
        return v if v is not None else float("-inf")

    passing = [i for i, c in enumerate(candidates) if c["verdict"]["ok"]]
    for i in passing:
        candidates[i]["execution"] = execute(candidates[i]["verdict"]["sql"])
    voters = [i for i in passing if candidates[i]["execution"]["status"] == "ok"]
    if not passing:
        return {"index": None, "sql": None, "votes": 0, "groups": 0,
                "reason": f"all {len(candidates)} candidates rejected by the guardrail"}
    if not voters:
        best = max(passing, key=lp)
        return {"index": best, "sql": candidates[best]["verdict"]["sql"], "votes": 0, "groups": 0,
                "reason": "no passing candidate executed: highest log-probability"}
    groups = {}
    for i in voters:
        groups.setdefault(result_key(candidates[i]["execution"]), []).append(i)
    # most votes, then the group's best log-probability; the answer is that group's most probable candidate
    members = max(groups.values(), key=lambda m: (len(m), max(lp(i) for i in m)))
    best = max(members, key=lp)
    tied = sum(1 for m in groups.values() if len(m) == len(members))
    return {"index": best, "sql": candidates[best]["verdict"]["sql"], "votes": len(members), "groups": len(groups),
            "reason": f"{len(members)} of {len(voters)} executed candidates agree"
                      + (f" ({tied} groups tied: highest log-probability)" if tied > 1 else "")}


def ask_with_candidates(client, model, question, context, catalog, policy, n, temperature, execute,
                        max_tokens=512, explain=None):
    """`ask` with self-consistency: n samples -> guardrail -> execute -> majority. Same prompt as training."""
    from prompting import chat_messages
    filters = (context or {}).get("security_filters") or []
    t0 = time.perf_counter()
    cands = sample_candidates(client, model, chat_messages(question, context or {}), n, temperature, max_tokens)
    latency = round((time.perf_counter() - t0) * 1000, 1)
    for c in cands:
        c["verdict"] = check_sql(c["text"], catalog=catalog, policy=policy, security_filters=filters, explain=explain)
        if c["finish_reason"] == "length":  # a cut-off answer may still parse: never accept it
            c["verdict"].update(ok=False, sql=None)
    selection = select_candidate(cands, execute)
    chosen = cands[selection["index"]] if selection["index"] is not None else None
    return {"ok": chosen is not None, "sql": selection["sql"], "selection": selection, "candidates": cands,
            "final": chosen["verdict"] if chosen else None, "latency_ms": latency,
            "total_ms": round((time.perf_counter() - t0) * 1000, 1)}
