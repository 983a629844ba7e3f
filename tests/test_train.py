"""LoRA SFT: masking/BOS parity with the real tokenizer, bad input, and the real 2-rank DeepSpeed ZeRO-3 run."""
import hashlib
import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import PKG, ROOT
import sft_oracle_llama70b_lora as sft
from prompting import chat_messages

CONTEXT = {"tables": [{"name": "AP_INVOICES_ALL", "columns": [{"name": "INVOICE_ID", "type": "NUMBER"},
                                                            {"name": "ORG_ID", "type": "NUMBER"}]}],
           "security_filters": [{"table": "AP_INVOICES_ALL", "column": "ORG_ID", "predicate": "ORG_ID IN (:org_ids)"}]}
SQL = "SELECT COUNT(*) FROM AP_INVOICES_ALL AI WHERE AI.ORG_ID IN (:org_ids)"


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_masking_labels_only_answer_and_eot(tokenizer):
    conv = chat_messages("How many invoices?", CONTEXT, answer_sql=SQL)
    ex = sft.tokenize_conversation(tokenizer, conv)
    prompt = tokenizer.apply_chat_template(conv[:1], tokenize=True, add_generation_prompt=True)["input_ids"]
    bos, eot = tokenizer.convert_tokens_to_ids(["<|begin_of_text|>", "<|eot_id|>"])
    answer = tokenizer(SQL, add_special_tokens=False)["input_ids"]
    assert ex["input_ids"][:len(prompt)] == prompt          # training prompt ids == inference prompt ids
    assert ex["labels"][:len(prompt)] == [-100] * len(prompt)
    assert ex["labels"][len(prompt):] == answer + [eot]
    assert ex["input_ids"][len(prompt):] == answer + [eot]
    assert ex["input_ids"].count(bos) == 1 and ex["input_ids"][0] == bos


def test_xiyan_style_retokenizing_gives_two_bos(tokenizer):
    """The trap this entrypoint avoids: rendering to text then tokenizing with special tokens doubles the BOS."""
    conv = chat_messages("How many invoices?", CONTEXT, answer_sql=SQL)
    text = tokenizer.apply_chat_template(conv, tokenize=False)
    bos = tokenizer.convert_tokens_to_ids("<|begin_of_text|>")
    assert tokenizer(text)["input_ids"][:2] == [bos, bos]
    assert sft.tokenize_conversation(tokenizer, conv)["input_ids"].count(bos) == 1


def test_multi_turn_masks_every_non_assistant_turn(tokenizer):
    conv = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "SELECT 1 FROM DUAL"},
            {"role": "user", "content": "q2"}, {"role": "assistant", "content": "SELECT 2 FROM DUAL"}]
    ex = sft.tokenize_conversation(tokenizer, conv)
    learned = tokenizer.decode([t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != -100])
    assert learned == "SELECT 1 FROM DUAL<|eot_id|>SELECT 2 FROM DUAL<|eot_id|>"


def test_over_length_example_dropped_not_truncated(tokenizer):
    short = {"conversations": chat_messages("How many invoices?", CONTEXT, answer_sql=SQL)}
    long = {"conversations": chat_messages("How many invoices? " * 400, CONTEXT, answer_sql=SQL)}
    n_short = len(sft.tokenize_conversation(tokenizer, short["conversations"])["input_ids"])
    kept, dropped = sft.tokenize_dataset(tokenizer, [short, long], max_len=n_short)
    assert dropped == 1 and len(kept) == 1 and len(kept[0]["input_ids"]) == n_short


def test_collator_pads_right_with_ignored_labels(tokenizer):
    pad = tokenizer.convert_tokens_to_ids(sft.PAD_TOKEN)
    batch = sft.PadCollator(pad)([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4], "labels": [4]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, pad, pad]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    wide = sft.PadCollator(pad, multiple=4)([{"input_ids": [1, 2, 3, 4, 5], "labels": [-100, 2, 3, 4, 5]}])
    assert wide["input_ids"].tolist() == [[1, 2, 3, 4, 5, pad, pad, pad]]
    assert wide["labels"].tolist() == [[-100, 2, 3, 4, 5, -100, -100, -100]] and wide["attention_mask"].sum() == 5


@pytest.mark.parametrize("bad, message", [
    ("[]", "non-empty JSON list"),
    ("{not json", "not valid JSON"),
    ('[{"conversations": [{"role": "user", "content": "q"}]}]', "ending with an assistant turn"),
])
def test_bad_data_one_line_error(tmp_path, bad, message):
    path = tmp_path / "bad.json"
    path.write_text(bad)
    with pytest.raises(sft.StageError, match=message):
        sft.load_conversations(path)


