"""Capacity planner formulas vs hand arithmetic, its CLI contract, and the shipped vLLM YAMLs parsed by vLLM itself."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "custom_oracle_llama"
sys.path.insert(0, str(PKG))  # also done by tests/conftest.py; kept so this file runs on its own

import plan_capacity as pc  # noqa: E402

SCRIPT = PKG / "plan_capacity.py"
CFG_70B = PKG / "demo" / "llama33_70b_config.json"
YAML_GPU = PKG / "inference" / "vllm_config.yaml"
YAML_CPU = PKG / "inference" / "vllm_config_cpu.yaml"
SERVE_PY = ROOT / ".venv-serve" / "bin" / "python"
GiB = 1024 ** 3

L70 = json.loads(CFG_70B.read_text())
# The tiny fixture's architecture (demo/make_tiny_llama.py CONFIG) with its default 4096-token vocabulary.
TINY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            head_dim=64, vocab_size=4096, max_position_embeddings=4096, tie_word_embeddings=False)


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


@pytest.mark.parametrize("group_size,symmetric,expected", [
    # packed 2,359,296 weights / 2 = 1,179,648 ; scales 2,359,296 / 128 groups * 2 B = 36,864 ;
    # embed + lm_head 2 * 4096 * 256 * 2 = 4,194,304 ; norms (2*4+1) * 256 * 2 = 4,608
    (128, True, 1_179_648 + 36_864 + 4_194_304 + 4_608),
    # asymmetric adds a packed 4-bit zero point per group: 18,432 groups * 0.5 B = 9,216
    (128, False, 1_179_648 + 36_864 + 9_216 + 4_194_304 + 4_608),
    # group 64 doubles the scales: 73,728
    (64, True, 1_179_648 + 73_728 + 4_194_304 + 4_608),
])
def test_weights_bytes_tiny(group_size, symmetric, expected):
    assert pc.param_counts(TINY)["linear"] == 4 * (2 * 256 * 256 + 2 * 256 * 128 + 3 * 256 * 512) == 2_359_296
    assert pc.weights_bytes(TINY, group_size=group_size, symmetric=symmetric) == expected


def test_tiny_kv_and_tied_embeddings():
    assert pc.kv_bytes_per_token(TINY) == 4 * 2 * 64 * 2 * 2 == 2048
    tied = dict(TINY, tie_word_embeddings=True)
    assert pc.param_counts(tied)["lm_head"] == 0
    assert pc.weights_bytes(TINY) - pc.weights_bytes(tied) == 4096 * 256 * 2


def test_head_dim_and_kv_heads_default_like_transformers():
    cfg = {k: v for k, v in TINY.items() if k not in ("head_dim", "num_key_value_heads")}
    assert pc.kv_bytes_per_token(cfg) == 4 * 4 * 64 * 2 * 2  # MHA, head_dim = 256 / 4


def test_lora_params_70b_by_hand():
    # r * (in + out) per projection: q,o 32*(8192+8192) ; k,v 32*(8192+1024) ; gate,up,down 32*(8192+28672)
    per_layer = 2 * 32 * 16384 + 2 * 32 * 9216 + 3 * 32 * 36864
    assert per_layer == 5_177_344
    assert pc.lora_params(L70, 32) == 80 * per_layer == 414_187_520
    assert pc.lora_params(L70, 32, ("q_proj", "v_proj")) == 80 * 32 * (16384 + 9216)


def test_counts_match_transformers_and_peft():
    """The shapes the formulas assume are the ones transformers builds and PEFT adapts (meta device: no memory)."""
    torch = pytest.importorskip("torch")
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    for cfg in (L70, TINY):
        with torch.device("meta"):
            model = LlamaForCausalLM(LlamaConfig(**cfg))
            assert sum(p.numel() for p in model.parameters()) == pc.param_counts(cfg)["total"]
            peft_model = get_peft_model(model, LoraConfig(r=32, lora_alpha=32, target_modules=list(pc.LORA_TARGETS)))
            trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        assert trainable == pc.lora_params(cfg, 32)


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["W4A16", "W4A16_ASYM"])
def test_weights_bytes_matches_a_real_llmcompressor_checkpoint(tmp_path, scheme):
    """Quantize a small random LLaMA with llmcompressor (data-free RTN) and sum the saved tensors' bytes."""
    torch = pytest.importorskip("torch")
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from safetensors import safe_open
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = dict(TINY, num_hidden_layers=2, vocab_size=1024)
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
    assert scheme_read == {"bits": 4, "group_size": 128, "symmetric": scheme == "W4A16"}
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


