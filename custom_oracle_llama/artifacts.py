"""Tiny helpers every stage needs: one error type, hashes, atomic writes, library versions."""
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path


_UMASK = os.umask(0)
os.umask(_UMASK)


class StageError(Exception):
    """Bad input or a failed check: main() prints it as one line and exits non-zero."""


def sha256_file(path, chunk=1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tree_hashes(root) -> dict[str, str]:
    """{relative path: sha256} for every file under root, sorted."""
    root = Path(root)
    return {p.relative_to(root).as_posix(): sha256_file(p)
            for p in sorted(root.rglob("*")) if p.is_file()}


def tree_sha256(hashes: dict[str, str]) -> str:
    """One hash for a whole directory, from its per-file hashes."""
    return hashlib.sha256("".join(f"{k}\0{v}\n" for k, v in sorted(hashes.items())).encode()).hexdigest()


def read_json(path, missing_ok: bool = False):
    """Parsed JSON, {} for a missing optional file, StageError for anything unreadable."""
    path = Path(path)
    if missing_ok and not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StageError(f"cannot read {path}: {e}")


def atomic_write_text(path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the user's normal permissions
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def atomic_write_json_records(path, records: list) -> None:
    """A JSON list with one record per line: still one JSON document (json.load reads it), greppable by line, and
    written by the C encoder (indent=2 falls back to the pure-Python encoder: a third of the builder's time)."""
    atomic_write_text(path, "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n]\n")


@contextmanager
def atomic_dir(final, force: bool = False):
    """Yield a temp dir beside `final`; it becomes `final` only if the block completes."""
    final = Path(final)
    if final.exists() and any(final.iterdir()) and not force:
        raise StageError(f"{final} exists and is not empty (pass --force to replace it)")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".partial"))
    os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700; the final dir gets the user's normal permissions
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def library_versions(*names: str) -> dict[str, str]:
    out = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = "not installed"
    return out
