"""Every stage's environment, from config/offline.env (+ config/site.env when an install recorded one).

    import stage_env; stage_env.apply()     # first thing in a stage script, before torch/transformers load

`NAME := value` lines are always set (offline flags), `NAME ?= value` lines only when the environment has no NAME
(a user's HF_HOME or OMP_WAIT_POLICY wins). $(ROOT) is the folder holding custom_oracle_llama/. site.env is
written by install_into_xiyan.py and records where the site's environments live (NL2SQL_VENV, NL2SQL_SERVE_VENV).
The Makefile includes the same files, so `make <stage>` and a script run by hand see the same settings.

apply() also silences the third-party noise listed in QUIET_WARNINGS (deprecation warnings repeated every training
step) and QUIET_LOGS (log lines printed at import): nothing a user can act on. Our own warnings, errors and progress
bars are untouched.
"""
import logging
import os
import re
import warnings
from pathlib import Path

PKG = Path(__file__).resolve().parent
ROOT = PKG.parent
ENV_FILES = (PKG / "config" / "offline.env", PKG / "config" / "site.env")
LINE = re.compile(r"^([A-Z_][A-Z0-9_]*)\s*(:=|\?=)\s*(.*?)\s*$")

# (category, message regex, where it comes from): known third-party noise, silenced in every stage process.
QUIET_WARNINGS = [
    (FutureWarning, r"`torch\.distributed\.\w+` is deprecated",
     "DeepSpeed ZeRO-3 calls torch.distributed's old collective names every step (reduce_scatter_tensor, "
     "all_gather_into_tensor): ~90 lines per 4 steps in `make train`"),
]
# (logger, message regex, where it comes from): third-party log records dropped in every stage process.
QUIET_LOGS = [
    ("bitsandbytes.backends.cpu.ops", r"^Failed to load CPU gemm_4bit_forward from kernels-community",
     "bitsandbytes, imported by peft, on a CPU with AVX512-BF16 asks for the optional `kernels` package (a hub "
     "download we never want): one warning line before any output of every training/packaging stage"),
]


class DropMatching(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = pattern

    def filter(self, record) -> bool:
        return not re.search(self.pattern, record.getMessage())


def read_env_file(path, root=ROOT) -> list[tuple[str, str, str]]:
    """-> [(name, ':=' or '?=', value)]; a line that is neither a comment nor an assignment is an error."""
    out = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = LINE.match(line)
        value = m and m[3].replace("$(ROOT)", str(root))
        if not m or "$(" in value:
            raise ValueError(f"{path}:{n}: expected NAME := value or NAME ?= value (only $(ROOT) expands): {line}")
        out.append((m[1], m[2], value))
    return out


def apply(environ=None, files=ENV_FILES, root=ROOT) -> dict:
    """Set the stage environment in `environ` (default os.environ); -> {name: value} of what it set."""
    environ = os.environ if environ is None else environ
    for category, message, _ in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, message, _ in QUIET_LOGS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMatching) and f.pattern == message for f in logger.filters):  # apply() twice
            logger.addFilter(DropMatching(message))
    changed = {}
    for path in files:
        if not Path(path).is_file():
            continue
        for name, op, value in read_env_file(path, root):
            if op == ":=" or name not in environ:
                if environ.get(name) != value:
                    changed[name] = value
                environ[name] = value
    return changed
