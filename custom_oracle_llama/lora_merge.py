"""Streaming LoRA merge for the packaging stage: W += (alpha/r) * B @ A, shard by shard, without loading the model.

Used by package_oracle_model.py (step 1 of its docstring explains the method and the memory it needs) and by
`make bench` (bench_merge: peak RSS of a merge against the largest shard). The merge streams files; it never
loads the model.
"""
import hashlib
import json
import math
import re
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from artifacts import StageError, read_json, sha256_file

MANIFEST = "oracle_manifest.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
COPY_BLOCK = 4 << 20            # bytes per read/write when copying untouched tensors
MERGE_BLOCK_ELEMS = 4 << 20     # fp32 elements per row block of W + s * B @ A (a reused 16 MB buffer)
# Files copied unchanged from the base: configs, tokenizer, chat template, index, licence/readme.
SUPPORT_SUFFIXES = {".json", ".jinja", ".txt", ".model", ".tiktoken", ".md"}
SUPPORT_PREFIXES = ("LICENSE", "USE_POLICY", "NOTICE", "README")
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
PEFT_PREFIX = "base_model.model."
# LoRA features whose merge is not W += s * B @ A on a linear weight: refused rather than merged wrongly.
UNSUPPORTED_ADAPTER = {"use_dora": "DoRA", "fan_in_fan_out": "fan_in_fan_out (Conv1D) layers",
                       "modules_to_save": "modules_to_save (fully trained extra modules)",
                       "trainable_token_indices": "trainable token embeddings", "target_parameters": "target_parameters",
                       "layer_replication": "layer_replication", "lora_bias": "lora_bias", "use_qalora": "QA-LoRA",
                       "alora_invocation_tokens": "activated LoRA"}


# ---- safetensors, read and written as a byte stream --------------------------------------------------------------
# Not safe_open + save_file: safe_open memory-maps the shard (every page read counts toward RSS until unmapped) and
# save_file serialises a whole dict of tensors, so a shard-at-a-time merge holds 2-3x the shard. A merge never
# changes a tensor's name, dtype or shape, so the output shard can reuse the input header verbatim and be written
# sequentially while the input is read sequentially.
TORCH_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}