def test_train_memory_70b_by_hand():
    p = pc.plan_train(L70, 8, 80 * GiB, 8192, 32, 1, 312e12)
    assert p["sharded_weights_bytes"] == 70_553_706_496 * 2 // 8 == 17_638_426_624  # "~17.6 GB"
    assert p["lora_state_bytes"] == 414_187_520 * 16 // 8
    assert p["activation_checkpoint_bytes"] == 8192 * 8192 * 80 * 2
    assert p["layer_recompute_bytes"] == (13 * 8192 + 3 * 1024 + 5 * 28672) * 2 * 8192
    assert p["logits_bytes"] == 8192 * 128256 * 10
    # largest module gathered whole = lm_head (1,050,673,152 > one layer's 855,654,400), + 0.9h^2 + h^2 buckets
    assert p["gather_buffer_bytes"] == int((1_050_673_152 + 1.9 * 8192 * 8192) * 2)
    parts = [p[k] for k in ("sharded_weights_bytes", "lora_state_bytes", "activation_checkpoint_bytes",
                            "layer_recompute_bytes", "logits_bytes", "gather_buffer_bytes", "allowance_bytes")]
    assert abs(p["total_per_gpu_bytes"] - sum(parts)) <= len(parts)
    assert p["fits"] and p["total_per_gpu_bytes"] < 80 * GiB


@pytest.mark.parametrize("gpus,seq_len,micro_batch,fits", [
    (8, 8192, 1, True),
    (2, 8192, 1, False),    # 35 GB of sharded weights + activations + logits > 80 GiB
    (8, 32768, 4, False),   # activations and logits grow with seq x micro-batch, not sharded by ZeRO
])
def test_train_verdicts(gpus, seq_len, micro_batch, fits):
    assert pc.plan_train(L70, gpus, 80 * GiB, seq_len, 32, micro_batch, 312e12)["fits"] is fits


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


def test_serve_over_max_position_embeddings_does_not_fit():
    p = serve({"max-model-len": 8192, "max-num-seqs": 1, "gpu-memory-utilization": 0.9}, cfg=TINY)
    assert p["fits"] is False and "max_position_embeddings 4096" in p["reasons"][0]
    assert p["max_model_len_that_fits"] == 4096  # KV room is huge; capped by the model


@pytest.mark.parametrize("seqs", [1, 4, 16])
@pytest.mark.parametrize("max_len", [2048, 8192, 16384, 25568, 25584, 32768, 65536])
def test_max_len_that_fits_is_consistent_with_fits(seqs, max_len):
    p = serve({"max-model-len": max_len, "max-num-seqs": seqs, "gpu-memory-utilization": 0.9})
    assert p["fits"] == (max_len <= p["max_model_len_that_fits"])
    assert p["max_model_len_that_fits"] % 16 == 0 or p["max_model_len_that_fits"] == 131072
    at_limit = serve({"max-model-len": p["max_model_len_that_fits"], "max-num-seqs": seqs,
                      "gpu-memory-utilization": 0.9})
    assert at_limit["fits"]


def test_shipped_cpu_yaml_fits_the_tiny_model():
    p = serve(yaml.safe_load(YAML_CPU.read_text()), cfg=TINY)
    assert p["fits"] and p["kv_room_bytes"] == GiB
    assert p["kv_bytes_total"] == 4 * 2048 * 2048  # 16 MiB of the 1 GiB pool


# ------------------------------------------------------------------------------------------ CLI

def run_cli(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=120)


SERVE_KEYS = {"weights_bytes", "kv_bytes_per_token", "kv_bytes_total", "budget_bytes", "fits",
              "max_model_len_that_fits", "decode_floor_ms", "prefill_floor_s"}


def test_cli_serve_json_exit_0():
    r = run_cli("serve", "--model_config", CFG_70B, "--vllm_config", YAML_GPU, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)  # exactly one JSON object on stdout
    assert SERVE_KEYS <= out.keys()
    assert out["fits"] is True and out["weights_bytes"] == 39_500_398_592 and out["kv_bytes_per_token"] == 327_680


def test_cli_serve_table_and_flags():
    r = run_cli("serve", "--model_config", CFG_70B, "--vllm_config", YAML_GPU, "--gpu_mem_gib", 80,
                "--mem_bandwidth_tbps", 2.039, "--bf16_tflops", 312, "--kv_dtype_bytes", 1)
    assert r.returncode == 0, r.stderr
    assert "FITS" in r.stdout and "163,840 B" in r.stdout and "39.50 GB" in r.stdout


