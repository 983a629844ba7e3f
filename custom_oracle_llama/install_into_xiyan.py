"""Copy this add-on into a XiYan-SQLTraining checkout without ever overwriting a file there.

    python custom_oracle_llama/install_into_xiyan.py --xiyan_root /path/to/XiYan-SQLTraining

Every file of custom_oracle_llama/ lands at <xiyan_root>/custom_oracle_llama/<same path>. A target that already
exists with the same bytes is left alone; one with different bytes stops the whole install before anything is
copied (exit 1, naming it). Existing XiYan files are never opened for writing. Standard library only.

With --venv / --serve_venv (`make install-into-xiyan` passes the add-on's .venv and .venv-serve, or the VENV= /
SERVE_VENV= given to `make install-offline`), their locations are recorded in
<xiyan_root>/custom_oracle_llama/config/site.env (NL2SQL_VENV, NL2SQL_SERVE_VENV), which every stage reads through
stage_env.py: inference/serve.py finds vLLM's python there when run from the XiYan root. A variable already set in
the environment wins over the record.
"""
import argparse
import filecmp
import os
import shutil
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

SRC = Path(__file__).resolve().parent
SKIP_DIRS = {"__pycache__", ".pytest_cache"}
SITE_ENV = Path("config") / "site.env"   # written per install, never copied from the source


def site_env_text(venv: Path | None, serve_venv: Path | None) -> str:
    """config/site.env: where this site's environments live, in config/offline.env's syntax."""
    lines = [f"# Written by install_into_xiyan.py, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC: where this site's "
             "environments live.", "# Read by stage_env.py (every stage); a variable set in the environment wins."]
    for name, path in (("NL2SQL_VENV", venv), ("NL2SQL_SERVE_VENV", serve_venv)):
        if path is not None:
            lines.append(f"{name} ?= {path.resolve()}")
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def plan_install(src: Path, dest: Path) -> tuple[list[Path], list[Path], list[Path]]:
    """-> (files to add, files already identical, conflicting files), as paths relative to src."""
    add, same, conflict = [], [], []
    for path in sorted(p for p in src.rglob("*") if p.is_file() and not SKIP_DIRS & set(p.parts)):
        rel = path.relative_to(src)
        if rel == SITE_ENV:
            continue
        target = dest / rel
        if not target.exists():
            add.append(rel)
        elif target.is_file() and filecmp.cmp(path, target, shallow=False):
            same.append(rel)
        else:
            conflict.append(rel)
    return add, same, conflict


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--xiyan_root", required=True, help="root of a XiYan-SQLTraining checkout (has train/)")
    ap.add_argument("--venv", type=Path, help="the training/packaging/eval environment to record in config/site.env")
    ap.add_argument("--serve_venv", type=Path, help="the vLLM environment to record in config/site.env")
    ap.add_argument("--dry_run", action="store_true", help="print the plan, copy nothing")
    args = ap.parse_args(argv)
    root = Path(args.xiyan_root)
    if not (root / "train").is_dir():
        print(f"error: {root} does not look like a XiYan-SQLTraining checkout (no train/ folder)", file=sys.stderr)
        return 2
    dest = root / SRC.name
    add, same, conflict = plan_install(SRC, dest)
    if conflict:
        print(f"error: {len(conflict)} file(s) already exist with different content, nothing copied; first: "
              f"{dest / conflict[0]}", file=sys.stderr)
        return 1
    for rel in add:
        print(f"{'would add' if args.dry_run else 'added'} {dest / rel}")
        if not args.dry_run:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(SRC / rel, dest / rel)
    print(f"{len(add)} added, {len(same)} already identical, 0 conflicts -> {dest}")
    if args.venv or args.serve_venv:
        for flag, venv in (("--venv", args.venv), ("--serve_venv", args.serve_venv)):
            if venv is not None and not (venv / "bin" / "python").exists():
                print(f"warning: {flag} {venv} has no bin/python yet (make install-offline creates it)",
                      file=sys.stderr)
        if not args.dry_run:
            write_atomic(dest / SITE_ENV, site_env_text(args.venv, args.serve_venv))
        print(f"{'would record' if args.dry_run else 'recorded'} the environments in {dest / SITE_ENV}")
        if args.venv:
            print(f"before the README's steps, from {root}: source {args.venv.resolve()}/bin/activate")
    return 0


if __name__ == "__main__":
    sys.exit(main())
