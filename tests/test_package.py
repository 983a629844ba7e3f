"""Packaging: streaming LoRA merge vs PEFT (1 and many shards), refusals, verify; real GPTQ/AWQ, reload, manifest."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from conftest import PKG, ROOT
import lora_merge
import package_oracle_model as pkg
from artifacts import sha256_file
from prompting import chat_messages, template_sha256

SCRIPT = PKG / "package_oracle_model.py"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def save_adapter(model, out: Path, base_dir: Path, r: int = 8, alpha: int = 16, seed: int = 0) -> Path:
    """A real PEFT LoRA adapter on `model`, with a non-zero B scaled like a trained one, plus the training manifest
    fields the packager reads (as sft_oracle_llama70b_lora.py writes them)."""
    torch.manual_seed(seed)
    peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights=False))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.mul_(0.05)   # default init makes B @ A as large as W itself; a trained update is much smaller
    peft.save_pretrained(out)
    (out / "training_manifest.json").write_text(json.dumps({
        "stage": "lora_sft", "base_model": str(base_dir), "base_config_sha256": sha256_file(base_dir / "config.json"),
        "data_path": None, "data_sha256": None, "dataset_id": None, "dataset_manifest_sha256": None,
        "prompt_template_sha256": template_sha256()}))
    return out


def run_cli(*args, timeout=900):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def one_error_line(r) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
    return lines[0]


def tensors(path: Path) -> dict:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as s:
            out.update({k: s.get_tensor(k) for k in s.keys()})
    return out


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory) -> Path:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return save_adapter(model, tmp_path_factory.mktemp("adapter"), tiny_model_dir)


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> Path:
    """A small dataset in the builder's format: conversations + question/context/sql, holdout, manifest."""
    raw = [json.loads(line) for line in (PKG / "demo" / "raw_questions.jsonl").read_text().splitlines()
           if line.strip()][:28]
    recs = [{"id": r["id"], "conversations": chat_messages(r["question"], r["context"], answer_sql=r["sql"]),
             "sql_type": "oracle", "question": r["question"], "sql": r["sql"], "context": r["context"]} for r in raw]
    d = tmp_path_factory.mktemp("data")
    (d / "sft.json").write_text(json.dumps(recs[:22]))
    (d / "holdout.json").write_text(json.dumps(recs[22:]))
    (d / "sft.manifest.json").write_text(json.dumps({"dataset_id": "test_ds_v1", "holdout_out": str(d / "holdout.json"),
                                                     "prompt_template_sha256": template_sha256()}))
    return d / "sft.json"


@pytest.fixture(scope="module")
def merged_none(tiny_model_dir, adapter, sft_data, tmp_path_factory) -> Path:
    """The CLI with --quant_method none: streaming merge, PEFT merge check, manifest."""
    out = tmp_path_factory.mktemp("pkg") / "merged"
    r = run_cli("--base_model", tiny_model_dir, "--lora_adapter", adapter, "--merged_out", out,
                "--quant_method", "none", "--calib_data", sft_data)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


# ---- merge ------------------------------------------------------------------------------------------------------
def test_merge_equals_peft_merge_and_unload(tiny_model_dir, adapter, tmp_path):
    stats = lora_merge.merge_lora_shards(tiny_model_dir, adapter, tmp_path / "m", progress=False)
    assert stats["merged_tensors"] == 4 * 7 and stats["lora_scale"] == [2.0]
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16),
                                    adapter).merge_and_unload().state_dict()
    base, got = tensors(tiny_model_dir), tensors(tmp_path / "m")
    assert got.keys() == base.keys() == ref.keys()
    changed = 0
    for k, t in got.items():
        assert t.dtype == torch.bfloat16 and t.shape == ref[k].shape
        # PEFT rounds B@A to bf16 before adding, this merge rounds once: at most one bf16 step apart
        ulp = torch.finfo(torch.bfloat16).eps * torch.maximum(t.float().abs(), ref[k].float().abs())
        assert ((t.float() - ref[k].float()).abs() <= ulp).all(), k
        changed += not torch.equal(t, base[k])
    assert changed == 28, "every LoRA target changed, nothing else"
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                 "generation_config.json"):
        assert sha256_file(tmp_path / "m" / name) == sha256_file(tiny_model_dir / name), name
    assert stats["merged_weight_sha256"]["model.safetensors"] == sha256_file(tmp_path / "m" / "model.safetensors")


