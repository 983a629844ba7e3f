"""The seed's real prompt sizes at max_model_len 8192 (issue 17): RAG prompts of 6,500-16,000 characters, a full-schema
context, up to 512 output tokens. The builder's token budget is exact at that length, a LoRA step runs at it, and vLLM
(CPU YAML, max-model-len 8192) answers 4 such prompts at once without preemption and with stable memory."""
import json
import subprocess
import sys
import threading

import httpx
import pytest
import yaml

from conftest import PKG, ROOT
from serving import CPU_YAML, tree_rss
from dataset_records import apply_token_limits, chat_texts, count_tokens, sft_record
from prompting import chat_messages

SCHEMA = json.loads((PKG / "demo" / "ebs_schema.json").read_text())
TABLES = list(SCHEMA["tables"])
QUESTION = "How many unpaid invoices does each supplier have?"
SQL = ("SELECT S.VENDOR_NAME, COUNT(*) FROM AP_INVOICES_ALL I, AP_SUPPLIERS S WHERE I.VENDOR_ID = S.VENDOR_ID "
       "AND I.ORG_ID IN (:org_ids) GROUP BY S.VENDOR_NAME")
SEED_CHARS = (6_500, 9_000, 12_000, 16_000)  # the seed's RAG prompt sizes (user turn, characters)
MAX_LEN, MAX_OUT = 8192, 512


def schema_context(names) -> dict:
    """A retrieved-style context: the named demo-schema tables with every column, their joins and MOAC filters."""
    t, filters = SCHEMA["tables"], SCHEMA.get("security_filters", {})
    return {"tables": [{"name": n, "description": t[n].get("description", ""),
                        "columns": [{"name": c, **v} for c, v in t[n]["columns"].items()]} for n in names],
            "joins": [j for j in SCHEMA.get("joins", [])
                      if all(side.strip().split(".")[0] in names for side in j.split("="))],
            "security_filters": [{"table": n, **filters[n]} for n in names if n in filters]}


def seed_size_context(chars: int) -> dict:
    """The fewest demo tables whose rendered user turn reaches `chars` characters."""
    for k in range(1, len(TABLES) + 1):
        ctx = schema_context(TABLES[:k])
        if len(chat_messages(QUESTION, ctx)[0]["content"]) >= chars:
            return ctx
    raise AssertionError(f"the demo schema renders to fewer than {chars} characters")


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_tiny_fixture_has_8192_positions_and_the_cpu_yaml_uses_them(tiny_model_dir):
    assert json.loads((tiny_model_dir / "config.json").read_text())["max_position_embeddings"] == MAX_LEN
    assert yaml.safe_load(CPU_YAML.read_text())["max-model-len"] == MAX_LEN


def test_builder_token_budget_is_exact_at_8192_on_seed_size_contexts(tokenizer):
    """Seed-size retrieved contexts and the full demo schema: the builder's batched count (one Rust pass, prompt
    length from the boundary token) equals apply_chat_template(tokenize=True) to the token, and its limit keeps a
    record of exactly model_max_length tokens and rejects one token more, by name."""
    contexts = [seed_size_context(c) for c in SEED_CHARS] + [schema_context(TABLES)]
    records = [{"id": f"long-{i}", "line": i + 1, "question": QUESTION, "sql": SQL, "context": ctx, "tags": []}
               for i, ctx in enumerate(contexts)]
    sft = [sft_record(r) for r in records]
    full, prompt_chars = chat_texts(tokenizer, sft)
    counts = count_tokens(tokenizer.backend_tokenizer, full, prompt_chars)
    for rec, chars, (total, answer) in zip(sft, [*SEED_CHARS, 20_000], counts):
        assert len(rec["conversations"][0]["content"]) >= chars
        ids = tokenizer.apply_chat_template(rec["conversations"], tokenize=True)["input_ids"]
        prompt = tokenizer.apply_chat_template(rec["conversations"][:1], tokenize=True,
                                               add_generation_prompt=True)["input_ids"]
        assert (total, answer) == (len(ids), len(ids) - len(prompt))
        assert 1_500 < len(prompt) and total + MAX_OUT <= MAX_LEN  # seed-size, and fits 8192 with the output cap
    kept, rejects = apply_token_limits(records, counts, MAX_LEN, MAX_OUT)
    assert len(kept) == len(records) and rejects == []
    biggest = max(t for t, _ in counts)
    kept, rejects = apply_token_limits(records, counts, biggest - 1, MAX_OUT)
    assert [r["reason"] for r in rejects] == ["too_long"]
    assert rejects[0]["detail"] == f"{biggest} tokens > model_max_length {biggest - 1}"
    kept, rejects = apply_token_limits(records, counts, biggest, MAX_OUT)
    assert rejects == [] and max(r["n_tokens"] for r in kept) == biggest


