"""LoRA SFT of LLaMA-3.3-70B-Instruct on Oracle EBS NL2SQL data, DeepSpeed ZeRO-3 via `accelerate launch`.

XiYan-compatible flags (the seed's command works verbatim):
    accelerate launch --config_file custom_oracle_llama/config/accelerate_zero3_8gpu.yaml \
        custom_oracle_llama/sft_oracle_llama70b_lora.py --model_name_or_path Llama-3.3-70B-Instruct \
        --data_path ebs_sft.json --output_dir adapter --model_max_length 8192 --use_lora True --q_lora False \
        --enable_dialect_router False

Masking follows XiYan's sft4xiyan.py (prompt tokens labelled -100) but tokenizes the way vLLM's chat endpoint
does: apply_chat_template(tokenize=True), so there is exactly one <|begin_of_text|>. Examples that do not fit
model_max_length are dropped and counted, never truncated (truncation would mask every label).
"""
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import stage_env  # noqa: E402
stage_env.apply()  # offline flags, caches (DeepSpeed's op builds), OMP: before torch loads; user settings win

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import HfArgumentParser, Trainer, TrainerCallback  # noqa: E402

from artifacts import StageError, atomic_write_json, library_versions, sha256_file  # noqa: E402
from prompting import template_sha256  # noqa: E402
import plan_capacity  # noqa: E402

IGNORE_TOKEN_ID = -100
PAD_TOKEN = "<|finetune_right_pad_id|>"  # Meta's reserved pad token; Llama-3 ships without a pad token


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "base model dir (HF format), e.g. Llama-3.3-70B-Instruct"})
    use_lora: bool = field(default=True, metadata={"help": "train a LoRA adapter (full fine-tuning is not supported)"})
    q_lora: bool = field(default=False, metadata={"help": "4-bit base (use sft_oracle_llama70b_qlora.py)"})
    enable_dialect_router: bool = field(default=False, metadata={"help": "XiYan MoMQ routing: not supported, refused"})
    # r=32 on every attention + MLP projection: enough capacity for a new SQL dialect, ~0.4% of 70B params.
    lora_r: int = field(default=32, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (scale = alpha / r)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    lora_target_modules: str = field(default="q_proj,k_proj,v_proj,o_proj,up_proj,gate_proj,down_proj",
                                     metadata={"help": "comma-separated module names that get LoRA"})
    attn_implementation: str = field(default="sdpa", metadata={"help": "sdpa | flash_attention_2 | eager"})
    peak_tflops: float = field(default=312.0, metadata={"help": "per-device bf16 peak for the MFU estimate (A100: 312)"})


@dataclass
class DataArguments:
    data_path: str = field(metadata={"help": "XiYan conversations JSON (from build_oracle_sft_dataset.py)"})
    eval_data_path: str | None = field(default=None, metadata={"help": "optional conversations JSON for eval loss"})


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    # Defaults that make 70B at 8192 fit on 8x A100-80GB (see plan_capacity.py train):
    model_max_length: int = field(default=8192, metadata={"help": "longer examples are dropped, never truncated"})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "activations at 8192 x 80 layers need it"})
    bf16: bool = field(default=True, metadata={"help": "BF16 weights and compute (A100 native)"})
    per_device_train_batch_size: int = field(default=1, metadata={"help": "micro-batch 1 at 8192 tokens"})
    gradient_accumulation_steps: int = field(default=8, metadata={"help": "effective batch = 8 GPUs x 1 x this"})
    learning_rate: float = field(default=2e-4, metadata={"help": "LoRA learning rate"})
    num_train_epochs: float = field(default=3.0, metadata={"help": "epochs"})
    warmup_steps: float = field(default=0.03, metadata={"help": "warm-up steps; < 1 means a share of all steps "
                                                                "(DeepSpeed's WarmupDecayLR needs at least 1)"})
    logging_steps: float = field(default=10, metadata={"help": "log loss, tokens/s and MFU every N steps"})
    save_strategy: str = field(default="steps", metadata={"help": "checkpoint strategy (resume needs them)"})
    save_steps: float = field(default=200, metadata={"help": "checkpoint every N steps"})
    save_total_limit: int | None = field(default=2, metadata={"help": "keep the last N checkpoints"})
    remove_unused_columns: bool = field(default=False, metadata={"help": "our collator builds the batch"})
    use_cpu: bool = field(default=not torch.cuda.is_available(), metadata={"help": "only when there is no CUDA"})
    resume: bool = field(default=False, metadata={"help": "continue from the last checkpoint in output_dir"})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "allow a non-empty output_dir"})


