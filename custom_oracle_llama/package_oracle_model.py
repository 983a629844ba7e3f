r"""Package a LoRA adapter for serving: streaming merge into the bf16 base, 4-bit quantization, manifest, verify.

    python custom_oracle_llama/package_oracle_model.py --base_model Llama-3.3-70B-Instruct --lora_adapter adapter \
        --merged_out merged --quant_out quant --quant_method awq --calib_data ebs_sft.json
    python custom_oracle_llama/package_oracle_model.py verify quant             # recompute every hash
    python custom_oracle_llama/package_oracle_model.py bench-merge --shards 4   # merge peak RSS vs largest shard
(`package` is the default subcommand: `package_oracle_model.py package --base_model ...` is the same command.)

1. Merge: W += (alpha/r) * B @ A for every LoRA target, computed in fp32 and stored in the base dtype (bf16),
   streamed tensor by tensor through the base's safetensors shards. Each output shard reuses its input shard's
   header byte for byte (a merge changes no name, dtype, shape or offset); untouched tensors are copied in 4 MiB
   blocks, and only one LoRA-targeted matrix is in memory at a time. Config, tokenizer, chat template, generation
   config, licence files and model.safetensors.index.json are copied unchanged. Then the merge is checked against
   PEFT on a few held-out prompts: logits of the merged model vs PeftModel(base, adapter), both in fp32. Allowed:
   what bf16 rounding of the merged weights explains, measured by rounding PEFT's own fp32 merge toward zero; the
   top-1 token must agree wherever the reference's top-1 margin is larger than the difference.
2. Quantize with llm-compressor (the maintained successor of AutoAWQ, which is archived, and auto-gptq, which does
   not import under transformers 5 nor quantize without CUDA). The recipe is a data file in llm-compressor's own
   format: config/quant_awq_w4a16.yaml (--quant_method awq, default: AWQModifier + QuantizationModifier) or
   config/quant_gptq_w4a16.yaml (gptq, the fallback), or any --quant_recipe FILE; --group_size, when given,
   replaces the group size of every weight group in it. Both shipped recipes give compressed-tensors
   "pack-quantized" W4A16: symmetric int4 weights in groups of 128, lm_head and embeddings kept bf16, the format
   vLLM serves (Marlin kernels on A100). The effective recipe is copied into the manifest.
   Calibration uses only the SFT conversations, tokenized through the model's chat template
   (apply_chat_template(tokenize=True): one <|begin_of_text|>), as an in-memory dataset: no hub access.
   Conversations longer than --calib_max_seq_len are skipped and counted, never truncated.
3. Quality: quantized vs merged on held-out prompts (relative logit error, top-1 agreement, greedy-output
   agreement); warnings above --max_rel_logit_error / below --min_top1_agreement.
4. oracle_manifest.json in both outputs: inputs (sha256 of every base weight file + a tree hash, adapter hashes,
   dataset id, dataset manifest and prompt template hashes), merge-check figures, recipe, calibration, quality,
   library versions, timestamps and {file: sha256} of every file beside it. `verify DIR` recomputes them.
Each output is built in a temp dir beside it and renamed into place only when everything has succeeded.

Memory to provision:
- merge: one LoRA-targeted matrix plus ~25 MB of buffers beyond the Python process, whatever the shard size
  (70B: a 28672x8192 MLP matrix, 0.47 GB in bf16). `bench-merge` measures it on a multi-shard checkpoint.
  Disk: the base's size again for --merged_out.
- merge check: base + adapter, then the merged model, in fp32 (4 bytes/parameter: ~282 GB for 70B).
  On a smaller host pass --merge_check_prompts 0 (the manifest records it as skipped).
- quantization and quality check: the merged model in bf16 in CPU RAM (~141 GB for 70B) plus calibration
  activations; llm-compressor moves one decoder layer at a time to the GPU when there is one (one A100-80GB is
  enough), else calibrates on the CPU (fine for the tiny demo model, impractical for 70B). Output ~40 GB.

Relation to XiYan-SQLTraining's train/utils/adapter_merge.py: the same merge through PEFT (PeftModel.from_pretrained
+ merge_and_unload + save_pretrained), but it loads the adapter as fp16 and the whole base model at once, so a 70B
merge needs memory for the full model (~140 GB in 16-bit) and the adapter is rounded to fp16 first. This script
writes what PEFT's merge_and_unload computes (checked tensor by tensor in tests/test_package.py: within one bf16
step) without loading the model: the LoRA A/B matrices are read in their stored precision, the update is formed in
fp32 and rounded once to bf16, and the shards are streamed. PEFT is still used, as the independent reference of
the merge check.
"""
import argparse
import hashlib
import json
import os
import random
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import stage_env  # noqa: E402
stage_env.apply()  # config/offline.env (offline flags, caches, OMP_WAIT_POLICY): before torch loads

from artifacts import (StageError, atomic_dir, atomic_write_json, library_versions, read_json,  # noqa: E402
                       sha256_file, tree_hashes, tree_sha256)
from lora_merge import (ADAPTER_WEIGHTS, MANIFEST, SUPPORT_PREFIXES, SUPPORT_SUFFIXES, bench_merge,  # noqa: E402
                        check_adapter_fits, check_base_identity, lora_plan, merge_lora_shards, weight_shards)
from prompting import chat_messages, template_sha256  # noqa: E402

