"""The README's main job: ``baerase demo`` finds and erases the backdoor offline."""

from baerase.cli import main


def test_demo_flags_erases_and_writes_outputs(tmp_path, capsys):
    status = main(["demo", "--quiet", "--out", str(tmp_path / "demo")])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "| repaired model" in out
    assert (tmp_path / "demo" / "report.json").exists() and (tmp_path / "demo" / "model.safetensors").exists()
