"""Build the tiny LLaMA-3 stand-in for LLaMA-3.3-70B-Instruct, fully offline.

Same tokenizer *shape* as Meta's (byte-level BPE, Llama-3 pre-tokenizer regex, the real special tokens at the
end of the vocabulary, a post-processor that adds <|begin_of_text|>, the Llama-3.3-Instruct chat template) and the
same architecture (LlamaForCausalLM with GQA, untied lm_head, bf16 weights), only small: every stage of the
70B pipeline runs on it unchanged. It is briefly pre-trained as a plain language model on schema-derived EBS text,
template-made SQL and the SQL text of the demo TRAINING records (the same hash split as the dataset builder, so
holdout SQL is never seen). It never sees a question paired with its SQL: mapping questions to SQL is what the LoRA
stage has to learn, the way Llama-3.3 knows SQL but not your EBS questions.

    python custom_oracle_llama/demo/make_tiny_llama.py --out .cache/tiny-llama
"""
import argparse
import hashlib
import json
import math
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from artifacts import StageError, atomic_dir, library_versions, sha256_file  # noqa: E402
from prompting import render_user_prompt  # noqa: E402

# Meta's Llama-3 split regex (tiktoken cl100k-style), so words/numbers/punctuation split like the real tokenizer.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
NUM_SPECIAL = 256  # Llama-3 reserves 256 special ids at the end of the vocabulary
NAMED_SPECIAL = {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 4: "<|finetune_right_pad_id|>",
                 6: "<|start_header_id|>", 7: "<|end_header_id|>", 8: "<|eom_id|>", 9: "<|eot_id|>",
                 10: "<|python_tag|>"}

# Architecture: hidden and intermediate are multiples of 128 so W4A16 group-128 quantization applies to every
# linear; head_dim 64 is a size vLLM's CPU attention supports; 4 query heads share 2 KV heads (GQA, like 64/8).
# 8192 positions = the production max-model-len and training length, so seed-size prompts run end to end. RoPE has
# no learned position weights: this number changes config.json only, never the built weights.
CONFIG = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=64, max_position_embeddings=8192, rope_theta=500000.0,
              rms_norm_eps=1e-5, tie_word_embeddings=False, hidden_act="silu")


def special_tokens() -> list[str]:
    reserved = iter(range(NUM_SPECIAL))
    out = []
    for i in range(NUM_SPECIAL):
        out.append(NAMED_SPECIAL.get(i) or f"<|reserved_special_token_{next(reserved)}|>")
    return out


# Generic Oracle SQL vocabulary (keywords, functions, idioms): what a real pre-training corpus would teach.
SQL_PHRASES = """SELECT DISTINCT FROM WHERE AND OR NOT IN EXISTS BETWEEN LIKE IS NULL IS NOT NULL GROUP BY ORDER BY
HAVING DESC ASC JOIN LEFT JOIN INNER JOIN ON UNION ALL WITH AS CASE WHEN THEN ELSE END COUNT(*) COUNT(DISTINCT SUM(
AVG( MIN( MAX( ROUND( NVL( DECODE( TRUNC(SYSDATE) TRUNC( TO_CHAR( TO_DATE( TO_NUMBER( ADD_MONTHS(SYSDATE, -1)
MONTHS_BETWEEN( UPPER( LOWER( SUBSTR( LISTAGG( RANK() OVER (PARTITION BY ROW_NUMBER() OVER (ORDER BY
FETCH FIRST 10 ROWS ONLY FETCH FIRST 5 ROWS ONLY ROWNUM <= 10 SYSDATE - 30 (+) IN (:org_ids) = 'Y' = 'N'
'YYYY-MM' 'MON-YY' > 0 >= <= <> 1 2 3 10 100 1000""".split("\n")