RECIPES = HERE / "config"
LIBRARIES = ("torch", "transformers", "peft", "safetensors", "llmcompressor", "compressed-tensors", "accelerate",
             "datasets", "tokenizers")


def now_utc() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---- prompts, calibration -------------------------------------------------------------------------------------
def load_records(path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise StageError(f"data not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StageError(f"{path} is not valid JSON: {e}")
    if not isinstance(data, list) or not data:
        raise StageError(f"{path} must be a non-empty JSON list of XiYan conversation records")
    for n, rec in enumerate(data):
        conv = rec.get("conversations") if isinstance(rec, dict) else None
        if not conv or not all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in conv) \
                or conv[0]["role"] != "user":
            raise StageError(f"{path} record {n}: needs 'conversations' starting with a user turn")
    return data


def record_messages(rec: dict, with_answer: bool) -> list[dict]:
    """The record as served: re-rendered through prompting.chat_messages when it carries question + context."""
    if "question" in rec and "context" in rec:
        return chat_messages(rec["question"], rec["context"], answer_sql=rec.get("sql") if with_answer else None)
    conv = rec["conversations"]
    return conv if with_answer else conv[:1]


def chat_ids(tokenizer, messages, add_generation_prompt: bool = False) -> list[int]:
    """Token ids exactly as vLLM's chat endpoint builds them; the template supplies the one BOS."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    ids = list(out["input_ids"] if hasattr(out, "keys") else out)
    bos = tokenizer.bos_token_id
    if bos is not None and (ids[:1] != [bos] or ids.count(bos) != 1):
        raise StageError(f"chat template produced {ids.count(bos)} BOS tokens (expected exactly one, first)")
    return ids


def split_records(records: list[dict], holdout: list[dict] | None, n_eval: int, seed: int) -> tuple[list, list, str]:
    """-> (calibration candidates in a seeded order, eval records, where eval came from)."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    shuffled = [records[i] for i in order]
    if holdout:
        return shuffled, holdout[:n_eval], "holdout"
    if len(shuffled) <= n_eval:
        raise StageError(f"{len(shuffled)} records: too few to hold {n_eval} out for the quality check "
                         f"(give --eval_data or lower --num_eval_prompts)")
    return shuffled[n_eval:], shuffled[:n_eval], "calib_data (held out of calibration)"


def calibration_set(tokenizer, records: list[dict], n: int, max_len: int) -> tuple[list[list[int]], dict]:
    """Whole conversations (prompt + SQL: decoding sees both) that fit max_len, in order, up to n."""
    rows, texts, too_long = [], [], 0
    for rec in records:
        if len(rows) == n:
            break
        ids = chat_ids(tokenizer, rec["conversations"])
        if len(ids) > max_len:
            too_long += 1
            continue
        rows.append(ids)
        texts.append(tokenizer.apply_chat_template(rec["conversations"], tokenize=False))
    if not rows:
        raise StageError(f"no calibration conversation fits --calib_max_seq_len {max_len} ({too_long} too long)")
    lengths = sorted(len(r) for r in rows)
    return rows, {
        "requested": n, "used": len(rows), "skipped_too_long": too_long, "max_seq_len": max_len,
        "tokens": {"min": lengths[0], "median": lengths[len(lengths) // 2], "max": lengths[-1],
                   "total": sum(lengths)},
        "texts_sha256": hashlib.sha256("\0".join(texts).encode()).hexdigest(),
        "token_ids_sha256": hashlib.sha256(json.dumps(rows).encode()).hexdigest(),
    }


# ---- merge check (merged vs PEFT base + adapter) --------------------------------------------------------------------
def _logits(model, ids: list[int]):
    import torch
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def _truncate_to_bf16_(model) -> None:
    """Round every weight toward zero to bf16 precision (kept in fp32): a second, cruder bf16 rounding."""
    import torch
    with torch.no_grad():
        for p in model.parameters():
            p.view(torch.int32).bitwise_and_(-65536)


def merge_check(base_dir, adapter_dir, merged_dir, prompts: list[list[int]], progress: bool = True) -> dict:
    """Merged-model logits vs PeftModel(base, adapter) logits (unmerged, fp32) on the given token sequences.

    A correct merge differs from the reference only by rounding W + s*B@A to bf16 (round to nearest). The allowed
    difference is measured, not guessed: the same exact merge (PEFT merge_and_unload in fp32) rounded toward zero
    to bf16, i.e. a rounding about twice as coarse on average. The merged model must be at least as close to the
    reference as that, in mean and max |logit difference|, and agree on the top-1 token wherever the reference's
    top-1 margin exceeds twice the observed difference. A wrong scale, a missed module or a transposed update
    moves the logits by a fraction of the adapter's own effect, far above the rounding floor.
    """
    import torch
    from peft import PeftModel
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                      str(adapter_dir)).eval()
    ref = [_logits(model, ids) for ids in tqdm(prompts, desc="merge check: PEFT base+adapter", disable=not progress)]
    with model.disable_adapter():
        effect = torch.cat([(_logits(model, ids) - r).abs().flatten() for ids, r in zip(prompts, ref)])
    model = model.merge_and_unload()
    _truncate_to_bf16_(model)
    floor = torch.cat([(_logits(model, ids) - r).abs().flatten() for ids, r in zip(prompts, ref)])
    del model
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    got = [_logits(merged, ids) for ids in tqdm(prompts, desc="merge check: merged", disable=not progress)]
    del merged
    diff = torch.cat([(g - r).abs().flatten() for g, r in zip(got, ref)])
    max_abs, mean_abs = diff.max().item(), diff.mean().item()
    agree = decidable = disagree_decidable = 0
    for g, r in zip(got, ref):
        top2 = r.topk(2, dim=-1).values
        margin_ok = (top2[:, 0] - top2[:, 1]) > 2 * max_abs
        same = g.argmax(-1) == r.argmax(-1)
        agree += same.sum().item()
        decidable += margin_ok.sum().item()
        disagree_decidable += (margin_ok & ~same).sum().item()
    positions = sum(len(p) for p in prompts)
    ok = max_abs <= floor.max().item() and mean_abs <= floor.mean().item() and disagree_decidable == 0
    return {"ok": ok, "prompts": len(prompts), "positions": positions,
            "max_abs_logit_diff": max_abs, "mean_abs_logit_diff": mean_abs,
            "rounding_floor_max_abs_diff": floor.max().item(), "rounding_floor_mean_abs_diff": floor.mean().item(),
            "adapter_effect_max_abs": effect.max().item(), "adapter_effect_mean_abs": effect.mean().item(),
            "max_abs_ref_logit": max(r.abs().max().item() for r in ref),
            "top1_agreement": agree / positions, "top1_decidable_positions": decidable,
            "top1_disagreements_where_decidable": disagree_decidable, "compute_dtype": "float32"}


# ---- quantization ----------------------------------------------------------------------------------------------
def cpu_workarounds() -> list[str]:
    """Patches llm-compressor needs without an accelerator; returns what was applied (recorded in the manifest).

    llm-compressor 0.14.0.1 AWQModifier._apply_smoothing pins the cached layer inputs before its grid search:
    `cache.pin_memory(batch_index)` in src/llmcompressor/modifiers/transform/awq/base.py (line 507 in 0.14.0.1;
    https://github.com/vllm-project/llm-compressor/blob/main/src/llmcompressor/modifiers/transform/awq/base.py),
    which calls tensor.pin_memory() in IntermediatesCache._pin_intermediate (src/llmcompressor/pipelines/cache.py),
    and torch raises "Cannot access accelerator device when none is available". GPTQ never calls it.
    Page-locking only speeds host-to-device copies, and on a CPU-only host there are none, so skipping it changes
    no value. Applied only when torch sees no accelerator; GPU hosts run llm-compressor unmodified.
    """
    import torch
    if torch.accelerator.is_available():
        return []
    from llmcompressor.pipelines.cache import IntermediatesCache
    if not hasattr(IntermediatesCache, "pin_memory"):
        return []           # a later llm-compressor without the call: nothing to patch
    IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None
    return ["llmcompressor.pipelines.cache.IntermediatesCache.pin_memory -> no-op (no accelerator: "
            "AWQ smoothing would call tensor.pin_memory(), which needs one)"]


def check_group_size(config: dict, group_size: int) -> None:
    """Every quantized Linear's input width must be a multiple of the group size."""
    try:
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        widths = {"hidden_size": config["hidden_size"], "intermediate_size": config["intermediate_size"],
                  "num_attention_heads*head_dim": config["num_attention_heads"] * head_dim}
    except KeyError as e:
        raise StageError(f"config.json has no {e}: not a Llama-style decoder, cannot check --group_size")
    bad = {k: v for k, v in widths.items() if v % group_size}
    if group_size <= 0 or bad:
        raise StageError(f"--group_size {group_size} does not divide {bad or widths} (Linear input widths)")


def recipe_file(method: str, explicit: str | None) -> Path:
    """--quant_recipe FILE, else the shipped recipe of --quant_method: config/quant_<method>_w4a16.yaml."""
    return Path(explicit) if explicit else RECIPES / f"quant_{method}_w4a16.yaml"


def modifiers_of(recipe: dict) -> dict:
    """{modifier name: its arguments} over every `*_stage` / `*_modifiers` block (llm-compressor's layout)."""
    return {name: margs or {} for stage, groups in recipe.items()
            if stage.endswith("_stage") and isinstance(groups, dict)
            for group, mods in groups.items() if group.endswith("_modifiers") and isinstance(mods, dict)
            for name, margs in mods.items()}


def load_recipe(path, group_size: int | None) -> dict:
    """Read a quantization recipe; --group_size (when given) replaces every weight group's size.
    -> {"file", "file_sha256", "recipe" (effective, as passed to oneshot), "modifiers", "weights" (per group)}."""
    import yaml
    path = Path(path)
    try:
        recipe = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise StageError(f"cannot read quantization recipe {path}: {e}")
    mods = modifiers_of(recipe) if isinstance(recipe, dict) else {}
    weights = {f"{name}.{g}": cfg["weights"] for name, margs in mods.items()
               for g, cfg in (margs.get("config_groups") or {}).items() if isinstance(cfg, dict) and cfg.get("weights")}
    if not weights:
        raise StageError(f"{path} is not an llm-compressor quantization recipe (no *_stage / *_modifiers block with "
                         f"config_groups.*.weights)")
    if group_size is not None:
        for w in weights.values():
            w["group_size"] = group_size
    return {"file": str(path.resolve()), "file_sha256": sha256_file(path), "recipe": recipe,
            "modifiers": list(mods), "weights": weights}


def scheme_of(weights: dict) -> str:
    """A readable name of the weight format, e.g. 'W4A16 symmetric int4, group 128'."""
    names = {f"W{w.get('num_bits')}A16 {'symmetric' if w.get('symmetric') else 'asymmetric'} {w.get('type')}"
             f"{w.get('num_bits')}" + (f", group {w['group_size']}" if w.get("strategy") == "group" else
                                       f", {w.get('strategy')}") for w in weights.values()}
    return "; ".join(sorted(names))


def quantize(merged_dir, out_dir, recipe: dict, calib_rows: list[list[int]], max_len: int) -> dict:
    """llm-compressor oneshot with the recipe on the merged checkpoint; writes a compressed-tensors checkpoint."""
    import torch
    import yaml
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    applied = cpu_workarounds() if "AWQModifier" in recipe["modifiers"] else []
    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    ds = Dataset.from_dict({"input_ids": calib_rows, "attention_mask": [[1] * len(r) for r in calib_rows]})
    t0 = time.perf_counter()
    # Every row already fits max_len (longer ones were skipped), so the truncating collator never cuts anything.
    oneshot(model=model, tokenizer=tokenizer, dataset=ds, recipe=yaml.safe_dump(recipe["recipe"], sort_keys=False),
            max_seq_length=max_len, num_calibration_samples=len(calib_rows), shuffle_calibration_samples=False)
    seconds = time.perf_counter() - t0
    model.save_pretrained(out_dir, save_compressed=True)
    del model
    # Tokenizer, chat template etc. byte-identical to the merged model (re-saving a tokenizer rewrites its config).
    for p in sorted(Path(merged_dir).iterdir()):
        if p.is_file() and p.name not in {"config.json", "generation_config.json", MANIFEST} \
                and not p.name.startswith("model.safetensors") and (p.suffix in SUPPORT_SUFFIXES
                                                                    or p.name.startswith(SUPPORT_PREFIXES)):
            shutil.copyfile(p, Path(out_dir) / p.name)
    written = Path(out_dir) / "recipe.yaml"   # llm-compressor's record of the modifiers it ran
    qcfg = json.loads((Path(out_dir) / "config.json").read_text()).get("quantization_config")
    if not qcfg:
        raise StageError("llm-compressor wrote no quantization_config: the checkpoint is not compressed")
    return {"scheme": scheme_of(recipe["weights"]), "recipe_file": recipe["file"],
            "recipe_file_sha256": recipe["file_sha256"], "recipe": recipe["recipe"], "modifiers": recipe["modifiers"],
            "recipe_yaml": written.read_text() if written.is_file() else None,
            "quantization_config": qcfg, "cpu_workarounds": applied, "seconds": round(seconds, 2)}


# ---- quality: quantized vs merged ------------------------------------------------------------------------------
def _greedy(model, ids: list[int], max_new_tokens: int, eos) -> list[int]:
    import torch
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                             top_k=None, pad_token_id=eos[0], eos_token_id=eos)
    return out[0, len(ids):].tolist()


