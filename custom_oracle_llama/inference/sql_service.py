#!/usr/bin/env python
"""Guarded SQL service: the one HTTP endpoint applications talk to (question in, guarded Oracle SQL out).

    python custom_oracle_llama/inference/sql_service.py --config custom_oracle_llama/inference/service_config.yaml

POST /v1/sql {"question", "context"?}: context from the request, else retrieved from the schema (retrieve_context)
-> the training prompt template -> vLLM -> guardrail -> exactly one retry with the reasons (sql_guardrail.ask) ->
{"ok", "sql", "reasons", "codes", "attempts", "binds", "bind_names", "request_id"}. It returns SQL, never runs it.

- Deny by default: every route but GET /health needs `Authorization: Bearer <key>` (401 otherwise); the OpenAPI
  schema is served behind the same key at /openapi.json, the interactive docs are off. The keys file (YAML list of
  {key_sha256, user, org_ids}, written by service_keys.py) holds hashes only, is compared in constant time and is
  re-read when it changes (adding or revoking a user needs no restart).
- MOAC bound to the caller: every *_ALL table with ORG_ID in the catalog must be filtered by ORG_ID IN (:org_ids)
  (the policy's required filters); a request context's security_filters can only add to them. The response's
  "binds" gives {"org_ids": <the caller's org_ids from the keys file>}: the app runs the SQL with exactly those.
- Backpressure: at most max_in_flight_per_backend requests per backend (= vLLM max-num-seqs), least-in-flight
  routing over `backends`, a bounded queue of queue_size (full -> 429 + Retry-After; waited queue_timeout_s -> 503).
  Backend refused/reset -> 503, timed out -> 504, other backend error -> 502; each within backend_timeout_s per
  model call, and the service keeps serving (a failed backend is avoided for backend_down_s while others are up).
- Audit log: one JSON line per request (all routes but /health), written with one os.write on an O_APPEND fd (a
  crash cannot tear a line in the middle of the file; read_audit skips an unterminated last line). Never a key.
- POST /v1/feedback {"request_id", "sql"}: the caller's corrected/confirmed SQL for one of their recent requests
  (the last feedback_window kept in memory), checked by the guardrail with that request's context and the caller's
  scope, appended to feedback_out as a raw record in the builder's input format with "source": "feedback".
- GET /metrics: Prometheus text (requests by outcome, guardrail rejections by code, retries, latency, queue depth).

Runs in the training/guardrail environment (.venv: sqlglot, the prompt renderer, retrieval); vLLM runs in
.venv-serve. `--start_vllm MODEL_DIR` starts one vLLM through serve.py (capacity plan first) and serves in front of it.
"""
import argparse
import asyncio
import collections
import contextlib
import dataclasses
import datetime
import fnmatch
import hmac
import json
import logging
import os
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import sqlglot  # noqa: E402
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.responses import JSONResponse, PlainTextResponse  # noqa: E402
from pydantic import AfterValidator, BaseModel, ConfigDict, StrictStr, field_validator  # noqa: E402
from sqlglot import exp  # noqa: E402
from sqlglot.errors import ParseError, TokenError  # noqa: E402
from starlette.exceptions import HTTPException as StarletteHTTPException  # noqa: E402

from artifacts import StageError, read_yaml_mapping  # noqa: E402
from dataset_records import Context, RawRecord  # noqa: E402  (the dataset builder's raw-record schema)
from service_keys import read_keys, sha256_hex  # noqa: E402  (the keys file format lives with its tool)
from sql_guardrail import ask, check_sql, load_catalog, load_policy  # noqa: E402

log = logging.getLogger("sql_service")