def schema_corpus(schema: dict, seed: int = 0) -> list[str]:
    """Plain text and simple SQL derived from the schema only (no demo question/SQL pairs)."""
    rng = random.Random(seed)
    texts = SQL_PHRASES * 20
    tables = schema["tables"]
    for name, t in tables.items():
        cols = list(t["columns"])
        texts.append(f"{name}: {t.get('description', '')}")
        texts += [f"  - {c} {v['type']}: {v.get('description', '')}" for c, v in t["columns"].items()]
        for _ in range(6):
            pick = rng.sample(cols, k=min(len(cols), rng.randint(1, 4)))
            where = ""
            if name in schema.get("security_filters", {}):
                where = f" WHERE A.{schema['security_filters'][name]['column']} IN (:org_ids)"
            texts.append(f"SELECT {', '.join('A.' + c for c in pick)} FROM {name} A{where}")
    for j in schema.get("joins", []):
        texts.append(f"- {j}")
    # The prompt's fixed wording (rules, section headers) around one table's context, no question/SQL pairs.
    for name, t in tables.items():
        context = {"tables": [{"name": name, "description": t.get("description", ""),
                               "columns": [{"name": c, **v} for c, v in t["columns"].items()]}]}
        texts.append(render_user_prompt("?", context))
    for term, target in schema.get("synonyms", {}).items():
        texts.append(f"- {term} = {target}")
    texts += [sql for _, _, sql in synthetic_pairs(schema, 1000, seed)]
    return texts


def alias_of(table: str) -> str:
    alias = "".join(w[0] for w in table.split("_") if w != "ALL")[:3]
    return alias + "1" if alias in {"AS", "AT", "BY", "IN", "IS", "OF", "ON", "OR", "TO"} else alias


def synthetic_pairs(schema: dict, n: int, seed: int) -> list[tuple[str, dict, str]]:
    """(question, context, SQL) made from the schema alone by templates; the SQL goes into the pre-training
    corpus so the base knows Oracle SQL over these tables. Never the demo question/SQL pairs: those are what
    LoRA has to learn."""
    rng = random.Random(seed)
    tables, filters = schema["tables"], schema.get("security_filters", {})
    edges = [tuple(side.strip().split(".") for side in j.split("=")) for j in schema.get("joins", [])]

    def words(col):
        return col.lower().replace("_", " ")

    def ctx(used: dict[str, list[str]]):
        out = {"tables": [], "joins": [], "security_filters": []}
        for t, cols in used.items():
            keep = [c for c in tables[t]["columns"] if c in cols or rng.random() < 0.3]
            out["tables"].append({"name": t, "description": tables[t].get("description", ""),
                                  "columns": [{"name": c, **tables[t]["columns"][c]} for c in keep]})
            if t in filters:
                out["security_filters"].append({"table": t, **filters[t]})
        out["joins"] = [f"{a[0]}.{a[1]} = {b[0]}.{b[1]}" for a, b in edges if a[0] in used and b[0] in used]
        return out

    def where(parts):
        return " WHERE " + " AND ".join(parts) if parts else ""

    out = []
    while len(out) < n:
        t = rng.choice(sorted(tables))
        a, cols = alias_of(t), list(tables[t]["columns"])
        typed = {k: [c for c in cols if tables[t]["columns"][c]["type"].startswith(k)] for k in ("NUM", "VARC", "DATE")}
        sec = [f"{a}.{filters[t]['column']} IN (:org_ids)"] if t in filters else []
        kind = rng.randrange(5)
        if kind == 0:
            pick = rng.sample(cols, k=min(len(cols), rng.randint(1, 3)))
            q = f"Show the {' and '.join(words(c) for c in pick)} of {t.lower()}"
            sql = f"SELECT {', '.join(f'{a}.{c}' for c in pick)} FROM {t} {a}{where(sec)}"
        elif kind == 1 and typed["NUM"] and typed["VARC"]:
            g, m = rng.choice(typed["VARC"]), rng.choice(typed["NUM"])
            pick = [g, m]
            q = f"Total {words(m)} by {words(g)} in {t.lower()}"
            sql = (f"SELECT {a}.{g}, SUM({a}.{m}) AS TOTAL FROM {t} {a}{where(sec)} GROUP BY {a}.{g} "
                   "ORDER BY TOTAL DESC")
        elif kind == 2 and typed["DATE"]:
            d, c = rng.choice(typed["DATE"]), rng.choice(cols)
            pick, days = [d, c], rng.choice([7, 30, 90])
            q = f"List {words(c)} of {t.lower()} with {words(d)} in the last {days} days"
            sql = f"SELECT {a}.{c} FROM {t} {a}{where([f'{a}.{d} >= TRUNC(SYSDATE) - {days}'] + sec)}"
        elif kind == 3 and typed["NUM"]:
            m, c, k = rng.choice(typed["NUM"]), rng.choice(cols), rng.choice([5, 10, 20])
            pick = [m, c]
            q = f"Top {k} {t.lower()} by {words(m)}"
            sql = (f"SELECT {a}.{c}, {a}.{m} FROM {t} {a}{where(sec)} ORDER BY {a}.{m} DESC "
                   f"FETCH FIRST {k} ROWS ONLY")
        else:
            linked = [e for e in edges if t in (e[0][0], e[1][0]) and e[0][0] != e[1][0]]
            if not linked:
                continue
            (t1, k1), (t2, k2) = rng.choice(linked)
            a1, a2 = alias_of(t1), alias_of(t2)
            if a1 == a2:
                a2 += "2"
            c1, c2 = rng.choice(list(tables[t1]["columns"])), rng.choice(list(tables[t2]["columns"]))
            conds = [f"{al}.{filters[tb]['column']} IN (:org_ids)" for tb, al in ((t1, a1), (t2, a2)) if tb in filters]
            q = f"List {words(c1)} of {t1.lower()} with {words(c2)} of {t2.lower()}"
            sql = (f"SELECT {a1}.{c1}, {a2}.{c2} FROM {t1} {a1} JOIN {t2} {a2} ON {a1}.{k1} = {a2}.{k2}"
                   f"{where(conds)}")
            out.append((q, ctx({t1: [c1, k1] + [filters.get(t1, {}).get("column")],
                                t2: [c2, k2] + [filters.get(t2, {}).get("column")]}), sql))
            continue
        out.append((q, ctx({t: pick + ([filters[t]["column"]] if t in filters else [])}), sql))
    return out


