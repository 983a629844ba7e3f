"""Capacity planner: formulas vs hand arithmetic and vs the engines themselves (DeepSpeed's ZeRO-3 estimator, a
measured tiny LoRA step, vLLM's own KV-cache report), its CLI contract, and the shipped vLLM YAMLs parsed by vLLM."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "custom_oracle_llama"
sys.path[:0] = [str(PKG), str(PKG / "demo")]  # also done by tests/conftest.py; kept so this file runs on its own

import plan_capacity as pc  # noqa: E402
from make_tiny_llama import CONFIG as TINY_ARCH  # noqa: E402

SCRIPT = PKG / "plan_capacity.py"
CFG_70B = PKG / "demo" / "llama33_70b_config.json"
YAML_GPU = PKG / "inference" / "vllm_config.yaml"
YAML_CPU = PKG / "inference" / "vllm_config_cpu.yaml"
SERVE_PY = ROOT / ".venv-serve" / "bin" / "python"
GiB = 1024 ** 3

L70 = json.loads(CFG_70B.read_text())


@pytest.fixture(scope="module")
def tiny(tiny_model_dir) -> dict:
    """The tiny fixture as built (`make tiny`): its config.json's architecture keys and its real vocabulary (what the
    BPE trainer produced, not the --vocab_size it was asked for). conftest's tiny_model_dir fails when the fixture is
    missing or its config differs from make_tiny_llama.CONFIG, so these are the builder's values too."""
    built = json.loads((tiny_model_dir / "config.json").read_text())
    return {k: built[k] for k in (*TINY_ARCH, "vocab_size") if k in built}


def test_tiny_is_the_built_fixture(tiny, tiny_model_dir):
    """The planner's count for `tiny` is the number of parameters in the fixture's own safetensors file."""
    from safetensors import safe_open
    with safe_open(str(tiny_model_dir / "model.safetensors"), "pt") as f:
        on_disk = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    assert pc.param_counts(tiny)["total"] == on_disk
    assert set(TINY_ARCH) - set(tiny) <= {"rope_theta"}  # transformers 5 saves it inside rope_parameters


# ------------------------------------------------------------------------------------------ the 70B config file

def test_llama33_config_has_the_real_values():
    assert {k: L70[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                "intermediate_size", "vocab_size", "rope_theta", "max_position_embeddings",
                                "rms_norm_eps", "bos_token_id", "eos_token_id", "torch_dtype",
                                "tie_word_embeddings", "architectures")} == {
        "hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
        "intermediate_size": 28672, "vocab_size": 128256, "rope_theta": 500000.0,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009], "torch_dtype": "bfloat16", "tie_word_embeddings": False,
        "architectures": ["LlamaForCausalLM"]}


# ------------------------------------------------------------------------------------------ formulas, by hand

def test_param_counts_70b_by_hand():
    # per layer: q 8192*8192 + k,v 2*8192*1024 + o 8192*8192 = 150,994,944 ; MLP 3*8192*28672 = 704,643,072
    per_layer = 8192 * 8192 + 2 * 8192 * 1024 + 8192 * 8192 + 3 * 8192 * 28672
    assert per_layer == 855_638_016
    c = pc.param_counts(L70)
    assert c["linear"] == 80 * 855_638_016 == 68_451_041_280
    assert c["embed"] == c["lm_head"] == 128256 * 8192 == 1_050_673_152
    assert c["norms"] == (2 * 80 + 1) * 8192 == 1_318_912
    assert c["total"] == 70_553_706_496


def test_weights_bytes_70b_by_hand():
    # int4 packed: 68,451,041,280 / 2 = 34,225,520,640 B ; bf16 scale per 128 weights: 68,451,041,280 / 128 * 2
    # = 1,069,547,520 B ; embed + lm_head bf16: 2 * 1,050,673,152 * 2 = 4,202,692,608 B ; norms 1,318,912 * 2
    expected = 34_225_520_640 + 1_069_547_520 + 4_202_692_608 + 2_637_824
    assert pc.weights_bytes(L70) == expected == 39_500_398_592  # "about 39.5 GB"


def test_kv_70b_by_hand():
    assert pc.kv_bytes_per_token(L70) == 80 * 8 * 128 * 2 * 2 == 327_680 == 320 * 1024
    assert pc.kv_bytes_total(L70, 4, 8192) == 4 * 8192 * 327_680 == 10 * GiB
    assert pc.kv_bytes_per_token(L70, dtype_bytes=1) == 163_840  # fp8 KV halves it


def test_kv_total_rounds_up_to_whole_16_token_blocks():
    assert pc.kv_bytes_total(L70, 1, 8193) == 8208 * 327_680
    assert pc.kv_bytes_total(L70, 1, 8192) == 8192 * 327_680


@pytest.mark.parametrize("group_size,symmetric,linear_bytes", [
    # packed 2,359,296 weights / 2 = 1,179,648 ; scales 2,359,296 / 128 groups * 2 B = 36,864
    (128, True, 1_179_648 + 36_864),
    # asymmetric adds a packed 4-bit zero point per group: 18,432 groups * 0.5 B = 9,216
    (128, False, 1_179_648 + 36_864 + 9_216),
    # group 64 doubles the scales: 73,728
    (64, True, 1_179_648 + 73_728),
])
def test_weights_bytes_tiny(tiny, group_size, symmetric, linear_bytes):
    assert pc.param_counts(tiny)["linear"] == 4 * (2 * 256 * 256 + 2 * 256 * 128 + 3 * 256 * 512) == 2_359_296
    # + embed and lm_head in bf16 (2 x vocab x 256 x 2 B) + norms (2*4+1) x 256 x 2 B = 4,608
    expected = linear_bytes + 2 * tiny["vocab_size"] * 256 * 2 + 4_608
    assert pc.weights_bytes(tiny, group_size=group_size, symmetric=symmetric) == expected