def test_multi_shard_merge_matches_single_shard(tiny_model_dir, adapter, tmp_path):
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(
        sharded, max_shard_size="1MB")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copyfile(tiny_model_dir / name, sharded / name)   # same config bytes as the adapter's base
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) >= 4
    stats = lora_merge.merge_lora_shards(sharded, adapter, tmp_path / "m", progress=False)
    single = lora_merge.merge_lora_shards(tiny_model_dir, adapter, tmp_path / "m1", progress=False)
    assert stats["shards"] == len(shards) and stats["merged_tensors"] == single["merged_tensors"] == 28
    assert stats["largest_shard_bytes"] == max(p.stat().st_size for p in shards)
    got, want = tensors(tmp_path / "m"), tensors(tmp_path / "m1")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert sha256_file(tmp_path / "m" / "model.safetensors.index.json") == \
        sha256_file(sharded / "model.safetensors.index.json")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    assert torch.equal(reloaded.model.layers[3].mlp.down_proj.weight, want["model.layers.3.mlp.down_proj.weight"])


def test_merge_check_passes_and_catches_a_wrong_scale(tiny_model_dir, adapter, sft_data, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [pkg.chat_ids(tok, pkg.record_messages(r, with_answer=True))
               for r in json.loads(sft_data.read_text())[:2]]
    lora_merge.merge_lora_shards(tiny_model_dir, adapter, tmp_path / "good", progress=False)
    good = pkg.merge_check(tiny_model_dir, adapter, tmp_path / "good", prompts, progress=False)
    assert good["ok"], good
    assert good["mean_abs_logit_diff"] < good["rounding_floor_mean_abs_diff"] < good["adapter_effect_mean_abs"]
    wrong = tmp_path / "wrong_alpha"
    shutil.copytree(adapter, wrong)
    cfg = json.loads((wrong / "adapter_config.json").read_text())
    cfg["lora_alpha"] = cfg["lora_alpha"] * 1.5     # a 50% scale error (e.g. alpha/r vs alpha/sqrt(r) mix-ups)
    (wrong / "adapter_config.json").write_text(json.dumps(cfg))
    lora_merge.merge_lora_shards(tiny_model_dir, wrong, tmp_path / "bad", progress=False)
    bad = pkg.merge_check(tiny_model_dir, adapter, tmp_path / "bad", prompts, progress=False)
    assert not bad["ok"], bad


@pytest.mark.slow   # a measurement on a synthetic 4-shard checkpoint (~15 s): it belongs with `make bench`
def test_bench_merge_peak_rss_within_two_shards(tmp_path):
    result = lora_merge.bench_merge(4, tmp_path, hidden=1024, intermediate=4096, layers=4, vocab=8192)
    assert result["shards"] >= 3 and result["peak_rss_method"].startswith("VmHWM")
    assert result["within_budget"], result
    assert result["peak_rss_extra_bytes"] <= 2 * result["largest_shard_bytes"]


# ---- bad input: one line, exit 2, no output ----------------------------------------------------------------------
def _other_shape(base, out):      # hidden 128 instead of 256
    cfg = AutoConfig.from_pretrained(base)
    cfg.hidden_size, cfg.intermediate_size = 128, 256
    save_adapter(AutoModelForCausalLM.from_config(cfg), out, base)


def _more_layers(base, out):      # same widths, 6 layers: adapts layers the base does not have
    cfg = AutoConfig.from_pretrained(base)
    cfg.num_hidden_layers = 6
    save_adapter(AutoModelForCausalLM.from_config(cfg), out, base)


def _other_base_config(base, out):  # right shapes, but trained on a base with another config.json
    save_adapter(AutoModelForCausalLM.from_pretrained(base), out, base)
    tm = json.loads((out / "training_manifest.json").read_text())
    tm["base_config_sha256"] = "0" * 64
    (out / "training_manifest.json").write_text(json.dumps(tm))


def _dora(base, out):
    save_adapter(AutoModelForCausalLM.from_pretrained(base), out, base)
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (out / "adapter_config.json").write_text(json.dumps(cfg))


def _no_weights(base, out):
    save_adapter(AutoModelForCausalLM.from_pretrained(base), out, base)
    (out / "adapter_model.safetensors").unlink()


def _rank_mismatch(base, out):
    save_adapter(AutoModelForCausalLM.from_pretrained(base), out, base)
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["r"] = 16
    (out / "adapter_config.json").write_text(json.dumps(cfg))


@pytest.mark.slow
@pytest.mark.parametrize("make, message", [
    (_other_shape, r"does not match the base model: \S+ is \[\d+, \d+\] in the base but the LoRA update is "),
    (_more_layers, "does not match the base model: it adapts model.layers.4"),
    (_other_base_config, "does not match the base model: .*config.json has sha256"),
    (_dora, "DoRA is not supported"),
    (_no_weights, "adapter weights missing"),
    (_rank_mismatch, "inconsistent with r=16"),
])
def test_bad_adapter_refused_without_output(tiny_model_dir, sft_data, tmp_path, make, message):
    make(tiny_model_dir, tmp_path / "adapter")
    out = tmp_path / "out"
    r = run_cli("--base_model", tiny_model_dir, "--lora_adapter", tmp_path / "adapter", "--merged_out",
                out / "merged", "--quant_out", out / "quant", "--calib_data", sft_data)
    assert re.search(message, one_error_line(r)), r.stderr
    assert not out.exists() or not any(out.iterdir()), "no output, not even a partial dir"


@pytest.mark.slow
def test_existing_output_refused_without_force(tiny_model_dir, adapter, sft_data, tmp_path):
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "keep.txt").write_text("earlier package")
    r = run_cli("--base_model", tiny_model_dir, "--lora_adapter", adapter, "--merged_out", tmp_path / "merged",
                "--quant_out", tmp_path / "quant", "--calib_data", sft_data)
    assert "exists and is not empty" in one_error_line(r) and "--force" in r.stderr
    assert (tmp_path / "merged" / "keep.txt").read_text() == "earlier package"
    assert not (tmp_path / "quant").exists()


