"""Capacity planner: will LLaMA-3.3-70B serve on 1x A100-80GB (W4A16) and train on 8x A100-80GB (ZeRO-3 + LoRA)?

Paper arithmetic from the model's config.json (and, for serving, vLLM's --config YAML), so a site can check a
configuration before it books GPUs. Every formula is a pure function below; the docstrings state the assumptions.

    python custom_oracle_llama/plan_capacity.py serve --model_config CONFIG.json --vllm_config custom_oracle_llama/inference/vllm_config.yaml [--users 40]
    python custom_oracle_llama/plan_capacity.py train --model_config CONFIG.json --gpus 8 --nodes 2 --inter_node_gbps 200

The formulas are checked against the engines, not restated: KV bytes/token and the KV pool's token count against
vLLM's own start-up report, the ZeRO-3 weight/optimizer partitions against DeepSpeed's estimator, the activation
peak against a measured tiny LoRA step (tests/test_plan_capacity.py).

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
# The loss phase of a training step, per logit (measured on the tiny LoRA run, tests/test_plan_capacity.py):
# fp32 log-softmax output saved by cross_entropy 4 + fp32 NLL gradient 4 + fp32 log-softmax gradient 4. The bf16
# logits and their fp32 upcast are already freed: the Trainer keeps only the loss of the model's outputs. Plus, per
# token, the final RMSNorm's fp32 copy of the hidden state (4h bytes), saved for its backward.
LOGITS_BYTES_PER_ENTRY = 12
# One decoder layer's recompute + backward under activation checkpointing, bf16 elements per token, LoRA dropout on:
# measured live tensors at that phase's peak (tests/test_plan_capacity.py fits them on 5 shapes, residual < 0.2%).
# h: RMSNorm fp32 copies (2 x 2 norms), norm outputs, q, rotated q, attention output, o_proj output, 7 LoRA-dropout
# copies and masks of the adapter inputs, residual adds, and ~6h of gradients in flight; i: gate, up, silu(gate),
# product, down's dropout copy, one gradient; kv: k and v after rotation; r: each adapter's x @ A; head_dim: RoPE.
LAYER_BACKWARD_COEFFS = {"h": 23, "i": 6, "kv": 2, "r": 7, "head_dim": 2}
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

def weights_bytes(cfg: dict, group_size: int | None = 128, bits: int = 4, symmetric: bool = True,
                  quantize_lm_head: bool = False) -> int:
    """Bytes of a compressed-tensors int weight-only checkpoint (W4A16 pack-quantized by default) in GPU memory.

    Every decoder-layer linear: out*in*bits/8 packed weights + one bf16 scale per group of `group_size` input
    columns (group_size None = channel strategy: one scale per output row) + one packed `bits`-bit zero point per
    scale when asymmetric. embed_tokens and the RMSNorm weights stay bf16; lm_head too unless the scheme quantizes
    it (llmcompressor's recipes list it in `ignore`). The 16-byte weight_shape tensor per linear is left out.
    """
    def linear(n, k):
        scales = n * (math.ceil(k / group_size) if group_size else 1)
        return n * k * bits / 8 + scales * (BF16 + (0 if symmetric else bits / 8))

    d, c = model_dims(cfg), param_counts(cfg)
    total = sum(linear(n, k) for k, n in linear_shapes(cfg).values()) * d["num_hidden_layers"]
    head = (linear(d["vocab_size"], d["hidden_size"]) if quantize_lm_head else c["lm_head"] * BF16) if c["lm_head"] else 0
    return int(total + head) + (c["embed"] + c["norms"]) * BF16


def kv_bytes_per_token(cfg: dict, dtype_bytes: int = 2) -> int:
    """K and V for every layer: layers x kv_heads x head_dim x 2 (K, V) x dtype bytes."""
    d = model_dims(cfg)
    return d["num_hidden_layers"] * d["num_key_value_heads"] * d["head_dim"] * 2 * dtype_bytes


def kv_bytes_total(cfg: dict, max_num_seqs: int, max_model_len: int, dtype_bytes: int = 2) -> int:
    """KV cache for max_num_seqs sequences all at max_model_len (whole 16-token blocks), so none is preempted."""
    blocks = math.ceil(max_model_len / KV_BLOCK_TOKENS)
    return max_num_seqs * blocks * KV_BLOCK_TOKENS * kv_bytes_per_token(cfg, dtype_bytes)


def kv_pool_tokens(cfg: dict, pool_bytes: float, dtype_bytes: int = 2) -> int:
    """Tokens a KV pool of pool_bytes holds, in whole 16-token blocks: what vLLM logs at start-up as
    "KV cache size: N tokens" (checked against a real vLLM in tests/test_plan_capacity.py)."""
    per_block = KV_BLOCK_TOKENS * kv_bytes_per_token(cfg, dtype_bytes)
    return max(0, int(pool_bytes // per_block)) * KV_BLOCK_TOKENS


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
    """The weight scheme a checkpoint was quantized with, read from its compressed-tensors quantization_config
    (what llmcompressor writes into config.json): bits, group size (None = per-channel), symmetry, and whether
    lm_head is quantized (it is unless `ignore` names it). An unquantized config plans as W4A16, the packager's
    default. Anything the formula does not model (float/FP8/NVFP4 weights, per-tensor scales, mixed schemes across
    config groups, other quantization methods) is refused by name rather than planned wrongly."""
    qc = cfg.get("quantization_config")
    if not qc:
        return dict(W4A16, quantize_lm_head=False)
    if qc.get("quant_method") != "compressed-tensors":
        raise StageError(f"quantization_config.quant_method {qc.get('quant_method')!r}: the planner models "
                         "compressed-tensors weight-only int quantization (W4A16, W8A16)")
    try:
        groups = list(qc["config_groups"].values())
        schemes = [g["weights"] for g in groups]
        if not schemes or any(w is None for w in schemes):
            raise KeyError("weights")
        w = schemes[0]
        if any(x != w for x in schemes[1:]):
            raise StageError("quantization_config has several different weight schemes; the planner models one")
        if w.get("type", "int") != "int":
            raise StageError(f"weights type {w.get('type')!r} (float/FP8/FP4) is not modeled; int only")
        strategy = w.get("strategy") or ("group" if w.get("group_size") else "channel")
        if strategy not in ("group", "channel"):
            raise StageError(f"weights strategy {strategy!r} is not modeled (group or channel)")
        out = {"bits": int(w["num_bits"]), "group_size": int(w["group_size"]) if strategy == "group" else None,
               "symmetric": bool(w["symmetric"])}
        targets = [t for g in groups for t in g.get("targets", [])]
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise StageError(f"quantization_config has no readable weights scheme (missing {e})") from None
    if out["bits"] not in (2, 4, 8) or (out["group_size"] is not None and out["group_size"] <= 0):
        raise StageError(f"quantization_config weights scheme not understood: {out}")
    ignore = qc.get("ignore") or []
    out["quantize_lm_head"] = "lm_head" not in ignore and any(t in ("Linear", "lm_head") for t in targets)
    return out


def kv_dtype_bytes_from(vllm_cfg: dict) -> int:
    dt = str(vllm_cfg.get("kv-cache-dtype", "auto"))
    if dt == "auto":
        return BF16  # the model dtype: bf16 for this project
    if dt.startswith("fp8"):
        return 1
    raise StageError(f"kv-cache-dtype {dt!r} not understood (auto or fp8*)")


def plan_serve(cfg: dict, vllm_cfg: dict, gpu_mem_bytes: float, bandwidth_bps: float, peak_flops: float,
               kv_dtype_bytes: int | None = None) -> dict:
    """Serving plan for one GPU (one vLLM replica; `data-parallel-size: N` runs N such replicas behind one
    endpoint). With kv-cache-memory-bytes set, vLLM uses exactly that KV pool (and the utilization fraction is not
    used for sizing); otherwise the KV pool is what is left of gpu_mem x gpu-memory-utilization after weights and
    the allowance."""
    seqs, max_len = _pos_int(vllm_cfg, "max-num-seqs"), _pos_int(vllm_cfg, "max-model-len")
    if _pos_int(vllm_cfg, "tensor-parallel-size", 1) != 1:
        raise StageError("tensor-parallel-size != 1: this planner models one GPU per replica (the 4-bit 70B fits "
                         "one A100-80GB); scale out with data-parallel-size instead")
    dp = _pos_int(vllm_cfg, "data-parallel-size", 1)
    kv_b = kv_dtype_bytes or kv_dtype_bytes_from(vllm_cfg)
    q = quant_scheme(cfg)
    w = weights_bytes(cfg, **q)
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
        "quant_scheme": q, "data_parallel_size": dp, "weights_bytes": w, "kv_dtype_bytes": kv_b, "kv_bytes_per_token": kv_tok,
        "max_num_seqs": seqs, "max_model_len": max_len, "kv_bytes_total": kv_total,
        "gpu_mem_bytes": int(gpu_mem_bytes), "gpu_memory_utilization": util, "kv_cache_memory_bytes": pool,
        "budget_bytes": int(budget), "allowance_bytes": SERVE_ALLOWANCE_BYTES,
        "kv_room_bytes": int(kv_room), "headroom_bytes": int(kv_room - kv_total),
        "fits": not reasons, "reasons": reasons,
        "max_model_len_that_fits": max_len_that_fits(cfg, kv_room, seqs, kv_b),
        # sequences that could all reach max_model_len at once in this KV room (raising max-num-seqs up to here
        # trades per-user decode speed for fewer GPUs)
        "kv_pool_tokens": kv_pool_tokens(cfg, kv_room, kv_b),
        "max_num_seqs_that_fit": kv_pool_tokens(cfg, kv_room, kv_b) // (math.ceil(max_len / KV_BLOCK_TOKENS) * KV_BLOCK_TOKENS),
        "decode_floor_ms": decode_floor_ms(w, mean_kv_read, bandwidth_bps, step_flops, peak_flops),
        "decode_floor_ms_full_context": decode_floor_ms(w, kv_total, bandwidth_bps, step_flops, peak_flops),
        "prefill_floor_s": prefill_floor_s(cfg, max_len, peak_flops),
    }


def plan_users(serve: dict, users: int, gpus_per_node: int = 8) -> dict:
    """GPUs and topology for `users` concurrent users, each one sequence in flight, no preemption.

    Each A100 runs one replica serving the YAML's max-num-seqs users. Up to one node's worth of replicas: vLLM's
    own data parallelism (`data-parallel-size: N` in the YAML) - one process, one endpoint, vLLM balances the
    replicas. Past one node: one such endpoint per node, all listed in the SQL service's `backends` (it routes to
    the least-loaded). Also reported: the GPUs needed if max-num-seqs were raised to what the KV room allows.
    """
    if users <= 0 or gpus_per_node <= 0:
        raise StageError(f"--users and --gpus_per_node must be positive, got {users} and {gpus_per_node}")
    seqs, dense = serve["max_num_seqs"], serve["max_num_seqs_that_fit"]
    gpus = math.ceil(users / seqs)
    nodes = math.ceil(gpus / gpus_per_node)
    if nodes == 1:
        topology = (f"one node, one endpoint: data-parallel-size: {gpus} in the vLLM YAML"
                    if gpus > 1 else "one GPU, one endpoint (data-parallel-size: 1)")
    else:
        per_node = [gpus // nodes + (n < gpus % nodes) for n in range(nodes)]  # balanced: equal endpoints
        topology = (f"{nodes} nodes, {nodes} endpoints in the service's backends, each vLLM with "
                    f"data-parallel-size {' / '.join(map(str, per_node))}")
    return {"users": users, "users_per_gpu": seqs, "gpus": gpus, "nodes": nodes, "gpus_per_node": gpus_per_node,
            "topology": topology, "data_parallel_size": min(gpus, gpus_per_node), "endpoints": nodes,
            "users_per_gpu_at_kv_limit": dense, "gpus_at_kv_limit": math.ceil(users / dense) if dense else None}


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


def layer_backward_bytes(cfg: dict, seq_len: int, lora_r: int, micro_batch: int = 1) -> int:
    """Peak live activations while one checkpointed decoder layer is recomputed and back-propagated (bf16), from
    LAYER_BACKWARD_COEFFS: (23h + 6i + 2kv + 7r + 2 head_dim) x 2 bytes x seq x micro_batch. The coefficients are
    measured (see the constant); with lora_dropout 0 the dropout copies vanish and this over-estimates."""
    d, k = model_dims(cfg), LAYER_BACKWARD_COEFFS
    per_token = (k["h"] * d["hidden_size"] + k["i"] * d["intermediate_size"]
                 + k["kv"] * d["num_key_value_heads"] * d["head_dim"] + k["r"] * lora_r + k["head_dim"] * d["head_dim"])
    return per_token * BF16 * seq_len * micro_batch


def activation_bytes(cfg: dict, seq_len: int, lora_r: int, micro_batch: int = 1) -> dict:
    """Per-GPU activation memory of one micro-batch with activation checkpointing (not sharded by ZeRO: every GPU
    holds its own micro-batch). The checkpoints (each layer's bf16 input) live through the whole backward; on top
    of them the step peaks either in the loss (logits, LOGITS_BYTES_PER_ENTRY per logit) or in one layer's
    recompute + backward, never both: the logits' buffers are freed before the first layer is recomputed."""
    d = model_dims(cfg)
    out = {"activation_checkpoint_bytes": micro_batch * seq_len * d["hidden_size"] * d["num_hidden_layers"] * BF16,
           "logits_bytes": micro_batch * seq_len * (d["vocab_size"] * LOGITS_BYTES_PER_ENTRY + 4 * d["hidden_size"]),
           "layer_backward_bytes": layer_backward_bytes(cfg, seq_len, lora_r, micro_batch)}
    out["activation_peak_bytes"] = out["activation_checkpoint_bytes"] + max(out["logits_bytes"],
                                                                            out["layer_backward_bytes"])
    return out


def zero3_states_bytes(cfg: dict, gpus: int, lora_r: int, targets=LORA_TARGETS) -> dict:
    """What ZeRO-3 partitions: the frozen bf16 base (2 B/param) and LoRA's trainable state (TRAINABLE_BYTES/param),
    each split evenly over all GPUs of all nodes."""
    c, n_lora = param_counts(cfg), lora_params(cfg, lora_r, targets)
    return {"sharded_weights_bytes": c["total"] * BF16 / gpus, "lora_state_bytes": n_lora * TRAINABLE_BYTES / gpus}


def plan_train(cfg: dict, gpus: int, gpu_mem_bytes: float, seq_len: int, lora_r: int, micro_batch: int,
               peak_flops: float, targets=LORA_TARGETS) -> dict:
    """Per-GPU memory for ZeRO-3 + LoRA (no CPU offload) over `gpus` GPUs in total, and the compute floor."""
    for name, v in (("gpus", gpus), ("seq_len", seq_len), ("lora_r", lora_r), ("micro_batch", micro_batch)):
        if v <= 0:
            raise StageError(f"--{name} must be positive, got {v}")
    d, c = model_dims(cfg), param_counts(cfg)
    h = d["hidden_size"]
    n_lora = lora_params(cfg, lora_r, targets)
    largest = max(c["per_layer_linear"] + 2 * h, c["embed"], c["lm_head"])
    act = activation_bytes(cfg, seq_len, lora_r, micro_batch)
    mem = {
        **zero3_states_bytes(cfg, gpus, lora_r, targets),
        "activation_peak_bytes": act["activation_peak_bytes"],
        # the largest module gathered whole (lm_head/embed for 70B) + DeepSpeed "auto" prefetch bucket (0.9 h^2)
        # + reduce bucket (h^2), bf16
        "gather_buffer_bytes": (largest + 0.9 * h * h + h * h) * BF16,
        "allowance_bytes": TRAIN_ALLOWANCE_BYTES,
    }
    total = sum(mem.values())
    flops = train_flops_per_token(cfg, seq_len, lora_r, targets)
    out = {k: int(v) for k, v in {**mem, **act}.items()}
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


def largest_micro_batch(cfg: dict, gpus: int, gpu_mem_bytes: float, seq_len: int, lora_r: int,
                        targets=LORA_TARGETS, cap: int = 64) -> int:
    """Largest micro-batch (sequences of seq_len per GPU) whose plan fits; 0 if not even one does."""
    fits = [mb for mb in range(1, cap + 1)
            if plan_train(cfg, gpus, gpu_mem_bytes, seq_len, lora_r, mb, 1.0, targets)["fits"]]
    return fits[-1] if fits else 0


def zero3_comm_per_micro_step(cfg: dict, gpus_per_node: int, nodes: int, lora_r: int, intra_bps: float,
                              inter_bps: float, targets=LORA_TARGETS, hpz: bool = False) -> dict:
    """Bytes each GPU receives and the seconds it takes, per micro-step (ZeRO-3 gathers per forward/backward, so
    gradient accumulation does not amortize it; only more tokens per micro-step do).

    Every parameter (bf16, LoRA included) is all-gathered twice: once for the forward, once for the backward
    (the recompute and the layer's backward share one gather: stage3_max_reuse_distance 1e9 keeps it); LoRA's
    bf16 gradients are reduce-scattered once. A ring all-gather moves (G-1)/G of the bytes through every GPU;
    within a node at the NVLink bus bandwidth, across nodes NCCL stripes the rings over the node's NICs, so the
    ring runs at min(NVLink, the node's aggregate inter-node bandwidth). hpz=True: ZeRO++ hierarchical partitioning
    (zero_hpz_partition_size = GPUs per node) keeps a second copy of the weights inside each node, so the
    backward gather stays on NVLink, at weights/gpus_per_node extra memory per GPU.
    """
    if gpus_per_node <= 0 or nodes <= 0 or intra_bps <= 0 or inter_bps <= 0:
        raise StageError("GPUs per node, nodes and bandwidths must be positive")
    c = param_counts(cfg)
    weights = (c["total"] + lora_params(cfg, lora_r, targets)) * BF16
    g = gpus_per_node * nodes
    ring = intra_bps if nodes == 1 else min(intra_bps, inter_bps)
    share = (g - 1) / g
    grads = lora_params(cfg, lora_r, targets) * BF16 * share
    if hpz and nodes > 1:
        seconds = weights * share / ring + weights * (gpus_per_node - 1) / gpus_per_node / intra_bps + grads / ring
    else:
        seconds = (2 * weights * share + grads) / ring
    return {"bytes_per_gpu": int(2 * weights * share + grads), "seconds": seconds, "ring_bytes_per_s": ring,
            "hpz_extra_bytes_per_gpu": int(weights / gpus_per_node) if hpz and nodes > 1 else 0}


def plan_nodes(cfg: dict, gpus_per_node: int, max_nodes: int, gpu_mem_bytes: float, seq_len: int, lora_r: int,
               micro_batch: int, peak_flops: float, mfu: float, intra_bps: float, inter_bps: float,
               grad_accum: int = 1, targets=LORA_TARGETS) -> list[dict]:
    """Throughput on paper for 1..max_nodes nodes: per micro-step, compute (tokens x FLOPs/token at `mfu`) and the
    ZeRO-3 gathers overlap (overlap_comm: true), so a micro-step takes the longer of the two. `break_even_tokens` =
    tokens per GPU per micro-step (micro_batch x seq_len) at which compute starts to hide the gathers."""
    if not 0 < mfu <= 1 or grad_accum <= 0:
        raise StageError(f"--mfu must be in (0, 1] and --grad_accum positive, got {mfu} and {grad_accum}")
    fpt = train_flops_per_token(cfg, seq_len, lora_r, targets)["total"]
    rows = []
    for nodes in range(1, max_nodes + 1):
        g = gpus_per_node * nodes
        mem = plan_train(cfg, g, gpu_mem_bytes, seq_len, lora_r, micro_batch, peak_flops, targets)
        tokens = micro_batch * seq_len
        compute = tokens * fpt / (peak_flops * mfu)
        row = {"nodes": nodes, "gpus": g, "fits": mem["fits"], "total_per_gpu_bytes": mem["total_per_gpu_bytes"],
               "largest_micro_batch": largest_micro_batch(cfg, g, gpu_mem_bytes, seq_len, lora_r, targets),
               "compute_s": compute}
        for tag, hpz in (("", False), ("hpz_", True)):
            comm = zero3_comm_per_micro_step(cfg, gpus_per_node, nodes, lora_r, intra_bps, inter_bps, targets, hpz)
            step = max(compute, comm["seconds"])
            row.update({f"{tag}comm_s": comm["seconds"], f"{tag}tokens_per_s": g * tokens / step,
                        f"{tag}comm_bound": comm["seconds"] > compute,
                        f"{tag}break_even_tokens": math.ceil(comm["seconds"] * peak_flops * mfu / fpt)})
            if not tag:
                row["gather_bytes_per_gpu"] = comm["bytes_per_gpu"]
            else:
                row["hpz_extra_bytes_per_gpu"] = comm["hpz_extra_bytes_per_gpu"]
        row["break_even_tokens_per_optimizer_step"] = row["break_even_tokens"] * g * grad_accum
        rows.append(row)
    return rows


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
    scheme = "W%dA16, %s, %s%s" % (q["bits"], f"group {q['group_size']}" if q["group_size"] else "per channel",
                                   "sym" if q["symmetric"] else "asym + zp", ", lm_head int" if q["quantize_lm_head"] else "")
    rows = [
        (f"weights ({scheme})", _gb(p["weights_bytes"])),
        ("KV per token", f"{p['kv_bytes_per_token']:,} B ({p['kv_bytes_per_token'] / 1024:g} KiB)"),
        (f"KV for {p['max_num_seqs']} x {p['max_model_len']}", _gb(p["kv_bytes_total"])),
        ("activation/graph allowance", _gb(p["allowance_bytes"])),
        ("budget", pool),
        ("room left for KV", _gb(p["kv_room_bytes"])),
        ("verdict", ("FITS" if p["fits"] else "DOES NOT FIT") + f", headroom {_gb(p['headroom_bytes'])}"),
        (f"largest max-model-len at {p['max_num_seqs']} seqs", f"{p['max_model_len_that_fits']:,}"),
        (f"most seqs at {p['max_model_len']} tokens each", f"{p['max_num_seqs_that_fit']:,}"),
        ("decode floor, full batch (mean / full context)",
         f"{p['decode_floor_ms']:.1f} ms / {p['decode_floor_ms_full_context']:.1f} ms per step"),
        (f"prefill floor, {p['max_model_len']}-token prompt", f"{p['prefill_floor_s']:.2f} s"),
    ]
    text = _table("serve plan (1 GPU per replica)", rows) + "".join(f"\n  - {r}" for r in p["reasons"])
    u = p.get("users_plan")
    if u:
        alt = (f"{u['gpus_at_kv_limit']} with max-num-seqs {u['users_per_gpu_at_kv_limit']} (slower decode per user)"
               if u["gpus_at_kv_limit"] else "none: the KV room holds no full-length sequence")
        text += "\n\n" + _table(f"{u['users']} concurrent users", [
            ("A100s", f"{u['gpus']} ({u['users_per_gpu']} users each = the YAML's max-num-seqs)"),
            ("topology", u["topology"]),
            ("A100s at the KV limit", alt)])
    return text


def train_table(p: dict) -> str:
    rows = [(k.removesuffix("_bytes").replace("_", " "), _gb(p[k])) for k in (
        "sharded_weights_bytes", "lora_state_bytes", "activation_peak_bytes", "gather_buffer_bytes",
        "allowance_bytes", "total_per_gpu_bytes")]
    rows[3:3] = [(f"  = checkpoints + max(logits, layer backward)", "%s + max(%s, %s)" % tuple(
        f"{p[k] / 1e9:.2f} GB" for k in ("activation_checkpoint_bytes", "logits_bytes", "layer_backward_bytes")))]
    rows += [
        ("LoRA params", f"{p['lora_params']:,} (r={p['lora_r']})"),
        ("verdict", ("FITS" if p["fits"] else "DOES NOT FIT") + f" in {_gb(p['gpu_mem_bytes'])}, "
                                                               f"headroom {_gb(p['headroom_bytes'])}"),
        ("FLOPs per token", f"{p['flops_per_token']:.3e}"),
        (f"compute floor at 100% MFU ({p['gpus']} GPUs)", f"{p['compute_floor_tokens_per_s']:,.0f} tok/s "
                                                           f"(6N rule: {p['compute_floor_tokens_per_s_6n']:,.0f})"),
    ]
    text = _table(f"train plan (ZeRO-3 + LoRA, per GPU, {p['gpus']} GPUs, seq {p['seq_len']}, "
                  f"micro-batch {p['micro_batch']})", rows)
    nodes = p.get("nodes_plan")
    if nodes:
        a = p["nodes_assumptions"]
        head = (f"{'nodes':>5} {'GPUs':>4} {'mem/GPU':>8} {'max mb':>6} {'compute':>8} {'gathers':>8} {'tok/s':>7} "
                f"{'bound':>7} {'break-even tok/GPU':>18} {'hpZ gathers':>11} {'hpZ tok/s':>9} {'hpZ +mem':>8}")
        lines = [head] + [
            f"{r['nodes']:>5} {r['gpus']:>4} {r['total_per_gpu_bytes'] / 1e9:>6.1f}GB {r['largest_micro_batch']:>6} "
            f"{r['compute_s']:>7.2f}s {r['comm_s']:>7.2f}s {r['tokens_per_s']:>7,.0f} "
            f"{'comm' if r['comm_bound'] else 'compute':>7} {r['break_even_tokens']:>18,} {r['hpz_comm_s']:>10.2f}s "
            f"{r['hpz_tokens_per_s']:>9,.0f} {r['hpz_extra_bytes_per_gpu'] / 1e9:>6.1f}GB" for r in nodes]
        text += ("\n\n" + f"ZeRO-3 weight gathers per micro-step ({p['micro_batch']} x {p['seq_len']} tokens per GPU, "
                 f"MFU {a['mfu']:g}, NVLink {a['nvlink_gbs']:g} GB/s, inter-node {a['inter_node_gbps']:g} Gbit/s "
                 f"per node)\n" + "\n".join(lines) + "\n  gathers happen every micro-step: gradient accumulation "
                 "does not hide them; more tokens per GPU per micro-step (micro-batch x seq) does, up to 'max mb'."
                 f"\n  break-even tokens per optimizer step (x GPUs x grad_accum {a['grad_accum']}): "
                 + ", ".join(f"{r['nodes']} node{'s' if r['nodes'] > 1 else ''} "
                             f"{r['break_even_tokens_per_optimizer_step']:,}" for r in nodes))
    return text


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model_config", required=True,
                        help="the model's config.json (base, or quantized: its quantization_config sets the scheme)")
    common.add_argument("--gpu_mem_gib", type=float, default=80.0, help="memory per GPU in GiB (A100-80GB: 80)")
    common.add_argument("--bf16_tflops", type=float, default=312.0, help="dense bf16 peak per GPU, TFLOP/s (A100: 312)")
    common.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    fmt = argparse.ArgumentDefaultsHelpFormatter
    s = sub.add_parser("serve", parents=[common], formatter_class=fmt, help="vLLM on one GPU: weights, KV cache, verdict, floors")
    s.add_argument("--vllm_config", required=True, help="vLLM --config YAML (max-model-len, max-num-seqs, ...)")
    s.add_argument("--mem_bandwidth_tbps", type=float, default=1.935, help="HBM bandwidth, TB/s (A100 PCIe 80GB: 1.935)")
    s.add_argument("--kv_dtype_bytes", type=int, default=None, choices=(1, 2, 4),
                   help="KV cache element size; default from the YAML's kv-cache-dtype (auto = bf16 = 2)")
    s.add_argument("--users", type=int, default=None,
                   help="concurrent users to plan for: A100s needed and data-parallel-size vs several endpoints")
    s.add_argument("--gpus_per_node", type=int, default=8, help="GPUs per node, for --users")
    t = sub.add_parser("train", parents=[common], formatter_class=fmt, help="ZeRO-3 + LoRA: per-GPU memory, compute floor")
    t.add_argument("--gpus", type=int, default=8, help="GPUs per node")
    t.add_argument("--nodes", type=int, default=1, help="nodes; ZeRO-3 shards over gpus x nodes, the scaling table "
                                                       "covers 1..nodes")
    t.add_argument("--seq_len", type=int, default=8192, help="training sequence length (model_max_length)")
    t.add_argument("--lora_r", type=int, default=32, help="LoRA rank")
    t.add_argument("--lora_target_modules", default=",".join(LORA_TARGETS), help="comma-separated projections")
    t.add_argument("--micro_batch", type=int, default=1, help="sequences per GPU per micro-step")
    t.add_argument("--grad_accum", type=int, default=8, help="micro-steps per optimizer step (for tokens per step)")
    t.add_argument("--inter_node_gbps", type=float, default=200.0,
                   help="inter-node bandwidth per node, Gbit/s, all NICs together (one HDR InfiniBand NIC: 200; "
                        "DGX A100 with 8 NICs: 1600; 100GbE: 100)")
    t.add_argument("--nvlink_gbs", type=float, default=230.0,
                   help="intra-node all-gather bus bandwidth, GB/s (A100 NVLink, nccl-tests typical: ~230; "
                        "PCIe-only nodes: ~20)")
    t.add_argument("--mfu", type=float, default=0.4,
                   help="assumed model FLOPs utilization for the compute time of a micro-step (an assumption: "
                        "measure yours from the training log's mfu)")
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
            if args.users is not None:
                plan["users_plan"] = plan_users(plan, args.users, args.gpus_per_node)
            text = serve_table(plan)
        else:
            targets = tuple(t.strip() for t in args.lora_target_modules.split(",") if t.strip())
            if args.nodes <= 0 or args.gpus <= 0:
                raise StageError(f"--gpus and --nodes must be positive, got {args.gpus} and {args.nodes}")
            if args.inter_node_gbps <= 0 or args.nvlink_gbs <= 0:
                raise StageError("--inter_node_gbps and --nvlink_gbs must be positive")
            plan = plan_train(cfg, args.gpus * args.nodes, gpu_mem, args.seq_len, args.lora_r, args.micro_batch,
                              peak, targets)
            plan["nodes_plan"] = plan_nodes(cfg, args.gpus, args.nodes, gpu_mem, args.seq_len, args.lora_r,
                                            args.micro_batch, peak, args.mfu, args.nvlink_gbs * 1e9,
                                            args.inter_node_gbps / 8 * 1e9, args.grad_accum, targets)
            plan["nodes_assumptions"] = {"mfu": args.mfu, "nvlink_gbs": args.nvlink_gbs,
                                         "inter_node_gbps": args.inter_node_gbps, "grad_accum": args.grad_accum}
            text = train_table(plan)
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(plan) if args.json else text)
    return 0 if plan["fits"] else 1


if __name__ == "__main__":
    sys.exit(main())