# ---- configuration: every key with its default (unknown keys are an error: a typo must not drop a limit) --------
DEFAULTS = {
    "host": "127.0.0.1",              # loopback: put a TLS terminator in front to expose it (README)
    "port": 8100,
    "backends": [],                   # vLLM OpenAI base URLs, e.g. http://127.0.0.1:8000/v1
    "backend_api_key_env": "VLLM_API_KEY",  # env var holding vLLM's --api-key (never in this file)
    "model": "oracle-ebs-sql",        # vLLM served-model-name
    "catalog": None,                  # {TABLE: {COLUMN: TYPE}} JSON or ALL_TAB_COLUMNS CSV: required
    "policy": None,                   # guardrail policy YAML (default: guardrail_policy.yaml)
    "schema": None,                   # schema JSON for question-time retrieval (none: requests must bring context)
    "tokenizer": None,                # model folder whose tokenizer counts the prompt (none: byte estimate)
    "max_context_tokens": 1500,       # whole rendered prompt; + max_tokens must fit vLLM's max-model-len
    "keys_file": None,                # YAML list of {key_sha256, user, org_ids}: required
    "audit_log": None,                # JSONL, appended: required
    "feedback_out": None,             # raw JSONL for the next `make dataset` (none: /v1/feedback answers 404)
    "max_in_flight_per_backend": 4,   # = vLLM max-num-seqs: more would only queue inside vLLM, invisible to us
    "queue_size": 16,                 # requests waiting for a backend slot; one more -> 429
    "queue_timeout_s": 60.0,          # longest wait for a slot -> 503
    "backend_timeout_s": 60.0,        # per model call (a request makes at most two)
    "backend_down_s": 5.0,            # a failed backend is avoided this long while another is up
    "retry_after_s": 2,               # Retry-After on 429/503
    "max_tokens": 512,                # per attempt (the server-side cap in the vLLM YAML still applies)
    "max_question_chars": 2000,       # longer -> 413
    "max_body_bytes": 262144,         # longer request body -> 413 before it is parsed
    "feedback_window": 10000,         # recent requests /v1/feedback can refer to
}
REQUIRED = ("catalog", "keys_file", "audit_log")
PATH_KEYS = ("catalog", "policy", "schema", "tokenizer", "keys_file", "audit_log", "feedback_out")
ORG_FILTER = {"column": "ORG_ID", "predicate": "ORG_ID IN (:org_ids)"}


def load_config(path, overrides=None) -> dict:
    """YAML -> settings; relative paths are relative to the config file. StageError on anything wrong."""
    path = Path(path)
    raw = read_yaml_mapping(path, "config", DEFAULTS)
    cfg = {**DEFAULTS, **raw, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    for k in PATH_KEYS:
        if cfg[k] is not None and k in raw and not (overrides or {}).get(k):
            cfg[k] = str((path.parent / str(cfg[k])).resolve())
    missing = [k for k in REQUIRED if not cfg[k]]
    if missing:
        raise StageError(f"config {path}: missing {missing}")
    if not isinstance(cfg["backends"], list) or not cfg["backends"] or \
            not all(isinstance(b, str) and b.startswith(("http://", "https://")) for b in cfg["backends"]):
        raise StageError(f"config {path}: backends must be a non-empty list of http(s) base URLs")
    for k in ("max_in_flight_per_backend", "queue_size", "max_question_chars", "max_body_bytes", "max_tokens",
              "feedback_window", "port", "max_context_tokens"):
        if not isinstance(cfg[k], int) or cfg[k] < (0 if k == "queue_size" else 1):
            raise StageError(f"config {path}: {k} must be a positive integer, got {cfg[k]!r}")
    for k in ("queue_timeout_s", "backend_timeout_s", "backend_down_s", "retry_after_s"):
        if not isinstance(cfg[k], (int, float)) or cfg[k] <= 0:
            raise StageError(f"config {path}: {k} must be a positive number, got {cfg[k]!r}")
    return cfg


# ---- keys: hashes only on disk, constant-time comparison, re-read when the file changes ---------------------------
@dataclasses.dataclass(frozen=True)
class Caller:
    user: str
    org_ids: tuple


class KeyStore:
    """The keys file, re-read when its mtime/size changes. A file that became invalid keeps the last good keys
    (logged) rather than locking everyone out or letting anyone in."""

    def __init__(self, path):
        self.path = Path(path)
        self.entries = read_keys(self.path)
        self._stamp = self._stat()

    def _stat(self):
        with contextlib.suppress(OSError):
            st = self.path.stat()
            return st.st_mtime_ns, st.st_size
        return None

    def lookup(self, key: str) -> Caller | None:
        stamp = self._stat()
        if stamp != self._stamp:
            try:
                self.entries, self._stamp = read_keys(self.path), stamp
            except StageError as e:
                log.error("keys file not reloaded, keeping the previous keys: %s", e)
        digest = sha256_hex(key)
        found = None
        for e in self.entries:  # every entry is compared: the time does not depend on which one matches
            if hmac.compare_digest(e["key_sha256"], digest):
                found = e
        return Caller(found["user"], tuple(found["org_ids"])) if found else None


# ---- audit log: one whole line per os.write on an O_APPEND fd ----------------------------------------------------
class JsonlAppender:
    def __init__(self, path, fsync=False):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path, self.fsync = Path(path), fsync
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)

    def append(self, record: dict) -> None:
        data = (json.dumps(record, ensure_ascii=False, default=str) + "\n").encode("utf-8")
        written = os.write(self.fd, data)
        if written != len(data):  # disk full: the reader skips the short last line; the request gets a 503
            log.error("%s: short write (%d of %d bytes)", self.path, written, len(data))
            raise OSError(28, "No space left on device (short write)")
        if self.fsync:
            os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