@pytest.mark.slow
def test_force_replaces_an_existing_output(tiny_model_dir, adapter, sft_data, tmp_path):
    """--force replaces the whole earlier package: its files are gone (not merged into), the new manifest describes
    this run's inputs, lists exactly the files now present, and verifies. No temp dir is left beside it."""
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("earlier package")
    (out / "model.safetensors").write_bytes(b"earlier weights")
    (out / pkg.MANIFEST).write_text(json.dumps({"kind": "oracle_merged_model", "files": {"keep.txt": "0" * 64}}))
    r = run_cli("--base_model", tiny_model_dir, "--lora_adapter", adapter, "--merged_out", out,
                "--quant_method", "none", "--calib_data", sft_data, "--force")
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (out / "keep.txt").exists()
    m = json.loads((out / pkg.MANIFEST).read_text())
    assert m["adapter"]["adapter_model_sha256"] == sha256_file(adapter / "adapter_model.safetensors")
    assert set(m["files"]) == {p.name for p in out.iterdir()} - {pkg.MANIFEST}
    assert (out / "model.safetensors").stat().st_size > 1_000_000   # the merged weights, not b"earlier weights"
    assert "--force" in m["command"]
    assert run_cli("verify", out).returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


@pytest.mark.slow
@pytest.mark.parametrize("flag, where", [("--merged_out", "inside"), ("--quant_out", "same")])
def test_output_overlapping_an_input_refused(tiny_model_dir, adapter, sft_data, tmp_path, flag, where):
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    target = base / "merged" if where == "inside" else adapter
    outs = {"--merged_out": tmp_path / "m", "--quant_out": tmp_path / "q", flag: target}
    r = run_cli("--base_model", base, "--lora_adapter", adapter, *[x for kv in outs.items() for x in kv],
                "--calib_data", sft_data, "--force")
    assert "overlaps an input directory" in one_error_line(r)
    assert sha256_file(base / "model.safetensors") == sha256_file(tiny_model_dir / "model.safetensors")


