"""Shared test fixtures: the scripts' folders on sys.path, the real tiny LLaMA fixture, the stage environment."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest_plugins = ["serving"]

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "custom_oracle_llama"
sys.path[:0] = [str(PKG), str(PKG / "inference"), str(PKG / "demo")]
CACHE = ROOT / ".cache"
import stage_env  # noqa: E402
stage_env.apply()  # the Makefile's environment (config/offline.env): offline flags, caches, OMP, tokenizer threads
SERVE_PY = ROOT / ".venv-serve" / "bin" / "python"


def pytest_configure(config):
    # The one rule for `slow` (README, "Two commands"): a test is slow when it starts a process (a CLI, a server, an
    # engine, a `make` stage: 0.1-6 s each on 2 cores) or waits out timed load. Everything else runs in
    # `make test-fast`, in the pytest process; `fast_tests_start_no_process` below holds it to that. CI runs both.
    config.addinivalue_line("markers", "slow: starts a process (CLI, server, engine, make) or waits out timed load "
                                       "(make test runs these too)")


@pytest.fixture(autouse=True)
def fast_tests_start_no_process(request, monkeypatch):
    """The rule above, checked: a test not marked slow that starts a process fails and says so."""
    if request.node.get_closest_marker("slow") is None:
        def refuse(self, args, *a, **k):
            raise AssertionError(f"this test starts a process ({args!r:.120}): mark it @pytest.mark.slow "
                                 f"(the rule in tests/conftest.py) or test the code in process")
        monkeypatch.setattr(subprocess.Popen, "__init__", refuse)


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The real tiny LLaMA-3 fixture, built by `make tiny` (a prerequisite of `make test` and `make test-fast`).
    Not built here: the Makefile holds its settings, and two sessions building it at once would race."""
    out = CACHE / "tiny-llama"
    if not (out / "config.json").exists():
        pytest.fail(f"the tiny model {out} is not built: run `make tiny` (about 4 minutes), or `make test-fast`")
    from make_tiny_llama import CONFIG
    built = json.loads((out / "config.json").read_text())
    stale = {k: (built[k], v) for k, v in CONFIG.items() if k in built and built[k] != v}
    if stale:
        pytest.fail(f"the tiny model {out} is older than make_tiny_llama.py ({stale}: built vs now): run `make tiny`")
    return out


def run_make(target: str, runs: Path, timeout: int, *extra: str) -> subprocess.CompletedProcess:
    """Run a Makefile stage exactly as a user would (the Makefile is the single source of demo settings)."""
    r = subprocess.run(["make", "-s", target, f"RUNS={runs}", *extra], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout)
    if r.returncode != 0:
        raise AssertionError(f"make {target} failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-6000:]}")
    return r


@pytest.fixture(scope="session")
def demo_runs(tmp_path_factory) -> Path:
    """One pipeline run directory shared by the whole session (dataset -> adapter -> merged -> quant)."""
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="session")
def demo_dataset(demo_runs, tiny_model_dir) -> dict:
    run_make("dataset", demo_runs, 600)
    data = demo_runs / "data"
    return {"train": data / "ebs_sft.json", "holdout": data / "ebs_holdout.json", "catalog": data / "ebs_catalog.json",
            "manifest": data / "ebs_sft.manifest.json", "rejects": data / "ebs_sft.rejects.jsonl"}


@pytest.fixture(scope="session")
def trained_adapter(demo_runs, demo_dataset) -> Path:
    """`make train`: real accelerate launch, DeepSpeed ZeRO-3, 2 CPU processes, LoRA on the tiny LLaMA."""
    run_make("train", demo_runs, 2400)
    return demo_runs / "adapter"


@pytest.fixture(scope="session")
def packaged_model(demo_runs, trained_adapter) -> dict:
    """`make package`: streaming merge of the trained adapter, 4-bit AWQ with domain calibration, manifest."""
    run_make("package", demo_runs, 2400)
    return {"merged": demo_runs / "merged", "quant": demo_runs / "quant"}