def compare_quantized(merged_dir, quant_dir, tokenizer, records: list[dict], max_new_tokens: int,
                      progress: bool = True) -> dict:
    """Teacher-forced logits over prompt + gold SQL, and greedy generations from the prompt, of both models."""
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    models = {"merged": AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.bfloat16).eval(),
              "quant": AutoModelForCausalLM.from_pretrained(quant_dir, dtype=torch.bfloat16).eval()}
    eos = models["merged"].generation_config.eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    rel, agree, positions, same_out, prefix, examples = [], 0, 0, 0, [], []
    for rec in tqdm(records, desc="quality: quantized vs merged", disable=not progress):
        full = chat_ids(tokenizer, record_messages(rec, with_answer=True))
        m, q = (_logits(models[k], full) for k in ("merged", "quant"))
        rel.append(((q - m).norm() / m.norm()).item())
        agree += (q.argmax(-1) == m.argmax(-1)).sum().item()
        positions += len(full)
        prompt = chat_ids(tokenizer, record_messages(rec, with_answer=False), add_generation_prompt=True)
        gm, gq = (_greedy(models[k], prompt, max_new_tokens, eos) for k in ("merged", "quant"))
        same_out += gm == gq
        n = next((i for i, (x, y) in enumerate(zip(gm, gq)) if x != y), min(len(gm), len(gq)))
        prefix.append(n / max(1, max(len(gm), len(gq))))
        if len(examples) < 2:
            examples.append({"id": rec.get("id"), "merged": tokenizer.decode(gm), "quantized": tokenizer.decode(gq)})
    return {"prompts": len(records), "positions": positions, "rel_logit_error_mean": sum(rel) / len(rel),
            "rel_logit_error_max": max(rel), "top1_agreement": agree / positions,
            "greedy_identical": same_out / len(records), "greedy_common_prefix": sum(prefix) / len(prefix),
            "max_new_tokens": max_new_tokens, "examples": examples}