# ---- data: pure functions, shared with the QLoRA entrypoint ------------------------------------------------------
def chat_ids(tokenizer, messages, add_generation_prompt=False) -> list[int]:
    """Token ids exactly as vLLM's chat endpoint builds them (the template carries the one BOS)."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def tokenize_conversation(tokenizer, conversations: list[dict]) -> dict:
    """input_ids + labels: -100 over every prompt token, the assistant tokens (+ <|eot_id|>) learned."""
    input_ids, labels = [], []
    for i, msg in enumerate(conversations):
        if msg["role"] != "assistant":
            continue
        prompt = chat_ids(tokenizer, conversations[:i], add_generation_prompt=True)
        full = chat_ids(tokenizer, conversations[:i + 1])
        if full[:len(prompt)] != prompt or prompt[:len(input_ids)] != input_ids:
            raise StageError("chat template is not prefix-stable; cannot mask prompt tokens")
        labels += [IGNORE_TOKEN_ID] * (len(prompt) - len(input_ids)) + full[len(prompt):]
        input_ids = full
    return {"input_ids": input_ids, "labels": labels}


def load_conversations(path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise StageError(f"data not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise StageError(f"{path} is not valid JSON: {e.msg} (line {e.lineno})")
    if not isinstance(data, list) or not data:
        raise StageError(f"{path} must be a non-empty JSON list of XiYan conversation records")
    for n, rec in enumerate(data):
        conv = rec.get("conversations") if isinstance(rec, dict) else None
        if not conv or not all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in conv) \
                or conv[-1]["role"] != "assistant":
            raise StageError(f"{path} record {n}: needs 'conversations' ending with an assistant turn")
    return data


def tokenize_dataset(tokenizer, records: list[dict], max_len: int) -> tuple[list[dict], int]:
    """-> (examples that fit, number dropped for length). No example ever loses a label to truncation."""
    kept, dropped = [], 0
    for rec in records:
        ex = tokenize_conversation(tokenizer, rec["conversations"])
        if len(ex["input_ids"]) > max_len:
            dropped += 1
        elif any(label != IGNORE_TOKEN_ID for label in ex["labels"]):
            kept.append(ex)
    return kept, dropped


class PadCollator:
    """Right-pad with Meta's pad token; padded labels are -100. Counts real tokens for the tokens/s log.

    Widths are rounded up to a multiple (64 in training): a few distinct shapes instead of one per batch keeps the
    kernel caches and the allocator from growing through a long run (seen on CPU as RSS creep and falling tokens/s).
    """

    def __init__(self, pad_id: int, multiple: int = 1):
        self.pad_id, self.multiple, self.tokens_seen = pad_id, multiple, 0

    def __call__(self, batch):
        width = -(-max(len(ex["input_ids"]) for ex in batch) // self.multiple) * self.multiple
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_TOKEN_ID, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ex in enumerate(batch):
            n = len(ex["input_ids"])
            ids[row, :n], labels[row, :n], mask[row, :n] = torch.tensor(ex["input_ids"]), torch.tensor(ex["labels"]), 1
        self.tokens_seen += int(mask.sum())
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


# ---- model -------------------------------------------------------------------------------------------------------
def lora_config(margs: ModelArguments):
    from peft import LoraConfig
    return LoraConfig(r=margs.lora_r, lora_alpha=margs.lora_alpha, lora_dropout=margs.lora_dropout,
                      target_modules=[m.strip() for m in margs.lora_target_modules.split(",") if m.strip()],
                      bias="none", task_type="CAUSAL_LM")


def load_bf16_model(margs: ModelArguments, targs: TrainingArguments):
    """BF16 base; under ZeRO-3 (accelerate's zero3_init_flag) from_pretrained builds it already partitioned."""
    from peft import get_peft_model
    model = transformers.AutoModelForCausalLM.from_pretrained(
        margs.model_name_or_path, dtype=torch.bfloat16 if targs.bf16 else torch.float32,
        attn_implementation=margs.attn_implementation)
    if targs.gradient_checkpointing:
        model.enable_input_require_grads()  # checkpointing + frozen embeddings needs grads on the inputs
    return get_peft_model(model, lora_config(margs))


def partition_report(model) -> dict:
    """How many parameters ZeRO-3 really partitioned (a partitioned param has ds_numel and a 0-size local shape)."""
    params = list(model.parameters())
    partitioned = [p for p in params if hasattr(p, "ds_numel") and p.numel() < p.ds_numel]
    total = sum(getattr(p, "ds_numel", p.numel()) for p in params)
    local = sum(p.numel() for p in params)
    base_linear = next((type(m).__name__ for n, m in model.named_modules() if n.endswith("q_proj.base_layer")), None)
    return {"params": len(params), "partitioned_params": len(partitioned), "total_numel": total,
            "numel_on_this_rank_outside_zero": local, "base_linear_class": base_linear}


# ---- adapter verification (ZeRO-3 + LoRA can silently save empty adapters) ---------------------------------------
def verify_adapter(adapter_dir, base_model_path) -> dict:
    """Every LoRA tensor the base architecture implies is present, non-empty and of the right shape.

    The base is built on the meta device from its config: no weights are loaded, so this is cheap even for 70B.
    """
    from peft import LoraConfig, get_peft_model
    from safetensors import safe_open

    adapter_dir = Path(adapter_dir)
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file() or weights.stat().st_size == 0:
        raise StageError(f"adapter not saved: {weights} missing or empty")
    with safe_open(str(weights), "pt") as f:
        found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    config = transformers.AutoConfig.from_pretrained(base_model_path)
    with torch.device("meta"):
        meta = get_peft_model(transformers.AutoModelForCausalLM.from_config(config),
                              LoraConfig.from_pretrained(str(adapter_dir)))
    expected = {k.replace(".default", ""): tuple(v.shape) for k, v in meta.state_dict().items() if "lora_" in k}
    missing = sorted(k for k in expected if k not in found)
    wrong = sorted(k for k in expected if k in found and found[k] != expected[k])
    empty = sorted(k for k, shape in found.items() if math.prod(shape) == 0)
    if missing or wrong or empty:
        first = (missing or wrong or empty)[0]
        raise StageError(f"adapter {adapter_dir} is broken: {len(missing)} missing, {len(wrong)} wrong-shape, "
                         f"{len(empty)} empty LoRA tensors (first: {first})")
    return {"lora_tensors": len(expected), "adapter_sha256": sha256_file(weights)}


# ---- logging: tokens/s, MFU, loss curve --------------------------------------------------------------------------
class ThroughputCallback(TrainerCallback):
    def __init__(self, collator: PadCollator, flops_per_token: float, peak_flops_total: float, world: int):
        self.collator, self.fpt, self.peak, self.world = collator, flops_per_token, peak_flops_total, world
        self.t0, self.tok0 = None, 0

    def on_step_begin(self, args, state, control, **kw):
        if self.t0 is None:
            self.t0, self.tok0 = time.perf_counter(), self.collator.tokens_seen

    def on_log(self, args, state, control, logs=None, **kw):
        if logs is None or self.t0 is None or "loss" not in logs:
            return
        elapsed = time.perf_counter() - self.t0
        tokens = (self.collator.tokens_seen - self.tok0) * self.world  # each rank sees its own share
        tps = tokens / max(elapsed, 1e-9)
        logs["tokens_per_s"] = round(tps, 1)
        logs["mfu"] = round(tps * self.fpt / self.peak, 6)
        self.t0, self.tok0 = time.perf_counter(), self.collator.tokens_seen


def save_loss_curve(log_history: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in log_history if "loss" in h]
    losses = [h["loss"] for h in log_history if "loss" in h]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses, marker="o", ms=3, label="train loss")
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    if evals:
        ax.plot(*zip(*evals), marker="s", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title("LoRA SFT loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def check_output_dir(targs: TrainingArguments) -> None:
    out = Path(targs.output_dir)
    if targs.resume:
        if not any(out.glob("checkpoint-*")):
            raise StageError(f"--resume: no checkpoint-* in {out}")
    elif out.exists() and any(out.iterdir()) and not targs.overwrite_output_dir:
        raise StageError(f"{out} is not empty: pass --resume True to continue or --overwrite_output_dir True")


def check_deepspeed_config(environ=os.environ) -> None:
    """The DeepSpeed JSON `accelerate launch` passes on must exist (a relative path is from the working directory),
    else DeepSpeed fails later with a traceback. XiYan's JSON is train/config/dp_zero3.json from the XiYan root."""
    path = environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if path and path != "none" and not Path(path).is_file():
        raise StageError(f"DeepSpeed config {path} not found (from {Path.cwd()}): run from the XiYan root, or give "
                         f"--deepspeed_config_file custom_oracle_llama/config/dp_zero3.json to accelerate launch")


def parse_args(argv=None):
    check_deepspeed_config()
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    margs, dargs, targs = parser.parse_args_into_dataclasses(args=argv)
    if margs.enable_dialect_router:
        raise StageError("--enable_dialect_router True (XiYan MoMQ dialect routing) is not supported: this model "
                         "serves one dialect (Oracle); sql_type is kept as metadata only")
    if not margs.use_lora:
        raise StageError("--use_lora False (full fine-tuning of 70B) is not supported by this entrypoint")
    return margs, dargs, targs


def train(argv=None, load_model=load_bf16_model) -> dict:
    margs, dargs, targs = parse_args(argv)
    if margs.q_lora != (load_model is not load_bf16_model):
        raise StageError("--q_lora True needs sft_oracle_llama70b_qlora.py (4-bit base); "
                         "sft_oracle_llama70b_qlora.py needs --q_lora True")
    check_output_dir(targs)
    rank0 = targs.process_index == 0
    tokenizer = transformers.AutoTokenizer.from_pretrained(margs.model_name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = PAD_TOKEN
    train_ex, dropped = tokenize_dataset(tokenizer, load_conversations(dargs.data_path), targs.model_max_length)
    eval_ex, eval_dropped = ([], 0) if not dargs.eval_data_path else tokenize_dataset(
        tokenizer, load_conversations(dargs.eval_data_path), targs.model_max_length)
    if rank0:
        print(f"data: {len(train_ex)} train examples ({dropped} dropped > {targs.model_max_length} tokens), "
              f"{len(eval_ex)} eval ({eval_dropped} dropped)")
    if not train_ex:
        raise StageError(f"no training example fits model_max_length={targs.model_max_length}")

    # Seed before the model exists: LoRA's A matrices are drawn at get_peft_model, before Trainer seeds (same seed ->
    # same adapter init on every rank and every run).
    transformers.set_seed(targs.seed)
    model = load_model(margs, targs)
    partition = partition_report(model)
    collator = PadCollator(tokenizer.pad_token_id, multiple=64)
    cfg = transformers.AutoConfig.from_pretrained(margs.model_name_or_path)
    mean_len = sum(len(ex["input_ids"]) for ex in train_ex) / len(train_ex)
    fpt = plan_capacity.train_flops_per_token(cfg.to_dict(), seq_len=mean_len, lora_r=margs.lora_r,
                                              targets=lora_config(margs).target_modules)["total"]
    world = targs.world_size
    trainer = Trainer(model=model, args=targs, train_dataset=train_ex, eval_dataset=eval_ex or None,
                      data_collator=collator, processing_class=tokenizer,
                      callbacks=[ThroughputCallback(collator, fpt, margs.peak_tflops * 1e12 * world, world)])
    if rank0 and hasattr(model, "print_trainable_parameters"):
        model.print_trainable_parameters()
    result = trainer.train(resume_from_checkpoint=True if targs.resume else None)
    trainer.save_model(targs.output_dir)
    trainer.accelerator.wait_for_everyone()
    summary = {}
    if rank0:
        # Training is over: stop ZeRO-3 from partitioning the meta-device model verify_adapter builds.
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config
        unset_hf_deepspeed_config()
        out = Path(targs.output_dir)
        summary = verify_adapter(out, margs.model_name_or_path)
        history = trainer.state.log_history
        save_loss_curve(history, out / "loss_curve.png")
        losses = [h["loss"] for h in history if "loss" in h]
        data_manifest = Path(dargs.data_path).with_suffix("").as_posix() + ".manifest.json"
        base_cfg = Path(margs.model_name_or_path) / "config.json"
        manifest = {
            "stage": "lora_sft", "created_unix": int(time.time()),
            "data_path": dargs.data_path, "data_sha256": sha256_file(dargs.data_path),
            "dataset_manifest_sha256": sha256_file(data_manifest) if Path(data_manifest).is_file() else None,
            "dataset_id": (json.loads(Path(data_manifest).read_text())["dataset_id"]
                           if Path(data_manifest).is_file() else None),
            "prompt_template_sha256": template_sha256(),
            "base_model": margs.model_name_or_path,
            "base_config_sha256": sha256_file(base_cfg) if base_cfg.is_file() else None,
            "examples": {"train": len(train_ex), "dropped_too_long": dropped, "eval": len(eval_ex)},
            "final_loss": losses[-1] if losses else None, "first_loss": losses[0] if losses else None,
            "global_step": trainer.state.global_step, "train_runtime_s": result.metrics.get("train_runtime"),
            # machines = ranks / ranks per machine (torchrun's LOCAL_WORLD_SIZE, set on every node by accelerate)
            "world_size": world, "num_machines": world // int(os.environ.get("LOCAL_WORLD_SIZE", world)),
            "zero3_partition_rank0": partition, "adapter": summary,
            "flops_per_token": fpt,
            "model_args": asdict(margs), "data_args": asdict(dargs),
            "training_args": json.loads(targs.to_json_string()),
            "versions": library_versions("torch", "transformers", "peft", "accelerate", "deepspeed", "tokenizers"),
        }
        atomic_write_json(out / "training_manifest.json", manifest)
        print(f"adapter OK ({summary['lora_tensors']} LoRA tensors), loss {manifest['first_loss']} -> "
              f"{manifest['final_loss']}, {partition['partitioned_params']}/{partition['params']} params "
              f"partitioned by ZeRO-3 -> {out}")
    # Every rank leaves together, after rank 0 has written the manifest: ranks that exited while rank 0 still held
    # the process group made the 2-machine launch abort at teardown (SIGABRT on rank 1, 1 CI run in 3, 2026-12-02).
    # If rank 0 fails above, its launcher stops the waiting ranks.
    trainer.accelerator.wait_for_everyone()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return summary


def main(argv=None, load_model=load_bf16_model) -> int:
    try:
        train(argv, load_model)
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