def read_audit(path) -> list[dict]:
    """Every complete line of an audit log / feedback JSONL; an unterminated last line (a crash mid-write) is
    skipped, a bad complete line is an error."""
    data = Path(path).read_bytes()
    lines = data.split(b"\n")
    out = []
    for n, line in enumerate(lines[:-1], 1):  # the piece after the last "\n" is empty or torn
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise StageError(f"{path}: line {n} is not JSON: {e}") from None
    return out


# ---- MOAC: the caller's scope ------------------------------------------------------------------------------------
def required_filters(catalog, policy: dict) -> list[dict]:
    """The policy's required MOAC filters expanded over the catalog: [{table, column, predicate}] for every table that
    matches a rule's globs and has its column (the shipped policy: every *_ALL table with ORG_ID, ORG_ID IN
    (:org_ids)). A policy without the key (older guardrail) gets that rule; an explicit empty list stays empty."""
    rules = policy["required_filters"] if "required_filters" in policy else [{"tables": ["*_ALL"], **ORG_FILTER}]
    out = []
    for table in sorted(catalog):
        columns = {str(c).upper() for c in catalog[table]}
        for rule in rules:
            if rule["column"].upper() in columns and any(fnmatch.fnmatchcase(table.upper(), g.upper())
                                                         for g in rule["tables"]):
                out.append({"table": table, "column": rule["column"], "predicate": rule["predicate"]})
    return out


def merge_filters(*groups) -> list[dict]:
    """Union of security filters, first occurrence wins per (table, column, predicate): only ever adds."""
    out = {}
    for group in groups:
        for f in group or []:
            key = (f["table"].upper(), f["column"].upper(), " ".join(f["predicate"].split()))
            out.setdefault(key, {"table": f["table"], "column": f["column"], "predicate": f["predicate"]})
    return list(out.values())


def scoped_context(context: dict, required: list[dict]) -> dict:
    """The prompt context with the required filters of its own tables added (the model sees what it must apply)."""
    tables = {t["name"].upper() for t in context.get("tables", [])}
    own = [f for f in required if f["table"].upper() in tables]
    return {**context, "security_filters": merge_filters(own, context.get("security_filters"))}


def bind_names(sql: str, verdict: dict) -> list[str]:
    """Bind variables the SQL uses (lower-case): the verdict's `binds` when the guardrail gives it, else sqlglot."""
    if isinstance(verdict.get("binds"), list):
        return sorted(verdict["binds"])
    tree = sqlglot.parse_one(sql, read="oracle")
    return sorted({str(p.name).lower() for p in tree.find_all(exp.Placeholder) if p.name})