def quality_warnings(q: dict, max_rel: float, min_top1: float) -> list[str]:
    out = []
    if q["rel_logit_error_mean"] > max_rel:
        out.append(f"quantized model's mean relative logit error {q['rel_logit_error_mean']:.3f} > {max_rel}")
    if q["top1_agreement"] < min_top1:
        out.append(f"quantized model's top-1 agreement with the merged model {q['top1_agreement']:.3f} < {min_top1}")
    return out


# ---- manifest and verify ---------------------------------------------------------------------------------------
def finish_dir(root, manifest: dict) -> dict:
    """Normal permissions (a serving user must read it), {file: sha256} of everything, manifest written last."""
    root = Path(root)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(root, 0o777 & ~umask)
    for p in root.rglob("*"):
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)
    files = {k: v for k, v in tree_hashes(root).items() if k != MANIFEST}
    manifest = {**manifest, "files": files, "files_tree_sha256": tree_sha256(files)}
    atomic_write_json(root / MANIFEST, manifest)
    return manifest


def verify_dir(root) -> int:
    """Recompute every file hash of a packaged dir; raise naming the first file that differs. -> files checked."""
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise StageError(f"{path} not found: not a packaged model dir")
    manifest = read_json(path)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files:
        raise StageError(f"{path} is not a packaging manifest (no 'files' table)")
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} - {MANIFEST}
    for rel in sorted(set(files) | present):
        if rel not in files:
            raise StageError(f"verify failed: {rel} is not in the manifest (unexpected file)")
        if rel not in present:
            raise StageError(f"verify failed: {rel} is missing")
        got = sha256_file(root / rel)
        if got != files[rel]:
            raise StageError(f"verify failed: {rel} differs (sha256 {got[:16]}..., manifest {files[rel][:16]}...)")
    return len(files)


