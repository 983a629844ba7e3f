"""Tiny helpers every stage needs: one error type, hashes, atomic writes, library versions."""
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import signal
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


def read_yaml_mapping(path, what: str, keys) -> dict:
    """A settings YAML (policy, service config) -> its mapping; StageError naming `what` for an unreadable file,
    invalid YAML, a non-mapping or a key outside `keys` (a typo must not silently drop a limit)."""
    import yaml
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as e:
        raise StageError(f"cannot read {what} {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise StageError(f"{what} {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise StageError(f"{what} {path} must be a mapping")
    unknown = sorted(set(raw) - set(keys))
    if unknown:
        raise StageError(f"{what} {path}: unknown keys {unknown}")
    return raw


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


# ---- a set of output files published as one ----------------------------------------------------------------
SET_JOURNAL = "publish.json"


def _fsync_dir(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _locked(folder):
    """An open fd holding an exclusive flock on `folder`, or None if another live process holds it."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _roll_forward(journal: dict) -> None:
    """Move every staged file still in its folder onto its final path, in journal order (idempotent), then drop
    the folders, the journal's own folder last."""
    for staged, final in journal["moves"]:
        if os.path.lexists(staged):
            os.replace(staged, final)
    for parent in dict.fromkeys(str(Path(f).parent) for _, f in journal["moves"]):
        _fsync_dir(parent)
    for folder in journal["folders"]:
        shutil.rmtree(folder, ignore_errors=True)


def _set_folders(parents, tag: str) -> list[Path]:
    return [d for parent in parents if Path(parent).is_dir()
            for d in sorted(Path(parent).glob(f".{tag}.build-*.partial")) if d.is_dir()]


def recover_file_sets(parents, tag: str) -> list[str]:
    """Finish or remove what a killed atomic_file_set left in `parents`: a committed set (journal present) is
    published, an uncommitted one deleted. A folder a live build holds is an error. -> what was done, per folder."""
    done, folders = [], _set_folders(parents, tag)
    locks = []
    try:
        for d in folders:
            fd = _locked(d)
            if fd is None:
                raise StageError(f"another build is writing these outputs right now ({d} is locked)")
            locks.append(fd)
        for d in folders:  # committed sets first: their folders in other parents must not be deleted as stale
            if (d / SET_JOURNAL).is_file():
                _roll_forward(read_json(d / SET_JOURNAL))
                done.append(f"finished the interrupted publish of {d}")
        for d in folders:
            if d.exists():
                shutil.rmtree(d, ignore_errors=True)
                done.append(f"removed the unfinished build folder {d}")
    except OSError as e:
        raise StageError(f"cannot clean up an earlier build's folder: {e}") from None
    finally:
        for fd in locks:
            os.close(fd)
    return done


@contextmanager
def atomic_file_set(finals, tag: str):
    """Write several output files as one set. Yields {final path: staged path}; the block writes the staged paths
    (any it leaves out are not published). Staged files live in hidden `.<tag>.build-<id>.partial` folders beside
    their finals (same filesystem: publishing is renames), locked while the build runs. After the block a journal
    is committed, then every file is renamed onto its final in `finals` order (put the manifest last) with SIGTERM
    and SIGINT held, and the folders are removed. Killed before the commit: only a stale folder remains, which
    recover_file_sets (run this first) deletes; killed during the renames: the next recover_file_sets finishes them.
    On an exception the previous files stay as they were and the folders are removed."""
    finals = [Path(p).absolute() for p in finals]
    parents = list(dict.fromkeys(p.parent for p in finals))
    build_id = f"{os.getpid()}-{secrets.token_hex(4)}"
    folders, locks, committed = {}, [], False
    try:
        for parent in parents:
            parent.mkdir(parents=True, exist_ok=True)
            folders[parent] = parent / f".{tag}.build-{build_id}.partial"
            folders[parent].mkdir(mode=0o700)
            locks.append(_locked(folders[parent]))
        staged = {p: folders[p.parent] / f"{i:02d}-{p.name}" for i, p in enumerate(finals)}
        yield staged
        journal = {"moves": [[str(s), str(f)] for f, s in staged.items() if s.exists()],
                   "folders": [str(folders[p]) for p in reversed(parents)]}
        for d in folders.values():
            _fsync_dir(d)
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        try:
            atomic_write_json(folders[parents[0]] / SET_JOURNAL, journal)
            _fsync_dir(folders[parents[0]])
            committed = True
            _roll_forward(journal)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
    finally:
        for fd in locks:
            if fd is not None:
                os.close(fd)
        if not committed:  # a committed set whose renames failed stays for recover_file_sets to finish
            for d in folders.values():
                shutil.rmtree(d, ignore_errors=True)


def library_versions(*names: str) -> dict[str, str]:
    out = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = "not installed"
    return out