# ---- backends: bounded in-flight per backend, bounded queue, least-in-flight routing -------------------------------
class Overloaded(Exception):
    """Queue full (429) or waited too long for a slot (503)."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


class Backends:
    """Slots over several vLLM endpoints. All methods run on the event loop (no locks needed besides the
    condition that wakes waiters)."""

    def __init__(self, urls, per_backend, queue_size, down_s):
        self.urls, self.per_backend, self.queue_size, self.down_s = list(urls), per_backend, queue_size, down_s
        self.in_flight = {u: 0 for u in self.urls}
        self.down_until = {u: 0.0 for u in self.urls}
        self.waiting = 0
        self._cond = asyncio.Condition()

    def pick(self):
        """Least-in-flight free backend; backends that just failed only when none is up."""
        now = time.monotonic()
        up = [u for u in self.urls if self.down_until[u] <= now] or self.urls
        free = [u for u in up if self.in_flight[u] < self.per_backend]
        return min(free, key=lambda u: self.in_flight[u]) if free else None

    async def acquire(self, timeout_s):
        async with self._cond:
            url = self.pick()
            if url is None:
                if self.waiting >= self.queue_size:
                    raise Overloaded(429, f"queue full ({self.queue_size} waiting): retry later")
                self.waiting += 1
                try:
                    await asyncio.wait_for(self._cond.wait_for(lambda: self.pick() is not None), timeout_s)
                except TimeoutError:
                    raise Overloaded(503, f"no backend slot within {timeout_s:g} s") from None
                finally:
                    self.waiting -= 1
                url = self.pick()
            self.in_flight[url] += 1
            return url

    async def release(self, url, failed: bool):
        async with self._cond:
            self.in_flight[url] -= 1
            self.down_until[url] = time.monotonic() + self.down_s if failed else 0.0
            self._cond.notify_all()


def backend_failure(e: StageError) -> tuple[int, str]:
    """ask's StageError "model endpoint call failed: <Type>: ..." -> (HTTP status, outcome)."""
    import openai
    cause, text = e.__context__, str(e)
    if isinstance(cause, openai.APITimeoutError) or "APITimeoutError" in text:
        return 504, "backend_timeout"
    if isinstance(cause, openai.APIConnectionError) or "APIConnectionError" in text:
        return 503, "backend_unavailable"
    return 502, "backend_error"


# ---- request/response bodies ------------------------------------------------------------------------------------
class RequestContext(Context):
    model_config = ConfigDict(extra="forbid")

    @field_validator("security_filters")
    @classmethod
    def _predicates_parse(cls, filters):
        for f in filters:
            try:
                sqlglot.parse_one(f.predicate, read="oracle")
            except (ParseError, TokenError):
                raise ValueError(f"security filter predicate {f.predicate!r} is not valid Oracle SQL") from None
        return filters


def _not_blank(v: str) -> str:
    if not v.strip():
        raise ValueError("must not be blank")
    return v


NonBlank = Annotated[StrictStr, AfterValidator(_not_blank)]


class SqlRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    question: NonBlank
    context: RequestContext | None = None


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    request_id: StrictStr
    sql: NonBlank


def attempt_summary(a: dict) -> dict:
    v = a["verdict"]
    return {"ok": v["ok"], "codes": v["codes"], "reasons": v["reasons"], "finish_reason": a["finish_reason"],
            "latency_ms": a["latency_ms"]}


def attempt_audit(a: dict) -> dict:
    v = a["verdict"]
    return {"sql": v.get("candidate_sql") or a["raw_output"][:4000], "ok": v["ok"], "codes": v["codes"],
            "reasons": v["reasons"], "finish_reason": a["finish_reason"], "latency_ms": a["latency_ms"]}


