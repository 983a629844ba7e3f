"""Capacity planner: will LLaMA-3.3-70B serve on 1x A100-80GB (W4A16) and train on 8x A100-80GB (ZeRO-3 + LoRA)?

Paper arithmetic from the model's config.json (and, for serving, vLLM's --config YAML), so a site can check a
configuration before it books GPUs. Every formula is a pure function below; the docstrings state the assumptions.

    python custom_oracle_llama/plan_capacity.py serve --model_config CONFIG.json --vllm_config custom_oracle_llama/inference/vllm_config.yaml
    python custom_oracle_llama/plan_capacity.py train --model_config CONFIG.json --gpus 8 --seq_len 8192

Exit status: 0 = fits, 1 = does not fit, 2 = bad input (missing file, bad YAML/JSON, missing keys).
"""
import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from artifacts import StageError  # noqa: E402

GiB = 1024 ** 3
BF16 = 2
# vLLM's paged KV cache hands out blocks of 16 tokens on GPU: a sequence of L tokens holds ceil(L/16) blocks.
KV_BLOCK_TOKENS = 16
# vLLM's default when the YAML does not set gpu-memory-utilization.
VLLM_DEFAULT_GPU_UTIL = 0.92
# Serving allowance inside the gpu-memory-utilization budget, besides weights and KV: CUDA context + cuBLAS/Marlin
# workspaces (~1 GiB), peak activations of one forward at max-num-batched-tokens 2048 (70B: gate/up 2048 x 28672
# x 2 x 2 B ~ 0.25 GB, plus attention/sampler buffers, < 1 GiB), CUDA graphs for decode batch sizes <= 4
# (~0.5 GiB). ~2.5 GiB measured-typical, rounded up to 4 GiB so the verdict stays on the safe side.
SERVE_ALLOWANCE_BYTES = 4 * GiB
# Training allowance per GPU: CUDA context, NCCL communicators/buffers, allocator fragmentation.
TRAIN_ALLOWANCE_BYTES = 4 * GiB
# Mixed-precision Adam per trainable parameter (ZeRO paper): bf16 param 2 + bf16 grad 2 + fp32 master 4
# + Adam m 4 + Adam v 4 = 16 bytes, all partitioned across GPUs by ZeRO-3.
TRAINABLE_BYTES = 16
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# W4A16 as llmcompressor's preset writes it: int4, group 128, symmetric (no zero point), bf16 scales.
W4A16 = {"bits": 4, "group_size": 128, "symmetric": True}


# ---------------------------------------------------------------------------------------------- model shapes

