"""Real vLLM OpenAI servers for tests (pytest plugin: `pytest_plugins = ["serving"]` in conftest).

`vllm_server(model_dir, log_path)` starts the server through the same launcher `make serve` uses
(custom_oracle_llama/inference/serve.py: capacity plan, then exec of .venv-serve's vLLM) on a free loopback port
with the CPU YAML, waits for /health and always stops the whole process group by PID, also on failure.
Fixtures `vllm_tiny` / `vllm_quant` share one slot: at most one server runs at a time (2 cores, shared RAM), and a
server is reused until a test asks for the other model, so tests grouped by model start each server once.
"""
import contextlib
import json
import secrets
from pathlib import Path

import psutil
import pytest
import yaml

from artifacts import StageError
from serve import running_server

ROOT = Path(__file__).resolve().parents[1]
SERVE_SCRIPT = ROOT / "custom_oracle_llama" / "inference" / "serve.py"
CPU_YAML = ROOT / "custom_oracle_llama" / "inference" / "vllm_config_cpu.yaml"
STARTUP_TIMEOUT_S = 300
# Figures worth reading in CI logs (startup time, RSS drift, queueing), printed at the end of the session.
REPORT: dict[str, str] = {}


def tree_rss(pid: int) -> int:
    """Resident bytes of the server: API process + engine core + worker (all descendants)."""
    root = psutil.Process(pid)
    total = 0
    for p in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return total


def served_name(config=CPU_YAML) -> str:
    return yaml.safe_load(Path(config).read_text())["served-model-name"]


@contextlib.contextmanager
def vllm_server(model_dir, log_path, config=CPU_YAML, extra_args=("--enforce-eager",), env=None):
    """serve.running_server (the launcher `make serve` uses), with a start-up failure as a test failure."""
    run_env = {"VLLM_CPU_KVCACHE_SPACE": "1", **(env or {})}  # caches etc.: conftest applied config/offline.env
    try:
        server = running_server(model_dir, config, log_path, extra_args, run_env, STARTUP_TIMEOUT_S)
        info = server.__enter__()
    except StageError as e:
        pytest.fail(str(e))
    try:
        yield {**info, "api_key": run_env.get("VLLM_API_KEY")}
    finally:
        server.__exit__(None, None, None)


class ServerSlot:
    """At most one live server; get(key, ...) reuses the running one for the same key, else swaps."""

    def __init__(self, log_dir: Path):
        self.log_dir, self.key, self.info, self._stack = log_dir, None, None, None
        # servers run as a site would: with an API key from the environment (requests must send it)
        self.api_key = secrets.token_hex(16)
        self.failed: dict[str, str] = {}

    def get(self, key: str, model_dir) -> dict:
        if key in self.failed:  # do not pay another 300 s start-up for a server that already failed
            pytest.fail(self.failed[key])
        if self.key != key:
            self.close()
            stack = contextlib.ExitStack()
            try:
                self.info = stack.enter_context(vllm_server(model_dir, self.log_dir / f"vllm-{key}.log",
                                                             env={"VLLM_API_KEY": self.api_key}))
            except BaseException as e:
                self.failed[key] = f"{key} server failed to start earlier in this session: {e}"
                raise
            self.key, self._stack = key, stack
            REPORT[f"{key} server start-up (launcher + plan + vLLM to /health)"] = f"{self.info['startup_s']:.1f} s"
        return self.info

    def close(self) -> None:
        if self._stack is not None:
            stack, self._stack, self.key, self.info = self._stack, None, None, None
            stack.close()


@pytest.fixture(scope="session")
def vllm_slot(tmp_path_factory):
    slot = ServerSlot(tmp_path_factory.mktemp("vllm"))
    yield slot
    slot.close()


def serve_model(slot: ServerSlot, request, key: str) -> dict:
    """"tiny": conftest's tiny LLaMA; "quant": the 4-bit package from `make package`. A running server of the other
    kind is stopped first, before the (heavy) package fixture runs."""
    if slot.key != key:
        slot.close()
    model_dir = (request.getfixturevalue("tiny_model_dir") if key == "tiny"
                 else request.getfixturevalue("packaged_model")["quant"])
    return slot.get(key, model_dir)


@pytest.fixture
def vllm_tiny(vllm_slot, request) -> dict:
    return serve_model(vllm_slot, request, "tiny")


@pytest.fixture
def vllm_quant(vllm_slot, request) -> dict:
    return serve_model(vllm_slot, request, "quant")


def pytest_terminal_summary(terminalreporter):
    if REPORT:
        terminalreporter.section("vLLM serving figures")
        for k, v in REPORT.items():
            terminalreporter.write_line(f"{k}: {v}")


def send_json(handler, status: int, payload) -> None:
    """One JSON response from a test's fake OpenAI endpoint (http.server handler): what vLLM's API server sends."""
    data = json.dumps(payload).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)