# ---- the app ----------------------------------------------------------------------------------------------------
def make_metrics():
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
    reg = CollectorRegistry()
    return reg, {
        "requests": Counter("sql_service_requests", "Requests by route and outcome", ["route", "outcome"],
                            registry=reg),
        "rejections": Counter("sql_service_guardrail_rejections", "Rejected model answers by reason code", ["code"],
                              registry=reg),
        "retries": Counter("sql_service_retries", "Questions that needed the one guarded retry", registry=reg),
        "latency": Histogram("sql_service_request_seconds", "Request latency (whole request, queue included)",
                             ["route"], registry=reg,
                             buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, float("inf"))),
        "queue": Gauge("sql_service_queue_depth", "Requests waiting for a backend slot", registry=reg),
        "in_flight": Gauge("sql_service_backend_in_flight", "Requests in flight per backend", ["backend"],
                           registry=reg),
    }


class Service:
    """Everything loaded once at start-up (catalog, policy, keys, retrieval index, clients, logs)."""

    def __init__(self, cfg: dict):
        import openai
        self.cfg = cfg
        self.catalog = load_catalog(cfg["catalog"])
        self.policy = load_policy(cfg["policy"])
        self.required = required_filters(self.catalog, self.policy)
        self.keys = KeyStore(cfg["keys_file"])
        self.audit = JsonlAppender(cfg["audit_log"])
        self.feedback = JsonlAppender(cfg["feedback_out"]) if cfg["feedback_out"] else None
        self.retrieval = load_retrieval(cfg) if cfg["schema"] else None
        api_key = os.environ.get(cfg["backend_api_key_env"]) or "EMPTY"
        self.clients = {u: openai.OpenAI(base_url=u, api_key=api_key, timeout=cfg["backend_timeout_s"], max_retries=0)
                        for u in cfg["backends"]}
        self.backends = Backends(cfg["backends"], cfg["max_in_flight_per_backend"], cfg["queue_size"],
                                 cfg["backend_down_s"])
        # worker threads: every backend slot plus a few for retrieval / feedback checks
        self.pool = ThreadPoolExecutor(len(cfg["backends"]) * cfg["max_in_flight_per_backend"] + 4,
                                       thread_name_prefix="ask")
        self.recent = collections.OrderedDict()  # request_id -> {user, question, context, scope}
        self.registry, self.m = make_metrics()
        self.m["queue"].set_function(lambda: self.backends.waiting)
        for u in self.backends.urls:
            self.m["in_flight"].labels(u).set_function(lambda u=u: self.backends.in_flight[u])

    def close(self):
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.audit.close()
        if self.feedback:
            self.feedback.close()

    def remember(self, request_id, record):
        self.recent[request_id] = record
        while len(self.recent) > self.cfg["feedback_window"]:
            self.recent.popitem(last=False)

    def ask_scoped(self, url, question, context, scope):
        """ask() (prompt -> model -> guardrail -> one retry), then the accepted query once more against the caller's
        whole scope: every required filter of the catalog, a table the context did not name included."""
        result = ask(url, self.cfg["model"], question, context, self.catalog, self.policy,
                     max_tokens=self.cfg["max_tokens"], timeout=self.cfg["backend_timeout_s"], client=self.clients[url])
        scoped = check_sql(result["sql"], catalog=self.catalog, policy=self.policy,
                           security_filters=scope) if result["ok"] else None
        return result, scoped


def load_retrieval(cfg):
    """Question-time retrieval (retrieve_context.py, the same builder training data used): the schema index built
    once; the tokenizer (or, without one, a conservative byte estimate) bounds the rendered prompt."""
    import retrieve_context
    index = retrieve_context.build_index(retrieve_context.load_schema(cfg["schema"]))
    tokenizer = retrieve_context.load_tokenizer(cfg["tokenizer"]) if cfg["tokenizer"] else None
    return lambda question: retrieve_context.retrieve(index, question, tokenizer, cfg["max_context_tokens"])


def error_response(status, message, headers=None, **extra):
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


UNAUTHORIZED = "missing or invalid API key (Authorization: Bearer <key>)"
ROUTES = ("/v1/sql", "/v1/feedback", "/metrics", "/openapi.json")  # metric labels: anything else is "other"


def caller_of(request: Request) -> Caller | None:
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        return None
    return request.app.state.service.keys.lookup(key.strip())