def run_entrypoint(*args, timeout=300):
    return subprocess.run([sys.executable, str(PKG / "sft_oracle_llama70b_lora.py"), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


REFUSALS = {  # extra flags -> the one error line's reason; each is refused before a model or a tokenizer loads
    "dialect router": (["--enable_dialect_router", "True"], "enable_dialect_router"),
    "q_lora on the bf16 entrypoint": (["--q_lora", "True"], "sft_oracle_llama70b_qlora.py"),
    "non-empty output dir": ([], "is not empty"),
    "missing data": (["--data_path", "{tmp}/nope.json"], "data not found"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_entrypoint_refuses_with_one_line(case, tmp_path, tiny_model_dir, capsys):
    """In process through main(argv), the code path of `python sft_oracle_llama70b_lora.py` (the slow tier runs one
    case as a real process below): exit 2, one `error:` line, and a user's file in the output dir untouched."""
    extra, reason = REFUSALS[case]
    out = tmp_path / "o"
    if case == "non-empty output dir":
        out.mkdir()
        (out / "keep.txt").write_text("user file")
    argv = ["--model_name_or_path", str(tiny_model_dir), "--data_path", "x.json", "--output_dir", str(out),
            *[a.format(tmp=tmp_path) for a in extra]]
    assert sft.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and reason in err and len(err.splitlines()) == 1, err
    if case == "non-empty output dir":
        assert (out / "keep.txt").read_text() == "user file" and sorted(out.iterdir()) == [out / "keep.txt"]


@pytest.mark.slow
def test_entrypoint_refusal_as_a_real_process(tmp_path, tiny_model_dir):
    r = run_entrypoint("--model_name_or_path", str(tiny_model_dir), "--data_path", "x.json",
                       "--output_dir", str(tmp_path / "o"), "--enable_dialect_router", "True")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "enable_dialect_router" in r.stderr
    assert "Traceback" not in r.stderr


# ---- the real 2-process DeepSpeed ZeRO-3 run (session fixture in conftest: `make train`) ----------------------
@pytest.mark.slow
def test_zero3_run_learned_and_partitioned(trained_adapter, tiny_model_dir):
    from safetensors import safe_open
    manifest = json.loads((trained_adapter / "training_manifest.json").read_text())
    assert manifest["world_size"] == 2
    part = manifest["zero3_partition_rank0"]
    with safe_open(str(tiny_model_dir / "model.safetensors"), "pt") as f:
        base = {k: f.get_slice(k).get_shape() for k in f.keys()}
    # ZeRO-3 builds the base already partitioned over the 2 ranks (zero3_init_flag): every base tensor, all of its
    # elements; what rank 0 holds whole is only the LoRA tensors PEFT adds afterwards (measured: 39 of 95 tensors,
    # 3,821,824 of 4,346,112 elements)
    assert part["params"] == len(base) + manifest["adapter"]["lora_tensors"]
    assert part["partitioned_params"] == len(base), "ZeRO-3 did not partition every base weight"
    assert part["total_numel"] - part["numel_on_this_rank_outside_zero"] == sum(math.prod(s) for s in base.values())
    assert manifest["final_loss"] < 0.5 * manifest["first_loss"], manifest
    assert manifest["adapter"]["lora_tensors"] == 4 * 7 * 2     # 4 layers x 7 projections x (A, B)
    assert (trained_adapter / "loss_curve.png").stat().st_size > 1000
    assert manifest["prompt_template_sha256"] and manifest["dataset_manifest_sha256"]
    assert sft.verify_adapter(trained_adapter, manifest["base_model"])["lora_tensors"] == 56


@pytest.mark.slow
def test_verify_adapter_catches_missing_tensor(trained_adapter, tmp_path, tiny_model_dir):
    from safetensors.torch import load_file, save_file
    broken = tmp_path / "broken"
    shutil.copytree(trained_adapter, broken, ignore=shutil.ignore_patterns("checkpoint-*"))
    tensors = load_file(broken / "adapter_model.safetensors")
    tensors.pop(sorted(tensors)[0])
    save_file(tensors, broken / "adapter_model.safetensors")
    with pytest.raises(sft.StageError, match="1 missing"):
        sft.verify_adapter(broken, tiny_model_dir)


def similarity(got: str, gold: str) -> float:
    import difflib
    return difflib.SequenceMatcher(None, got, gold).ratio()


@pytest.mark.slow
def test_learned_gold_sql_by_greedy_decoding(trained_adapter, demo_dataset, tiny_model_dir):
    """Greedy decoding of 10 training questions: the fine-tuned model reproduces >= 8 gold SQL exactly, the base
    (which has read the training SQL text, never a question paired with it) does not."""
    from peft import PeftModel
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    records = json.loads(demo_dataset["train"].read_text())[:10]

    def greedy(model):
        outs = []
        for rec in records:
            ids = tok.apply_chat_template(rec["conversations"][:1], add_generation_prompt=True,
                                          return_tensors="pt", tokenize=True)["input_ids"]
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=512, do_sample=False, eos_token_id=tok.eos_token_id)
            outs.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
        return outs

    before = greedy(base)
    after = greedy(PeftModel.from_pretrained(base, trained_adapter).eval())
    gold = [r["sql"] for r in records]
    exact_before = sum(a == g for a, g in zip(before, gold))
    exact = sum(a == g for a, g in zip(after, gold))
    s_before = sum(map(similarity, before, gold)) / 10
    s_after = sum(map(similarity, after, gold)) / 10
    print(f"greedy on 10 training questions: exact {exact_before}/10 -> {exact}/10, "
          f"similarity to gold {s_before:.2f} -> {s_after:.2f}")
    assert exact >= 8, [(a, g) for a, g in zip(after, gold) if a != g]
    assert exact_before <= 2, before
    assert all(a.startswith("SELECT") or a.startswith("WITH") for a in after)


@pytest.mark.slow
def test_resume_continues_from_checkpoint(trained_adapter, tmp_path, demo_dataset, tiny_model_dir):
    run = tmp_path / "resume"
    shutil.copytree(trained_adapter, run)
    ckpt = max(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    step = int(ckpt.name.split("-")[1])
    r = subprocess.run(["make", "-s", "train", f"RUNS={tmp_path}", f"SFT={demo_dataset['train']}",
                        f"ADAPTER={run}", f"TRAIN_ARGS=--resume True --max_steps {step + 2} --save_steps 1000 "
                        "--per_device_train_batch_size 4 --learning_rate 3e-3 --logging_steps 1",
                        # -W: treat the entrypoint as changed so make re-runs the stage (path as the Makefile names it)
                        "-o", str(demo_dataset["train"]), "-W", "custom_oracle_llama/sft_oracle_llama70b_lora.py"],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    state = json.loads((run / f"checkpoint-{step + 2}" / "trainer_state.json").read_text())
    assert state["global_step"] == step + 2
    # the optimizer/scheduler/log state came from the checkpoint: the earlier run's history is carried over
    first_run = json.loads((ckpt / "trainer_state.json").read_text())["log_history"]
    assert state["log_history"][:len(first_run)] == first_run
    assert json.loads((run / "training_manifest.json").read_text())["global_step"] == step + 2


@pytest.mark.slow
def test_same_seed_same_adapter_bit_for_bit(tmp_path, demo_dataset):
    """`make train` twice with --seed 0 gives the same adapter file (LoRA init is seeded before the model is built;
    DeepSpeed's 2-rank gloo reductions are repeatable on CPU); --seed 1 gives another one."""
    def train(name, seed):
        out = tmp_path / name
        r = subprocess.run(["make", "-s", "train", f"RUNS={tmp_path}", f"SFT={demo_dataset['train']}", f"ADAPTER={out}",
                            f"TRAIN_ARGS=--max_steps 3 --save_steps 1000 --per_device_train_batch_size 2 "
                            f"--learning_rate 5e-3 --logging_steps 1 --gradient_checkpointing False --seed {seed}",
                            "-o", str(demo_dataset["train"])], cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "FutureWarning" not in r.stderr, r.stderr[-3000:]  # stage_env.QUIET_WARNINGS: DeepSpeed's every-step noise
        return hashlib.sha256((out / "adapter_model.safetensors").read_bytes()).hexdigest()

    first, again, other = train("a", 0), train("b", 0), train("c", 1)
    assert first == again
    assert other != first


@pytest.mark.slow
def test_qlora_nf4_run_on_cpu(tmp_path, tiny_model_dir):
    """QLoRA path for real: bitsandbytes NF4 base (its CPU fallback), LoRA, the same checks and manifest. Eight
    rephrasings of one question share one answer, so 10 steps (5 epochs) must learn it: the last logged batch loss
    falls below a quarter of the first (measured when written: 3.64 -> 0.28). A run whose LoRA does not train (no
    gradient through the 4-bit base, frozen adapters, learning rate ignored) stays near its first loss."""
    data = tmp_path / "sft.json"
    data.write_text(json.dumps([{"id": str(i), "conversations": chat_messages(f"Invoices above {i}00?", CONTEXT,
                                                                              answer_sql=SQL)} for i in range(8)]))
    r = subprocess.run([sys.executable, str(PKG / "sft_oracle_llama70b_qlora.py"), "--model_name_or_path",
                        str(tiny_model_dir), "--data_path", str(data), "--output_dir", str(tmp_path / "q"),
                        "--model_max_length", "2048", "--max_steps", "10", "--per_device_train_batch_size", "2",
                        "--gradient_accumulation_steps", "1", "--logging_steps", "1", "--learning_rate", "5e-3"],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = json.loads((tmp_path / "q" / "training_manifest.json").read_text())
    assert manifest["zero3_partition_rank0"]["base_linear_class"] == "Linear4bit"
    assert manifest["model_args"]["q_lora"] is True and manifest["adapter"]["lora_tensors"] == 56
    assert manifest["global_step"] == 10
    assert manifest["final_loss"] < 0.25 * manifest["first_loss"], (manifest["first_loss"], manifest["final_loss"])
