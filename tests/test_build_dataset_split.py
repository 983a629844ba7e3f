"""The train/holdout split end to end through the builder CLI: records whose SQL is the same query spelled
differently (semicolon, fence, comments, line breaks) are one group and land on one side, hashed or explicit."""
import json
import subprocess
import sys

import pytest

from conftest import PKG, ROOT

SCRIPT = PKG / "build_oracle_sft_dataset.py"
RAW = [json.loads(line) for line in (PKG / "demo" / "raw_questions.jsonl").read_text().splitlines() if line.strip()]
SPELLINGS = [lambda s: s, lambda s: s + ";", lambda s: f"```sql\n{s}\n```", lambda s: s + " -- same query",
             lambda s: s.replace(" ", "\n  ", 1), lambda s: "/* another spelling */ " + s]


@pytest.mark.slow
def test_same_normalized_sql_stays_on_one_side(tmp_path):
    groups = []                                    # 8 demo queries with distinct SQL
    for r in RAW:
        if r["sql"] not in {g["sql"] for g in groups}:
            groups.append(r)
        if len(groups) == 8:
            break
    lines, group_of = [], {}
    for g, r in enumerate(groups):
        for k, spell in enumerate(SPELLINGS):
            rid = f"g{g}-s{k}"
            group_of[rid] = g
            # group 0's first record fixes its side explicitly: its other spellings must follow it, not their hash
            split = {"split": "holdout"} if (g, k) == (0, 0) else {}
            lines.append({"id": rid, "question": f"{r['question']} (spelling {k})", "sql": spell(r["sql"]),
                          "context": r["context"], **split})
    # the same query once more, explicitly on the other side: refused as a leak, never written to either file
    lines.append({"id": "leak", "question": f"{groups[0]['question']} (explicit train)", "sql": groups[0]["sql"],
                  "context": groups[0]["context"], "split": "train"})
    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(SCRIPT), "--input_raw", str(raw), "--output_sft", str(out / "sft.json"),
                        "--dataset_id", "split_test", "--holdout_fraction", "0.5", "--holdout_out",
                        str(out / "holdout.json"), "--seed", "0"], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    side = {x["id"]: name for name in ("sft", "holdout") for x in json.loads((out / f"{name}.json").read_text())}
    rejects = [json.loads(x) for x in (out / "sft.rejects.jsonl").read_text().splitlines()]
    assert [(x["id"], x["reason"]) for x in rejects] == [("leak", "split_leak")], rejects
    assert "already in the holdout split" in rejects[0]["detail"]
    assert set(side) == set(group_of), "every spelling is kept: none is a duplicate question or a reject"
    sides = {g: {side[i] for i in side if group_of[i] == g} for g in range(len(groups))}
    assert all(len(s) == 1 for s in sides.values()), sides
    assert sides[0] == {"holdout"}
    hashed = [s.pop() for g, s in sides.items() if g != 0]
    assert "sft" in hashed and "holdout" in hashed, f"seed 0 must put hashed groups on both sides: {hashed}"
    manifest = json.loads((out / "sft.manifest.json").read_text())
    assert manifest["counts"]["train"] == list(side.values()).count("sft")
    assert manifest["counts"]["holdout"] == list(side.values()).count("holdout")