def input_summary(base_dir, adapter_dir, stats: dict) -> tuple[dict, dict]:
    """Manifest sections for the base model and the adapter."""
    base_dir, adapter_dir = Path(base_dir), Path(adapter_dir)
    base_files = {**stats["base_weight_sha256"], **{n: sha256_file(base_dir / n) for n in stats["copied_files"]}}
    adapter_files = {p.name: sha256_file(p) for p in sorted(adapter_dir.iterdir()) if p.is_file()}
    tm = read_json(adapter_dir / "training_manifest.json", missing_ok=True)
    base = {"path": str(base_dir.resolve()), "config_sha256": base_files["config.json"],
            "weights_sha256": stats["base_weight_sha256"], "tree_sha256": tree_sha256(base_files),
            "files_hashed": sorted(base_files)}
    adapter = {"path": str(adapter_dir.resolve()), "adapter_model_sha256": adapter_files[ADAPTER_WEIGHTS],
               "adapter_config_sha256": adapter_files["adapter_config.json"], "tree_sha256": tree_sha256(adapter_files),
               "training_manifest_sha256": adapter_files.get("training_manifest.json"),
               "base_model_name_or_path": stats["adapter_config"].get("base_model_name_or_path"),
               "r": stats["adapter_config"].get("r"), "lora_alpha": stats["adapter_config"].get("lora_alpha"),
               "target_modules": stats["target_modules"],
               "trained": {k: tm.get(k) for k in ("data_path", "data_sha256", "dataset_id", "dataset_manifest_sha256",
                                                  "prompt_template_sha256", "base_model", "final_loss",
                                                  "global_step", "created_unix")}}
    return base, adapter


def dataset_summary(adapter_dir, calib_data: Path, eval_data: Path | None) -> tuple[dict, list[str], list | None]:
    """Dataset provenance (adapter's training manifest + the dataset manifest beside the calibration data)."""
    tm = read_json(Path(adapter_dir) / "training_manifest.json", missing_ok=True)
    dm_path = Path(calib_data.with_suffix("").as_posix() + ".manifest.json")
    dm = read_json(dm_path, missing_ok=True)
    warnings = []
    holdout = None
    if eval_data is None and dm.get("holdout_out"):
        for cand in (Path(dm["holdout_out"]), dm_path.parent / Path(dm["holdout_out"]).name):
            if cand.is_file():
                eval_data = cand
                break
    if eval_data is not None:
        holdout = load_records(eval_data)
    calib_sha = sha256_file(calib_data)
    current = template_sha256()
    info = {"dataset_id": dm.get("dataset_id") or tm.get("dataset_id"),
            "dataset_manifest": str(dm_path) if dm else None,
            "dataset_manifest_sha256": sha256_file(dm_path) if dm else tm.get("dataset_manifest_sha256"),
            "prompt_template_sha256": dm.get("prompt_template_sha256") or tm.get("prompt_template_sha256"),
            "prompt_template_sha256_current": current,
            "calib_data": str(calib_data.resolve()), "calib_data_sha256": calib_sha,
            "training_data_sha256": tm.get("data_sha256"),
            "eval_data": str(Path(eval_data).resolve()) if eval_data else None,
            "eval_data_sha256": sha256_file(eval_data) if eval_data else None}
    if not dm:
        warnings.append(f"no dataset manifest beside {calib_data} ({dm_path.name}): dataset_id from the adapter only")
    if tm.get("data_sha256") and tm["data_sha256"] != calib_sha:
        warnings.append("calibration data differs from the data the adapter was trained on")
    if tm.get("dataset_manifest_sha256") and dm and tm["dataset_manifest_sha256"] != info["dataset_manifest_sha256"]:
        warnings.append("dataset manifest differs from the one recorded when the adapter was trained")
    for src, sha in (("adapter training", tm.get("prompt_template_sha256")),
                     ("dataset", dm.get("prompt_template_sha256"))):
        if sha and sha != current:
            warnings.append(f"prompt template changed since {src} (sha256 {sha[:12]} vs current {current[:12]}): "
                            f"the served prompt differs from the trained one")
    return info, warnings, holdout


# ---- CLI --------------------------------------------------------------------------------------------------------
SUBCOMMANDS = ("package", "verify", "bench-merge")


