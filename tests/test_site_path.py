"""The site's path exactly as the README writes it, and README figures that are what the commands print.

`test_readme_site_path_end_to_end` reads the bash block of the README's "The real 70B path" section and runs it on
a XiYan-shaped tree: `make install-into-xiyan`, then from the XiYan root with the recorded training environment
active: dataset, training, packaging, verify, serving, ask, eval. The only changes are the stand-ins in STAND_INS
(the tiny model for the 70B, the CPU accelerate/vLLM files for the GPU ones, a free port) and the few flags in
SHORTER that keep it to a few minutes; a README edit that breaks a command breaks this test.
"""
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import PKG, ROOT
import stage_env
from serve import log_tail, stop_tree

README = ROOT / "README.md"
PORT = 18321   # this test's own port (the README's 8000 may be in use on a shared machine)


def readme_blocks(heading: str, text: str | None = None) -> list[tuple[str, str]]:
    """[(language, body)] of the fenced blocks of one `## heading` section, in order."""
    text = README.read_text() if text is None else text
    section = text[text.index(f"\n## {heading}") + 1:]
    section = section[:section.find("\n## ")] if "\n## " in section else section
    return re.findall(r"^```(\w*)\n(.*?)^```$", section, re.M | re.S)


def readme_block(heading: str, lang: str = "bash") -> str:
    """The first fenced block of that language in the section."""
    blocks = [body for language, body in readme_blocks(heading) if language == lang]
    assert blocks, f"no ```{lang} block in '## {heading}'"
    return blocks[0]


