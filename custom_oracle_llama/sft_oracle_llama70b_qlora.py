"""QLoRA SFT entrypoint: same flags, data, masking, checks and manifest as sft_oracle_llama70b_lora.py, with the
base loaded in 4-bit NF4 by train_util_4bit.py. `--q_lora True` is implied.

    accelerate launch --config_file custom_oracle_llama/config/accelerate_zero3_8gpu.yaml \
        custom_oracle_llama/sft_oracle_llama70b_qlora.py --model_name_or_path Llama-3.3-70B-Instruct \
        --data_path ebs_sft.json --output_dir adapter-qlora --model_max_length 8192
    python custom_oracle_llama/sft_oracle_llama70b_qlora.py ...   (one process, e.g. one GPU or the CPU test)
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sft_oracle_llama70b_lora as lora  # noqa: E402
from train_util_4bit import load_4bit_model  # noqa: E402


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--q_lora" not in argv:
        argv += ["--q_lora", "True"]
    return lora.main(argv, load_model=load_4bit_model)


if __name__ == "__main__":
    sys.exit(main())
