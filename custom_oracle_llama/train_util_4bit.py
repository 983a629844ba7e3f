"""QLoRA loader: the base in 4-bit NF4 (double quantization, bf16 compute), ready for LoRA training.

70B in NF4 is ~35 GB instead of ~140 GB in bf16: the option when 8x A100-80GB are not available (e.g. one or two
GPUs). bnb_4bit_quant_storage=bf16 keeps the packed weights in a dtype DeepSpeed ZeRO-3 / FSDP can shard.
On CPU, bitsandbytes 0.50 runs NF4 with its pure-PyTorch fallback (slow, but real): tests use it on the tiny model.
"""
import torch
import transformers
from peft import get_peft_model, prepare_model_for_kbit_training


def nf4_config() -> transformers.BitsAndBytesConfig:
    return transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16)


def load_4bit_model(margs, targs):
    """Same contract as sft_oracle_llama70b_lora.load_bf16_model: returns the PEFT-wrapped model."""
    from sft_oracle_llama70b_lora import lora_config
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"QLoRA needs bitsandbytes (pinned in requirements-oracle.txt): {e}")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        margs.model_name_or_path, quantization_config=nf4_config(), dtype=torch.bfloat16,
        attn_implementation=margs.attn_implementation)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=targs.gradient_checkpointing)
    return get_peft_model(model, lora_config(margs))
