"""The one prompt renderer: training, calibration, serving (guardrail `ask`) and eval all call this.

The wording lives in prompts/oracle_nl2sql_v1.jinja; this module only loads it and builds chat messages.
Messages go through the model's own chat template (tokenizer.apply_chat_template / vLLM's chat endpoint),
which adds the single <|begin_of_text|>.
"""
import hashlib
from pathlib import Path

import jinja2

TEMPLATE_PATH = Path(__file__).resolve().parent / "prompts" / "oracle_nl2sql_v1.jinja"
_ENV = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False)
_TEMPLATE = _ENV.from_string(TEMPLATE_PATH.read_text(encoding="utf-8"))
_EMPTY_CONTEXT = {"tables": [], "joins": [], "columns": [], "synonyms": {}, "security_filters": []}


def template_sha256() -> str:
    return hashlib.sha256(TEMPLATE_PATH.read_bytes()).hexdigest()


def render_user_prompt(question: str, context: dict, previous_sql: str | None = None,
                       reasons: list[str] | None = None) -> str:
    """User turn for one question; with previous_sql/reasons it is the single guarded retry."""
    ctx = {**_EMPTY_CONTEXT, **(context or {})}
    ctx["tables"] = [{"description": "", **t, "columns": [{"type": "", "description": "", **c} for c in t["columns"]]}
                     for t in ctx["tables"]]
    return _TEMPLATE.render(question=question.strip(), context=ctx,
                            previous_sql=previous_sql, reasons=reasons or []).strip()


def chat_messages(question: str, context: dict, answer_sql: str | None = None,
                  previous_sql: str | None = None, reasons: list[str] | None = None) -> list[dict]:
    """[user] for inference, [user, assistant] for training. No system turn: the Llama-3 template adds its own."""
    messages = [{"role": "user", "content": render_user_prompt(question, context, previous_sql, reasons)}]
    if answer_sql is not None:
        messages.append({"role": "assistant", "content": answer_sql.strip()})
    return messages