def test_tiny_kv_and_tied_embeddings(tiny):
    assert pc.kv_bytes_per_token(tiny) == 4 * 2 * 64 * 2 * 2 == 2048
    tied = dict(tiny, tie_word_embeddings=True)
    assert pc.param_counts(tied)["lm_head"] == 0
    assert pc.weights_bytes(tiny) - pc.weights_bytes(tied) == tiny["vocab_size"] * 256 * 2


def test_head_dim_and_kv_heads_default_like_transformers(tiny):
    cfg = {k: v for k, v in tiny.items() if k not in ("head_dim", "num_key_value_heads")}
    assert pc.kv_bytes_per_token(cfg) == 4 * 4 * 64 * 2 * 2  # MHA, head_dim = 256 / 4


def test_lora_params_70b_by_hand():
    # r * (in + out) per projection: q,o 32*(8192+8192) ; k,v 32*(8192+1024) ; gate,up,down 32*(8192+28672)
    per_layer = 2 * 32 * 16384 + 2 * 32 * 9216 + 3 * 32 * 36864
    assert per_layer == 5_177_344
    assert pc.lora_params(L70, 32) == 80 * per_layer == 414_187_520
    assert pc.lora_params(L70, 32, ("q_proj", "v_proj")) == 80 * 32 * (16384 + 9216)


def test_counts_match_transformers_and_peft(tiny):
    """The shapes the formulas assume are the ones transformers builds and PEFT adapts (meta device: no memory)."""
    torch = pytest.importorskip("torch")
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    for cfg in (L70, tiny):
        with torch.device("meta"):
            model = LlamaForCausalLM(LlamaConfig(**cfg))
            assert sum(p.numel() for p in model.parameters()) == pc.param_counts(cfg)["total"]
            peft_model = get_peft_model(model, LoraConfig(r=32, lora_alpha=32, target_modules=list(pc.LORA_TARGETS)))
            trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        assert trainable == pc.lora_params(cfg, 32)


@pytest.mark.slow
@pytest.mark.parametrize("scheme,expected", [
    ("W4A16", {"bits": 4, "group_size": 128, "symmetric": True}),
    ("W4A16_ASYM", {"bits": 4, "group_size": 128, "symmetric": False}),
    ("W8A16", {"bits": 8, "group_size": 128, "symmetric": True}),
])
def test_weights_bytes_matches_a_real_llmcompressor_checkpoint(tiny, tmp_path, scheme, expected):
    """Quantize a small random LLaMA with llmcompressor (data-free RTN) and sum the saved tensors' bytes; the
    scheme is read back from the checkpoint's own config.json, not assumed."""
    torch = pytest.importorskip("torch")
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from safetensors import safe_open
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = dict(tiny, num_hidden_layers=2, vocab_size=1024)
    LlamaForCausalLM(LlamaConfig(**cfg)).to(torch.bfloat16).save_pretrained(tmp_path / "base")
    model = LlamaForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.bfloat16)
    oneshot(model=model, recipe=QuantizationModifier(targets="Linear", scheme=scheme, ignore=["lm_head"]))
    model.save_pretrained(tmp_path / "q", save_compressed=True)
    on_disk = 0
    for f in (tmp_path / "q").glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                if not k.endswith("weight_shape"):  # 16-byte shape records, left out by the formula
                    t = st.get_tensor(k)
                    on_disk += t.numel() * t.element_size()
    qcfg = json.loads((tmp_path / "q" / "config.json").read_text())
    scheme_read = pc.quant_scheme(qcfg)
    assert scheme_read == dict(expected, quantize_lm_head=False)
    assert pc.weights_bytes(qcfg, **scheme_read) == on_disk


def test_train_flops_and_floor_70b():
    f = pc.train_flops_per_token(L70, 8192, 32)
    n_matmul = 68_451_041_280 + 1_050_673_152  # decoder linears + lm_head (embedding lookup is a gather)
    assert f["base"] == 6 * n_matmul
    assert f["lora"] == 8 * 414_187_520
    assert f["attention"] == 8 * 80 * 8192 * 64 * 128  # x4 of forward 2 * layers * seq * heads * head_dim
    assert f["six_n"] == 6 * 70_553_706_496
    p = pc.plan_train(L70, 8, 80 * GiB, 8192, 32, 1, 312e12)
    # the "~5,900 tok/s": 8 * 312e12 / (6 * 70,553,706,496) = 5,896
    assert p["compute_floor_tokens_per_s_6n"] == pytest.approx(5896.2, abs=0.5)
    assert p["compute_floor_tokens_per_s"] == pytest.approx(8 * 312e12 / f["total"])
    assert 5000 < p["compute_floor_tokens_per_s"] < p["compute_floor_tokens_per_s_6n"]


def deepspeed_estimate(total_params: int, largest_layer_params: int, gpus_per_node: int, nodes: int) -> dict:
    """DeepSpeed's own ZeRO-3 estimator, as a site would run it: its printed table, parsed (GiB, 2 decimals)."""
    import contextlib
    import io
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        estimate_zero3_model_states_mem_needs_all_cold(total_params=total_params,
                                                       largest_layer_params=largest_layer_params,
                                                       num_gpus_per_node=gpus_per_node, num_nodes=nodes)
    rows = {}
    for line in out.getvalue().splitlines():
        if "offload_param=" in line:
            cpu, gpu, options = (x.strip() for x in line.split("|"))
            rows[options.replace(" ", "").replace("OffloadDeviceEnum.", "")] = float(gpu.removesuffix("GB")) * GiB
    return rows


