"""examples/train_segmentation.py: a tiny run end to end (so the example does not rot), and its argument
checks."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "train_segmentation.py")


def run(*args, cwd):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), ROOT) if p)}
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def test_tiny_training_run_writes_results(tmp_path):
    pytest.importorskip("torchvision")
    result = run("--steps", "2", "--batch", "2", "--size", "24", "--eval-every", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((tmp_path / "segmentation_out" / "segmentation.json").read_text())
    assert set(saved["results"]) == {"unet", "ssm", "full"}
    assert all(0.0 <= r["miou"] <= 1.0 and len(r["curve"]) == 2 for r in saved["results"].values())


@pytest.mark.parametrize("args,message", [
    (("--size", "20"), "--size must be >= 21"), (("--eval-every", "0"), "--eval-every must be >= 1"),
    (("--batch", "0"), "--batch must be >= 1"), (("--steps", "0"), "--steps must be >= 1"),
])
def test_bad_arguments_are_refused(tmp_path, args, message):
    result = run(*args, cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr
    assert not (tmp_path / "segmentation_out").exists()