def model_dims(cfg: dict) -> dict:
    """The numbers every formula needs, validated (StageError names a missing/bad key)."""
    need = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    missing = [k for k in need if k not in cfg]
    if missing:
        raise StageError(f"model config is missing {', '.join(missing)}")
    d = {k: cfg[k] for k in need}
    d["num_key_value_heads"] = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    d["head_dim"] = cfg.get("head_dim") or (cfg["hidden_size"] // max(1, cfg["num_attention_heads"]))
    d["max_position_embeddings"] = cfg.get("max_position_embeddings") or 0
    for k, v in d.items():
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise StageError(f"model config {k} must be a positive integer, got {v!r}")
    d["tie_word_embeddings"] = bool(cfg.get("tie_word_embeddings", False))
    return d


def linear_shapes(cfg: dict) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every projection in one decoder layer (LLaMA: GQA attention + SwiGLU MLP)."""
    d = model_dims(cfg)
    h, i = d["hidden_size"], d["intermediate_size"]
    q = d["num_attention_heads"] * d["head_dim"]
    kv = d["num_key_value_heads"] * d["head_dim"]
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def param_counts(cfg: dict) -> dict[str, int]:
    """Exact parameter counts (no biases in LLaMA). lm_head counts 0 extra when tied to embed_tokens."""
    d = model_dims(cfg)
    per_layer = sum(a * b for a, b in linear_shapes(cfg).values())
    embed = d["vocab_size"] * d["hidden_size"]
    c = {"linear": per_layer * d["num_hidden_layers"], "per_layer_linear": per_layer, "embed": embed,
         "lm_head": 0 if d["tie_word_embeddings"] else embed,
         # input_layernorm + post_attention_layernorm per layer, plus the final norm
         "norms": (2 * d["num_hidden_layers"] + 1) * d["hidden_size"]}
    c["total"] = c["linear"] + c["embed"] + c["lm_head"] + c["norms"]
    return c


# ---------------------------------------------------------------------------------------------- serving

def weights_bytes(cfg: dict, group_size: int = 128, bits: int = 4, symmetric: bool = True) -> int:
    """Bytes of the W4A16 (compressed-tensors pack-quantized) checkpoint in GPU memory.

    Every decoder-layer linear: out*in*bits/8 packed weights + one bf16 scale per group of `group_size` input
    columns (+ one packed `bits`-bit zero point per group when asymmetric; W4A16 is symmetric: none).
    embed_tokens, lm_head and the RMSNorm weights stay bf16 (llmcompressor's recipes ignore lm_head). The 16-byte
    weight_shape tensor per linear is left out (9 KB for 70B).
    """
    groups_bytes = BF16 + (bits / 8 if not symmetric else 0)
    total = 0.0
    for k, n in linear_shapes(cfg).values():
        groups = n * math.ceil(k / group_size)
        total += n * k * bits / 8 + groups * groups_bytes
    c = param_counts(cfg)
    return int(total * model_dims(cfg)["num_hidden_layers"]) + (c["embed"] + c["lm_head"] + c["norms"]) * BF16


def kv_bytes_per_token(cfg: dict, dtype_bytes: int = 2) -> int:
    """K and V for every layer: layers x kv_heads x head_dim x 2 (K, V) x dtype bytes."""
    d = model_dims(cfg)
    return d["num_hidden_layers"] * d["num_key_value_heads"] * d["head_dim"] * 2 * dtype_bytes


def kv_bytes_total(cfg: dict, max_num_seqs: int, max_model_len: int, dtype_bytes: int = 2) -> int:
    """KV cache for max_num_seqs sequences all at max_model_len (whole 16-token blocks), so none is preempted."""
    blocks = math.ceil(max_model_len / KV_BLOCK_TOKENS)
    return max_num_seqs * blocks * KV_BLOCK_TOKENS * kv_bytes_per_token(cfg, dtype_bytes)


def max_len_that_fits(cfg: dict, kv_room_bytes: float, max_num_seqs: int, dtype_bytes: int = 2) -> int:
    """Largest max-model-len whose KV for max_num_seqs sequences fits in kv_room_bytes: a multiple of 16,
    capped at max_position_embeddings (vLLM refuses longer). fits(L) <=> L <= this value."""
    per_block = max_num_seqs * KV_BLOCK_TOKENS * kv_bytes_per_token(cfg, dtype_bytes)
    tokens = max(0, int(kv_room_bytes // per_block)) * KV_BLOCK_TOKENS
    cap = model_dims(cfg)["max_position_embeddings"]
    return min(tokens, cap) if cap else tokens


def attention_flops_per_token(cfg: dict, context: int) -> float:
    """Forward attention-score FLOPs for one token attending to `context` tokens: QK^T and AV, 2*ctx*d each."""
    d = model_dims(cfg)
    return 4 * d["num_hidden_layers"] * context * d["num_attention_heads"] * d["head_dim"]


def decode_floor_ms(weights: int, kv_read: int, bandwidth_bps: float, flops: float = 0.0,
                    peak_flops: float = float("inf")) -> float:
    """One decode step reads all weights once (shared by the batch) plus every sequence's KV; at batch <= 4 it is
    memory-bound, but the compute time is taken if larger. (The embedding table, 2.1 GB of the 70B's weights, is
    only gathered, not streamed, so the true floor is ~1 ms lower; kept in, as a margin.)"""
    return 1e3 * max((weights + kv_read) / bandwidth_bps, flops / peak_flops)


def prefill_floor_s(cfg: dict, tokens: int, peak_flops: float) -> float:
    """Prefill of one `tokens`-long prompt at the bf16 peak (W4A16 dequantizes into bf16 GEMMs):
    2 x linear params x tokens + causal attention (2 x layers x tokens^2 x heads*head_dim)
    + lm_head for the last token only (vLLM computes logits for sampled positions). Embeddings are a gather."""
    c = param_counts(cfg)
    lm_head = c["lm_head"] or c["embed"]
    flops = 2 * c["linear"] * tokens + attention_flops_per_token(cfg, tokens) * tokens / 2 + 2 * lm_head
    return flops / peak_flops


def quant_scheme(cfg: dict) -> dict:
    """bits/group/symmetry from a compressed-tensors quantization_config; W4A16 defaults for an unquantized config."""
    qc = cfg.get("quantization_config")
    if not qc:
        return dict(W4A16)
    if qc.get("quant_method") != "compressed-tensors":
        raise StageError(f"quantization_config.quant_method {qc.get('quant_method')!r}: the planner models "
                         "compressed-tensors weight-only int quantization (W4A16)")
    try:
        w = next(iter(qc["config_groups"].values()))["weights"]
        return {"bits": int(w["num_bits"]), "group_size": int(w["group_size"]), "symmetric": bool(w["symmetric"])}
    except (KeyError, TypeError, StopIteration, ValueError) as e:
        raise StageError(f"quantization_config has no group-quantized weights scheme ({e})") from None


def kv_dtype_bytes_from(vllm_cfg: dict) -> int:
    dt = str(vllm_cfg.get("kv-cache-dtype", "auto"))
    if dt == "auto":
        return BF16  # the model dtype: bf16 for this project
    if dt.startswith("fp8"):
        return 1
    raise StageError(f"kv-cache-dtype {dt!r} not understood (auto or fp8*)")


def plan_serve(cfg: dict, vllm_cfg: dict, gpu_mem_bytes: float, bandwidth_bps: float, peak_flops: float,
               kv_dtype_bytes: int | None = None) -> dict:
    """Serving plan for one GPU. With kv-cache-memory-bytes set, vLLM uses exactly that KV pool (and the
    utilization fraction is not used for sizing); otherwise the KV pool is what is left of
    gpu_mem x gpu-memory-utilization after weights and the allowance."""
    seqs, max_len = _pos_int(vllm_cfg, "max-num-seqs"), _pos_int(vllm_cfg, "max-model-len")
    if _pos_int(vllm_cfg, "tensor-parallel-size", 1) != 1:
        raise StageError("tensor-parallel-size != 1: this planner models a single GPU")
    kv_b = kv_dtype_bytes or kv_dtype_bytes_from(vllm_cfg)
    q = quant_scheme(cfg)
    w = weights_bytes(cfg, q["group_size"], q["bits"], q["symmetric"])
    kv_tok = kv_bytes_per_token(cfg, kv_b)
    kv_total = kv_bytes_total(cfg, seqs, max_len, kv_b)
    pool, reasons = vllm_cfg.get("kv-cache-memory-bytes"), []
    if pool is not None:
        pool = _pos_num(vllm_cfg, "kv-cache-memory-bytes")
        util, budget = None, gpu_mem_bytes
        kv_room = pool if w + pool + SERVE_ALLOWANCE_BYTES <= budget else 0
        if not kv_room:
            reasons.append(f"weights {_gb(w)} + kv-cache-memory-bytes {_gb(pool)} + allowance "
                           f"{_gb(SERVE_ALLOWANCE_BYTES)} exceed the GPU's {_gb(budget)}")
    else:
        util = _pos_num(vllm_cfg, "gpu-memory-utilization", VLLM_DEFAULT_GPU_UTIL)
        if util > 1:
            raise StageError(f"gpu-memory-utilization must be in (0, 1], got {util}")
        budget = gpu_mem_bytes * util
        kv_room = budget - w - SERVE_ALLOWANCE_BYTES
    max_pos = model_dims(cfg)["max_position_embeddings"]
    if kv_total > kv_room:
        reasons.append(f"KV for {seqs} x {max_len} tokens needs {_gb(kv_total)} but {_gb(max(kv_room, 0))} is left "
                       f"for it (weights {_gb(w)}, allowance {_gb(SERVE_ALLOWANCE_BYTES)}, budget {_gb(budget)})")
    if max_pos and max_len > max_pos:
        reasons.append(f"max-model-len {max_len} exceeds the model's max_position_embeddings {max_pos}")
    # A full batch whose sequences are on average half-way to max_model_len (the worst case is reported too).
    mean_kv_read = seqs * (max_len // 2) * kv_tok
    c = param_counts(cfg)
    step_flops = seqs * (2 * (c["linear"] + (c["lm_head"] or c["embed"])) + attention_flops_per_token(cfg, max_len / 2))
    return {
        "quant_scheme": q, "weights_bytes": w, "kv_dtype_bytes": kv_b, "kv_bytes_per_token": kv_tok,
        "max_num_seqs": seqs, "max_model_len": max_len, "kv_bytes_total": kv_total,
        "gpu_mem_bytes": int(gpu_mem_bytes), "gpu_memory_utilization": util, "kv_cache_memory_bytes": pool,
        "budget_bytes": int(budget), "allowance_bytes": SERVE_ALLOWANCE_BYTES,
        "kv_room_bytes": int(kv_room), "headroom_bytes": int(kv_room - kv_total),
        "fits": not reasons, "reasons": reasons,
        "max_model_len_that_fits": max_len_that_fits(cfg, kv_room, seqs, kv_b),
        "decode_floor_ms": decode_floor_ms(w, mean_kv_read, bandwidth_bps, step_flops, peak_flops),
        "decode_floor_ms_full_context": decode_floor_ms(w, kv_total, bandwidth_bps, step_flops, peak_flops),
        "prefill_floor_s": prefill_floor_s(cfg, max_len, peak_flops),
    }


# ---------------------------------------------------------------------------------------------- training

def lora_params(cfg: dict, r: int, targets=LORA_TARGETS) -> int:
    """LoRA A (r x in) + B (out x r) on each targeted projection of every layer."""
    shapes = linear_shapes(cfg)
    unknown = set(targets) - set(shapes)
    if unknown:
        raise StageError(f"unknown LoRA target modules: {', '.join(sorted(unknown))}")
    return r * sum(a + b for name, (a, b) in shapes.items() if name in targets) * model_dims(cfg)["num_hidden_layers"]


def train_flops_per_token(cfg: dict, seq_len: int, lora_r: int, targets=LORA_TARGETS) -> dict:
    """Hardware FLOPs per trained token, LoRA on a frozen base with activation checkpointing.

    Base matmuls (decoder linears + lm_head; the embedding is a gather): forward 2N, recompute 2N (checkpointing
    re-runs each layer's forward), backward 2N for activation gradients only (the base is frozen: no weight
    gradients) -> 6N. LoRA adapters do get weight gradients: 8 x N_lora. Causal attention scores: forward
    2 x layers x seq x heads*head_dim per token, x4 (forward, recompute, backward 2x).
    `six_n` = 6 x all params, the textbook full-fine-tuning rule: ~5,900 tok/s for 70B on 8x A100 at 100% MFU.
    It lands on the same order here because 4N (frozen-base model FLOPs) + 2N recompute = 6N as well.
    """
    c = param_counts(cfg)
    n_matmul = c["linear"] + (c["lm_head"] or c["embed"])
    base = 6 * n_matmul
    lora = 8 * lora_params(cfg, lora_r, targets)
    attn = 4 * attention_flops_per_token(cfg, seq_len / 2)  # causal: mean context is seq/2
    return {"base": base, "lora": lora, "attention": attn, "total": base + lora + attn, "six_n": 6 * c["total"]}


def layer_recompute_bytes(cfg: dict, seq_len: int, micro_batch: int = 1) -> int:
    """Activations of the one decoder layer being recomputed for its backward (bf16, per token):
    attention 5h + 3kv (norm out, q, k, v, rotated q/k, attention out, o_proj out), MLP 2h + 4i (norm out, gate,
    up, silu(gate), product, down out), LoRA-dropout copies of each adapter input 6h + i
    -> (13h + 3kv + 5i) x 2 bytes x seq x micro_batch."""
    d = model_dims(cfg)
    h, i, kv = d["hidden_size"], d["intermediate_size"], d["num_key_value_heads"] * d["head_dim"]
    return (13 * h + 3 * kv + 5 * i) * BF16 * seq_len * micro_batch


def plan_train(cfg: dict, gpus: int, gpu_mem_bytes: float, seq_len: int, lora_r: int, micro_batch: int,
               peak_flops: float, targets=LORA_TARGETS) -> dict:
    """Per-GPU memory for ZeRO-3 + LoRA (no CPU offload) and the compute floor across all GPUs."""
    for name, v in (("gpus", gpus), ("seq_len", seq_len), ("lora_r", lora_r), ("micro_batch", micro_batch)):
        if v <= 0:
            raise StageError(f"--{name} must be positive, got {v}")
    d, c = model_dims(cfg), param_counts(cfg)
    h, layers = d["hidden_size"], d["num_hidden_layers"]
    n_lora = lora_params(cfg, lora_r, targets)
    largest = max(c["per_layer_linear"] + 2 * h, c["embed"], c["lm_head"])
    mem = {
        # ZeRO-3 partitions the frozen bf16 base evenly across GPUs
        "sharded_weights_bytes": c["total"] * BF16 / gpus,
        "lora_state_bytes": n_lora * TRAINABLE_BYTES / gpus,
        # HF gradient checkpointing keeps each decoder layer's input hidden state (bf16); not sharded: every GPU
        # holds its own micro-batch
        "activation_checkpoint_bytes": micro_batch * seq_len * h * layers * BF16,
        "layer_recompute_bytes": layer_recompute_bytes(cfg, seq_len, micro_batch),
        # logits bf16 + the loss's fp32 upcast + its fp32 gradient: seq x vocab x (2 + 4 + 4)
        "logits_bytes": micro_batch * seq_len * d["vocab_size"] * (BF16 + 4 + 4),
        # the largest module gathered whole (lm_head/embed for 70B) + DeepSpeed "auto" prefetch bucket (0.9 h^2)
        # + reduce bucket (h^2), bf16
        "gather_buffer_bytes": (largest + 0.9 * h * h + h * h) * BF16,
        "allowance_bytes": TRAIN_ALLOWANCE_BYTES,
    }
    total = sum(mem.values())
    flops = train_flops_per_token(cfg, seq_len, lora_r, targets)
    out = {k: int(v) for k, v in mem.items()}
    out.update({
        "gpus": gpus, "seq_len": seq_len, "lora_r": lora_r, "micro_batch": micro_batch,
        "lora_params": n_lora, "total_params": c["total"],
        "total_per_gpu_bytes": int(total), "gpu_mem_bytes": int(gpu_mem_bytes),
        "headroom_bytes": int(gpu_mem_bytes - total), "fits": total <= gpu_mem_bytes,
        "flops_per_token": flops["total"],
        "compute_floor_tokens_per_s": gpus * peak_flops / flops["total"],
        "compute_floor_tokens_per_s_6n": gpus * peak_flops / flops["six_n"],
    })
    return out


# ---------------------------------------------------------------------------------------------- I/O + CLI

def _pos_num(cfg: dict, key: str, default=None) -> float:
    v = cfg.get(key, default)
    if v is None:
        raise StageError(f"vLLM config is missing {key}")
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
        raise StageError(f"vLLM config {key} must be a positive number, got {v!r}")
    return v


def _pos_int(cfg: dict, key: str, default=None) -> int:
    v = _pos_num(cfg, key, default)
    if not isinstance(v, int):
        raise StageError(f"vLLM config {key} must be an integer, got {v!r}")
    return v


def load_json(path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StageError(f"model config not found: {path}") from None
    except (OSError, ValueError) as e:
        raise StageError(f"model config {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise StageError(f"model config {path} is not a JSON object")
    return data


def load_yaml(path) -> dict:
    import yaml
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StageError(f"vLLM config not found: {path}") from None
    except (OSError, yaml.YAMLError) as e:
        raise StageError(f"vLLM config {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise StageError(f"vLLM config {path} is not a YAML mapping of flag: value")
    return data


def _gb(b: float) -> str:
    return f"{b / 1e9:.2f} GB ({b / GiB:.2f} GiB)"


def _table(title: str, rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join([title, "-" * len(title)] + [f"{k:<{width}}  {v}" for k, v in rows])


def serve_table(p: dict) -> str:
    q = p["quant_scheme"]
    pool = (f"kv-cache-memory-bytes {_gb(p['kv_cache_memory_bytes'])} (whole GPU {_gb(p['budget_bytes'])})"
            if p["kv_cache_memory_bytes"] else f"{p['gpu_memory_utilization']} x {_gb(p['gpu_mem_bytes'])}")
    rows = [
        ("weights (W%dA16, group %d, %s)" % (q["bits"], q["group_size"], "sym" if q["symmetric"] else "asym + zp"),
         _gb(p["weights_bytes"])),
        ("KV per token", f"{p['kv_bytes_per_token']:,} B ({p['kv_bytes_per_token'] / 1024:g} KiB)"),
        (f"KV for {p['max_num_seqs']} x {p['max_model_len']}", _gb(p["kv_bytes_total"])),
        ("activation/graph allowance", _gb(p["allowance_bytes"])),
        ("budget", pool),
        ("room left for KV", _gb(p["kv_room_bytes"])),
        ("verdict", ("FITS" if p["fits"] else "DOES NOT FIT") + f", headroom {_gb(p['headroom_bytes'])}"),
        (f"largest max-model-len at {p['max_num_seqs']} seqs", f"{p['max_model_len_that_fits']:,}"),
        ("decode floor, full batch (mean / full context)",
         f"{p['decode_floor_ms']:.1f} ms / {p['decode_floor_ms_full_context']:.1f} ms per step"),
        (f"prefill floor, {p['max_model_len']}-token prompt", f"{p['prefill_floor_s']:.2f} s"),
    ]
    return _table("serve plan (1 GPU)", rows) + "".join(f"\n  - {r}" for r in p["reasons"])


def train_table(p: dict) -> str:
    rows = [(k.removesuffix("_bytes").replace("_", " "), _gb(p[k])) for k in (
        "sharded_weights_bytes", "lora_state_bytes", "activation_checkpoint_bytes", "layer_recompute_bytes",
        "logits_bytes", "gather_buffer_bytes", "allowance_bytes", "total_per_gpu_bytes")]
    rows += [
        ("LoRA params", f"{p['lora_params']:,} (r={p['lora_r']})"),
        ("verdict", ("FITS" if p["fits"] else "DOES NOT FIT") + f" in {_gb(p['gpu_mem_bytes'])}, "
                                                               f"headroom {_gb(p['headroom_bytes'])}"),
        ("FLOPs per token", f"{p['flops_per_token']:.3e}"),
        (f"compute floor at 100% MFU ({p['gpus']} GPUs)", f"{p['compute_floor_tokens_per_s']:,.0f} tok/s "
                                                           f"(6N rule: {p['compute_floor_tokens_per_s_6n']:,.0f})"),
    ]
    return _table(f"train plan (ZeRO-3 + LoRA, per GPU, seq {p['seq_len']}, micro-batch {p['micro_batch']})", rows)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model_config", required=True, help="the model's config.json (base or quantized)")
    common.add_argument("--gpu_mem_gib", type=float, default=80.0, help="memory per GPU in GiB (A100-80GB: 80)")
    common.add_argument("--bf16_tflops", type=float, default=312.0, help="dense bf16 peak per GPU, TFLOP/s (A100: 312)")
    common.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    fmt = argparse.ArgumentDefaultsHelpFormatter
    s = sub.add_parser("serve", parents=[common], formatter_class=fmt, help="vLLM on one GPU: weights, KV cache, verdict, floors")
    s.add_argument("--vllm_config", required=True, help="vLLM --config YAML (max-model-len, max-num-seqs, ...)")
    s.add_argument("--mem_bandwidth_tbps", type=float, default=1.935, help="HBM bandwidth, TB/s (A100 PCIe 80GB: 1.935)")
    s.add_argument("--kv_dtype_bytes", type=int, default=None, choices=(1, 2, 4),
                   help="KV cache element size; default from the YAML's kv-cache-dtype (auto = bf16 = 2)")
    t = sub.add_parser("train", parents=[common], formatter_class=fmt, help="ZeRO-3 + LoRA: per-GPU memory, compute floor")
    t.add_argument("--gpus", type=int, default=8, help="number of GPUs ZeRO-3 shards across")
    t.add_argument("--seq_len", type=int, default=8192, help="training sequence length (model_max_length)")
    t.add_argument("--lora_r", type=int, default=32, help="LoRA rank")
    t.add_argument("--lora_target_modules", default=",".join(LORA_TARGETS), help="comma-separated projections")
    t.add_argument("--micro_batch", type=int, default=1, help="sequences per GPU per step")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_json(args.model_config)
        gpu_mem, peak = args.gpu_mem_gib * GiB, args.bf16_tflops * 1e12
        if gpu_mem <= 0 or peak <= 0:
            raise StageError("--gpu_mem_gib and --bf16_tflops must be positive")
        if args.cmd == "serve":
            if args.mem_bandwidth_tbps <= 0:
                raise StageError("--mem_bandwidth_tbps must be positive")
            plan = plan_serve(cfg, load_yaml(args.vllm_config), gpu_mem, args.mem_bandwidth_tbps * 1e12, peak,
                              args.kv_dtype_bytes)
            text = serve_table(plan)
        else:
            targets = tuple(t.strip() for t in args.lora_target_modules.split(",") if t.strip())
            plan = plan_train(cfg, args.gpus, gpu_mem, args.seq_len, args.lora_r, args.micro_batch, peak, targets)
            text = train_table(plan)
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(plan) if args.json else text)
    return 0 if plan["fits"] else 1


if __name__ == "__main__":
    sys.exit(main())