def read_header(path) -> tuple[int, dict]:
    """-> (offset of the data section, header dict) of a .safetensors file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            size = struct.unpack("<Q", raw)[0] if len(raw) == 8 else None
            if size is None or size > 100 << 20 or size > path.stat().st_size - 8:
                raise StageError(f"{path} is not a safetensors file (bad header length)")
            header = json.loads(f.read(size))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StageError(f"cannot read safetensors header of {path}: {e}")
    return 8 + size, header


def tensor_entries(header: dict) -> list[tuple[str, dict]]:
    """Tensors in data order (the order their bytes appear in the file)."""
    return sorted(((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"][0])


def read_tensor(f, data_start: int, info: dict, into: bytearray | None = None):
    """One tensor, read with plain file I/O (no mmap) into a new buffer or the front of `into`."""
    import torch

    begin, end = info["data_offsets"]
    buf = memoryview(into)[:end - begin] if into is not None else bytearray(end - begin)
    f.seek(data_start + begin)
    if f.readinto(buf) != len(buf):
        raise StageError(f"{f.name} is truncated")
    dtype = getattr(torch, TORCH_DTYPES[info["dtype"]])
    if not len(buf):
        return torch.empty(info["shape"], dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).reshape(info["shape"])


# ---- the LoRA adapter -------------------------------------------------------------------------------------------
@dataclass
class LoraTarget:
    a_key: str
    b_key: str
    rank: int
    scale: float
    in_features: int
    out_features: int


def pattern_value(patterns: dict, module: str, default):
    """rank_pattern / alpha_pattern lookup, same rule as peft.utils.other.get_pattern_key."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def lora_plan(adapter_dir) -> tuple[dict[str, LoraTarget], dict]:
    """{base weight name: LoraTarget} from adapter_config.json + the A/B tensor headers (no weights are read)."""
    adapter_dir = Path(adapter_dir)
    cfg_path, weights = adapter_dir / "adapter_config.json", adapter_dir / ADAPTER_WEIGHTS
    if not cfg_path.is_file():
        raise StageError(f"not a LoRA adapter: {cfg_path} missing")
    if not weights.is_file():
        raise StageError(f"adapter weights missing: {weights} (only safetensors adapters are supported)")
    cfg = read_json(cfg_path)
    if cfg.get("peft_type") != "LORA":
        raise StageError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not LORA")
    for flag, what in UNSUPPORTED_ADAPTER.items():
        if cfg.get(flag):
            raise StageError(f"{cfg_path}: {what} is not supported by the streaming merge")
    if cfg.get("bias", "none") != "none":
        raise StageError(f"{cfg_path}: bias={cfg['bias']!r} adapters are not supported (bias must be 'none')")

    _, header = read_header(weights)
    shapes = {k: v["shape"] for k, v in header.items() if k != "__metadata__"}
    plan = {}
    for key in sorted(shapes):
        if not key.endswith(LORA_SUFFIXES):
            raise StageError(f"{weights}: tensor {key} is not a LoRA A/B matrix (only linear LoRA can be merged)")
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[:-len(".lora_A.weight")]
        b_key = module + ".lora_B.weight"
        if b_key not in shapes:
            raise StageError(f"{weights}: {key} has no matching lora_B")
        (rank, in_f), (out_f, rank_b) = shapes[key], shapes[b_key]
        name = module.removeprefix(PEFT_PREFIX)
        expected_r = pattern_value(cfg.get("rank_pattern") or {}, name, cfg.get("r"))
        if rank != rank_b or rank == 0 or rank != expected_r or 0 in (in_f, out_f):
            raise StageError(f"{weights}: {name} has lora_A {shapes[key]} / lora_B {shapes[b_key]}, inconsistent "
                             f"with r={expected_r} in adapter_config.json")
        alpha = pattern_value(cfg.get("alpha_pattern") or {}, name, cfg.get("lora_alpha"))
        scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
        plan[name + ".weight"] = LoraTarget(key, b_key, rank, scale, in_f, out_f)
    if len(plan) * 2 != len(shapes):
        orphan = sorted(k for k in shapes if k.endswith(".lora_B.weight")
                        and k[:-len(".lora_B.weight")] + ".lora_A.weight" not in shapes)
        raise StageError(f"{weights}: {orphan[0]} has no matching lora_A")
    if not plan:
        raise StageError(f"{weights} has no LoRA tensors")
    return plan, cfg


# ---- the base model ---------------------------------------------------------------------------------------------
def weight_shards(base_dir) -> list[str]:
    """Shard file names of a safetensors checkpoint (from its index when there is one)."""
    base_dir = Path(base_dir)
    if not (base_dir / "config.json").is_file():
        raise StageError(f"base model not found: {base_dir / 'config.json'} missing")
    index = base_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(read_json(index)["weight_map"].values()))
        except (KeyError, AttributeError) as e:
            raise StageError(f"{index} is not a safetensors index: no weight_map ({e})")
    else:
        shards = sorted(p.name for p in base_dir.glob("*.safetensors"))
    if not shards:
        raise StageError(f"no *.safetensors weights in {base_dir} (.bin/.pth checkpoints: convert to safetensors first)")
    missing = [s for s in shards if not (base_dir / s).is_file()]
    if missing:
        raise StageError(f"base model incomplete: {base_dir / missing[0]} missing")
    return shards


def support_files(base_dir, shards: list[str]) -> tuple[list[str], list[str]]:
    """(files copied unchanged, top-level entries left out) of the base dir."""
    copied, skipped = [], []
    for p in sorted(Path(base_dir).iterdir()):
        if p.name in shards or p.name == MANIFEST:
            continue
        keep = p.is_file() and (p.suffix in SUPPORT_SUFFIXES or p.name.startswith(SUPPORT_PREFIXES))
        (copied if keep else skipped).append(p.name)
    return copied, skipped


