"""`make demo-seeds`' summary (demo/summarize_demo_runs.py) on run folders shaped like `make demo`'s: per-run figures,
min-max, the gate on the worst run, and one error line for a run that did not finish. The figures themselves come
from real runs (README); here the summarizing is under test."""
import json
import subprocess
import sys

import pytest

from conftest import PKG

SUMMARIZE = PKG / "demo" / "summarize_demo_runs.py"


def fake_run(root, seed, learned, merged, first, final, adapter=b"A"):
    (root / "demo").mkdir(parents=True)
    (root / "adapter").mkdir()
    (root / "quant").mkdir()
    (root / "demo" / "demo_summary.json").write_text(json.dumps({
        "learned_quant": learned, "learned_merged": merged, "n_train": 10,
        "holdout": {"ok_rate": {"first": first, "final": final}, "exact_match": {"first": 0.0, "final": 0.0}}}))
    (root / "adapter" / "training_manifest.json").write_text(json.dumps({"training_args": {"seed": seed},
                                                                         "final_loss": 0.04 + seed / 100}))
    (root / "adapter" / "adapter_model.safetensors").write_bytes(adapter)
    (root / "quant" / "model.safetensors").write_bytes(b"Q" + adapter)
    return root


def summarize(*args):
    return subprocess.run([sys.executable, str(SUMMARIZE), *map(str, args)], capture_output=True, text=True,
                          timeout=60)


@pytest.mark.slow
def test_min_max_over_runs_and_the_gate_on_the_worst(tmp_path):
    runs = [fake_run(tmp_path / "0", 0, 10, 10, 0.6, 0.85), fake_run(tmp_path / "0b", 0, 10, 10, 0.6, 0.85),
            fake_run(tmp_path / "1", 1, 8, 9, 0.55, 0.7, adapter=b"B")]
    r = summarize(*runs, "--out", tmp_path / "summary")
    assert r.returncode == 0, r.stderr
    out = json.loads((tmp_path / "summary.json").read_text())
    assert out["min_max"]["learned_quant"] == [8, 10] and out["min_max"]["learned_merged"] == [9, 10]
    assert out["min_max"]["holdout_pass_first"] == [0.55, 0.6] and out["min_max"]["holdout_pass_final"] == [0.7, 0.85]
    same, other = out["runs"][0]["adapter_sha256"], out["runs"][2]["adapter_sha256"]
    assert out["runs"][1]["adapter_sha256"] == same != other
    md = (tmp_path / "summary.md").read_text()
    assert "| training SQL reproduced, 4-bit via vLLM | 10 / 10 | 10 / 10 | 8 / 10 | 8 - 10 / 10 |" in md
    assert "| holdout guardrail pass, after the retry | 85% | 85% | 70% | 70% - 85% |" in md
    gated = summarize(*runs, "--out", tmp_path / "gated", "--min_learned", 0.9)
    assert gated.returncode == 1 and "worst run reproduced 8/10" in gated.stderr


@pytest.mark.slow
@pytest.mark.parametrize("breaks, message", [
    (lambda run: (run / "demo" / "demo_summary.json").unlink(), "cannot read"),
    (lambda run: (run / "quant" / "model.safetensors").unlink(), "not a finished `make demo` run"),
    (lambda run: (run / "demo" / "demo_summary.json").write_text("{}"), "lacks 'holdout'"),
])
def test_an_unfinished_run_is_one_error_line_and_nothing_written(tmp_path, breaks, message):
    run = fake_run(tmp_path / "0", 0, 10, 10, 0.6, 0.85)
    breaks(run)
    r = summarize(run, "--out", tmp_path / "summary")
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "summary.json").exists() and not (tmp_path / "summary.md").exists()
