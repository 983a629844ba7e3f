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


def test_install_refuses_conflict_before_copying_anything(tmp_path):
    fake_xiyan(tmp_path)
    target = tmp_path / "custom_oracle_llama" / "prompting.py"
    target.parent.mkdir()
    target.write_text("# a user's own edit\n")
    before = snapshot(tmp_path)
    r = install(tmp_path)
    assert r.returncode == 1 and "prompting.py" in r.stderr and "nothing copied" in r.stderr
    assert snapshot(tmp_path) == before


def test_install_refuses_non_xiyan_dir(tmp_path):
    r = install(tmp_path)
    assert r.returncode == 2 and "does not look like" in r.stderr and "Traceback" not in r.stderr


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
