"""examples/arith_grpo/run.sh end to end, shortened: every stage, file and field of the report.

SFT_STEPS and GRPO_STEPS cut both training stages to a few steps, so the accuracies mean nothing
here; the full run's figures are in the example's README. What can break is tested: the stages run
in order from any directory, into a path with a space, and the report holds what it promises.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_arith_grpo_run_sh_goes_through_every_stage_and_writes_the_report(tmp_path):
    out = tmp_path / "arith run"
    env = {**os.environ, "SFT_STEPS": "20", "GRPO_STEPS": "3", "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # run.sh calls `python`
    result = subprocess.run(["bash", str(ROOT / "examples" / "arith_grpo" / "run.sh"), str(out)], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    for key in ("accuracy_before", "accuracy_after"):
        assert 0.0 <= report[key] <= 100.0
    assert report["gain_points"] == report["accuracy_after"] - report["accuracy_before"]
    assert report["n_heldout"] == 200 and report["carry"]["n"] + report["no_carry"]["n"] == 200
    assert [point["step"] for point in report["reward_curve"]] == [3]  # GRPO_STEPS reached the trainer
    assert 0.0 <= report["reward_curve"][0]["reward"] <= 1.0
    assert 0.0 <= report["grpo_eval_exact_number"] <= 100.0
    assert set(report["minutes"]) == {"data", "tokenizer", "sft", "before", "grpo", "after"}
    assert "held-out accuracy" in result.stdout and "reward curve" in result.stdout
    assert (out / "grpo" / "final" / "model.safetensors").exists()
