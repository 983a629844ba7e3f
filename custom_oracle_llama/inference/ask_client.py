"""The guarded round trip: prompt (the training template) -> model -> check_sql -> at most one retry.

Retry format: the SAME template as training (prompting.chat_messages) rendered with previous_sql = the rejected
answer and reasons = the verdict's reasons ("## Previous answer (rejected)" / "## Why it was rejected"). Exactly one
retry; the final verdict is the retry's; unvalidated SQL is never returned as valid.
"""
import time

from artifacts import StageError
from guardrail.check import check_sql, first_line


class EndpointError(StageError):
    """The model endpoint could not be reached or answered with an error (transport, HTTP 4xx/5xx, timeout)."""


def openai_base_url(url: str) -> str:
    """Accept http://host:port and http://host:port/v1 alike (vLLM's OpenAI routes live under /v1)."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else f"{url}/v1"


def complete(client, model, messages, max_tokens):
    t0 = time.perf_counter()
    try:
        resp = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=max_tokens)
    except Exception as e:  # openai.APIError and transport errors: one line, not a traceback
        raise EndpointError(f"model endpoint call failed: {type(e).__name__}: {first_line(e)}") from None
    latency = round((time.perf_counter() - t0) * 1000, 1)
    if not resp.choices:
        return "", None, latency
    choice = resp.choices[0]
    return choice.message.content or "", choice.finish_reason, latency


def ask(base_url, model, question, context, catalog, policy, api_key=None, max_tokens=512, timeout=120.0,
        allow_dml=False, explain=None, client=None) -> dict:
    """Guarded round trip. The policy's required filters apply through the catalog; the context's add to them."""
    import openai
    from prompting import chat_messages
    context = context or {}
    filters = context.get("security_filters") or []
    client = client or openai.OpenAI(base_url=openai_base_url(base_url), api_key=api_key or "EMPTY",
                                     timeout=timeout, max_retries=0)

    def attempt(messages):
        raw, finish, latency = complete(client, model, messages, max_tokens)
        verdict = check_sql(raw, catalog=catalog, policy=policy, security_filters=filters, allow_dml=allow_dml,
                            explain=explain)
        if finish == "length":
            # A cut-off answer may still parse (e.g. a truncated WHERE); never accept it.
            verdict.update(ok=False, sql=None)
            verdict["reasons"] = verdict["reasons"] + [f"answer was cut off at max_tokens={max_tokens}: "
                                                       "write a shorter query"]
            verdict["codes"] = list(dict.fromkeys(verdict["codes"] + ["contract"]))
        return {"messages": messages, "raw_output": raw, "finish_reason": finish, "verdict": verdict,
                "latency_ms": latency}

    first = attempt(chat_messages(question, context))
    attempts = [first]
    if not first["verdict"]["ok"]:
        previous = first["verdict"]["candidate_sql"] or first["raw_output"].strip() or "(empty answer)"
        attempts.append(attempt(chat_messages(question, context, previous_sql=previous,
                                              reasons=first["verdict"]["reasons"])))
    final = attempts[-1]["verdict"]
    return {"ok": final["ok"], "sql": final["sql"] if final["ok"] else None, "final": final,
            "retried": len(attempts) > 1, "attempts": attempts,
            "latency_ms": round(sum(a["latency_ms"] for a in attempts), 1)}