def check_adapter_fits(plan: dict[str, LoraTarget], base_dir, shards: list[str]) -> dict[str, str]:
    """Every LoRA target exists in the base with the shape B @ A produces: -> {weight name: shard}."""
    where = {}
    for shard in shards:
        _, header = read_header(Path(base_dir) / shard)
        for name, info in header.items():
            if name != "__metadata__":
                where[name] = (shard, info)
    located = {}
    for name, t in plan.items():
        if name not in where:
            raise StageError(f"adapter does not match the base model: it adapts {name.removesuffix('.weight')}, "
                             f"which {base_dir} does not have (trained on a different base?)")
        shard, info = where[name]
        if list(info["shape"]) != [t.out_features, t.in_features]:
            raise StageError(f"adapter does not match the base model: {name} is {info['shape']} in the base but "
                             f"the LoRA update is [{t.out_features}, {t.in_features}] (different hidden/intermediate "
                             f"size: trained on a different base?)")
        if info["dtype"] not in TORCH_DTYPES:
            raise StageError(f"base weight {name} has dtype {info['dtype']}: merge into the unquantized bf16 base")
        located[name] = shard
    return located


def check_base_identity(adapter_dir, base_dir, allow_mismatch: bool) -> dict:
    """Compare the base's config.json with the one recorded when the adapter was trained."""
    tm = read_json(Path(adapter_dir) / "training_manifest.json", missing_ok=True)
    now = sha256_file(Path(base_dir) / "config.json")
    trained = tm.get("base_config_sha256")
    info = {"base_config_sha256": now, "trained_base_config_sha256": trained,
            "trained_base_model": tm.get("base_model"), "matches": trained == now if trained else None}
    if trained and trained != now and not allow_mismatch:
        raise StageError(f"adapter does not match the base model: {base_dir}/config.json has sha256 {now[:12]}, the "
                         f"adapter was trained on {tm.get('base_model')} with config sha256 {trained[:12]} "
                         f"(pass --allow_base_mismatch if only the config file changed)")
    return info