@pytest.mark.parametrize("gpus_per_node,nodes", [(8, 1), (8, 2), (8, 4)])
def test_zero3_partitions_agree_with_deepspeeds_estimator(gpus_per_node, nodes):
    """Sharded base weights and LoRA's optimizer state, from DeepSpeed's estimator rather than our formula.

    DeepSpeed models full fine-tuning; per GPU its rows are
      offload_param=cpu,  offload_optimizer=cpu:  4 x largest layer                  (the gathered layer)
      offload_param=none, offload_optimizer=cpu:  4 x largest layer + 2 x params / G (+ bf16 weights on the GPU)
      offload_param=none, offload_optimizer=none: 4 x largest layer + 18 x params / G (+ grads and Adam states)
    so the partitioned bf16 weights are row 2 - row 1, and per trainable parameter the optimizer side (gradient,
    fp32 master, Adam m and v) is row 3 - row 2. LoRA trains only its adapters: that difference, computed by
    DeepSpeed for the adapter parameters alone, is our LoRA state. (Its 4 x largest-layer term assumes the gathered
    layer also gets a gradient; a frozen base does not, so our gather buffer counts 2 bytes.)
    """
    torch = pytest.importorskip("torch")
    pytest.importorskip("deepspeed")
    from transformers import LlamaConfig, LlamaForCausalLM
    with torch.device("meta"):  # the real module tree, no memory
        model = LlamaForCausalLM(LlamaConfig(**L70))
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    total = sum(p.numel() for p in model.parameters())
    g = gpus_per_node * nodes
    full = deepspeed_estimate(total, largest, gpus_per_node, nodes)
    only_layer = full["offload_param=cpu,offload_optimizer=cpu,zero_init=1"]
    weights_ds = full["offload_param=none,offload_optimizer=cpu,zero_init=1"] - only_layer
    n_lora = pc.lora_params(L70, 32)
    lora = deepspeed_estimate(n_lora, 0, gpus_per_node, nodes)
    lora_state_ds = (lora["offload_param=none,offload_optimizer=none,zero_init=1"]
                     - lora["offload_param=none,offload_optimizer=cpu,zero_init=1"])
    plan = pc.plan_train(L70, g, 80 * GiB, 8192, 32, 1, 312e12)
    half_cent = 0.01 * GiB  # two printed values, each rounded to 0.005 GiB
    assert largest == 128256 * 8192  # DeepSpeed's "largest layer" = embed_tokens / lm_head
    assert abs(plan["sharded_weights_bytes"] - weights_ds) <= half_cent, (plan["sharded_weights_bytes"], weights_ds)
    assert abs(plan["lora_state_bytes"] - lora_state_ds) <= half_cent, (plan["lora_state_bytes"], lora_state_ds)
    assert weights_ds > 1 * GiB and lora_state_ds > 0.04 * GiB  # the comparison is not between two zeros


class LivePeak:
    """Peak bytes of live tensor storages created inside (a TorchDispatchMode: every op's outputs are seen; a
    storage counts until it is garbage-collected). Storages passed in `ignore` (the parameters) are not counted."""

    def __init__(self, ignore=()):
        import weakref
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten
        tracker = self
        self.live = self.peak = 0
        self.seen = dict.fromkeys(ignore)

        def free(key, n):
            tracker.seen.pop(key, None)
            tracker.live -= n

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_flatten(out)[0]:
                    if hasattr(t, "untyped_storage"):
                        st = t.untyped_storage()
                        key, n = st.data_ptr(), st.nbytes()
                        if n and key not in tracker.seen:
                            tracker.seen[key] = n
                            tracker.live += n
                            tracker.peak = max(tracker.peak, tracker.live)
                            weakref.finalize(st, free, key, n)
                return out

        self.mode = Mode()


