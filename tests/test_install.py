"""Air-gapped install from a wheelhouse, and installing into a XiYan checkout without overwriting anything."""
import hashlib
import os
import subprocess
import sys

import pytest

from conftest import PKG, ROOT

SCRIPT = PKG / "install_into_xiyan.py"


def fake_xiyan(root):
    """A directory laid out like XiYan-SQLTraining, with files that must stay byte-identical."""
    files = {"train/config/dp_zero3.json": '{"zero_optimization": {"stage": 3}}\n',
             "train/config/zero3.yaml": "deepspeed_config:\n  deepspeed_config_file: config/dp_zero3.json\n",
             "train/sft4xiyan.py": "# XiYan trainer\n", "README.md": "XiYan\n"}
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return {rel: hashlib.sha256((root / rel).read_bytes()).hexdigest() for rel in files}


def snapshot(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in root.rglob("*") if p.is_file()}


def install(root, *extra):
    return subprocess.run([sys.executable, str(SCRIPT), "--xiyan_root", str(root), *extra], capture_output=True,
                          text=True, timeout=60)


@pytest.mark.slow
def test_install_adds_files_and_never_touches_xiyan(tmp_path):
    before = fake_xiyan(tmp_path)
    r = install(tmp_path)
    assert r.returncode == 0, r.stderr
    after = snapshot(tmp_path)
    assert {k: after[k] for k in before} == before
    assert (tmp_path / "custom_oracle_llama" / "sft_oracle_llama70b_lora.py").read_bytes() == \
        (PKG / "sft_oracle_llama70b_lora.py").read_bytes()
    assert "added" in r.stdout and "0 conflicts" in r.stdout
    again = install(tmp_path)   # idempotent: identical files are fine
    assert again.returncode == 0 and again.stdout.strip().splitlines()[-1].startswith("0 added")


@pytest.mark.slow
def test_install_refuses_conflict_before_copying_anything(tmp_path):
    fake_xiyan(tmp_path)
    target = tmp_path / "custom_oracle_llama" / "prompting.py"
    target.parent.mkdir()
    target.write_text("# a user's own edit\n")
    before = snapshot(tmp_path)
    r = install(tmp_path)
    assert r.returncode == 1 and "prompting.py" in r.stderr and "nothing copied" in r.stderr
    assert snapshot(tmp_path) == before


