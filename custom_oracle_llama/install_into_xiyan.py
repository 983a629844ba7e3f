"""Copy this add-on into a XiYan-SQLTraining checkout without ever overwriting a file there.

    python custom_oracle_llama/install_into_xiyan.py --xiyan_root /path/to/XiYan-SQLTraining

Every file of custom_oracle_llama/ lands at <xiyan_root>/custom_oracle_llama/<same path>. A target that already
exists with the same bytes is left alone; one with different bytes stops the whole install before anything is
copied (exit 1, naming it). Existing XiYan files are never opened for writing. Standard library only.
"""
import argparse
import filecmp
import shutil
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent
SKIP_DIRS = {"__pycache__", ".pytest_cache"}


def plan_install(src: Path, dest: Path) -> tuple[list[Path], list[Path], list[Path]]:
    """-> (files to add, files already identical, conflicting files), as paths relative to src."""
    add, same, conflict = [], [], []
    for path in sorted(p for p in src.rglob("*") if p.is_file() and not SKIP_DIRS & set(p.parts)):
        rel = path.relative_to(src)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