def training_sql(raw_path: Path, holdout_fraction: float, seed: int) -> list[str]:
    """SQL text of the demo records the dataset builder will put in the TRAIN split: the builder's own split_key and
    hashed_side, same seed (the guardrail's normalized_sql keeps comments and quoted case: another grouping)."""
    from dataset_records import hashed_side, split_key

    out = []
    for line in raw_path.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        sql = rec.get("sql") or rec.get("sql_gold")
        side = rec.get("split") or hashed_side(split_key(sql), holdout_fraction, seed)
        if side == "train":
            out.append(sql)
    return out


def train_tokenizer(corpus: list[str], vocab_size: int):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - NUM_SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(corpus, trainer)
    tok.add_special_tokens(special_tokens())
    bos = "<|begin_of_text|>"
    # Meta's post-processor: BOS in front of every sequence (also why rendered chat text must not be re-tokenized
    # with special tokens: the chat template already starts with BOS).
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                      special_tokens=[(bos, tok.token_to_id(bos))])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token="<|eot_id|>",
                                   model_input_names=["input_ids", "attention_mask"],
                                   clean_up_tokenization_spaces=True, model_max_length=131072)
    fast.chat_template = (HERE / "llama3_chat_template.jinja").read_text(encoding="utf-8")
    return fast