async def authenticate(request: Request) -> Caller:
    """The router's dependency: the caller the middleware authenticated before anything else (the body is not
    even parsed for an unknown caller); a route on the router cannot be reached without one."""
    caller = getattr(request.state, "caller", None)
    if caller is None:
        raise HTTPException(401, UNAUTHORIZED, headers={"WWW-Authenticate": "Bearer"})
    return caller


api = APIRouter(dependencies=[Depends(authenticate)])  # every route on it is behind the key


@api.post("/v1/sql")
async def sql_route(body: SqlRequest, request: Request, caller: Caller = Depends(authenticate)):
    svc: Service = request.app.state.service
    cfg, audit, request_id = svc.cfg, request.state.audit, request.state.request_id
    if len(body.question) > cfg["max_question_chars"]:
        audit.update(outcome="bad_request", question_chars=len(body.question))
        raise HTTPException(413, f"question is {len(body.question)} characters > {cfg['max_question_chars']}")
    audit["question"] = body.question
    loop = asyncio.get_running_loop()
    if body.context is not None:
        context, source = body.context.model_dump(), "request"
    elif svc.retrieval is not None:
        try:
            context, source = await loop.run_in_executor(svc.pool, svc.retrieval, body.question), "retrieval"
        except StageError as e:  # e.g. "no relevant tables for this question": the question's problem, not ours
            audit.update(outcome="no_context", error=str(e))
            raise HTTPException(422, f"retrieval: {e}") from None
    else:
        audit["outcome"] = "bad_request"
        raise HTTPException(422, "no context in the request and no schema configured for retrieval")
    context = scoped_context(context, svc.required)
    scope = merge_filters(svc.required, context["security_filters"])
    audit.update(context_source=source, context_sha256=sha256_hex(json.dumps(context, sort_keys=True)))
    svc.remember(request_id, {"user": caller.user, "question": body.question, "context": context, "scope": scope})

    try:
        url = await svc.backends.acquire(cfg["queue_timeout_s"])
    except Overloaded as e:
        audit["outcome"] = "overloaded" if e.status == 429 else "queue_timeout"
        raise HTTPException(e.status, str(e), headers={"Retry-After": str(int(cfg["retry_after_s"]))}) from None
    audit["backend"] = url
    failed = True
    try:
        result, scoped = await loop.run_in_executor(svc.pool, svc.ask_scoped, url, body.question, context, scope)
        failed = False
    except StageError as e:
        if not str(e).startswith("model endpoint call failed"):
            failed = False  # not the backend's fault: a 500 in the audit log, no traceback in the response
            raise
        status, outcome = backend_failure(e)
        audit.update(outcome=outcome, error=str(e))
        headers = {"Retry-After": str(int(cfg["retry_after_s"]))} if status == 503 else None
        raise HTTPException(status, f"model backend: {e}", headers=headers) from None
    finally:
        await svc.backends.release(url, failed)

    final = result["final"]
    ok, reasons, codes = result["ok"], list(final["reasons"]), list(final["codes"])
    if scoped is not None and not scoped["ok"]:
        ok, reasons, codes = False, scoped["reasons"], scoped["codes"]
    for verdict in [a["verdict"] for a in result["attempts"]] + ([scoped] if scoped else []):
        for code in verdict["codes"]:
            svc.m["rejections"].labels(code).inc()
    if result["retried"]:
        svc.m["retries"].inc()
    sql = result["sql"] if ok else None
    names = bind_names(sql, final) if ok else []
    audit.update(outcome="ok" if ok else "rejected", attempts=[attempt_audit(a) for a in result["attempts"]],
                 sql=sql, codes=codes, model_latency_ms=result["latency_ms"])
    return {"ok": ok, "sql": sql, "reasons": reasons, "codes": codes, "request_id": request_id,
            "binds": {"org_ids": list(caller.org_ids)} if "org_ids" in names else {}, "bind_names": names,
            "retried": result["retried"], "attempts": [attempt_summary(a) for a in result["attempts"]],
            "context_source": source}