def package_flags(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--base_model", required=True, help="base model dir, HF safetensors format, bf16 (not quantized)")
    ap.add_argument("--lora_adapter", required=True, help="PEFT LoRA adapter dir (adapter_model.safetensors + config)")
    ap.add_argument("--merged_out", required=True, help="output dir of the merged bf16 checkpoint")
    ap.add_argument("--quant_out", help="output dir of the 4-bit checkpoint (required unless --quant_method none)")
    ap.add_argument("--quant_method", choices=["awq", "gptq", "none"], default="awq",
                    help="awq (default): config/quant_awq_w4a16.yaml, AWQ smoothing + W4A16; gptq: "
                         "config/quant_gptq_w4a16.yaml, GPTQ W4A16 (fallback); none: merge only")
    ap.add_argument("--calib_data", help="SFT conversations JSON for calibration (default: the data the adapter was "
                                         "trained on, from its training_manifest.json)")
    ap.add_argument("--eval_data", help="held-out conversations JSON for the merge and quality checks (default: the "
                                        "holdout named in the dataset manifest, else records kept out of calibration)")
    ap.add_argument("--num_calib_samples", type=int, default=64, help="calibration conversations (default 64)")
    ap.add_argument("--calib_max_seq_len", type=int, default=1024,
                    help="longest calibration conversation in tokens; longer ones are skipped, never truncated")
    ap.add_argument("--quant_recipe", help="llm-compressor recipe YAML to use instead of the shipped one of "
                                           "--quant_method (config/quant_<method>_w4a16.yaml)")
    ap.add_argument("--group_size", type=int, default=None,
                    help="replace the group size of every weight group of the recipe (default: the recipe's, 128)")
    ap.add_argument("--num_eval_prompts", type=int, default=8,
                    help="held-out prompts for the quality check (default 8)")
    ap.add_argument("--merge_check_prompts", type=int, default=4,
                    help="prompts for the merged-vs-PEFT logit check (default 4; 0 skips it: it needs the "
                         "model in fp32)")
    ap.add_argument("--max_new_tokens", type=int, default=32,
                    help="greedy tokens compared in the quality check (default 32)")
    ap.add_argument("--max_rel_logit_error", type=float, default=0.10,
                    help="warn when the quantized model's mean relative logit error exceeds this (default 0.10)")
    ap.add_argument("--min_top1_agreement", type=float, default=0.90,
                    help="warn when quantized/merged top-1 agreement falls below this (default 0.90)")
    ap.add_argument("--allow_base_mismatch", action="store_true",
                    help="accept a base whose config.json differs from the one the adapter was trained on "
                         "(tensor names and shapes are still checked)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the calibration/eval split (default 0)")
    ap.add_argument("--force", action="store_true", help="replace existing output dirs")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="package_oracle_model.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", metavar="{package,verify,bench-merge}",
                            help="package (the default when the first argument is a flag), verify, bench-merge")
    ap.package = sub.add_parser("package", help="merge + 4-bit quantization + manifests (default subcommand)",
                                description="Merge the LoRA adapter into the base, quantize it with the recipe, "
                                            "check both against their references and write the manifests.")
    package_flags(ap.package)
    v = sub.add_parser("verify", help="recompute every file hash of a packaged dir",
                       description="Recompute the sha256 of every file of a packaged model dir against its "
                                   "oracle_manifest.json; exit 0 if all match, else name the first file that "
                                   "differs and exit 2.")
    v.add_argument("dir", help="merged_out or quant_out dir")
    b = sub.add_parser("bench-merge", help="merge peak RSS vs the largest shard",
                       description="Peak RSS of the streaming merge vs the largest shard, on a synthetic "
                                   "Llama-shaped multi-shard checkpoint.")
    b.add_argument("--shards", type=int, default=4, help="number of shards (default 4)")
    b.add_argument("--hidden", type=int, default=1024, help="hidden size (default 1024)")
    b.add_argument("--intermediate", type=int, default=4096, help="MLP size (default 4096)")
    b.add_argument("--layers", type=int, default=8, help="decoder layers (default 8)")
    b.add_argument("--workdir", default=".cache/bench-merge",
                   help="scratch dir for the synthetic checkpoint, emptied afterwards (default .cache/bench-merge)")
    b.add_argument("--out", help="also write the result JSON here")
    return ap