def test_disk_space_checked_before_writing(tmp_path):
    with pytest.raises(pkg.StageError, match="not enough disk space"):
        pkg.check_free_space({tmp_path / "not" / "yet": 1 << 60})
    pkg.check_free_space({tmp_path: 1})


@pytest.mark.parametrize("config, group, ok", [
    ({"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "head_dim": 64}, 128, True),
    ({"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "head_dim": 64}, 96, False),
    ({"hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64}, 128, True),   # Llama-3.3-70B
    ({"hidden_size": 8192, "intermediate_size": 29568, "num_attention_heads": 64}, 128, True),   # Qwen2.5-72B
    ({"hidden_size": 8192, "intermediate_size": 29568, "num_attention_heads": 64}, 256, False),  # 29568 = 115.5*256
])
def test_group_size_must_divide_every_linear_input(config, group, ok):
    if ok:
        pkg.check_group_size(config, group)
    else:
        with pytest.raises(pkg.StageError, match="does not divide"):
            pkg.check_group_size(config, group)


# ---- the quantization recipe is a data file ---------------------------------------------------------------------
@pytest.mark.parametrize("method, modifiers", [("awq", ["AWQModifier", "QuantizationModifier"]),
                                               ("gptq", ["GPTQModifier"])])
def test_shipped_recipes_are_w4a16_group_128(method, modifiers):
    path = pkg.recipe_file(method, None)
    assert path == PKG / "config" / f"quant_{method}_w4a16.yaml"
    r = pkg.load_recipe(path, None)
    assert r["modifiers"] == modifiers and r["file_sha256"] == sha256_file(path)
    assert pkg.scheme_of(r["weights"]) == "W4A16 symmetric int4, group 128"
    assert all(m.get("ignore") == ["lm_head"] for m in pkg.modifiers_of(r["recipe"]).values() if "config_groups" in m)
    assert pkg.scheme_of(pkg.load_recipe(path, 64)["weights"]) == "W4A16 symmetric int4, group 64"
    assert pkg.scheme_of(pkg.load_recipe(path, None)["weights"]) == "W4A16 symmetric int4, group 128", \
        "--group_size rewrites what is passed on, never the file"


@pytest.mark.parametrize("text, message", [
    ("quant_stage: [\n", "cannot read quantization recipe"),
    ("quant_stage:\n  quant_modifiers:\n    AWQModifier: {}\n", "not an llm-compressor quantization recipe"),
    ("- just a list\n", "not an llm-compressor quantization recipe"),
])
def test_bad_recipe_file_refused(tmp_path, text, message):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    with pytest.raises(pkg.StageError, match=message):
        pkg.load_recipe(path, None)


@pytest.mark.parametrize("argv, command", [
    (["--base_model", "b", "--lora_adapter", "a", "--merged_out", "m", "--quant_out", "q"], "package"),
    (["package", "--base_model", "b", "--lora_adapter", "a", "--merged_out", "m", "--quant_method", "none"], "package"),
    (["verify", "q"], "verify"),
    (["bench-merge", "--shards", "3"], "bench-merge"),
])
def test_subcommands_and_the_default_package(argv, command):
    args = pkg.parse_args(argv)
    assert args.command == command
    if command == "package":
        assert args.quant_method in ("awq", "none") and args.group_size is None and args.quant_recipe is None


@pytest.mark.slow
def test_recipe_and_group_size_refused_before_any_output(tiny_model_dir, adapter, sft_data, tmp_path):
    common = ["--base_model", tiny_model_dir, "--lora_adapter", adapter, "--merged_out", tmp_path / "m",
              "--quant_out", tmp_path / "q", "--calib_data", sft_data]
    r = run_cli(*common, "--quant_recipe", tmp_path / "absent.yaml")
    assert "cannot read quantization recipe" in one_error_line(r)
    r = run_cli(*common, "--group_size", 96)
    assert "--group_size 96 does not divide" in one_error_line(r)
    assert not (tmp_path / "m").exists() and not (tmp_path / "q").exists()


def test_calibration_skips_long_conversations_never_truncates(tiny_model_dir, sft_data):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    records = json.loads(sft_data.read_text())
    lengths = sorted(len(pkg.chat_ids(tok, r["conversations"])) for r in records)
    limit = lengths[len(lengths) // 2]
    rows, stats = pkg.calibration_set(tok, records, n=100, max_len=limit)
    fitting = sum(n <= limit for n in lengths)
    assert stats["used"] == len(rows) == fitting and stats["skipped_too_long"] == len(records) - fitting
    full = {tuple(pkg.chat_ids(tok, r["conversations"])) for r in records}
    assert all(tuple(row) in full for row in rows), "rows are whole conversations"
    assert all(row.count(tok.bos_token_id) == 1 and row[0] == tok.bos_token_id for row in rows)
    with pytest.raises(pkg.StageError, match="no calibration conversation fits"):
        pkg.calibration_set(tok, records, n=4, max_len=lengths[0] - 1)


# ---- --quant_method none: merge + check + manifest + verify ------------------------------------------------------
@pytest.mark.slow
def test_merged_manifest_records_inputs_and_check(merged_none, tiny_model_dir, adapter, sft_data):
    m = json.loads((merged_none / pkg.MANIFEST).read_text())
    assert m["kind"] == "oracle_merged_model"
    assert m["base_model"]["weights_sha256"] == {"model.safetensors": sha256_file(tiny_model_dir / "model.safetensors")}
    assert m["adapter"]["adapter_model_sha256"] == sha256_file(adapter / "adapter_model.safetensors")
    assert m["dataset"]["dataset_id"] == "test_ds_v1" and m["dataset"]["eval_source"] == "holdout"
    assert m["dataset"]["dataset_manifest_sha256"] == sha256_file(sft_data.parent / "sft.manifest.json")
    assert m["dataset"]["prompt_template_sha256"] == template_sha256()
    check = m["merge"]["check"]
    assert check["ok"] and check["prompts"] == 4 and check["top1_disagreements_where_decidable"] == 0
    assert set(m["files"]) == {p.name for p in merged_none.iterdir()} - {pkg.MANIFEST}
    assert m["versions"]["peft"] != "not installed" and m["started_utc"] <= m["finished_utc"]


def flip_middle_byte(d: Path, name: str = "model.safetensors") -> None:
    with (d / name).open("r+b") as f:
        f.seek(f.seek(0, 2) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))


@pytest.mark.slow  # merged_none runs the packager's process
@pytest.mark.parametrize("damage, named", [
    (flip_middle_byte, "model.safetensors differs"),
    (lambda d: (d / "tokenizer_config.json").unlink(), "tokenizer_config.json is missing"),
    (lambda d: (d / "extra.bin").write_bytes(b"x"), "extra.bin is not in the manifest"),
])
def test_verify_passes_then_names_the_damaged_file(merged_none, tmp_path, damage, named):
    copy = tmp_path / "copy"
    shutil.copytree(merged_none, copy)
    r = run_cli("verify", copy)
    assert r.returncode == 0 and "verified" in r.stdout, r.stderr
    damage(copy)
    r = run_cli("verify", copy)
    assert named in one_error_line(r)


# ---- real quantization (slow) -------------------------------------------------------------------------------------
def greedy(model_dir: Path, messages, n=24) -> str:
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, temperature=None, top_p=None,
                             pad_token_id=tok.eos_token_id)
    assert out.shape[1] > ids.shape[1]
    return tok.decode(out[0, ids.shape[1]:])


def assert_w4a16_checkpoint(quant: Path, group: int = 128) -> None:
    cfg = json.loads((quant / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "pack-quantized"
    w = cfg["config_groups"]["group_0"]["weights"]
    assert (w["num_bits"], w["strategy"], w["group_size"], w["symmetric"]) == (4, "group", group, True)
    assert cfg["ignore"] == ["lm_head"]
    t = tensors(quant)
    assert t["lm_head.weight"].dtype == torch.bfloat16 and t["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert "model.layers.0.self_attn.q_proj.weight_packed" in t and "model.layers.0.self_attn.q_proj.weight" not in t


@pytest.mark.slow
def test_gptq_end_to_end_reloads_and_generates(tiny_model_dir, adapter, sft_data, tmp_path):
    """Another scheme is another recipe file: the shipped GPTQ recipe with groups of 64, through --quant_recipe."""
    recipe = tmp_path / "gptq_w4a16_g64.yaml"
    recipe.write_text((PKG / "config" / "quant_gptq_w4a16.yaml").read_text().replace("group_size: 128",
                                                                                   "group_size: 64"))
    r = run_cli("package", "--base_model", tiny_model_dir, "--lora_adapter", adapter, "--merged_out",
                tmp_path / "merged", "--quant_out", tmp_path / "quant", "--quant_recipe", recipe,
                "--calib_data", sft_data, "--num_calib_samples", 16, "--calib_max_seq_len", 2048,
                "--num_eval_prompts", 4)
    assert r.returncode == 0, r.stderr[-4000:]
    quant = tmp_path / "quant"
    assert_w4a16_checkpoint(quant, group=64)
    m = json.loads((quant / pkg.MANIFEST).read_text())
    q = m["quantization"]
    assert q["method"] == "gptq_w4a16_g64" and q["modifiers"] == ["GPTQModifier"] and q["cpu_workarounds"] == []
    assert "GPTQModifier" in q["recipe_yaml"] and q["scheme"] == "W4A16 symmetric int4, group 64"
    assert q["recipe_file"] == str(recipe) and q["recipe_file_sha256"] == sha256_file(recipe)
    assert q["calibration"]["used"] == 16 and q["calibration"]["tokens"]["max"] <= 2048
    # the packager's promise with its default bars (top-1 >= 0.90, mean relative logit error <= 0.1), met by GPTQ
    # on this adapter (measured 0.969 and 0.058)
    ql = m["quality"]
    assert ql["thresholds"] == {"min_top1_agreement": 0.90, "max_rel_logit_error": 0.1} and ql["prompts"] == 4
    assert ql["ok"] and ql["warnings"] == [] and m["warnings"] == [], ql
    assert ql["top1_agreement"] >= 0.90 and ql["rel_logit_error_mean"] <= 0.1, ql
    assert m["merged"]["files_tree_sha256"] == json.loads((tmp_path / "merged" / pkg.MANIFEST).read_text())[
        "files_tree_sha256"]
    assert run_cli("verify", quant).returncode == 0
    holdout = json.loads((sft_data.parent / "holdout.json").read_text())[0]
    greedy(quant, chat_messages(holdout["question"], holdout["context"]))


@pytest.mark.slow
def test_packaged_demo_model_manifest_and_reload(packaged_model, demo_dataset, trained_adapter, tiny_model_dir):
    """`make package` (AWQ, 64 calibration conversations <= 1024 tokens) on the adapter `make train` produced."""
    quant, merged = packaged_model["quant"], packaged_model["merged"]
    for d in (quant, merged):
        r = run_cli("verify", d)
        assert r.returncode == 0, r.stderr
    assert_w4a16_checkpoint(quant)
    m = json.loads((quant / pkg.MANIFEST).read_text())
    assert m["base_model"]["weights_sha256"]["model.safetensors"] == sha256_file(tiny_model_dir / "model.safetensors")
    assert m["adapter"]["adapter_model_sha256"] == sha256_file(trained_adapter / "adapter_model.safetensors")
    ds = m["dataset"]
    assert ds["dataset_id"] == "ebs_demo_v1" and ds["eval_source"] == "holdout"
    assert ds["dataset_manifest_sha256"] == sha256_file(demo_dataset["manifest"])
    assert ds["prompt_template_sha256"] == template_sha256() == m["adapter"]["trained"]["prompt_template_sha256"]
    assert ds["calib_data_sha256"] == ds["training_data_sha256"]
    assert m["merge"]["check"]["ok"] and m["base_identity"]["matches"]
    q = m["quantization"]
    assert q["method"] == "awq" and "AWQModifier" in q["recipe_yaml"] and "QuantizationModifier" in q["recipe_yaml"]
    assert q["recipe_file_sha256"] == sha256_file(PKG / "config" / "quant_awq_w4a16.yaml")
    assert q["recipe"] == yaml.safe_load((PKG / "config" / "quant_awq_w4a16.yaml").read_text())
    assert q["cpu_workarounds"], "the pin_memory workaround is applied (and recorded) on a CPU-only host"
    # calibration: exactly what `make package` asked for (CALIB_SAMPLES conversations <= CALIB_MAX_LEN tokens), or
    # every training conversation that fits when fewer do; the longer ones are skipped, counted, never cut
    asked = {k: int(re.search(rf"^{k} \?= (\d+)$", (ROOT / "Makefile").read_text(), re.M)[1])
             for k in ("CALIB_SAMPLES", "CALIB_MAX_LEN")}
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    train = json.loads(demo_dataset["train"].read_text())
    fitting = sum(len(pkg.chat_ids(tok, r["conversations"])) <= asked["CALIB_MAX_LEN"] for r in train)
    cal = q["calibration"]
    assert (cal["requested"], cal["max_seq_len"]) == (asked["CALIB_SAMPLES"], asked["CALIB_MAX_LEN"]) == (64, 1024)
    assert cal["used"] == min(cal["requested"], fitting) and cal["tokens"]["max"] <= cal["max_seq_len"]
    assert cal["skipped_too_long"] <= len(train) - fitting
    # quality, quantized vs merged on the 8 held-out prompts, against the packager's own bars (its defaults: `make
    # package` passes none): top-1 agreement >= 0.90 is met (measured 0.905). Mean relative logit error <= 0.1 is
    # not met by AWQ on this tiny model: measured 0.127 (0.114 with --group_size 64), while --quant_method gptq on
    # the same adapter gives 0.070 (measured by hand); so this package is recorded with ok: false and that one
    # warning. Asserted: the top-1 bar, the logit error no worse than measured + ~20%, and ok/warnings exactly as
    # the figures and the bars say.
    ql, th = m["quality"], m["quality"]["thresholds"]
    bar = pkg.parse_args(["--base_model", "b", "--lora_adapter", "a", "--merged_out", "m", "--quant_out", "q"])
    assert th == {"max_rel_logit_error": bar.max_rel_logit_error, "min_top1_agreement": bar.min_top1_agreement}
    assert (th["min_top1_agreement"], th["max_rel_logit_error"]) == (0.90, 0.1) and ql["prompts"] == 8
    assert ql["top1_agreement"] >= th["min_top1_agreement"], ql
    assert ql["rel_logit_error_mean"] <= 0.15, ql
    missed = {"relative logit error": ql["rel_logit_error_mean"] > th["max_rel_logit_error"],
              "top-1 agreement": ql["top1_agreement"] < th["min_top1_agreement"]}
    assert ql["ok"] is not any(missed.values()), ql
    assert len(ql["warnings"]) == sum(missed.values()), ql["warnings"]
    assert all(any(what in w for w in ql["warnings"]) for what, failed in missed.items() if failed), ql["warnings"]
    assert set(ql["warnings"]) <= set(m["warnings"])
    assert not [w for w in m["warnings"] if "differs" in w or "changed" in w], m["warnings"]
    holdout = json.loads(demo_dataset["holdout"].read_text())[0]
    text = greedy(quant, chat_messages(holdout["question"], holdout["context"]), n=48)
    assert text.strip()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_verify_names_a_flipped_byte_in_the_quantized_folder(packaged_model, tmp_path, name):
    """The 4-bit folder vLLM serves (packed int4 weights; config.json holds the quantization scheme vLLM reads)."""
    copy = tmp_path / "quant"
    shutil.copytree(packaged_model["quant"], copy)
    r = run_cli("verify", copy)
    assert r.returncode == 0 and "verified" in r.stdout, r.stderr
    flip_middle_byte(copy, name)
    r = run_cli("verify", copy)
    assert re.match(rf"error: verify failed: {re.escape(name)} differs \(sha256 ", one_error_line(r)), r.stderr