@api.post("/v1/feedback")
async def feedback_route(body: FeedbackRequest, request: Request, caller: Caller = Depends(authenticate)):
    svc: Service = request.app.state.service
    audit = request.state.audit
    audit.update(feedback_for=body.request_id, sql=body.sql)
    rec = svc.recent.get(body.request_id)
    if svc.feedback is None or rec is None or rec["user"] != caller.user:  # another user's request looks unknown
        audit["outcome"] = "not_found"
        raise HTTPException(404, "unknown or expired request_id for this user" if svc.feedback else
                            "feedback is not configured (feedback_out)")
    verdict = await asyncio.get_running_loop().run_in_executor(
        svc.pool, lambda: check_sql(body.sql, catalog=svc.catalog, policy=svc.policy, security_filters=rec["scope"]))
    if not verdict["ok"]:
        audit.update(outcome="rejected", codes=verdict["codes"])
        return error_response(422, "the guardrail rejected this SQL", reasons=verdict["reasons"],
                              codes=verdict["codes"], request_id=request.state.request_id)
    record = {"id": f"feedback-{body.request_id}", "question": rec["question"], "sql": verdict["sql"],
              "context": rec["context"], "tags": ["feedback"], "source": "feedback", "user": caller.user,
              "request_id": body.request_id, "time": now_iso()}
    RawRecord.model_validate(record)  # the builder's own input schema: the next `make dataset` reads it
    svc.feedback.append(record)
    audit["outcome"] = "ok"
    return {"ok": True, "request_id": request.state.request_id, "feedback_id": record["id"]}


@api.get("/metrics")
async def metrics_route(request: Request):
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    request.state.audit["outcome"] = "ok"
    return PlainTextResponse(generate_latest(request.app.state.service.registry), media_type=CONTENT_TYPE_LATEST)


@api.get("/openapi.json", include_in_schema=False)
async def openapi_route(request: Request):
    request.state.audit["outcome"] = "ok"
    return request.app.openapi()


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def create_app(cfg: dict) -> FastAPI:
    svc = Service(cfg)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        svc.close()

    app = FastAPI(title="Oracle EBS guarded SQL service", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    app.state.service = svc

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    app.include_router(api)

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, e: RequestValidationError):
        errors = e.errors()
        request.state.audit["outcome"] = "bad_request"
        if any(err.get("type") == "json_invalid" for err in errors):
            return error_response(400, "request body is not valid JSON")
        return error_response(422, "invalid request body", detail=[
            {"loc": [str(x) for x in err.get("loc", ())], "msg": err.get("msg", "")} for err in errors])

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return error_response(e.status_code, e.detail, headers=e.headers)

    @app.middleware("http")
    async def audit_and_limits(request: Request, call_next):
        if request.url.path == "/health":
            return await call_next(request)
        t0 = time.perf_counter()
        request_id = uuid.uuid4().hex
        request.state.request_id = request_id
        request.state.audit = audit = {"time": now_iso(), "request_id": request_id, "method": request.method,
                                       "route": request.url.path[:200], "user": None}
        status = 500
        try:
            response, caller = None, caller_of(request)
            if caller is None:  # deny by default: every path but /health, known or not
                audit["outcome"] = "unauthorized"
                response = error_response(401, UNAUTHORIZED, headers={"WWW-Authenticate": "Bearer"})
            else:
                request.state.caller = caller
                audit.update(user=caller.user, org_ids=list(caller.org_ids))
            if response is None and request.method == "POST":
                length = request.headers.get("content-length")
                if length is None:
                    response = error_response(411, "Content-Length required")
                elif not length.isdigit() or int(length) > cfg["max_body_bytes"]:
                    response = error_response(413, f"request body over {cfg['max_body_bytes']} bytes")
                elif request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
                    response = error_response(415, "Content-Type must be application/json")
                if response is not None:
                    audit["outcome"] = "bad_request"
            if response is None:
                response = await call_next(request)
            status = response.status_code
            response.headers["X-Request-ID"] = request_id
            return response
        finally:
            elapsed = time.perf_counter() - t0
            audit.setdefault("outcome", "not_found" if status == 404 else "error" if status >= 500 else "other")
            audit.update(status=status, latency_ms=round(elapsed * 1000, 1))
            route = request.url.path if request.url.path in ROUTES else "other"
            svc.m["latency"].labels(route).observe(elapsed)
            try:
                svc.audit.append(audit)
            except OSError as e:  # disk full, log removed read-only...: no answer leaves without its audit line
                svc.m["requests"].labels(route, "audit_failed").inc()
                return error_response(503, f"audit log unavailable ({e.strerror or type(e).__name__}): "  # noqa: B012
                                           "the service answers nothing it cannot audit")
            svc.m["requests"].labels(route, audit["outcome"]).inc()

    return app