def commands(block: str) -> list[str]:
    """Shell commands of a block: continuation lines joined, comments and blank lines dropped."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        line = re.sub(r"\s+#\s.*$", "", line).strip()   # trailing comments ("  # adds ...")
        if line and not line.startswith("#"):
            out.append(re.sub(r"\s+", " ", line))
    return out


SITE_PATH = readme_block("The real 70B path")


def test_readme_site_path_has_every_step():
    """Fast guard for the parser and the block: the steps the slow test runs are where it expects them."""
    cmds = commands(SITE_PATH)
    starts = [c.split()[0] if c.split()[0] != "python" else c.split()[1] for c in cmds]
    assert starts == ["make", "make", "cd", "custom_oracle_llama/build_oracle_sft_dataset.py", "accelerate",
                      "custom_oracle_llama/package_oracle_model.py", "custom_oracle_llama/package_oracle_model.py",
                      "custom_oracle_llama/inference/serve.py", "custom_oracle_llama/inference/sql_guardrail.py",
                      "custom_oracle_llama/eval_oracle_nl2sql.py"], cmds
    for c in cmds:
        for script in re.findall(r"custom_oracle_llama/\S+\.(?:py|yaml)", c):
            assert (ROOT / script).is_file(), f"README names {script}, which does not exist"


# ---- README figures: the planner blocks are what the command prints ----------------------------------------------
@pytest.mark.slow
def test_readme_capacity_plan_is_what_the_command_prints():
    """The block under the two commands is their output, optional [flags] included (the README shows them run)."""
    cmds = [re.sub(r"\[([^\]]*)\]", r"\1", c) for c in commands(readme_block("Capacity plan"))]
    assert [c.split()[:3] for c in cmds] == [["python", "custom_oracle_llama/plan_capacity.py", "serve"],
                                             ["python", "custom_oracle_llama/plan_capacity.py", "train"]], cmds
    printed = []
    for c in cmds:
        r = subprocess.run([sys.executable, *c.split()[1:]], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        printed.append(r.stdout.rstrip())
    shown = readme_block("Capacity plan", lang="")
    assert [line.rstrip() for line in shown.rstrip().splitlines()] == "\n\n".join(printed).splitlines(), \
        "the README's planner block differs from what the two commands print: paste their output"


# ---- the slow end-to-end run --------------------------------------------------------------------------------------
def stand_ins(xiyan: Path, tiny: Path) -> list[tuple[str, str]]:
    """README text -> what stands in for it here. The order matters (longer names first)."""
    return [("/opt/XiYan-SQLTraining", str(xiyan)), ("/opt/oracle-nl2sql", str(ROOT)),
            ("/models/Llama-3.3-70B-Instruct", str(tiny)),
            ("accelerate_zero3_8gpu.yaml", "accelerate_zero3_cpu.yaml"),   # 2 CPU ranks over gloo, same ZeRO-3
            ("inference/vllm_config.yaml", "inference/vllm_config_cpu.yaml"),
            ("http://127.0.0.1:8000", f"http://127.0.0.1:{PORT}"),
            (" --oracle_dsn staging-db:1521/EBSSTG", "")]   # no Oracle here: eval explains on its DuckDB mirror


# Appended to a command (by its script) so the run takes minutes: flags the README's command accepts unchanged.
SHORTER = {
    "sft_oracle_llama70b_lora.py": "--max_steps 2 --per_device_train_batch_size 2 --gradient_accumulation_steps 1 "
                                   "--gradient_checkpointing False --logging_steps 1 --save_steps 1000",
    "package_oracle_model.py --base_model": "--num_calib_samples 8 --num_eval_prompts 2 --merge_check_prompts 1",
    "serve.py": f"--port {PORT}",
    "eval_oracle_nl2sql.py": "--limit 4 --concurrency 4 --out_dir runs/eval",
}


def site_command(cmd: str, xiyan: Path, tiny: Path) -> str:
    for readme_text, here in stand_ins(xiyan, tiny):
        cmd = cmd.replace(readme_text, here)
    extra = [flags for key, flags in SHORTER.items() if key in cmd]
    return " ".join([cmd, *extra])


def xiyan_tree(root: Path) -> Path:
    """A XiYan-SQLTraining checkout's shape (train/, its ZeRO-3 files) plus the site's two inputs at its root."""
    files = {"train/config/dp_zero3.json": (PKG / "config" / "dp_zero3.json").read_text(),
             "train/config/zero3.yaml": "deepspeed_config:\n  deepspeed_config_file: config/dp_zero3.json\n",
             "train/sft4xiyan.py": "# XiYan trainer\n", "README.md": "XiYan\n",
             "ebs_raw.jsonl": (PKG / "demo" / "raw_questions.jsonl").read_text(),
             "ebs_catalog.json": (PKG / "demo" / "ebs_catalog.json").read_text()}
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def fresh_shell_env() -> dict:
    """A new login shell: none of the settings config/offline.env provides, no recorded environments."""
    ours = {name for name, _, _ in stage_env.read_env_file(stage_env.ENV_FILES[0])}
    return {k: v for k, v in os.environ.items() if k not in ours and not k.startswith(("NL2SQL_", "VIRTUAL_ENV"))}


def run(cmd: str, cwd: Path, timeout: int, ok=(0,)) -> subprocess.CompletedProcess:
    r = subprocess.run(["bash", "-c", cmd], cwd=cwd, env=fresh_shell_env(), capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode in ok, f"{cmd}\nexit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r


def port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.slow
def test_readme_site_path_end_to_end(tmp_path, tiny_model_dir):
    assert port_free(PORT), f"port {PORT} is in use"
    xiyan = xiyan_tree(tmp_path / "XiYan-SQLTraining")
    cmds = [site_command(c, xiyan, tiny_model_dir) for c in commands(SITE_PATH)]
    install_offline, install, activate, dataset, train, package, verify, serve, ask, evaluate = cmds
    assert install_offline.startswith("make install-offline")   # covered by test_install's wheelhouse test

    r = run(install, ROOT, 120)   # from the add-on checkout, as step 0 says
    assert "recorded the environments" in r.stdout and f"source {ROOT}/.venv/bin/activate" in r.stdout
    assert activate == f"cd {xiyan} && source {ROOT}/.venv/bin/activate"

    run(f"{activate} && {dataset}", xiyan, 600)
    assert json.loads((xiyan / "data" / "ebs_sft.json").read_text()) and (xiyan / "data" / "catalog.json").is_file()

    run(f"{activate} && {train}", xiyan, 1200)
    manifest = json.loads((xiyan / "runs" / "adapter" / "training_manifest.json").read_text())
    assert manifest["global_step"] == 2 and manifest["world_size"] == 2 and manifest["adapter"]["lora_tensors"] == 56

    run(f"{activate} && {package}", xiyan, 1800)
    r = run(f"{activate} && {verify}", xiyan, 300)
    assert r.stdout.startswith("verified ") and (xiyan / "runs" / "quant" / "oracle_manifest.json").is_file()

    holdout = json.loads((xiyan / "data" / "ebs_holdout.json").read_text())
    (xiyan / "context.json").write_text(json.dumps(holdout[0]["context"]))   # what a retriever returns
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(["bash", "-c", f"{activate} && exec {serve}"], cwd=xiyan, env=fresh_shell_env(),
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        t0 = time.monotonic()
        while True:
            assert server.poll() is None, f"serve.py exited {server.returncode}:\n{log_tail(log)}"
            assert time.monotonic() - t0 < 400, f"vLLM not healthy after 400 s:\n{log_tail(log)}"
            try:
                if httpx.get(f"http://127.0.0.1:{PORT}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        # the recorded serving environment was found from the XiYan root, and the caches went there too
        assert f"starting (CPU; API key NOT set): {ROOT}/.venv-serve/bin/python -m vllm" in log.read_text()
        assert (xiyan / ".cache" / "vllm").is_dir()

        r = run(f"{activate} && {ask}", xiyan, 600, ok=(0, 1))   # 1 = the guardrail rejected the answer
        answer = json.loads(r.stdout.strip().splitlines()[0])
        assert answer["attempts"] and answer["ok"] == (r.returncode == 0)

        r = run(f"{activate} && {evaluate}", xiyan, 900, ok=(0, 1))   # 1 = a threshold failed (2 steps of training)
        report = json.loads((xiyan / "runs" / "eval" / "report.json").read_text())
        assert report["totals"]["examples"] == 4, report["totals"]
    finally:
        stop_tree(server)
    assert port_free(PORT), "the server was not stopped"
