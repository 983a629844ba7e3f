#!/usr/bin/env python
"""API keys of the guarded SQL service: only sha256 hashes are stored; a new key is printed once.

    python custom_oracle_llama/inference/service_keys.py add-user --keys_file keys.yaml --user finance-ui --org_ids 204
    python custom_oracle_llama/inference/service_keys.py remove-user --keys_file keys.yaml --user finance-ui
    python custom_oracle_llama/inference/service_keys.py list --keys_file keys.yaml

The keys file is a YAML list of {key_sha256, user, org_ids}: `org_ids` are the EBS operating units this key may
read (the service binds :org_ids to exactly these). The key itself goes to stdout once (give it to the app's secret
store); lose it and you add the user again. The running service re-reads the file when it changes, so adding and
revoking take effect without a restart. The file is written atomically.
"""
import argparse
import hashlib
import secrets
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import yaml  # noqa: E402

from artifacts import StageError, atomic_write_text  # noqa: E402

KEY_PREFIX = "oebs_"


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def parse_keys(raw, where) -> list[dict]:
    """The keys YAML's content -> [{key_sha256, user, org_ids}]. StageError names the bad entry."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise StageError(f"{where}: must be a YAML list of {{key_sha256, user, org_ids}}")
    out, seen = [], set()
    for i, e in enumerate(raw, 1):
        if not isinstance(e, dict) or set(e) != {"key_sha256", "user", "org_ids"}:
            raise StageError(f"{where}: entry {i} must have exactly key_sha256, user, org_ids")
        digest, user, orgs = e["key_sha256"], e["user"], e["org_ids"]
        if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
            raise StageError(f"{where}: entry {i} ({user}): key_sha256 must be 64 lower-case hex digits")
        if not isinstance(user, str) or not user.strip():
            raise StageError(f"{where}: entry {i}: user must be a non-empty string")
        if not isinstance(orgs, list) or not orgs or not all(isinstance(o, int) and not isinstance(o, bool)
                                                             for o in orgs):
            raise StageError(f"{where}: entry {i} ({user}): org_ids must be a non-empty list of integers")
        if digest in seen:
            raise StageError(f"{where}: entry {i} ({user}): the same key appears twice")
        seen.add(digest)
        out.append({"key_sha256": digest, "user": user, "org_ids": list(orgs)})
    return out


def read_keys(path) -> list[dict]:
    path = Path(path)
    try:
        return parse_keys(yaml.safe_load(path.read_text(encoding="utf-8")), str(path))
    except OSError as e:
        raise StageError(f"cannot read keys file {path}: {e.strerror or e} (service_keys.py add-user creates it)") \
            from None
    except yaml.YAMLError as e:
        raise StageError(f"keys file {path} is not valid YAML: {str(e).splitlines()[0]}") from None


def parse_org_ids(text: str) -> list[int]:
    try:
        orgs = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise StageError(f"--org_ids must be comma-separated integers, got {text!r}") from None
    if not orgs:
        raise StageError("--org_ids needs at least one operating unit id")
    return orgs


def write_keys(path: Path, entries: list[dict]) -> None:
    parse_keys(entries, str(path))  # never write a file the service would refuse
    header = "# Guarded SQL service keys (sha256 of each key; written by service_keys.py). Keys are never stored.\n"
    atomic_write_text(path, header + yaml.safe_dump(entries, sort_keys=False, default_flow_style=None))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    add = sub.add_parser("add-user", help="create a key for a user; prints the key once")
    add.add_argument("--keys_file", required=True, help="keys YAML (created if missing)")
    add.add_argument("--user", required=True, help="user / application name recorded in the audit log")
    add.add_argument("--org_ids", required=True, help="comma-separated EBS operating unit ids this key may read")
    add.add_argument("--replace", action="store_true", help="replace the user's existing key (rotation)")
    rm = sub.add_parser("remove-user", help="revoke every key of a user")
    rm.add_argument("--keys_file", required=True, help="keys YAML")
    rm.add_argument("--user", required=True, help="user to remove")
    ls = sub.add_parser("list", help="users and their org_ids (no keys, no hashes)")
    ls.add_argument("--keys_file", required=True, help="keys YAML")
    args = ap.parse_args(argv)
    path = Path(args.keys_file)
    try:
        entries = read_keys(path) if path.exists() or args.cmd != "add-user" else []
        if args.cmd == "add-user":
            if not args.user.strip():
                raise StageError("--user must not be empty")
            orgs = parse_org_ids(args.org_ids)
            if any(e["user"] == args.user for e in entries) and not args.replace:
                raise StageError(f"user {args.user!r} already has a key in {path} (--replace rotates it)")
            key = KEY_PREFIX + secrets.token_urlsafe(32)
            entries = [e for e in entries if e["user"] != args.user]
            entries.append({"key_sha256": sha256_hex(key), "user": args.user, "org_ids": orgs})
            write_keys(path, entries)
            print(key)
            print(f"added {args.user} (org_ids {orgs}) to {path}; the key above is shown only this once",
                  file=sys.stderr)
        elif args.cmd == "remove-user":
            kept = [e for e in entries if e["user"] != args.user]
            if len(kept) == len(entries):
                raise StageError(f"user {args.user!r} not found in {path}")
            write_keys(path, kept)
            print(f"removed {args.user} from {path} ({len(kept)} user(s) left)", file=sys.stderr)
        else:
            for e in entries:
                print(f"{e['user']}\torg_ids {','.join(map(str, e['org_ids']))}")
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