# ---- CLI --------------------------------------------------------------------------------------------------------
def build_parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="service YAML (service_config.yaml shows every key)")
    ap.add_argument("--host", help="bind address (default: the config's host, else 127.0.0.1)")
    ap.add_argument("--port", type=int, help="port (default: the config's port)")
    ap.add_argument("--backend", action="append", help="vLLM base URL (repeatable); replaces the config's backends")
    ap.add_argument("--keys_file", help="keys YAML (replaces the config's keys_file)")
    ap.add_argument("--audit_log", help="audit JSONL (replaces the config's audit_log)")
    ap.add_argument("--feedback_out", help="feedback raw JSONL (replaces the config's feedback_out)")
    ap.add_argument("--tokenizer", help="model folder for retrieval's token count (replaces the config's tokenizer)")
    ap.add_argument("--start_vllm", metavar="MODEL_DIR",
                    help="first start vLLM on this model through serve.py (capacity plan, loopback, free port) and "
                         "use it as the only backend; it is stopped when the service stops")
    ap.add_argument("--vllm_config", default=str(HERE / "vllm_config_cpu.yaml"),
                    help="vLLM YAML for --start_vllm (default: vllm_config_cpu.yaml)")
    ap.add_argument("--vllm_log", default=None, help="vLLM log file for --start_vllm (default: beside the audit log)")
    return ap


def main(argv=None) -> int:
    import stage_env  # offline flags and caches as `make` sets them, without overriding the user's
    stage_env.apply()
    args = build_parser().parse_args(argv)
    # our own lines only: third-party loggers (bm25s logs its index build at DEBUG) keep Python's WARNING default
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s sql_service %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    overrides = {"host": args.host, "port": args.port, "backends": args.backend, "keys_file": args.keys_file,
                 "audit_log": args.audit_log, "feedback_out": args.feedback_out, "tokenizer": args.tokenizer}
    with contextlib.ExitStack() as stack:
        try:
            if args.start_vllm:
                from serve import running_server
                cfg0 = load_config(args.config, {**overrides, "backends": ["http://placeholder"]})
                vlog = Path(args.vllm_log or Path(cfg0["audit_log"]).parent / "vllm.log")
                vlog.parent.mkdir(parents=True, exist_ok=True)
                print(f"sql_service: starting vLLM on {args.start_vllm} (log: {vlog}) ...", file=sys.stderr,
                      flush=True)
                srv = stack.enter_context(running_server(args.start_vllm, args.vllm_config, vlog))
                overrides.update(backends=[srv["base_url"] + "/v1"], model=srv["model"])
            cfg = load_config(args.config, overrides)
            app = create_app(cfg)
        except StageError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        import uvicorn
        svc = app.state.service
        print(f"sql_service: http://{cfg['host']}:{cfg['port']} -> {len(cfg['backends'])} backend(s) "
              f"{cfg['backends']}, model {cfg['model']}, {len(svc.keys.entries)} key(s), "
              f"{cfg['max_in_flight_per_backend']} in flight per backend, queue {cfg['queue_size']}, retrieval "
              f"{'on' if svc.retrieval else 'off'}; audit -> {cfg['audit_log']}", file=sys.stderr, flush=True)
        uvicorn.run(app, host=cfg["host"], port=cfg["port"], log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
