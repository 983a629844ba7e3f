"""The tiny LLaMA-3 stand-in behaves like LLaMA-3.3-70B-Instruct where the pipeline depends on it."""
import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from conftest import PKG
import make_tiny_llama

SPECIALS = {"<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
            "<|finetune_right_pad_id|>", "<|eom_id|>", "<|python_tag|>"}


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_special_tokens_and_bos_post_processor(tok):
    vocab = tok.get_vocab()
    assert SPECIALS <= vocab.keys()
    # like Meta's: the 256 special ids sit at the end of the vocabulary, in Meta's order
    assert vocab["<|begin_of_text|>"] == len(tok) - 256 and vocab["<|eot_id|>"] == len(tok) - 256 + 9
    assert tok.bos_token == "<|begin_of_text|>" and tok.eos_token == "<|eot_id|>" and tok.pad_token is None
    ids = tok("SELECT 1 FROM DUAL")["input_ids"]
    assert ids[0] == vocab["<|begin_of_text|>"] and ids.count(ids[0]) == 1
    assert tok.decode(ids, skip_special_tokens=True) == "SELECT 1 FROM DUAL"


def test_llama33_chat_template(tok):
    msgs = [{"role": "user", "content": " How many invoices? "}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: "
                    "December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>"
                    "\n\nHow many invoices?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)["input_ids"]
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id


def test_model_is_a_small_llama_with_gqa(tiny_model_dir, tok):
    cfg = AutoConfig.from_pretrained(tiny_model_dir)
    assert cfg.architectures == ["LlamaForCausalLM"] and cfg.num_key_value_heads < cfg.num_attention_heads
    assert cfg.hidden_size % 128 == 0 and cfg.intermediate_size % 128 == 0 and not cfg.tie_word_embeddings
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.dtype == torch.bfloat16 and model.config.vocab_size == len(tok)
    ids = tok.apply_chat_template([{"role": "user", "content": "x"}], return_tensors="pt", tokenize=True,
                                  add_generation_prompt=True)["input_ids"]
    assert model(ids).logits.shape == (1, ids.shape[1], len(tok))


@pytest.mark.slow
def test_pretraining_corpus_never_holds_holdout_sql(tiny_model_dir, demo_dataset):
    info = json.loads((tiny_model_dir / "tiny_fixture.json").read_text())
    train = json.loads(demo_dataset["train"].read_text())
    holdout_sql = {r["sql"] for r in json.loads(demo_dataset["holdout"].read_text())}
    corpus_sql = make_tiny_llama.training_sql(PKG / "demo" / "raw_questions.jsonl", info["holdout_fraction"],
                                              info["split_seed"])
    assert set(corpus_sql) == {r["sql"] for r in train} and not set(corpus_sql) & holdout_sql
    assert info["demo_train_sql_in_corpus"] == len(corpus_sql)


def test_synthetic_sql_passes_the_guardrail():
    import sql_guardrail as g
    schema = json.loads((PKG / "demo" / "ebs_schema.json").read_text())
    for q, ctx, sql in make_tiny_llama.synthetic_pairs(schema, 300, seed=3):
        catalog = {t["name"]: {c["name"]: c["type"] for c in t["columns"]} for t in ctx["tables"]}
        v = g.check_sql(sql, catalog=catalog, security_filters=ctx["security_filters"])
        assert v["ok"], (sql, v["reasons"])


@pytest.mark.slow  # builds two (small) models: tokenizer training + pre-training steps, ~25 s
def test_reuse_skips_a_build_from_the_same_inputs_and_rebuilds_on_a_change(tmp_path):
    """`make tiny` passes --reuse: a prerequisite touched without changing the corpus costs seconds; any input
    change (here the seed) builds again. Small settings: the decision is under test, not the model."""
    import subprocess
    import sys
    out = tmp_path / "tiny"
    small = ["--out", str(out), "--vocab_size", "512", "--pretrain_steps", "2", "--sql_repeats", "1", "--force",
             "--reuse"]

    def build(*extra):
        r = subprocess.run([sys.executable, str(PKG / "demo" / "make_tiny_llama.py"), *small, *extra],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout

    assert "tiny llama:" in build()
    weights, fixture = (out / "model.safetensors").stat().st_mtime_ns, json.loads((out / "tiny_fixture.json").read_text())
    config_mtime = (out / "config.json").stat().st_mtime_ns
    assert "up to date (same inputs" in build()
    assert (out / "model.safetensors").stat().st_mtime_ns == weights
    assert (out / "config.json").stat().st_mtime_ns > config_mtime  # make's target is fresh again
    assert "tiny llama:" in build("--seed", "1")
    assert json.loads((out / "tiny_fixture.json").read_text())["inputs_sha256"] != fixture["inputs_sha256"]