def long_record(tokenizer, target: int) -> dict:
    """A training conversation of just under `target` tokens: the full demo schema, then archive copies of its
    tables (EBS keeps *_ARCHIVE twins) until one more table would pass the target."""
    tables = schema_context(TABLES)["tables"]
    best = None
    for extra in range(len(tables) + 1):
        ctx = schema_context(TABLES)
        ctx["tables"] += [{**t, "name": t["name"] + "_ARCHIVE"} for t in tables[:extra]]
        conv = chat_messages(QUESTION, ctx, answer_sql=SQL)
        n = len(tokenizer.apply_chat_template(conv, tokenize=True)["input_ids"])
        if n > target:
            break
        best = ({"conversations": conv}, n)
    return best


@pytest.mark.slow
def test_lora_step_at_8192(tmp_path, tiny_model_dir, tokenizer):
    """One LoRA step (bf16, gradient checkpointing, as for 70B) on a ~8k-token example through the real entrypoint:
    the example is kept whole (never truncated) and the step produces a finite loss and a verified adapter."""
    record, n_tokens = long_record(tokenizer, MAX_LEN)
    assert MAX_LEN - 600 < n_tokens <= MAX_LEN
    data = tmp_path / "long.json"
    data.write_text(json.dumps([record]))
    out = tmp_path / "adapter"
    r = subprocess.run([sys.executable, str(PKG / "sft_oracle_llama70b_lora.py"), "--model_name_or_path",
                        str(tiny_model_dir), "--data_path", str(data), "--output_dir", str(out),
                        "--model_max_length", str(MAX_LEN), "--max_steps", "1", "--per_device_train_batch_size", "1",
                        "--gradient_accumulation_steps", "1", "--gradient_checkpointing", "True",
                        "--logging_steps", "1", "--save_strategy", "no", "--warmup_steps", "1",
                        "--report_to", "none"],
                       capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = json.loads((out / "training_manifest.json").read_text())
    assert manifest["examples"] == {"train": 1, "dropped_too_long": 0, "eval": 0}
    assert manifest["global_step"] == 1 and 0 < manifest["first_loss"] < 20
    assert manifest["adapter"]["lora_tensors"] == 4 * 7 * 2


def metric(text: str, name: str) -> float:
    """Sum of a Prometheus counter/gauge over its label sets, from vLLM's /metrics text."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


@pytest.mark.slow
def test_vllm_answers_four_seed_size_prompts_at_once_without_preemption(vllm_tiny):
    """4 concurrent requests of 6.5k, 9k, 12k and 16k characters, each generating 512 tokens (ignore_eos: the full
    output cap, the worst case for the KV cache), three rounds: all 200 with 512 tokens, vLLM's own preemption counter
    unchanged, and the server's RSS after round 3 within 64 MiB of round 2 (round 1 warms allocator pools)."""
    server = vllm_tiny
    headers = {"Authorization": f"Bearer {server['api_key']}"} if server.get("api_key") else {}
    prompts = [chat_messages(QUESTION, seed_size_context(c)) for c in SEED_CHARS]

    def one_round() -> list[dict]:
        results = [None] * len(prompts)

        def ask(i):
            r = httpx.post(f"{server['base_url']}/v1/chat/completions", headers=headers, timeout=1200, json={
                "model": server["model"], "messages": prompts[i], "max_tokens": MAX_OUT, "ignore_eos": True,
                "temperature": 0})
            results[i] = {"status": r.status_code, "body": r.json()}

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results

    def metrics() -> str:
        return httpx.get(f"{server['base_url']}/metrics", timeout=30).text

    before = metrics()
    rss = []
    for _ in range(3):
        for res in one_round():
            assert res["status"] == 200, res["body"]
            usage = res["body"]["usage"]
            assert usage["completion_tokens"] == MAX_OUT and 1_500 < usage["prompt_tokens"] <= MAX_LEN - MAX_OUT
        rss.append(tree_rss(server["pid"]))
    after = metrics()
    assert metric(after, "vllm:num_preemptions_total") == metric(before, "vllm:num_preemptions_total")
    assert metric(after, "vllm:request_success_total") - metric(before, "vllm:request_success_total") == 12
    assert rss[2] - rss[1] < 64 * 2**20, [r / 2**20 for r in rss]
