"""The one-command demo: every verdict as expected, over real HTTP, and the cache reused."""

from typer.testing import CliRunner


def test_demo_runs_and_all_verdicts_expected(tmp_path, monkeypatch):
    from tamperprobe.cli.app import app

    monkeypatch.setenv("TAMPERPROBE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TAMPERPROBE_HISTORY", str(tmp_path / "h.sqlite"))
    r = CliRunner().invoke(app, ["demo"])
    assert r.exit_code == 0, r.output
    assert "as expected" in r.stdout
    assert r.stdout.count("TAMPERED") >= 12 and "0/10 · INTACT" in r.stdout
    cached = tmp_path / "cache" / "demo"
    assert (cached / "digits_cnn_seed0.safetensors").exists() and (cached / "digits_cnn.pt").exists()
