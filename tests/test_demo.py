"""The one-command demo: every verdict as expected, over real HTTP, and the cache reused."""

import subprocess
import sys


def test_demo_runs_and_all_verdicts_expected(tmp_path):
    env = {"TAMPERPROBE_CACHE": str(tmp_path / "cache"), "TAMPERPROBE_HISTORY": str(tmp_path / "h.sqlite"), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-m", "tamperprobe", "demo"], capture_output=True, text=True, timeout=180, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "as expected" in r.stdout
    assert r.stdout.count("TAMPERED") >= 12 and "0/10 · INTACT" in r.stdout
    cached = tmp_path / "cache" / "demo"
    assert (cached / "digits_cnn_seed0.safetensors").exists() and (cached / "digits_cnn.pt").exists()
