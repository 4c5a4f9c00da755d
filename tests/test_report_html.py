"""report.html: written beside report.json in every output, verdict first, self-contained (inline
images, no scripts, nothing fetched), every text escaped; and rendered by headless Chromium to a page
that is not blank and shows the verdict (skipped where Chromium is not installed)."""

import base64
import dataclasses
import html
import io
import os
import re
import shutil
import subprocess

import pytest
import torch
from helpers import tiny_model

import baerase
from baerase import Config
from baerase.report import ClassResult, ScanReport
from baerase.report_html import TOP_ROWS, gallery_targets, render_html, shown_classes, verdict_sentence

torch.set_num_threads(1)

# Tiny settings (see test_reliability.py); 20 unlearning steps: two guard checks make a history.
CFG = Config(steps=5, hidden=16, mine_hidden=8, batch_size=8, eval_samples=32, unlearn_epochs=1, min_steps=20)
CFG = CFG.replace(progress=False, seed=3)
K = 4


def data():
    g = torch.Generator().manual_seed(1)
    return torch.rand(40, 1, 8, 8, generator=g), torch.arange(40) % K


@pytest.fixture(scope="module")
def audited():
    """(images, scan report with class 1 forced flagged, erase result): one tiny audit for the module."""
    x, y = data()
    report = baerase.scan(tiny_model(num_classes=K), x, y, config=CFG)
    report.classes[1].flagged = True  # force an erase whatever this random model scored
    with pytest.warns(UserWarning, match="holds out"):
        result = baerase.erase(tiny_model(num_classes=K), x, y, report, config=CFG)
    return x, report, result


def _verdict_of(page: str) -> str:
    match = re.search(r'<p class="verdict [a-z]+" id="verdict">(.*?)</p>', page, re.S)
    assert match, "no verdict paragraph"
    return html.unescape(match.group(1))


def assert_self_contained(page: str) -> None:
    """No script, nothing fetched from elsewhere, every image an inline PNG that decodes."""
    from PIL import Image

    assert "<script" not in page.lower() and "javascript:" not in page.lower()
    assert '<meta name="viewport"' in page
    assert not re.search(r'(src|href)="(?!data:)', page), "a resource outside the page"
    sources = re.findall(r'<img src="([^"]+)"', page)
    for uri in sources:
        assert uri.startswith("data:image/png;base64,")
        Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).verify()


def test_scan_output_holds_a_self_contained_report_html_with_the_verdict_first(audited, tmp_path):
    x, report, _ = audited
    out = baerase.write_outputs(tmp_path / "scan", report, x)
    page = (out / "report.html").read_text(encoding="utf-8")
    assert (
        _verdict_of(page)
        == verdict_sentence(report)
        == "Backdoor found: class 1 of 4 flagged as a backdoor target (mask triggers)."
    )
    assert page.index('id="verdict"') < page.index("<h2>"), "the verdict comes before every section"
    assert_self_contained(page)
    assert "<h2>Erase</h2>" not in page and "<svg" in page and 'class="threshold"' in page
    # Gallery: the flagged class and the three least suspicious, each with mask, pattern, 3 stamped images.
    assert gallery_targets(report)[0] == 1 and len(gallery_targets(report)) == 4
    assert page.count('<figure class="trigger') == 4 and len(re.findall(r"<img ", page)) == 4 * 5
    assert page.count('<tr class="flagged">') == 1


def test_erase_output_shows_before_after_history_and_cost(audited, tmp_path):
    x, report, result = audited
    out = baerase.write_outputs(tmp_path / "audit", report, x, result)
    page = (out / "report.html").read_text(encoding="utf-8")
    assert _verdict_of(page) == verdict_sentence(report, result)
    assert_self_contained(page)
    assert (
        "<h2>Erase</h2>" in page
        and f"{result.accuracy_before:.2%}" in page
        and f"{result.trigger_asr_after:.2%}" in page
    )
    assert page.count("<polyline") == 2, "clean accuracy and trigger success over the unlearning steps"
    for phase in ("recovery", "unlearning", "verification"):
        assert f"<td>{phase}</td>" in page