def measured_activation_peak(cfg: dict, seq_len: int, lora_r: int = 32) -> int:
    """One LoRA training step as the entrypoint runs it (bf16 base and adapters - DeepSpeed's bf16 mode casts the
    adapters too - gradient checkpointing, SDPA, LoRA dropout 0.05, labels = inputs, and like the Trainer only the
    loss is kept of the model's outputs): peak live activation bytes."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**cfg, attn_implementation="sdpa")).to(torch.bfloat16)
    model.gradient_checkpointing_enable()
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=32, lora_dropout=0.05,
                                             target_modules=list(pc.LORA_TARGETS))).to(torch.bfloat16)
    model.train()
    ids = torch.randint(0, cfg["vocab_size"], (1, seq_len))
    tracker = LivePeak(p.untyped_storage().data_ptr() for p in model.parameters())
    with tracker.mode:
        model(input_ids=ids, labels=ids).loss.backward()
    return tracker.peak


@pytest.mark.slow
@pytest.mark.parametrize("vocab,phase", [("fixture", "logits_bytes"), (256, "layer_backward_bytes")])
@pytest.mark.parametrize("seq_len", [512, 1024, 2048])
def test_activation_peak_matches_a_measured_tiny_step(tiny, seq_len, vocab, phase):
    """The tiny fixture's shape at its real vocabulary (the built fixture's) peaks in the loss (as the 70B does: 12 x
    128,256 B/token of logits vs ~0.7 MB/token for a layer); with a 256-token vocabulary it peaks in a layer's
    recompute + backward. Both branches of the planner's activation term must match the measured peak within 2% at
    every length (measured at 512, 1024 and 2048 tokens: 1.007 of the planner's figure with the fixture's 2,852-token
    vocabulary, 0.9985 with 256)."""
    pytest.importorskip("peft")
    cfg = dict(tiny, vocab_size=tiny["vocab_size"] if vocab == "fixture" else vocab)
    plan = pc.activation_bytes(cfg, seq_len, 32)
    measured = measured_activation_peak(cfg, seq_len)
    assert max(plan["logits_bytes"], plan["layer_backward_bytes"]) == plan[phase]
    assert plan["activation_peak_bytes"] == pytest.approx(measured, rel=0.02), (seq_len, vocab, plan, measured)


def test_train_memory_70b():
    p = pc.plan_train(L70, 8, 80 * GiB, 8192, 32, 1, 312e12)
    assert p["sharded_weights_bytes"] == 70_553_706_496 * 2 // 8 == 17_638_426_624  # "~17.6 GB"
    assert p["activation_checkpoint_bytes"] == 8192 * 8192 * 80 * 2  # each layer's bf16 input
    assert p["logits_bytes"] == 8192 * (128256 * 12 + 4 * 8192) > p["layer_backward_bytes"]  # the 70B peaks in the loss
    assert p["activation_peak_bytes"] == p["activation_checkpoint_bytes"] + p["logits_bytes"]
    # largest module gathered whole = lm_head (1,050,673,152 > one layer's 855,654,400), + 0.9h^2 + h^2 buckets
    assert p["gather_buffer_bytes"] == int((1_050_673_152 + 1.9 * 8192 * 8192) * 2)
    parts = [p[k] for k in ("sharded_weights_bytes", "lora_state_bytes", "activation_peak_bytes",
                            "gather_buffer_bytes", "allowance_bytes")]
    assert abs(p["total_per_gpu_bytes"] - sum(parts)) <= len(parts)
    assert p["fits"] and p["total_per_gpu_bytes"] < 80 * GiB


@pytest.mark.parametrize("gpus,seq_len,micro_batch,fits", [
    (8, 8192, 1, True),
    (2, 8192, 1, False),    # 35 GB of sharded weights + activations + logits > 80 GiB
    (8, 32768, 4, False),   # activations and logits grow with seq x micro-batch, not sharded by ZeRO
])
def test_train_verdicts(gpus, seq_len, micro_batch, fits):
    assert pc.plan_train(L70, gpus, 80 * GiB, seq_len, 32, micro_batch, 312e12)["fits"] is fits


# ------------------------------------------------------------------------------------------ ZeRO-3 across nodes

W70 = (70_553_706_496 + 414_187_520) * 2  # bf16 base + LoRA, gathered whole by every GPU


def nodes_plan(max_nodes=4, inter_gbps=200, micro_batch=1, seq_len=8192, mfu=0.4, grad_accum=8):
    return pc.plan_nodes(L70, 8, max_nodes, 80 * GiB, seq_len, 32, micro_batch, 312e12, mfu, 230e9,
                         inter_gbps / 8 * 1e9, grad_accum)


def test_zero3_gathers_by_hand():
    one, two = nodes_plan(2)
    lora_grads = 414_187_520 * 2
    # one node: 2 gathers (forward; recompute + backward share one) of 7/8 of the weights, on NVLink
    assert one["comm_s"] == pytest.approx((2 * W70 + lora_grads) * 7 / 8 / 230e9)
    # two nodes: the rings cross the 200 Gbit/s = 25 GB/s inter-node link; 15/16 of the weights per gather
    assert two["comm_s"] == pytest.approx((2 * W70 + lora_grads) * 15 / 16 / 25e9) == pytest.approx(10.68, abs=0.01)
    assert two["gather_bytes_per_gpu"] == int((2 * W70 + lora_grads) * 15 / 16)
    # hpZ: the backward gather stays inside the node, at 1/8 of the weights extra per GPU
    assert two["hpz_comm_s"] == pytest.approx(W70 * 15 / 16 / 25e9 + W70 * 7 / 8 / 230e9 + lora_grads * 15 / 16 / 25e9)
    assert two["hpz_extra_bytes_per_gpu"] == W70 // 8 and one["hpz_extra_bytes_per_gpu"] == 0
    # compute per micro-step: 8192 tokens x FLOPs/token at 40% of 312 TFLOP/s
    fpt = pc.train_flops_per_token(L70, 8192, 32)["total"]
    assert one["compute_s"] == pytest.approx(8192 * fpt / (0.4 * 312e12))
    assert two["break_even_tokens"] == math.ceil(two["comm_s"] * 0.4 * 312e12 / fpt)
    assert two["break_even_tokens_per_optimizer_step"] == two["break_even_tokens"] * 16 * 8


@pytest.mark.parametrize("inter_gbps", [25, 100, 200, 1600])
@pytest.mark.parametrize("seq_len,micro_batch", [(2048, 1), (8192, 1), (8192, 2)])
def test_zero3_scaling_is_consistent(inter_gbps, seq_len, micro_batch):
    rows = nodes_plan(4, inter_gbps, micro_batch, seq_len)
    assert [r["gpus"] for r in rows] == [8, 16, 24, 32]
    for r in rows:
        tokens = micro_batch * seq_len
        # the verdict and the break-even point say the same thing
        assert r["comm_bound"] == (r["comm_s"] > r["compute_s"])
        assert r["comm_bound"] == (tokens < r["break_even_tokens"]) or abs(tokens - r["break_even_tokens"]) <= 1
        assert r["tokens_per_s"] == pytest.approx(r["gpus"] * tokens / max(r["comm_s"], r["compute_s"]))
        assert r["hpz_comm_s"] <= r["comm_s"] and r["hpz_tokens_per_s"] >= r["tokens_per_s"]
    # past one node each GPU still gathers the whole model: the per-GPU gather time does not shrink with nodes
    assert rows[1]["comm_s"] <= rows[2]["comm_s"] <= rows[3]["comm_s"]
    # more nodes shard the weights thinner: memory per GPU falls, the largest micro-batch never falls
    assert all(a["total_per_gpu_bytes"] > b["total_per_gpu_bytes"] for a, b in zip(rows, rows[1:]))
    assert all(a["largest_micro_batch"] <= b["largest_micro_batch"] for a, b in zip(rows, rows[1:]))


def test_slow_network_makes_gathers_dominate():
    fast, slow = nodes_plan(2, 1600)[1], nodes_plan(2, 25)[1]
    assert not fast["comm_bound"] and slow["comm_bound"]
    # 25 Gbit/s: 2 nodes are slower than 1 node alone
    assert slow["tokens_per_s"] < nodes_plan(1)[0]["tokens_per_s"]
    assert slow["break_even_tokens"] > 8192 > fast["break_even_tokens"]


def test_largest_micro_batch_is_the_memory_limit():
    for gpus in (8, 16):
        mb = pc.largest_micro_batch(L70, gpus, 80 * GiB, 8192, 32)
        assert mb >= 1
        assert pc.plan_train(L70, gpus, 80 * GiB, 8192, 32, mb, 312e12)["fits"]
        assert not pc.plan_train(L70, gpus, 80 * GiB, 8192, 32, mb + 1, 312e12)["fits"]


# ------------------------------------------------------------------------------------------ quantization scheme

def qconfig(weights, ignore=("lm_head",), method="compressed-tensors", targets=("Linear",), groups=1):
    return {"quant_method": method, "format": "pack-quantized", "ignore": list(ignore),
            "config_groups": {f"group_{n}": {"targets": list(targets), "weights": weights, "input_activations": None}
                              for n in range(groups)}}


INT4_G128 = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128}


@pytest.mark.parametrize("qc,expected", [
    (None, {"bits": 4, "group_size": 128, "symmetric": True, "quantize_lm_head": False}),
    (qconfig(INT4_G128), {"bits": 4, "group_size": 128, "symmetric": True, "quantize_lm_head": False}),
    (qconfig(dict(INT4_G128, group_size=64, symmetric=False)),
     {"bits": 4, "group_size": 64, "symmetric": False, "quantize_lm_head": False}),
    (qconfig({"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "group_size": None}),
     {"bits": 8, "group_size": None, "symmetric": True, "quantize_lm_head": False}),
    (qconfig(INT4_G128, ignore=()), {"bits": 4, "group_size": 128, "symmetric": True, "quantize_lm_head": True}),
    (qconfig(INT4_G128, groups=2), {"bits": 4, "group_size": 128, "symmetric": True, "quantize_lm_head": False}),
    (qconfig(dict(INT4_G128, type="float")), "float"),
    (qconfig(dict(INT4_G128, strategy="tensor")), "strategy 'tensor'"),
    (qconfig(INT4_G128, method="gptq"), "quant_method 'gptq'"),
    (qconfig(None), "no readable weights scheme"),
    ({"quant_method": "compressed-tensors", "config_groups": {"a": {"weights": INT4_G128},
                                                               "b": {"weights": dict(INT4_G128, num_bits=8)}}},
     "several different weight schemes"),
    (qconfig({"type": "int", "symmetric": True, "strategy": "group", "group_size": 128}), "missing 'num_bits'"),
])
def test_quant_scheme_read_from_checkpoint_config(tiny, qc, expected):
    cfg = dict(tiny, quantization_config=qc) if qc else dict(tiny)
    if isinstance(expected, str):
        with pytest.raises(pc.StageError, match=expected):
            pc.quant_scheme(cfg)
    else:
        assert pc.quant_scheme(cfg) == expected


def test_weights_bytes_channel_and_quantized_lm_head_by_hand(tiny):
    v = tiny["vocab_size"]
    # int8 per channel: 2,359,296 weights x 1 B + one bf16 scale per output row (256+128+128+256+512+512+256 = 2,048
    # per layer x 4 layers) ; embed + lm_head bf16 2 x v x 256 x 2 B ; norms 4,608
    assert pc.weights_bytes(tiny, group_size=None, bits=8) == 2_359_296 + 4 * 2048 * 2 + 2 * v * 256 * 2 + 4_608
    # lm_head int4 group 128: v x 256 / 2 packed + v x 2 groups x 2 B, instead of v x 256 x 2 B
    delta = v * 256 * 2 - (v * 256 // 2 + v * 2 * 2)
    assert pc.weights_bytes(tiny) - pc.weights_bytes(tiny, quantize_lm_head=True) == delta


def test_serve_plan_uses_the_checkpoints_scheme():
    w8 = dict(L70, quantization_config=qconfig({"num_bits": 8, "type": "int", "symmetric": True,
                                                "strategy": "channel", "group_size": None}))
    p = serve({"max-model-len": 8192, "max-num-seqs": 4, "gpu-memory-utilization": 0.9}, cfg=w8)
    assert p["quant_scheme"]["bits"] == 8
    assert p["weights_bytes"] == pc.weights_bytes(L70, group_size=None, bits=8) > 70e9  # 8-bit 70B: ~72.6 GB
    assert not p["fits"] and "KV for 4 x 8192" in p["reasons"][0]


# ------------------------------------------------------------------------------------------ users -> GPUs

@pytest.mark.parametrize("users,gpus,nodes,topology,kv_limit_gpus", [
    (1, 1, 1, "one GPU, one endpoint", 1),
    (4, 1, 1, "one GPU, one endpoint", 1),
    (5, 2, 1, "data-parallel-size: 2 in the vLLM YAML", 1),
    (32, 8, 1, "data-parallel-size: 8 in the vLLM YAML", 3),
    (33, 9, 2, "2 nodes, 2 endpoints in the service's backends, each vLLM with data-parallel-size 5 / 4", 3),
    (100, 25, 4, "4 nodes, 4 endpoints in the service's backends, each vLLM with data-parallel-size 7 / 6 / 6 / 6", 9),
])
def test_users_to_gpus_and_topology(users, gpus, nodes, topology, kv_limit_gpus):
    p = serve(yaml.safe_load(YAML_GPU.read_text()))
    # 31.21 GiB of KV room / (8192 x 320 KiB = 2.5 GiB per full-length sequence) = 12 sequences
    assert p["max_num_seqs_that_fit"] == 12
    u = pc.plan_users(p, users)
    assert (u["gpus"], u["nodes"], u["endpoints"]) == (gpus, nodes, nodes)
    assert topology in u["topology"]
    assert u["gpus_at_kv_limit"] == kv_limit_gpus
    assert u["gpus"] * p["max_num_seqs"] >= users > (u["gpus"] - 1) * p["max_num_seqs"]


# ------------------------------------------------------------------------------------------ serve plan

def serve(vllm_cfg, cfg=L70, gpu_gib=80):
    return pc.plan_serve(cfg, vllm_cfg, gpu_gib * GiB, 1.935e12, 312e12)


def test_serve_plan_70b_on_a100_by_hand():
    p = serve(yaml.safe_load(YAML_GPU.read_text()))
    assert p["budget_bytes"] == int(0.90 * 80 * GiB) == 77_309_411_328
    # room for KV = 77,309,411,328 - 39,500,398,592 weights - 4 GiB allowance = 33,514,045,440
    assert p["kv_room_bytes"] == 33_514_045_440
    assert p["headroom_bytes"] == 33_514_045_440 - 10 * GiB
    assert p["fits"] and p["reasons"] == []
    # 33,514,045,440 // (4 seqs * 16 tokens * 327,680 B) = 1,598 blocks -> 25,568 tokens
    assert p["max_model_len_that_fits"] == 1598 * 16 == 25_568
    # weights + KV of 4 sequences half-way (4 * 4096 tokens): (39,500,398,592 + 5,368,709,120) / 1.935e12 s
    assert p["decode_floor_ms"] == pytest.approx(1e3 * 44_869_107_712 / 1.935e12) == pytest.approx(23.19, abs=0.01)
    assert p["decode_floor_ms_full_context"] == pytest.approx(1e3 * (39_500_398_592 + 10 * GiB) / 1.935e12)
    # 2 * 68,451,041,280 * 8192 + 2 * 80 * 8192^2 * 8192 + 2 * 1,050,673,152 FLOPs at 312 TFLOP/s
    prefill = (2 * 68_451_041_280 * 8192 + 2 * 80 * 8192 ** 2 * 8192 + 2 * 1_050_673_152) / 312e12
    assert p["prefill_floor_s"] == pytest.approx(prefill) == pytest.approx(3.88, abs=0.01)


@pytest.mark.parametrize("vllm_cfg,fits,reason", [
    ({"max-model-len": 8192, "max-num-seqs": 4, "gpu-memory-utilization": 0.9}, True, None),
    ({"max-model-len": 131072, "max-num-seqs": 64, "gpu-memory-utilization": 0.9}, False, "KV for 64 x 131072"),
    ({"max-model-len": 25568, "max-num-seqs": 4, "gpu-memory-utilization": 0.9}, True, None),   # the limit
    ({"max-model-len": 25584, "max-num-seqs": 4, "gpu-memory-utilization": 0.9}, False, "KV for 4 x 25584"),
    ({"max-model-len": 8192, "max-num-seqs": 4, "gpu-memory-utilization": 0.5}, False, "but 0.00 GB"),
    ({"max-model-len": 8192, "max-num-seqs": 4}, True, None),    # vLLM's default utilization 0.92
    ({"max-model-len": 8192, "max-num-seqs": 4, "kv-cache-dtype": "fp8"}, True, None),
    ({"max-model-len": 8192, "max-num-seqs": 4, "kv-cache-memory-bytes": 12 * GiB}, True, None),
    ({"max-model-len": 8192, "max-num-seqs": 4, "kv-cache-memory-bytes": 8 * GiB}, False, "KV for 4 x 8192"),
    ({"max-model-len": 8192, "max-num-seqs": 4, "kv-cache-memory-bytes": 40 * GiB}, False, "exceed the GPU"),
])
def test_serve_verdicts(vllm_cfg, fits, reason):
    p = serve(vllm_cfg)
    assert p["fits"] is fits
    if reason:
        assert reason in " ".join(p["reasons"])
    else:
        assert p["reasons"] == []
    assert p["fits"] == (p["max_model_len"] <= p["max_model_len_that_fits"])


def test_serve_over_max_position_embeddings_does_not_fit(tiny):
    p = serve({"max-model-len": 16384, "max-num-seqs": 1, "gpu-memory-utilization": 0.9}, cfg=tiny)
    assert p["fits"] is False and "max_position_embeddings 8192" in p["reasons"][0]
    assert p["max_model_len_that_fits"] == 8192  # KV room is huge; capped by the model


@pytest.mark.parametrize("seqs", [1, 4, 16])
@pytest.mark.parametrize("max_len", [2048, 8192, 16384, 25568, 25584, 32768, 65536])
def test_max_len_that_fits_is_consistent_with_fits(seqs, max_len):
    p = serve({"max-model-len": max_len, "max-num-seqs": seqs, "gpu-memory-utilization": 0.9})
    assert p["fits"] == (max_len <= p["max_model_len_that_fits"])
    assert p["max_model_len_that_fits"] % 16 == 0 or p["max_model_len_that_fits"] == 131072
    at_limit = serve({"max-model-len": p["max_model_len_that_fits"], "max-num-seqs": seqs,
                      "gpu-memory-utilization": 0.9})
    assert at_limit["fits"]


@pytest.mark.slow
def test_kv_figures_equal_what_vllm_reports_at_start_up(vllm_tiny, vllm_slot, tiny_model_dir):
    """vLLM's own start-up line `KV cache size: N tokens, Maximum concurrency for L tokens per request: X x` for the
    tiny fixture under the CPU YAML: the planner's pool tokens and full-length sequences must be exactly N and X."""
    import re
    text = (vllm_slot.log_dir / "vllm-tiny.log").read_text(errors="replace")
    m = re.search(r"KV cache size: ([\d,]+) tokens, Maximum concurrency for ([\d,]+) tokens per request: ([\d.]+)x",
                  text)
    assert m, "vLLM's KV cache size line not found in its log"
    tokens, per_request, concurrency = int(m[1].replace(",", "")), int(m[2].replace(",", "")), float(m[3])
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    yaml_cfg = yaml.safe_load(YAML_CPU.read_text())
    # the test server's pool comes from VLLM_CPU_KVCACHE_SPACE=1 (GiB), the YAML's 1 GiB: the same number
    assert yaml_cfg["kv-cache-memory-bytes"] == GiB
    plan = pc.plan_serve(cfg, yaml_cfg, 80 * GiB, 1.935e12, 312e12)
    assert per_request == plan["max_model_len"] == 8192
    assert tokens == plan["kv_pool_tokens"] == GiB // pc.kv_bytes_per_token(cfg) == 524_288
    assert concurrency == tokens / per_request and plan["max_num_seqs_that_fit"] == int(concurrency) == 64


