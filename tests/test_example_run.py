"""The README's first command, shortened: examples/tcm_qg/run.sh end to end with a few training steps.

The full run (about 5 minutes) is what the README shows; here PT_STEPS and SFT_STEPS cut both
training stages to 4 steps, so every stage, file and field of the report is exercised in seconds.
The scores of so short a run mean nothing; that they exist, are in range and the files are there
is what can break.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_run_sh_goes_through_every_stage_and_writes_the_report(tmp_path):
    out = tmp_path / "tcm run"  # a space in the path: run.sh must quote its paths
    env = {**os.environ, "PT_STEPS": "4", "SFT_STEPS": "4", "DPO_STEPS": "4", "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # run.sh calls `python`
    result = subprocess.run(["bash", str(ROOT / "examples" / "tcm_qg" / "run.sh"), str(out)], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    for key in ("bleu4_before", "bleu4_after", "rougeL_before", "rougeL_after"):
        assert 0.0 <= report[key] <= 100.0, (key, report[key])
    assert report["n_dev_questions"] == 55
    assert report["split"]["dev_entities_also_in_train"] == []
    assert set(report["minutes"]) == {"tokenizer", "pretrain", "convert", "sft", "before", "after"}
    assert report["total_minutes"] > 0
    for stage in ("pretrain", "sft"):
        assert report[f"{stage}_train_loss"] > 0 and report[f"{stage}_eval_loss"] > 0
        steps = [json.loads(line).get("step") for line in (out / stage.replace("pretrain", "pt") / "metrics.jsonl")
                 .read_text().splitlines()]
        assert max(steps) == 4  # PT_STEPS / SFT_STEPS reached the trainer
    for name in ("before", "after"):
        predictions = (out / "eval" / f"{name}.predictions.jsonl").read_text(encoding="utf-8").splitlines()
        assert len(predictions) == 55
    assert (out / "sft" / "final" / "model.safetensors").exists()
    assert "BLEU-4" in result.stdout and "ROUGE-L" in result.stdout
    preference = report["preference"]
    assert preference["n_dev_pairs"] == 55
    for key in ("accuracy_sft", "accuracy_dpo"):
        assert 0.0 <= preference[key] <= 1.0, (key, preference[key])
    assert 0.0 <= preference["rougeL_dpo"] <= 100.0
    assert set(preference["minutes"]) == {"pairs", "dpo", "pref_sft", "pref_dpo", "after_dpo"}
    assert max(json.loads(line).get("step", 0) for line in (out / "dpo" / "metrics.jsonl").read_text().splitlines()) == 4
    assert "preference accuracy" in result.stdout
