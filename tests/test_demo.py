"""The README's main job: ``baerase demo`` finds and erases the backdoor offline.

The whole demo trains an MNIST model and audits it with the default settings (minutes on 2 cores):
it is ``slow``. The default run checks the command's wiring without training.
"""

import pytest

import baerase.demo
from baerase.cli import main


@pytest.mark.slow
def test_demo_flags_erases_and_writes_outputs(tmp_path, capsys):
    status = main(["demo", "--quiet", "--out", str(tmp_path / "demo")])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "| repaired model" in out
    assert (tmp_path / "demo" / "report.json").exists() and (tmp_path / "demo" / "model.safetensors").exists()


def test_demo_passes_its_options_to_the_run(tmp_path, monkeypatch):
    seen = {}

    def fake_run_demo(**kwargs):
        seen.update(kwargs)
        return 1  # the backdoor survived: the command's status says so

    monkeypatch.setattr(baerase.demo, "run_demo", fake_run_demo)
    out = tmp_path / "demo"
    status = main(
        ["demo", "--quiet", "--attack", "trojan", "--target", "2", "--steps", "7", "--seed", "4", "--out", str(out)]
    )
    assert status == 1
    assert (seen["attack"], seen["target"], seen["out"], seen["overwrite"]) == ("trojan", 2, str(out), False)
    config = seen["config"]
    assert config.recovery.steps == 7 and config.run.seed == 4 and config.run.progress is False


def test_demo_refuses_an_existing_out_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(baerase.demo, "run_demo", lambda **kw: pytest.fail("trained before checking --out"))
    (tmp_path / "report.json").write_text("{}")
    assert main(["demo", "--quiet", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("baerase: error: ") and "already exists" in err and "--overwrite" in err