def test_cli_serve_does_not_fit_exit_1(tmp_path):
    y = tmp_path / "big.yaml"
    y.write_text("max-model-len: 131072\nmax-num-seqs: 64\ngpu-memory-utilization: 0.9\n")
    r = run_cli("serve", "--model_config", CFG_70B, "--vllm_config", y, "--json")
    assert r.returncode == 1
    out = json.loads(r.stdout)
    assert out["fits"] is False and out["max_model_len_that_fits"] < 131072
    r = run_cli("serve", "--model_config", CFG_70B, "--vllm_config", y)
    assert r.returncode == 1 and "DOES NOT FIT" in r.stdout


def test_cli_train_json_and_table():
    r = run_cli("train", "--model_config", CFG_70B, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["fits"] is True and out["lora_params"] == 414_187_520
    assert {"sharded_weights_bytes", "total_per_gpu_bytes", "compute_floor_tokens_per_s"} <= out.keys()
    r = run_cli("train", "--model_config", CFG_70B, "--gpus", 2)
    assert r.returncode == 1 and "DOES NOT FIT" in r.stdout


@pytest.mark.parametrize("yaml_text,config,expect", [
    (None, "missing.json", "model config not found"),
    ("max-model-len: [8192\n", None, "not valid YAML"),
    ("- just\n- a list\n", None, "not a YAML mapping"),
    ("max-num-seqs: 4\n", None, "missing max-model-len"),
    ("max-model-len: 8192\n", None, "missing max-num-seqs"),
    ("max-model-len: big\nmax-num-seqs: 4\n", None, "must be a positive number"),
    ("max-model-len: 8192\nmax-num-seqs: 4\ngpu-memory-utilization: 1.5\n", None, "must be in (0, 1]"),
    ("max-model-len: 8192\nmax-num-seqs: 4\ntensor-parallel-size: 2\n", None, "single GPU"),
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


def test_cli_missing_yaml_exit_2(tmp_path):
    r = run_cli("serve", "--model_config", CFG_70B, "--vllm_config", tmp_path / "none.yaml")
    assert r.returncode == 2 and "vLLM config not found" in r.stderr


def test_cli_train_bad_input_exit_2():
    r = run_cli("train", "--model_config", CFG_70B, "--lora_target_modules", "q_proj,qkv_proj")
    assert r.returncode == 2 and "unknown LoRA target modules: qkv_proj" in r.stderr
    r = run_cli("train", "--model_config", CFG_70B, "--gpus", 0)
    assert r.returncode == 2 and "--gpus must be positive" in r.stderr


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


def test_vllm_parses_gpu_yaml(vllm_parsed):
    got = vllm_parsed[str(YAML_GPU)]
    # port 8123 from the CLI wins over the file's 8000: cli > config > defaults
    assert got == dict(COMMON, max_model_len=8192, engine_max_model_len=8192, gpu_memory_utilization=0.9,
                       kv_cache_memory_bytes=None, enforce_eager=False, max_num_batched_tokens=2048)


def test_vllm_parses_cpu_yaml(vllm_parsed):
    got = vllm_parsed[str(YAML_CPU)]
    assert got == dict(COMMON, max_model_len=2048, engine_max_model_len=2048, gpu_memory_utilization=0.92,
                       kv_cache_memory_bytes=GiB, enforce_eager=True, max_num_batched_tokens=2048)


def test_vllm_reads_api_key_from_environment(vllm_parsed):
    """No api-key in the YAMLs; vLLM picks VLLM_API_KEY up itself (vllm.envs) and uses it when --api-key is unset."""
    assert vllm_parsed["VLLM_API_KEY"] == "from-env-123"
    for path in (YAML_GPU, YAML_CPU):
        assert "api-key" not in yaml.safe_load(path.read_text())


def test_cpu_yaml_differs_only_where_documented():
    gpu, cpu = yaml.safe_load(YAML_GPU.read_text()), yaml.safe_load(YAML_CPU.read_text())
    assert set(gpu) - set(cpu) == {"gpu-memory-utilization"}
    assert set(cpu) - set(gpu) == {"kv-cache-memory-bytes"}
    assert {k for k in gpu.keys() & cpu.keys() if gpu[k] != cpu[k]} == {"max-model-len", "enforce-eager"}