@pytest.mark.slow
def test_install_refuses_non_xiyan_dir(tmp_path):
    r = install(tmp_path)
    assert r.returncode == 2 and "does not look like" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_lora_entrypoint_runs_from_inside_xiyan(tmp_path):
    """The copied scripts work from the XiYan root (imports, template, --help), not just from this repo."""
    fake_xiyan(tmp_path)
    assert install(tmp_path).returncode == 0
    r = subprocess.run([sys.executable, "custom_oracle_llama/sft_oracle_llama70b_lora.py", "--help"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--enable_dialect_router" in r.stdout
    r = subprocess.run([sys.executable, "custom_oracle_llama/inference/sql_guardrail.py", "check"], cwd=tmp_path,
                       input="SELECT 1 FROM DUAL", capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
def test_wheelhouse_then_offline_install(tmp_path):
    """make wheelhouse, then both environments from it with the package index disabled."""
    wh = tmp_path / "wh"
    env = {**os.environ, "PIP_NO_INDEX": "0"}
    r = subprocess.run(["make", "-s", "wheelhouse", f"WHEELHOUSE={wh}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=2400, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    offline = {**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": ""}
    venv, serve = tmp_path / "venv", tmp_path / "venv-serve"
    r = subprocess.run(["make", "-s", "install-offline", f"WHEELHOUSE={wh}", f"VENV={venv}", f"SERVE_VENV={serve}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=2400, env=offline)
    assert r.returncode == 0, r.stderr[-3000:]
    check = subprocess.run([str(venv / "bin" / "python"), "-c", "import torch, transformers, peft, deepspeed, "
                            "llmcompressor, sqlglot, duckdb, oracledb; print(torch.__version__)"],
                           capture_output=True, text=True, timeout=600)
    assert check.returncode == 0 and check.stdout.strip().splitlines()[-1].startswith("2.13.0"), check.stderr[-2000:]
    check = subprocess.run([str(serve / "bin" / "python"), "-c", "import vllm; print(vllm.__version__)"],
                           capture_output=True, text=True, timeout=600)
    assert check.returncode == 0 and check.stdout.strip().splitlines()[-1] == "0.32.0", check.stderr[-2000:]


# ---- the site's environment: config/offline.env for every stage, config/site.env for where the venvs live --------
@pytest.mark.slow
def test_makefile_and_stage_env_read_the_same_file():
    """One environment file: what `make` exports equals what stage_env.apply() sets (tests, serve.py, scripts)."""
    import stage_env
    names = [name for name, _, _ in stage_env.read_env_file(stage_env.ENV_FILES[0])]
    clean = {k: v for k, v in os.environ.items() if k not in names}
    r = subprocess.run(["make", "-s", "--eval", "print-env: ; @env", "print-env"], cwd=ROOT, env=clean,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    from_make = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
    from_python = {}
    stage_env.apply(from_python, files=stage_env.ENV_FILES[:1])
    assert {k: from_make.get(k) for k in names} == from_python
    assert from_python["HF_HUB_OFFLINE"] == "1" and from_python["TORCH_EXTENSIONS_DIR"] == str(ROOT / ".cache" /
                                                                                              "torch_extensions")


def test_stage_env_forces_offline_and_keeps_user_settings(tmp_path):
    import stage_env
    env = {"HF_HUB_OFFLINE": "0", "HF_HOME": "/site/hf", "OMP_WAIT_POLICY": "ACTIVE"}
    changed = stage_env.apply(env, root=tmp_path)
    assert env["HF_HUB_OFFLINE"] == "1" and env["HF_HOME"] == "/site/hf" and env["OMP_WAIT_POLICY"] == "ACTIVE"
    assert env["TORCH_EXTENSIONS_DIR"] == f"{tmp_path}/.cache/torch_extensions" and "HF_HOME" not in changed
    bad = tmp_path / "bad.env"
    bad.write_text("export HF_HOME=/x\n")
    with pytest.raises(ValueError, match=r"bad.env:1: expected NAME := value"):
        stage_env.apply({}, files=[bad])


@pytest.mark.slow
def test_stage_env_silences_listed_third_party_warnings_only():
    """DeepSpeed's every-step torch.distributed deprecation and bitsandbytes' `kernels` line are dropped (apply() twice
    is harmless); any other warning or log record, from the same logger too, still shows."""
    code = ("import logging, sys, warnings; sys.path.insert(0, sys.argv[1]); import stage_env; stage_env.apply({}); "
            "stage_env.apply({}); "
            "warnings.warn('`torch.distributed.reduce_scatter_tensor` is deprecated. Use x', FutureWarning); "
            "warnings.warn('our own deprecation', FutureWarning); warnings.warn('a user warning'); "
            "bnb = logging.getLogger('bitsandbytes.backends.cpu.ops'); "
            "bnb.warning('Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please', 'No module'); "
            "bnb.warning('another bitsandbytes warning'); print(len(bnb.filters))")
    r = subprocess.run([sys.executable, "-c", code, str(PKG)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "torch.distributed" not in r.stderr and "kernels-community" not in r.stderr
    assert "FutureWarning: our own deprecation" in r.stderr and "UserWarning: a user warning" in r.stderr
    assert "another bitsandbytes warning" in r.stderr and r.stdout == "1\n"


@pytest.mark.slow
def test_install_records_the_environments_and_serve_finds_vllm_from_the_xiyan_root(tmp_path):
    """From the XiYan root, serve.py finds the vLLM python install_into_xiyan recorded (no --vllm_python)."""
    xiyan, venv, serve_venv = tmp_path / "XiYan-SQLTraining", tmp_path / "envs" / "venv", tmp_path / "envs" / "serve"
    xiyan.mkdir()
    fake_xiyan(xiyan)
    (serve_venv / "bin").mkdir(parents=True)
    recorder = serve_venv / "bin" / "python"
    recorder.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$0.argv"\nenv > "$0.env"\n')
    recorder.chmod(0o755)
    r = install(xiyan, "--venv", venv, "--serve_venv", serve_venv)
    assert r.returncode == 0 and "recorded the environments" in r.stdout, r.stderr
    assert f"{venv} has no bin/python yet" in r.stderr   # recorded anyway, with a warning
    site = (xiyan / "custom_oracle_llama" / "config" / "site.env").read_text()
    assert f"NL2SQL_VENV ?= {venv}\n" in site and f"NL2SQL_SERVE_VENV ?= {serve_venv}\n" in site
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_bytes((PKG / "demo" / "llama33_70b_config.json").read_bytes())
    import stage_env
    set_by_us = {name for name, _, _ in stage_env.read_env_file(stage_env.ENV_FILES[0])}
    env = {k: v for k, v in os.environ.items() if not k.startswith("NL2SQL_") and k not in set_by_us}  # a new shell
    r = subprocess.run([sys.executable, "custom_oracle_llama/inference/serve.py", "--model", str(model), "--config",
                        "custom_oracle_llama/inference/vllm_config.yaml"], cwd=xiyan, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    argv = (serve_venv / "bin" / "python.argv").read_text().splitlines()
    assert argv[:4] == ["-m", "vllm.entrypoints.openai.api_server", "--model", str(model)]
    served_env = dict(line.split("=", 1) for line in (serve_venv / "bin" / "python.env").read_text().splitlines()
                      if "=" in line)
    assert served_env["VLLM_CACHE_ROOT"] == str(xiyan / ".cache" / "vllm")   # the XiYan root's .cache, not ~
    again = install(xiyan)   # re-install: the record is not a conflict
    assert again.returncode == 0, again.stderr
    assert not (PKG / "config" / "site.env").exists(), "the record lives in the XiYan copy only"


@pytest.mark.slow
def test_missing_deepspeed_config_is_one_line(tmp_path):
    """What `accelerate launch` hands the script when run from the wrong folder: one error line, no traceback."""
    r = subprocess.run([sys.executable, str(PKG / "sft_oracle_llama70b_lora.py"), "--model_name_or_path", "m",
                        "--data_path", "d.json", "--output_dir", str(tmp_path / "o")], cwd=tmp_path,
                       env={**os.environ, "ACCELERATE_DEEPSPEED_CONFIG_FILE": "train/config/dp_zero3.json"},
                       capture_output=True, text=True, timeout=300)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert r.returncode == 2 and "Traceback" not in r.stderr and errors == [
        f"error: DeepSpeed config train/config/dp_zero3.json not found (from {tmp_path}): run from the XiYan root, "
        "or give --deepspeed_config_file custom_oracle_llama/config/dp_zero3.json to accelerate launch"], r.stderr


@pytest.mark.slow
def test_make_train_with_a_wrong_xiyan_root_is_one_line(tmp_path):
    r = subprocess.run(["make", "-s", "train", f"RUNS={tmp_path}", f"XIYAN_ROOT={tmp_path}", "-o",
                        f"{tmp_path}/data/ebs_sft.json"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and r.stderr.strip().splitlines()[0] == (
        f"error: DeepSpeed config {tmp_path}/train/config/dp_zero3.json not found (XIYAN_ROOT={tmp_path} has no "
        "train/config/dp_zero3.json)"), r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "adapter").exists()