# ---- merge --------------------------------------------------------------------------------------------------------
def merge_weight_(w, a, b, scale: float, work=None) -> None:
    """w += scale * b @ a in place: fp32 arithmetic, one rounding to w's dtype, in row blocks.

    `work` (fp32, >= one row) is reused across calls: allocating and freeing tens of MB per tensor fragments the
    heap, and glibc then keeps the freed memory resident, which made RSS creep up tensor after tensor.
    """
    import torch

    a32 = a.to(torch.float32)
    cols = w.shape[1]
    if work is None or work.numel() < cols:
        work = torch.empty(max(cols, min(MERGE_BLOCK_ELEMS, w.numel())), dtype=torch.float32)
    rows = max(1, work.numel() // max(1, cols))
    for i in range(0, w.shape[0], rows):
        blk = w[i:i + rows]
        acc = work[:blk.numel()].view(blk.shape)
        acc.copy_(blk)
        acc.addmm_(b[i:i + rows].to(torch.float32), a32, alpha=scale)
        blk.copy_(acc)


class _HashingWriter:
    """Sequential writer that hashes what it writes and turns ENOSPC into one clear line."""

    def __init__(self, path):
        self.path, self.f, self.h = Path(path), open(path, "wb"), hashlib.sha256()

    def write(self, data) -> None:
        try:
            self.f.write(data)
        except OSError as e:
            raise StageError(f"cannot write {self.path}: {e.strerror} "
                             f"({shutil.disk_usage(self.path.parent).free >> 20} MiB free)") from e
        self.h.update(data)

    def close(self) -> None:
        try:
            self.f.close()
        except OSError as e:
            raise StageError(f"cannot write {self.path}: {e.strerror}") from e


class MergeBuffers:
    """The merge's only large allocations, sized once for the largest tensor and reused for every shard."""

    def __init__(self, plan: dict[str, LoraTarget], nbytes: dict[str, int]):
        import torch
        self.weight = bytearray(max(nbytes[k] for k in plan))
        self.copy = bytearray(max(1, min(COPY_BLOCK, max((v for k, v in nbytes.items() if k not in plan), default=1))))
        elems = max(t.in_features * t.out_features for t in plan.values())
        cols = max(t.in_features for t in plan.values())
        self.work = torch.empty(max(cols, min(MERGE_BLOCK_ELEMS, elems)), dtype=torch.float32)


def merge_shard(src, dst, plan: dict[str, LoraTarget], adapter_f, adapter_start: int, adapter_header: dict,
                bufs: MergeBuffers, progress=None) -> tuple[str, str, int]:
    """Stream one shard: -> (sha256 of the input, sha256 of the output, number of merged tensors)."""
    data_start, header = read_header(src)
    src_hash, merged, pos = hashlib.sha256(), 0, 0
    entries = tensor_entries(header)
    block = bufs.copy
    out = _HashingWriter(dst)
    try:
        with open(src, "rb") as f:
            head = f.read(data_start)
            src_hash.update(head)
            out.write(head)
            for name, info in entries:
                begin, end = info["data_offsets"]
                if begin != pos:
                    raise StageError(f"{src}: tensor {name} does not start where the previous one ends")
                if name in plan:
                    t = plan[name]
                    raw = memoryview(bufs.weight)[:end - begin]
                    w = read_tensor(f, data_start, info, into=bufs.weight)
                    src_hash.update(raw)
                    merge_weight_(w, read_tensor(adapter_f, adapter_start, adapter_header[t.a_key]),
                                  read_tensor(adapter_f, adapter_start, adapter_header[t.b_key]), t.scale, bufs.work)
                    out.write(raw)
                    merged += 1
                    del w
                else:
                    left = end - begin
                    while left:
                        n = f.readinto(memoryview(block)[:min(left, COPY_BLOCK)])
                        if not n:
                            raise StageError(f"{src} is truncated")
                        src_hash.update(memoryview(block)[:n])
                        out.write(memoryview(block)[:n])
                        left -= n
                if progress is not None:
                    progress.update(end - begin)
                pos = end
            if f.read(1):
                raise StageError(f"{src} has bytes after its last tensor")
    finally:
        out.close()
    return src_hash.hexdigest(), out.h.hexdigest(), merged


class PeakRSS:
    """Peak resident memory of this process during a block, beyond what it held when the block started.

    Linux: resets the kernel's high-water mark (echo 5 > /proc/self/clear_refs) and reads VmHWM afterwards, so the
    figure is exact; elsewhere falls back to ru_maxrss (an upper bound that includes earlier peaks).
    """

    def __enter__(self):
        import psutil
        self.before = psutil.Process().memory_info().rss
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.method = "VmHWM after clear_refs"
        except OSError:
            self.method = "ru_maxrss (upper bound)"
        return self

    def __exit__(self, *exc):
        if self.method.startswith("VmHWM"):
            line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
            self.peak = int(line.split()[1]) * 1024
        else:
            import resource
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.extra = max(0, self.peak - self.before)
        return False


def merge_lora_shards(base_dir, adapter_dir, out_dir, progress: bool = True) -> dict:
    """Merge the LoRA adapter into the base's safetensors shards, writing a complete HF checkpoint into out_dir.

    No CLI state: the benchmark and the tests call it directly. Returns the figures recorded in the manifest:
    shard sizes, peak RSS beyond the RSS at the start, sha256 of every input and output shard.
    """
    import torch  # noqa: F401  (imported before the RSS baseline: the libraries are not the merge's memory)
    from tqdm import tqdm

    base_dir, adapter_dir, out_dir = Path(base_dir), Path(adapter_dir), Path(out_dir)
    shards = weight_shards(base_dir)
    plan, cfg = lora_plan(adapter_dir)
    located = check_adapter_fits(plan, base_dir, shards)
    copied, skipped = support_files(base_dir, shards)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in copied:
        shutil.copyfile(base_dir / name, out_dir / name)

    sizes = {s: (base_dir / s).stat().st_size for s in shards}
    adapter_file = adapter_dir / ADAPTER_WEIGHTS
    adapter_start, adapter_header = read_header(adapter_file)
    nbytes = {}
    for shard in shards:
        for name, info in tensor_entries(read_header(base_dir / shard)[1]):
            nbytes[name] = info["data_offsets"][1] - info["data_offsets"][0]
    base_hashes, out_hashes, n_merged = {}, {}, 0
    t0 = time.perf_counter()
    with PeakRSS() as rss, open(adapter_file, "rb") as af, \
            tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, desc="merge", disable=not progress) as bar:
        bufs = MergeBuffers(plan, nbytes)
        for shard in shards:
            plan_here = {k: v for k, v in plan.items() if located[k] == shard}
            base_hashes[shard], out_hashes[shard], n = merge_shard(
                base_dir / shard, out_dir / shard, plan_here, af, adapter_start, adapter_header, bufs, bar)
            n_merged += n
        del bufs
    seconds = time.perf_counter() - t0
    if n_merged != len(plan):
        raise StageError(f"merged {n_merged} of {len(plan)} LoRA targets")
    largest_target = max(t.in_features * t.out_features for t in plan.values())
    return {
        "shards": len(shards), "largest_shard_bytes": max(sizes.values()), "total_weight_bytes": sum(sizes.values()),
        "merged_tensors": n_merged, "largest_merged_tensor_elements": largest_target,
        "lora_rank": sorted({t.rank for t in plan.values()}), "lora_scale": sorted({t.scale for t in plan.values()}),
        "target_modules": sorted({k.split(".")[-2] for k in plan}),
        "peak_rss_extra_bytes": rss.extra, "rss_before_bytes": rss.before, "peak_rss_method": rss.method,
        "peak_rss_over_largest_shard": round(rss.extra / max(sizes.values()), 4),
        "seconds": round(seconds, 3), "copied_files": copied, "skipped_base_entries": skipped,
        "base_weight_sha256": base_hashes, "merged_weight_sha256": out_hashes, "adapter_config": cfg,
    }


