"""The scripts in examples/ run (a few steps each) and print what they promise."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script: str, *args: str) -> str:
    result = subprocess.run([sys.executable, os.path.join(ROOT, "examples", script), *args],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_lstm_addition_trains_with_and_without_clipping():
    out = _run("lstm_addition.py", "--steps", "60", "--length", "30")
    assert "--- without clipping (max_norm=inf)" in out and "--- with clipping (max_norm=1.0)" in out
    summaries = [line for line in out.splitlines() if "steps clipped" in line]
    assert len(summaries) == 2
    assert " 0 of 60 steps clipped" in summaries[0]  # max_norm=inf never clips


def test_gpt_training_loop_logs_the_monitor():
    out = _run("gpt_training_loop.py", "--steps", "6", "--log-every", "3")
    assert out.count("grad norm") == 2 and "largest: " in out
    assert out.strip().splitlines()[-1].startswith("done: 6 steps")


def test_bad_batches_diverge_without_clipping_and_survive_with_it(tmp_path):
    plot = tmp_path / "losses.png"
    out = _run("bad_batches.py", "--steps", "220", "--plot", str(plot))
    verdicts = {line.split(":")[0].strip(): line.rsplit("(", 1)[1].rstrip(")")
                for line in out.splitlines() if "final clean loss" in line}
    assert verdicts == {"no clipping": "diverged", "fixed clipping": "survived", "zclip": "survived",
                        "autoclip": "survived", "skip bad steps": "survived"}, out
    assert "skip bad steps: skipped" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