def test_verdict_sentences():
    x, y = data()
    report = baerase.scan(tiny_model(num_classes=K), x, y, config=CFG)
    for c in report.classes:
        c.flagged = False
    assert (
        verdict_sentence(report) == "No backdoor found: none of the 4 scanned classes has an anomalously small trigger."
    )
    report.classes[0].flagged = report.classes[2].flagged = True
    assert verdict_sentence(report).startswith("Backdoor found: classes 0, 2 of 4")


def test_erase_verdicts(audited):
    _, report, result = audited
    verified = dataclasses.replace(result, verified=True, changed=True)
    assert verdict_sentence(report, verified).startswith("Backdoor in class 1 erased and verified by a re-scan: ")
    assert verdict_sentence(report, dataclasses.replace(result, verified=False, changed=True)).startswith(
        "Backdoor in class 1 NOT fully erased"
    )
    assert "returned unchanged" in verdict_sentence(report, dataclasses.replace(result, changed=False))


def test_a_scan_cut_short_is_inconclusive(audited):
    x, report, _ = audited
    cut = dataclasses.replace(report, cut_short="time budget of 60 s")
    page = render_html(cut, x)
    assert _verdict_of(page).startswith("Inconclusive: the scan was cut short (time budget of 60 s) after 4 of 4")
    assert 'class="verdict warn"' in page


def test_every_text_is_escaped(audited):
    x, report, _ = audited
    hostile = dataclasses.replace(report, provenance={"model_file": "<script>alert(1)</script>&"})
    page = render_html(hostile, x)
    assert "<script" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;&amp;" in page


def _thousand_classes() -> ScanReport:
    classes = [ClassResult(t, 0.1, 100.0, (t % 97) / 40, False) for t in range(1000)]
    for t in (5, 700):  # flagged, with indices below the top 20's
        classes[t] = ClassResult(t, 0.99, 4.0, 2.1, True)
    return ScanReport(classes, 1000, (3, 8, 8), "mask", "ref", Config().to_dict(), 1.0)


def test_a_thousand_classes_show_the_flagged_and_the_top_20_and_say_how_many_are_omitted():
    report = _thousand_classes()
    shown, omitted = shown_classes(report)
    assert {5, 700} <= {c.target for c in shown} and len(shown) == TOP_ROWS + 2 and omitted == 1000 - len(shown)
    indices = [c.anomaly_index for c in shown]
    assert indices == sorted(indices, reverse=True)
    page = render_html(report, torch.rand(4, 3, 8, 8))
    assert f"{omitted} less suspicious classes are omitted" in page
    assert page.count("<rect ") == len(shown) and page.count('<tr class="flagged">') == 2
    assert "class 0: anomaly index" not in page and "class 96: anomaly index" in page  # index 0 omitted, 2.4 shown
    assert "holds no recovered triggers" in page


def test_patch_family_pictures_the_patch():
    x, y = data()
    report = baerase.scan(tiny_model(num_classes=K), x, y, config=CFG.replace(family="patch"))
    page = render_html(report, x)
    assert_self_contained(page)
    assert ">patch</div>" in page and ">mask</div>" not in page


# ---- in a browser -------------------------------------------------------------------------------

CHROMIUM = os.environ.get("BAERASE_CHROMIUM") or next(
    (found for name in ("chromium", "chromium-browser", "google-chrome", "chrome") if (found := shutil.which(name))),
    None,
)
requires_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium not installed (apt install chromium)"
)


def chromium(tmp_path, *args: str) -> str:
    """Run headless Chromium with its own profile; returns its stdout."""
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    command += ["--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@requires_chromium
def test_chromium_renders_a_page_that_is_not_blank_and_shows_the_verdict(audited, tmp_path):
    import numpy as np
    from PIL import Image

    x, report, result = audited
    out = baerase.write_outputs(tmp_path / "audit", report, x, result)
    url = (out / "report.html").as_uri()
    shot = tmp_path / "shot.png"
    chromium(tmp_path, f"--screenshot={shot}", "--window-size=390,1600", url)  # a phone's width
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(np.float64)
    assert pixels.std() > 20 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50, "blank screenshot"
    tone = (218, 251, 225) if result.verified and result.changed else (255, 235, 233)
    assert (np.abs(pixels - tone).sum(-1) == 0).sum() > 1000, "the verdict banner's colour is not on screen"
    dom = chromium(tmp_path, "--dump-dom", url)
    assert _verdict_of(dom) == verdict_sentence(report, result)