# ---- benchmark: peak RSS of the streaming merge on a multi-shard checkpoint -------------------------------------
def _bench_child(base, adapter, out, queue) -> None:
    try:
        queue.put(merge_lora_shards(base, adapter, out, progress=False))
    except BaseException as e:  # the parent reports it
        queue.put({"error": repr(e)})


def bench_merge(shards: int, workdir, hidden: int = 1024, intermediate: int = 4096, layers: int = 8,
                vocab: int = 8192, rank: int = 16) -> dict:
    """Build a Llama-shaped checkpoint with `shards` shards and a matching random LoRA, then merge it in a fresh
    process and report its peak RSS beyond its starting RSS against the largest shard."""
    import multiprocessing as mp

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    workdir = Path(workdir)
    base, adapter, out = workdir / "base", workdir / "adapter", workdir / "merged"
    for p in (base, adapter, out):
        shutil.rmtree(p, ignore_errors=True)
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, head_dim=64,
                      vocab_size=vocab, tie_word_embeddings=False, dtype="bfloat16")
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(base, max_shard_size=max(1 << 20, math.ceil(total * 1.1 / shards)))
    peft = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, init_lora_weights=False,
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj"]))
    peft.save_pretrained(adapter)
    del model, peft
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_bench_child, args=(str(base), str(adapter), str(out), queue))
    proc.start()
    stats = queue.get()
    proc.join()
    for p in (base, adapter, out):      # ~2x the synthetic checkpoint on disk: not worth keeping
        shutil.rmtree(p, ignore_errors=True)
    if "error" in stats:
        raise StageError(f"bench merge failed: {stats['error']}")
    keep = ("shards", "largest_shard_bytes", "total_weight_bytes", "merged_tensors", "largest_merged_tensor_elements",
            "peak_rss_extra_bytes", "rss_before_bytes", "peak_rss_method", "peak_rss_over_largest_shard", "seconds")
    result = {k: stats[k] for k in keep}
    result.update({"budget": "peak_rss_extra_bytes <= 2 x largest_shard_bytes",
                   "within_budget": stats["peak_rss_extra_bytes"] <= 2 * stats["largest_shard_bytes"],
                   "model": {"hidden": hidden, "intermediate": intermediate, "layers": layers, "vocab": vocab,
                             "lora_rank": rank},
                   "throughput_MBps": round(stats["total_weight_bytes"] / 1e6 / max(stats["seconds"], 1e-9), 1)})
    return result