def test_shipped_cpu_yaml_fits_the_tiny_model(tiny):
    p = serve(yaml.safe_load(YAML_CPU.read_text()), cfg=tiny)
    assert p["fits"] and p["kv_room_bytes"] == GiB
    assert p["kv_bytes_total"] == 4 * 8192 * 2048  # 64 MiB of the 1 GiB pool


# ------------------------------------------------------------------------------------------ CLI

def run_cli(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=120)


SERVE_KEYS = {"weights_bytes", "kv_bytes_per_token", "kv_bytes_total", "budget_bytes", "fits",
              "max_model_len_that_fits", "decode_floor_ms", "prefill_floor_s"}


@pytest.mark.slow
def test_cli_serve_json_exit_0():
    r = run_cli("serve", "--model_config", CFG_70B, "--vllm_config", YAML_GPU, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)  # exactly one JSON object on stdout
    assert SERVE_KEYS <= out.keys()
    assert out["fits"] is True and out["weights_bytes"] == 39_500_398_592 and out["kv_bytes_per_token"] == 327_680


@pytest.mark.slow
def test_cli_serve_table_and_flags():
    r = run_cli("serve", "--model_config", CFG_70B, "--vllm_config", YAML_GPU, "--gpu_mem_gib", 80,
                "--mem_bandwidth_tbps", 2.039, "--bf16_tflops", 312, "--kv_dtype_bytes", 1)
    assert r.returncode == 0, r.stderr
    assert "FITS" in r.stdout and "163,840 B" in r.stdout and "39.50 GB" in r.stdout