def pretrain(model, tokenizer, corpus: list[str], steps: int, seed: int):
    """A few hundred causal-LM steps so the base is a language model of EBS text before LoRA."""
    import torch
    from tqdm import tqdm

    torch.manual_seed(seed)
    rng = random.Random(seed)
    ids = [tokenizer(t)["input_ids"] + [tokenizer.convert_tokens_to_ids("<|end_of_text|>")] for t in corpus]
    stream = [i for seq in ids for i in seq]
    block, batch = 128, 16
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    # 5% warm-up, then cosine decay to zero: the low-LR tail is what makes the corpus stick.
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    model.train()
    losses = []
    for _ in tqdm(range(steps), desc="pre-train tiny llama", unit="step", disable=None):
        starts = [rng.randrange(0, max(1, len(stream) - block - 1)) for _ in range(batch)]
        x = torch.tensor([stream[s:s + block] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def build_inputs(corpus: list[str], args) -> dict:
    """Everything the built model depends on, hashed: same inputs -> the same model (seeded, single process)."""
    inputs = {"corpus_sha256": hashlib.sha256("\0".join(corpus).encode()).hexdigest(), "config": CONFIG,
              "vocab_size": args.vocab_size, "pretrain_steps": args.pretrain_steps, "seed": args.seed,
              "script_sha256": sha256_file(__file__),
              "chat_template_sha256": sha256_file(HERE / "llama3_chat_template.jinja"),
              "versions": library_versions("torch", "transformers", "tokenizers")}
    return {**inputs, "sha256": hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()}


def built_from(out: Path, inputs: dict) -> bool:
    try:
        fixture = json.loads((out / "tiny_fixture.json").read_text())
    except (OSError, ValueError):
        return False
    return fixture.get("inputs_sha256") == inputs["sha256"] and (out / "model.safetensors").is_file()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output model directory (created atomically)")
    ap.add_argument("--schema", default=str(HERE / "ebs_schema.json"), help="EBS schema JSON the corpus is made from")
    ap.add_argument("--demo_raw", default=str(HERE / "raw_questions.jsonl"),
                    help="demo raw records: the SQL text of their train split joins the pre-training corpus")
    ap.add_argument("--holdout_fraction", type=float, default=0.1,
                    help="must equal the dataset builder's --holdout_fraction (holdout SQL stays unseen)")
    ap.add_argument("--split_seed", type=int, default=0, help="must equal the dataset builder's --seed")
    ap.add_argument("--vocab_size", type=int, default=4096, help="total vocabulary incl. 256 special tokens")
    ap.add_argument("--sql_repeats", type=int, default=12,
                    help="copies of each TRAIN-split SQL text in the LM corpus (text only, never the question)")
    ap.add_argument("--pretrain_steps", type=int, default=800, help="causal-LM steps on the schema corpus (0 = none)")
    ap.add_argument("--seed", type=int, default=0, help="seed for weights, corpus sampling and pre-training")
    ap.add_argument("--force", action="store_true", help="replace an existing --out directory")
    ap.add_argument("--reuse", action="store_true",
                    help="keep --out when it was built from the same inputs (corpus, architecture, settings, this "
                         "script, chat template, library versions: inputs_sha256 in tiny_fixture.json); `make tiny` "
                         "uses it, so an edit to a shared file that leaves the corpus alone costs seconds, not minutes")
    args = ap.parse_args(argv)
    try:
        import torch
        from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

        schema_path = Path(args.schema)
        if not schema_path.is_file():
            raise StageError(f"schema not found: {schema_path}")
        schema = json.loads(schema_path.read_text(encoding="utf-8"))
        corpus = schema_corpus(schema, args.seed)
        demo_sql = training_sql(Path(args.demo_raw), args.holdout_fraction, args.split_seed) if args.demo_raw else []
        corpus += demo_sql * args.sql_repeats
        inputs = build_inputs(corpus, args)
        if args.reuse and built_from(Path(args.out), inputs):
            (Path(args.out) / "config.json").touch()  # up to date for make: its prerequisites changed, not the model
            print(f"tiny llama up to date (same inputs {inputs['sha256'][:12]}): {args.out}")
            return 0
        tokenizer = train_tokenizer(corpus, args.vocab_size)
        bos, eot, eot_text = (tokenizer.convert_tokens_to_ids(t)
                              for t in ("<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>"))
        eom = tokenizer.convert_tokens_to_ids("<|eom_id|>")
        torch.manual_seed(args.seed)
        config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=bos, eos_token_id=[eot_text, eom, eot],
                             **CONFIG)
        model = LlamaForCausalLM(config)
        losses = pretrain(model, tokenizer, corpus, args.pretrain_steps, args.seed) if args.pretrain_steps else []
        model = model.to(torch.bfloat16)
        with atomic_dir(args.out, force=args.force) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            # Same sampling defaults as Meta's generation_config.json; eos = all three stop tokens.
            GenerationConfig(bos_token_id=bos, eos_token_id=[eot_text, eom, eot], do_sample=True,
                             temperature=0.6, top_p=0.9).save_pretrained(tmp)
            (tmp / "tiny_fixture.json").write_text(json.dumps({
                "purpose": "tiny LLaMA-3 stand-in for LLaMA-3.3-70B-Instruct (tests and demo only)",
                "schema_sha256": sha256_file(schema_path), "seed": args.seed, "vocab_size": len(tokenizer),
                "demo_raw_sha256": sha256_file(args.demo_raw) if args.demo_raw else None,
                "demo_train_sql_in_corpus": len(demo_sql), "sql_repeats": args.sql_repeats,
                "holdout_fraction": args.holdout_fraction,
                "split_seed": args.split_seed,
                "pretrain_steps": args.pretrain_steps, "inputs_sha256": inputs["sha256"],
                "pretrain_loss_first_last": [losses[0], losses[-1]] if losses else None,
                "parameters": sum(p.numel() for p in model.parameters())}, indent=2) + "\n")
        n = sum(p.numel() for p in model.parameters())
        loss = f", pre-train loss {losses[0]:.2f} -> {losses[-1]:.2f}" if losses else ""
        print(f"tiny llama: {n / 1e6:.2f}M params, vocab {len(tokenizer)}{loss} -> {args.out}")
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