def parse_args(argv=None):
    """Subcommands; without one (first argument a flag) the command is `package`, as the Makefile writes it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["package", *argv]
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.command == "package":
        if args.quant_method != "none" and not args.quant_out:
            ap.package.error("--quant_out is required unless --quant_method none")
        if min(args.num_calib_samples, args.calib_max_seq_len, args.num_eval_prompts, args.max_new_tokens) < 1 \
                or args.merge_check_prompts < 0 or (args.group_size is not None and args.group_size < 1):
            ap.package.error("sample counts, lengths, token counts and --group_size must be positive")
    return args


def check_paths(args) -> None:
    """Inputs exist; outputs are new (or --force), distinct, and nowhere inside an input."""
    for flag, p in (("--base_model", args.base_model), ("--lora_adapter", args.lora_adapter)):
        if not Path(p).is_dir():
            raise StageError(f"{flag} {p} is not a directory")
    outs = [("--merged_out", Path(args.merged_out))] + ([("--quant_out", Path(args.quant_out))]
                                                        if args.quant_method != "none" else [])
    ins = [Path(args.base_model).resolve(), Path(args.lora_adapter).resolve()]
    for flag, out in outs:
        r = out.resolve()
        if any(r == i or i in r.parents or r in i.parents for i in ins):
            raise StageError(f"{flag} {out} overlaps an input directory")
        if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
            raise StageError(f"{out} exists and is not empty (pass --force to replace it)")
    if len(outs) == 2 and outs[0][1].resolve() == outs[1][1].resolve():
        raise StageError("--merged_out and --quant_out must differ")


def check_free_space(need: dict) -> None:
    """need: {dir: bytes}; dirs on one filesystem share its free space."""
    by_dev = {}
    for d, n in need.items():
        d = Path(d)
        while not d.exists():
            d = d.parent
        dev = d.stat().st_dev
        by_dev.setdefault(dev, [d, 0])[1] += n
    for d, n in by_dev.values():
        avail = shutil.disk_usage(d).free
        if n > avail:
            raise StageError(f"not enough disk space under {d}: need ~{n >> 20} MiB, {avail >> 20} MiB free")


def print_summary(rows: list[tuple[str, str]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("what")
    table.add_column("value", justify="right")
    for k, v in rows:
        table.add_row(k, v)
    Console(stderr=True).print(table)


class Inputs(NamedTuple):
    """What preflight read and checked; the stages read it and return new values, they never change it."""
    base_dir: Path
    adapter_dir: Path
    calib_data: Path
    calib_pool: list
    eval_recs: list
    recipe: dict | None
    warnings: tuple
    common: dict


def preflight(args) -> Inputs:
    """Everything that can be refused cheaply, before any output exists or any model is loaded."""
    check_paths(args)
    base_dir, adapter_dir = Path(args.base_model), Path(args.lora_adapter)
    calib_data = args.calib_data
    if calib_data is None:
        calib_data = read_json(adapter_dir / "training_manifest.json", missing_ok=True).get("data_path")
        if not calib_data:
            raise StageError("--calib_data not given and the adapter's training_manifest.json names no data_path")
    calib_data = Path(calib_data)
    records = load_records(calib_data)
    identity = check_base_identity(adapter_dir, base_dir, args.allow_base_mismatch)
    shards = weight_shards(base_dir)
    check_adapter_fits(lora_plan(adapter_dir)[0], base_dir, shards)
    recipe = None
    if args.quant_method != "none":
        recipe = load_recipe(recipe_file(args.quant_method, args.quant_recipe), args.group_size)
        for size in sorted({w.get("group_size") for w in recipe["weights"].values() if w.get("strategy") == "group"}):
            check_group_size(read_json(base_dir / "config.json"), size)
    dataset, warnings, holdout = dataset_summary(adapter_dir, calib_data,
                                                 Path(args.eval_data) if args.eval_data else None)
    weights = sum((base_dir / s).stat().st_size for s in shards)
    need = {Path(args.merged_out).parent: weights}
    if args.quant_method != "none":     # 4-bit weights + bf16 embeddings/lm_head: well under half the bf16 size
        need[Path(args.quant_out).parent] = need.get(Path(args.quant_out).parent, 0) + weights // 2
    check_free_space(need)
    calib_pool, eval_recs, eval_source = split_records(records, holdout, args.num_eval_prompts, args.seed)
    if identity["matches"] is False:
        warnings.append("--allow_base_mismatch: base config.json differs from the one the adapter was trained on")
    return Inputs(base_dir, adapter_dir, calib_data, calib_pool, eval_recs, recipe, tuple(warnings),
                  {"schema_version": 1, "started_utc": now_utc(), "command": sys.argv,
                   "dataset": {**dataset, "eval_source": eval_source}, "base_identity": identity,
                   "versions": library_versions(*LIBRARIES)})


def merge_stage(args, inp: Inputs, out_dir: Path, tokenizer) -> dict:
    """Streaming merge + PEFT merge check into out_dir; -> the merged manifest."""
    stats = merge_lora_shards(inp.base_dir, inp.adapter_dir, out_dir)
    base_model, adapter = input_summary(inp.base_dir, inp.adapter_dir, stats)
    prompts = [chat_ids(tokenizer, record_messages(r, with_answer=True))
               for r in inp.eval_recs[:args.merge_check_prompts]]
    check = (merge_check(inp.base_dir, inp.adapter_dir, out_dir, prompts) if prompts
             else {"ok": None, "skipped": "--merge_check_prompts 0"})
    if check["ok"] is False:
        raise StageError(f"merge check failed: merged logits differ from PEFT base+adapter by up to "
                         f"{check['max_abs_logit_diff']:.4g} (mean {check['mean_abs_logit_diff']:.3g}) where bf16 "
                         f"rounding allows {check['rounding_floor_max_abs_diff']:.4g} (mean "
                         f"{check['rounding_floor_mean_abs_diff']:.3g}); "
                         f"{check['top1_disagreements_where_decidable']} decidable top-1 disagreements")
    merge = {**{k: v for k, v in stats.items() if k not in ("base_weight_sha256", "adapter_config")}, "check": check}
    return finish_dir(out_dir, {"kind": "oracle_merged_model", **inp.common, "base_model": base_model,
                                "adapter": adapter, "merge": merge, "warnings": list(inp.warnings),
                                "finished_utc": now_utc()})


def quant_stage(args, inp: Inputs, merged_dir: Path, merged: dict, out_dir: Path, tokenizer) -> dict:
    """Calibrate + quantize the merged checkpoint into out_dir, compare with it; -> the quantized manifest."""
    warnings = list(merged["warnings"])
    rows, calib = calibration_set(tokenizer, inp.calib_pool, args.num_calib_samples, args.calib_max_seq_len)
    if calib["used"] < calib["requested"]:
        warnings.append(f"calibrated on {calib['used']} of {calib['requested']} requested conversations "
                        f"({calib['skipped_too_long']} longer than {args.calib_max_seq_len} tokens skipped)")
        print(f"warning: {warnings[-1]}", file=sys.stderr)
    quant = {"method": Path(args.quant_recipe).stem if args.quant_recipe else args.quant_method,
             **quantize(merged_dir, out_dir, inp.recipe, rows, args.calib_max_seq_len),
             "calibration": {**calib, "source": str(inp.calib_data.resolve()), "seed": args.seed,
                             "format": "chat template, prompt + assistant SQL, token ids"}}
    quality = compare_quantized(merged_dir, out_dir, tokenizer, inp.eval_recs, args.max_new_tokens)
    problems = quality_warnings(quality, args.max_rel_logit_error, args.min_top1_agreement)
    quality = {**quality, "thresholds": {"max_rel_logit_error": args.max_rel_logit_error,
                                         "min_top1_agreement": args.min_top1_agreement},
               "warnings": problems, "ok": not problems}
    for w in problems:
        print(f"warning: {w}", file=sys.stderr)
    return finish_dir(out_dir, {
        "kind": "oracle_quantized_model", **inp.common, "base_model": merged["base_model"],
        "adapter": merged["adapter"], "merge": merged["merge"],
        "merged": {"path": str(Path(args.merged_out).resolve()), "files_tree_sha256": merged["files_tree_sha256"]},
        "quantization": quant, "quality": quality, "warnings": warnings + problems, "finished_utc": now_utc()})


def summary_rows(args, merged: dict, quant: dict | None, seconds: float) -> list[tuple[str, str]]:
    mib, m, check = 1 << 20, merged["merge"], merged["merge"]["check"]
    rows = [("base shards / largest", f"{m['shards']} / {m['largest_shard_bytes'] / mib:.1f} MiB"),
            ("LoRA tensors merged", str(m["merged_tensors"])),
            ("merge peak RSS (extra)", f"{m['peak_rss_extra_bytes'] / mib:.1f} MiB "
                                       f"({m['peak_rss_over_largest_shard']:.2f}x largest shard)"),
            ("merge check max |dlogit|", "skipped" if check["ok"] is None else
             f"{check['max_abs_logit_diff']:.2e} (rounding floor {check['rounding_floor_max_abs_diff']:.2e})"),
            ("merge check top-1 agreement", "skipped" if check["ok"] is None else f"{check['top1_agreement']:.4f}"),
            ("merged", f"{args.merged_out} ({len(merged['files'])} files)")]
    if quant:
        q, cal, ql = quant["quantization"], quant["quantization"]["calibration"], quant["quality"]
        rows += [("quantization", f"{q['method']}: {q['scheme']}"),
                 ("calibration conversations", f"{cal['used']} / {cal['requested']} (<= {cal['max_seq_len']} tokens)"),
                 ("rel. logit error (mean)", f"{ql['rel_logit_error_mean']:.4f}"),
                 ("top-1 agreement", f"{ql['top1_agreement']:.4f}"),
                 ("greedy outputs identical", f"{ql['greedy_identical']:.0%} of {ql['prompts']}"),
                 ("quantized", f"{args.quant_out} ({len(quant['files'])} files)")]
    return rows + [("warnings", str(len((quant or merged)["warnings"]))), ("elapsed", f"{seconds:.1f} s")]


def package(args) -> int:
    t0 = time.perf_counter()
    inp = preflight(args)
    for w in inp.warnings:
        print(f"warning: {w}", file=sys.stderr)
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(inp.base_dir)
    quant = None
    # Nested: the quantized dir is renamed into place first, then the merged one; a failure anywhere leaves neither.
    with atomic_dir(args.merged_out, args.force) as merged_tmp:
        merged = merge_stage(args, inp, merged_tmp, tokenizer)
        if args.quant_method != "none":
            with atomic_dir(args.quant_out, args.force) as quant_tmp:
                quant = quant_stage(args, inp, merged_tmp, merged, quant_tmp, tokenizer)
    print_summary(summary_rows(args, merged, quant, time.perf_counter() - t0), "package")
    return 0


def bench(args) -> int:
    result = bench_merge(args.shards, args.workdir, args.hidden, args.intermediate, args.layers)
    if args.out:
        atomic_write_json(args.out, result)
    mib = 1 << 20
    print_summary([("shards", str(result["shards"])),
                   ("largest shard", f"{result['largest_shard_bytes'] / mib:.1f} MiB"),
                   ("peak RSS beyond start", f"{result['peak_rss_extra_bytes'] / mib:.1f} MiB"),
                   ("ratio to largest shard", f"{result['peak_rss_over_largest_shard']:.3f}"),
                   ("within 2x budget", str(result["within_budget"])),
                   ("throughput", f"{result['throughput_MBps']} MB/s")], "bench-merge")
    print(json.dumps(result))
    return 0 if result["within_budget"] else 1


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "verify":
            print(f"verified {verify_dir(args.dir)} files")
            return 0
        if args.command == "bench-merge":
            return bench(args)
        return package(args)
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