@pytest.mark.slow
def test_cli_serve_does_not_fit_exit_1(tmp_path):
    y = tmp_path / "big.yaml"
    y.write_text("max-model-len: 131072\nmax-num-seqs: 64\ngpu-memory-utilization: 0.9\n")
    r = run_cli("serve", "--model_config", CFG_70B, "--vllm_config", y, "--json")
    assert r.returncode == 1
    out = json.loads(r.stdout)
    assert out["fits"] is False and out["max_model_len_that_fits"] < 131072
    r = run_cli("serve", "--model_config", CFG_70B, "--vllm_config", y)
    assert r.returncode == 1 and "DOES NOT FIT" in r.stdout


@pytest.mark.slow
def test_cli_train_json_and_table():
    r = run_cli("train", "--model_config", CFG_70B, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["fits"] is True and out["lora_params"] == 414_187_520
    assert {"sharded_weights_bytes", "total_per_gpu_bytes", "compute_floor_tokens_per_s"} <= out.keys()
    r = run_cli("train", "--model_config", CFG_70B, "--gpus", 2)
    assert r.returncode == 1 and "DOES NOT FIT" in r.stdout


@pytest.mark.slow
@pytest.mark.parametrize("yaml_text,config,expect", [
    (None, "missing.json", "model config not found"),
    ("max-model-len: [8192\n", None, "not valid YAML"),
    ("- just\n- a list\n", None, "not a YAML mapping"),
    ("max-num-seqs: 4\n", None, "missing max-model-len"),
    ("max-model-len: 8192\n", None, "missing max-num-seqs"),
    ("max-model-len: big\nmax-num-seqs: 4\n", None, "must be a positive number"),
    ("max-model-len: 8192\nmax-num-seqs: 4\ngpu-memory-utilization: 1.5\n", None, "must be in (0, 1]"),
    ("max-model-len: 8192\nmax-num-seqs: 4\ntensor-parallel-size: 2\n", None, "one GPU per replica"),
    ("max-model-len: 8192\nmax-num-seqs: 4\n", "nokeys.json", "missing hidden_size"),
    ("max-model-len: 8192\nmax-num-seqs: 4\n", "notjson.json", "not valid JSON"),
])
def test_cli_bad_input_exit_2(tmp_path, yaml_text, config, expect):
    (tmp_path / "nokeys.json").write_text('{"num_hidden_layers": 2}')
    (tmp_path / "notjson.json").write_text("{oops")
    y = tmp_path / "v.yaml"
    y.write_text(yaml_text or "max-model-len: 8192\nmax-num-seqs: 4\n")
    r = run_cli("serve", "--model_config", tmp_path / config if config else CFG_70B, "--vllm_config", y)
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and expect in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr and r.stdout == ""


@pytest.mark.slow
def test_cli_missing_yaml_exit_2(tmp_path):
    r = run_cli("serve", "--model_config", CFG_70B, "--vllm_config", tmp_path / "none.yaml")
    assert r.returncode == 2 and "vLLM config not found" in r.stderr


@pytest.mark.slow
def test_cli_serve_users():
    r = run_cli("serve", "--model_config", CFG_70B, "--vllm_config", YAML_GPU, "--users", 40)
    assert r.returncode == 0, r.stderr
    assert "40 concurrent users" in r.stdout and "2 nodes, 2 endpoints" in r.stdout and "5 / 5" in r.stdout
    r = run_cli("serve", "--model_config", CFG_70B, "--vllm_config", YAML_GPU, "--users", 12, "--json")
    assert json.loads(r.stdout)["users_plan"]["topology"].endswith("data-parallel-size: 3 in the vLLM YAML")
    r = run_cli("serve", "--model_config", CFG_70B, "--vllm_config", YAML_GPU, "--users", 0)
    assert r.returncode == 2 and "--users and --gpus_per_node must be positive" in r.stderr


@pytest.mark.slow
def test_cli_train_nodes():
    r = run_cli("train", "--model_config", CFG_70B, "--nodes", 2, "--inter_node_gbps", 100, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["gpus"] == 16 and [row["nodes"] for row in out["nodes_plan"]] == [1, 2]
    assert out["sharded_weights_bytes"] == 70_553_706_496 * 2 // 16
    r = run_cli("train", "--model_config", CFG_70B, "--nodes", 3)
    assert r.returncode == 0 and "ZeRO-3 weight gathers per micro-step" in r.stdout and "break-even" in r.stdout
    for bad, msg in ((("--nodes", 0), "--gpus and --nodes must be positive"), (("--mfu", 1.5), "--mfu must be in"),
                     (("--inter_node_gbps", 0), "--inter_node_gbps and --nvlink_gbs must be positive")):
        r = run_cli("train", "--model_config", CFG_70B, *bad)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_cli_train_bad_input_exit_2():
    r = run_cli("train", "--model_config", CFG_70B, "--lora_target_modules", "q_proj,qkv_proj")
    assert r.returncode == 2 and "unknown LoRA target modules: qkv_proj" in r.stderr
    r = run_cli("train", "--model_config", CFG_70B, "--gpus", 0)
    assert r.returncode == 2 and "--gpus and --nodes must be positive" in r.stderr


# ------------------------------------------------------------------------------------------ vLLM parses the YAMLs

PARSE = r"""
import json, sys
from vllm import envs
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
from vllm.utils.argparse_utils import FlexibleArgumentParser
out = {"VLLM_API_KEY": envs.VLLM_API_KEY}
model_dir = sys.argv[1]  # an existing local dir: vLLM (offline) resolves the model path without the hub
for path in sys.argv[2:]:
    parser = make_arg_parser(FlexibleArgumentParser())
    args = parser.parse_args(["--model", model_dir, "--config", path, "--port", "8123"])
    validate_parsed_serve_args(args)
    eng = AsyncEngineArgs.from_cli_args(args)  # what the server builds its engine from
    out[path] = {k: getattr(args, k) for k in (
        "model", "host", "port", "served_model_name", "dtype", "trust_remote_code", "load_format",
        "max_model_len", "max_num_seqs", "gpu_memory_utilization", "kv_cache_memory_bytes", "enforce_eager",
        "enable_prefix_caching", "enable_chunked_prefill", "max_num_batched_tokens", "generation_config",
        "override_generation_config", "api_key", "enable_log_requests")}
    out[path]["engine_max_model_len"] = eng.max_model_len
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def vllm_parsed(tmp_path_factory):
    if not SERVE_PY.exists():
        pytest.skip(f"{SERVE_PY} missing: the vLLM environment (.venv-serve) is not installed")
    env = dict(os.environ, VLLM_API_KEY="from-env-123", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               VLLM_CACHE_ROOT=str(ROOT / ".cache" / "vllm"))
    model_dir = tmp_path_factory.mktemp("model")
    r = subprocess.run([str(SERVE_PY), "-c", PARSE, str(model_dir), str(YAML_GPU), str(YAML_CPU)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for path in (YAML_GPU, YAML_CPU):
        assert out[str(path)].pop("model") == str(model_dir)  # the model comes from the CLI, never the YAML
    return out


COMMON = {"host": "127.0.0.1", "port": 8123, "served_model_name": ["oracle-ebs-sql"],
          "dtype": "bfloat16", "trust_remote_code": False, "load_format": "safetensors", "max_num_seqs": 4,
          "enable_prefix_caching": True, "enable_chunked_prefill": True, "generation_config": "vllm",
          "override_generation_config": {"max_new_tokens": 512, "temperature": 0}, "api_key": None,
          "enable_log_requests": False}


@pytest.mark.slow
def test_vllm_parses_gpu_yaml(vllm_parsed):
    got = vllm_parsed[str(YAML_GPU)]
    # port 8123 from the CLI wins over the file's 8000: cli > config > defaults
    assert got == dict(COMMON, max_model_len=8192, engine_max_model_len=8192, gpu_memory_utilization=0.9,
                       kv_cache_memory_bytes=None, enforce_eager=False, max_num_batched_tokens=2048)


@pytest.mark.slow
def test_vllm_parses_cpu_yaml(vllm_parsed):
    got = vllm_parsed[str(YAML_CPU)]
    assert got == dict(COMMON, max_model_len=8192, engine_max_model_len=8192, gpu_memory_utilization=0.92,
                       kv_cache_memory_bytes=GiB, enforce_eager=True, max_num_batched_tokens=2048)


@pytest.mark.slow
def test_vllm_reads_api_key_from_environment(vllm_parsed):
    """No api-key in the YAMLs; vLLM picks VLLM_API_KEY up itself (vllm.envs) and uses it when --api-key is unset."""
    assert vllm_parsed["VLLM_API_KEY"] == "from-env-123"
    for path in (YAML_GPU, YAML_CPU):
        assert "api-key" not in yaml.safe_load(path.read_text())


def test_cpu_yaml_differs_only_where_documented():
    gpu, cpu = yaml.safe_load(YAML_GPU.read_text()), yaml.safe_load(YAML_CPU.read_text())
    assert set(gpu) - set(cpu) == {"gpu-memory-utilization"}
    assert set(cpu) - set(gpu) == {"kv-cache-memory-bytes"}
    assert {k for k in gpu.keys() & cpu.keys() if gpu[k] != cpu[k]} == {"enforce-eager"}
