"""report.html: the scan (and erase) as one self-contained page a person reads in a browser.

The verdict comes first, in one sentence; then the per-class evidence as a table and a bar chart of
the anomaly index against the threshold, the erase's before/after and its unlearning history, a
gallery of recovered triggers and the cost record. Images are inline PNGs and charts inline SVG, so
the page needs no JavaScript, no network and no plotting library, and its CSS fits a phone screen.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from .cost import PhaseCost

if TYPE_CHECKING:
    from .report import ClassResult, EraseResult, ScanReport

ALL_ROWS_UP_TO = 50  # above this many classes the table shows the flagged and the most suspicious
TOP_ROWS = 20
LEAST_SUSPICIOUS = 3  # clean-looking classes shown in the gallery for comparison
MOST_FLAGGED_PICTURED = 12  # past this the gallery would dwarf the page; the table lists the rest
STAMPED = 3  # clean images stamped with each pictured trigger
THUMB = 96  # px: small images are enlarged (nearest neighbour) to about this, large ones shrunk to 2x it
CHART_CAP = 5.0  # bars above this many thresholds are clipped (a MAD near 0 gives indices of 1e6)


def write_html(
    path: str | os.PathLike, report: ScanReport, images: torch.Tensor, result: EraseResult | None = None
) -> None:
    """Write ``render_html(report, images, result)`` to ``path`` (UTF-8)."""
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(render_html(report, images, result))


def render_html(report: ScanReport, images: torch.Tensor, result: EraseResult | None = None) -> str:
    """The whole page: ``images`` [N, C, H, W] in [0, 1] are the clean images stamped in the gallery."""
    tone, sentence = _tone(report, result), verdict_sentence(report, result)
    title = "baerase audit report" if result is not None else "baerase scan report"
    body = [
        f"<h1>{_e(title)}</h1>",
        f'<p class="verdict {tone}" id="verdict">{_e(sentence)}</p>',
        _classes_section(report),
        _erase_section(result) if result is not None else "",
        _gallery_section(report, images),
        _cost_section(report, result),
        _details_section(report),
    ]
    return "\n".join([_HEAD.replace("{title}", _e(title)), *(part for part in body if part), "</body>\n</html>\n"])


def verdict_sentence(report: ScanReport, result: EraseResult | None = None) -> str:
    """The page's first line: what was found and, after an erase, whether it is gone."""
    if result is not None and result.erased:
        return _erase_verdict(result)
    scanned = len(report.classes)
    cut_short = getattr(report, "cut_short", None)
    if cut_short:
        return (
            f"Inconclusive: the scan was cut short ({cut_short}) after {scanned} of {report.num_classes} classes, "
            "so it gives no verdict."
        )
    if not report.flagged:
        return f"No backdoor found: none of the {scanned} scanned classes has an anomalously small trigger."
    return (
        f"Backdoor found: {_class_list(report.flagged)} of {report.num_classes} flagged as a backdoor target "
        f"({report.family} triggers)."
    )


def _erase_verdict(result: EraseResult) -> str:
    classes = _class_list(result.erased)
    acc = f"clean accuracy {result.accuracy_before:.1%} → {result.accuracy_after:.1%}"
    asr = f"recovered-trigger success {result.trigger_asr_before:.1%} → {result.trigger_asr_after:.1%}"
    if not result.changed:
        return (
            f"Backdoor in {classes} NOT erased: no unlearning step stayed within the accuracy guard, "
            "so the model is returned unchanged."
        )
    if result.verified:
        return f"Backdoor in {classes} erased and verified by a re-scan: {acc}, {asr}."
    return f"Backdoor in {classes} NOT fully erased: a re-scan still finds a trigger ({asr}; {acc})."


def _tone(report: ScanReport, result: EraseResult | None) -> str:
    if result is not None and result.erased:
        return "good" if result.verified and result.changed else "bad"
    if getattr(report, "cut_short", None):
        return "warn"
    return "bad" if report.flagged else "good"


def _class_list(classes: Sequence[int]) -> str:
    return f"class {classes[0]}" if len(classes) == 1 else "classes " + ", ".join(str(c) for c in classes)


# ---- per-class evidence ---------------------------------------------------------------------------


def shown_classes(report: ScanReport) -> tuple[list[ClassResult], int]:
    """(rows the table shows, how many it omits): every class up to ``ALL_ROWS_UP_TO``, else the flagged
    ones and the ``TOP_ROWS`` with the highest anomaly index, most suspicious first."""
    classes = report.classes
    if len(classes) <= ALL_ROWS_UP_TO:
        return list(classes), 0
    ranked = sorted(classes, key=lambda c: -_finite(c.anomaly_index, 0.0))
    keep = {c.target for c in ranked[:TOP_ROWS]} | set(report.flagged)
    shown = [c for c in ranked if c.target in keep]
    return shown, len(classes) - len(shown)


def _classes_section(report: ScanReport) -> str:
    shown, omitted = shown_classes(report)
    threshold = float(report.config.get("detection", {}).get("anomaly_threshold", 2.0))
    confirm = any(c.confirmation_index is not None for c in shown)
    mass = {"mask": "trigger mass (px)", "warp": "mean displacement (px)", "blend": "attenuation"}.get(
        report.family, "patch area (px)"
    )
    head = ["class", "anomaly index", mass, "attack success", *(["confirmation index"] if confirm else []), "flagged"]
    rows = []
    for c in shown:
        cells = [str(c.target), _num(c.anomaly_index), _num(c.trigger_norm, 1), f"{c.attack_success:.1%}"]
        if confirm:
            cells.append("" if c.confirmation_index is None else _num(c.confirmation_index))
        cells.append(c.flag_text)
        rows.append((cells, "flagged" if c.flagged else ""))
    note = (
        f'<p class="note">{len(report.classes)} classes: the table and chart show the flagged classes and the '
        f"{TOP_ROWS} with the highest anomaly index; {omitted} less suspicious classes are omitted "
        "(all of them are in report.json).</p>"
        if omitted
        else ""
    )
    caption = (
        f"Anomaly index of each class's recovered trigger (higher: smaller than the other classes' triggers, "
        f"more suspicious); dashed line: the threshold {threshold:g}."
    )
    return "\n".join(
        [
            "<h2>Classes</h2>",
            note,
            f'<figure class="chart">{_bar_chart(shown, threshold)}<figcaption>{_e(caption)}</figcaption></figure>',
            _table(head, rows),
        ]
    )


def _bar_chart(classes: Sequence[ClassResult], threshold: float) -> str:
    """Inline SVG: one bar per class, flagged ones red, a dashed threshold line; tall bars clipped."""
    width, height, left, right, top, bottom = 480, 200, 40, 6, 16, 30
    values = [_finite(c.anomaly_index, 0.0) for c in classes]
    ceiling = max(threshold * 1.25, min(max(values, default=0.0) * 1.1, threshold * CHART_CAP), 1e-9)
    plot_w, plot_h = width - left - right, height - top - bottom

    def y(value: float) -> float:
        return top + plot_h * (1 - min(value, ceiling) / ceiling)

    step = plot_w / max(len(classes), 1)
    parts = [
        f'<svg viewBox="0 0 {width} {height}" role="img" aria-label="anomaly index per class">',
        f'<line x1="{left}" y1="{y(0):.1f}" x2="{width - right}" y2="{y(0):.1f}" class="axis"/>',
    ]
    for tick in (0.0, threshold, ceiling):
        parts.append(f'<text x="{left - 4}" y="{y(tick) + 4:.1f}" text-anchor="end" class="tick">{tick:.3g}</text>')
    for i, (c, value) in enumerate(zip(classes, values, strict=True)):
        x, bar = left + i * step + step * 0.1, max(step * 0.8, 0.5)
        kind = "bar flagged" if c.flagged else "bar"
        label = f"class {c.target}: anomaly index {_num(c.anomaly_index)}"
        parts.append(
            f'<rect x="{x:.1f}" y="{y(value):.1f}" width="{bar:.1f}" height="{y(0) - y(value):.1f}" '
            f'class="{kind}"><title>{_e(label)}</title></rect>'
        )
        if value > ceiling:
            parts.append(
                f'<text x="{x + bar / 2:.1f}" y="{top - 3}" text-anchor="middle" class="tick">{value:.3g}</text>'
            )
        if len(classes) <= 20:  # room for a label under each bar
            parts.append(
                f'<text x="{x + bar / 2:.1f}" y="{height - bottom + 14}" text-anchor="middle" class="tick">'
                f"{c.target}</text>"
            )
    parts.append(
        f'<line x1="{left}" y1="{y(threshold):.1f}" x2="{width - right}" y2="{y(threshold):.1f}" class="threshold"/>'
    )
    parts.append(
        f'<text x="{width - right}" y="{y(threshold) - 4:.1f}" text-anchor="end" class="tlabel">threshold</text>'
    )
    parts.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 2}" text-anchor="middle" class="tick">class</text>')
    return "".join(parts) + "</svg>"


# ---- erase ----------------------------------------------------------------------------------------


def _erase_section(result: EraseResult) -> str:
    if not result.erased:
        return "<h2>Erase</h2>\n<p>Nothing to erase: no class was flagged.</p>"
    facts = (
        f"Unlearned {_class_list(result.erased)} in {result.rounds} round(s), {result.seconds:.1f} s; "
        + (
            "a re-scan of the repaired model finds no backdoor."
            if result.verified
            else "a re-scan still finds a trigger."
        )
        + (f" {result.rolled_back} non-finite steps were rolled back." if result.rolled_back else "")
        + ("" if result.changed else " No step was kept: the model is the input's copy.")
    )
    before_after = _table(
        ["on the held-out clean images", "before", "after"],
        [
            (["clean accuracy", f"{result.accuracy_before:.2%}", f"{result.accuracy_after:.2%}"], ""),
            (["recovered-trigger success", f"{result.trigger_asr_before:.2%}", f"{result.trigger_asr_after:.2%}"], ""),
        ],
    )
    parts = ["<h2>Erase</h2>", f"<p>{_e(facts)}</p>", before_after]
    if result.evidence:
        keys = list(dict.fromkeys(k for row in result.evidence for k in row))
        rows = [([_cell(row.get(k)) for k in keys], "flagged" if row.get("flagged") else "") for row in result.evidence]
        parts += ["<h3>Re-scan of the repaired model</h3>", _table([k.replace("_", " ") for k in keys], rows)]
    chart = _history_chart(result.history)
    if chart:
        caption = (
            "Unlearning history: clean accuracy and recovered-trigger success on the held-out images at each "
            "guard check (for a checkpoint outside the accuracy guard, the point part-way back that it would keep); "
            "dotted lines: a new round."
        )
        parts.append(f'<figure class="chart">{chart}<figcaption>{_e(caption)}</figcaption></figure>')
    return "\n".join(parts)


def _history_points(history: Iterable[dict]) -> tuple[list[tuple[float, float, float]], list[float]]:
    """(step, clean accuracy, trigger success) per guard check, steps running on across rounds, and
    where each later round starts. A check outside the guard has a second row, the point part-way
    back that the guard would keep; that row stands for the check."""
    checks: dict[tuple, dict] = {}
    for row in history:
        if all(isinstance(row.get(k), (int, float)) for k in ("step", "clean_accuracy", "trigger_asr")):
            checks[(row.get("round"), row["step"])] = row  # a later row for the same check replaces it
    points, starts, offset, last_step, last_round = [], [], 0.0, 0.0, None
    for (round_, step), row in checks.items():
        if last_round is not None and round_ != last_round:
            offset = last_step
            starts.append(offset)
        last_round, last_step = round_, offset + float(step)
        points.append((last_step, float(row["clean_accuracy"]), float(row["trigger_asr"])))
    return points, starts


def _history_chart(history: list[dict]) -> str:
    points, starts = _history_points(history)
    if not points:
        return ""
    width, height, left, right, top, bottom = 480, 190, 40, 6, 26, 32
    plot_w, plot_h = width - left - right, height - top - bottom
    span = max(points[-1][0] - points[0][0], 1.0)

    def x(step: float) -> float:
        return left + plot_w * (step - points[0][0]) / span

    def y(value: float) -> float:
        return top + plot_h * (1 - min(max(value, 0.0), 1.0))

    parts = [f'<svg viewBox="0 0 {width} {height}" role="img" aria-label="unlearning history">']
    for level in (0.0, 0.5, 1.0):
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y(level):.1f}" y2="{y(level):.1f}" class="grid"/>')
        parts.append(f'<text x="{left - 4}" y="{y(level) + 4:.1f}" text-anchor="end" class="tick">{level:.0%}</text>')
    for start in starts:
        parts.append(f'<line x1="{x(start):.1f}" x2="{x(start):.1f}" y1="{top}" y2="{top + plot_h}" class="round"/>')
    for series, css in ((1, "acc"), (2, "asr")):
        line = " ".join(f"{x(p[0]):.1f},{y(p[series]):.1f}" for p in points)
        parts.append(f'<polyline points="{line}" class="{css}"/>')
    parts.append(f'<text x="{left}" y="14" class="acc-label">clean accuracy</text>')
    parts.append(f'<text x="{left + 120}" y="14" class="asr-label">recovered-trigger success</text>')
    axis = f"unlearning step (0 to {points[-1][0]:.0f})"
    parts.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 4}" text-anchor="middle" class="tick">{axis}</text>')
    return "".join(parts) + "</svg>"


# ---- trigger gallery ------------------------------------------------------------------------------


def gallery_targets(report: ScanReport) -> list[int]:
    """Classes pictured: the flagged ones (at most ``MOST_FLAGGED_PICTURED``), then the
    ``LEAST_SUSPICIOUS`` with the lowest anomaly index, among those whose triggers the report holds."""
    if report.triggers is None:
        return []
    if report.untargeted:
        return report.triggers.targets.tolist()
    held = set(report.triggers.targets.tolist())
    flagged = [t for t in report.flagged if t in held][:MOST_FLAGGED_PICTURED]
    calm = sorted(
        (c for c in report.classes if c.target in held and not c.flagged),
        key=lambda c: _finite(c.anomaly_index, math.inf),
    )
    return flagged + [c.target for c in calm[:LEAST_SUSPICIOUS]]


def _gallery_section(report: ScanReport, images: torch.Tensor) -> str:
    targets = gallery_targets(report)
    if not targets:
        return "<h2>Recovered triggers</h2>\n<p>This report holds no recovered triggers to picture.</p>"
    pictures = _trigger_pictures(report, targets, images)
    by_class = {c.target: c for c in report.classes}
    figures = []
    for target in targets:
        if report.untargeted:
            caption = f"untargeted trigger (all-to-all backdoor): sends the classes to {report.flagged}"
            figures.append(_figure(caption, "untargeted", pictures[target], "trigger flagged"))
            continue
        c = by_class[target]
        kind = "flagged" if c.flagged else "least suspicious"
        caption = (
            f"class {target}: {kind}, anomaly index {_num(c.anomaly_index)}, attack success {c.attack_success:.0%}"
        )
        figures.append(
            _figure(caption, f"class {target}", pictures[target], "trigger flagged" if c.flagged else "trigger")
        )
    more = 0 if report.untargeted else len([t for t in report.flagged if t not in targets])
    note = f'<p class="note">{more} more flagged classes are not pictured.</p>' if more else ""
    intro = {
        "mask": "Each recovered trigger: its mask and one generated pattern, and clean images stamped with it.",
        "warp": "Each recovered warp: how far it moves each pixel (white: the most allowed), and warped clean images.",
        "patch": "Each recovered trigger: one generated patch, and clean images stamped with it at random places.",
        "blend": "Each recovered blend: the grey level it blends every pixel toward, and blended clean images.",
    }[report.family]
    return "\n".join(
        ["<h2>Recovered triggers</h2>", f"<p>{_e(intro)}</p>", note, '<div class="gallery">', *figures, "</div>"]
    )


def _figure(caption: str, name: str, pictures: list[tuple[str, str]], css: str) -> str:
    tiles = "".join(f'<div><img src="{uri}" alt="{_e(f"{name} {what}")}">{_e(what)}</div>' for what, uri in pictures)
    return f'<figure class="{css}"><figcaption>{_e(caption)}</figcaption><div class="row">{tiles}</div></figure>'


@torch.no_grad()
def _trigger_pictures(report: ScanReport, targets: list[int], images: torch.Tensor) -> dict[int, list[tuple[str, str]]]:
    """Per pictured class: (name, data URI) of its mask and pattern (or patch) and of stamped clean images."""
    held = report.triggers.targets.tolist()
    picked = report.triggers.select([held.index(t) for t in targets])
    device = picked.targets.device
    x = images[:STAMPED].detach().to(device=device, dtype=torch.float32)
    # A fixed seed: the same report draws the same pictures, and the caller's random stream is untouched.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        _, g = picked.sample(len(x))
        stamped = picked.stamp(x, g)
    c, h, w = report.image_shape
    out = {}
    for i, target in enumerate(targets):
        if picked.family == "mask":
            tiles = [("mask", torch.sigmoid(picked.mask_logits[i])), ("pattern", g[i, 0].view(c, h, w))]
        elif picked.family == "warp":
            tiles = [("displacement", picked.displacement()[i : i + 1] / picked.meta["max_shift"])]
        elif picked.family == "blend":
            tiles = [("grey level", g[i, 0, 1].expand(c, h, w))]
        else:
            p = picked.meta["patch_size"]
            tiles = [("patch", g[i, 0].view(c, p, p))]
        tiles += [(f"stamped {j + 1}", stamped[i, j]) for j in range(len(x))]
        out[target] = [(name, png_data_uri(t.float().cpu().numpy())) for name, t in tiles]
    return out


def png_data_uri(array: np.ndarray) -> str:
    """A [C, H, W] image in [0, 1] as a ``data:image/png;base64`` URI, resized toward ``THUMB`` px."""
    from PIL import Image

    pixels = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
    pixels = pixels.transpose(1, 2, 0) if pixels.shape[0] in (3, 4) else pixels.mean(0).astype(np.uint8)
    image = Image.fromarray(pixels)
    side = max(image.size)
    if side < THUMB:
        scale = max(1, THUMB // side)
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    elif side > 2 * THUMB:
        image.thumbnail((2 * THUMB, 2 * THUMB))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# ---- cost and details -----------------------------------------------------------------------------


def _cost_section(report: ScanReport, result: EraseResult | None) -> str:
    cost = report.cost if result is None else report.cost.merged(result.cost)
    k = max(report.num_classes, 1)
    total = PhaseCost(cost.forward, cost.backward, cost.seconds)
    rows = [
        ([name, f"{p.forward:,}", f"{p.backward:,}", f"{p.forward / k:,.0f}", f"{p.seconds:.1f}"], "")
        for name, p in [*cost.phases.items(), ("total", total)]
    ]
    head = ["phase", "model images", "of which backward", "per class", "seconds"]
    intro = "Images passed through the suspect model, per phase (a count that does not drift with the machine's load)."
    return "\n".join(["<h2>Cost</h2>", f"<p>{_e(intro)}</p>", _table(head, rows)])


def _details_section(report: ScanReport) -> str:
    facts = {
        "classes": report.num_classes,
        "image shape": " x ".join(str(s) for s in report.image_shape),
        "trigger family": report.family,
        "backend": report.backend,
        "scan seconds": f"{report.seconds:.1f}",
    }
    facts.update({k: v for k, v in report.provenance.items() if isinstance(v, (str, int, float)) and k != "config"})
    rows = [([str(k), str(v)], "") for k, v in facts.items()]
    settings = json.dumps(report.config, indent=1, default=str)
    return "\n".join(
        [
            "<h2>Details</h2>",
            _table(["", ""], rows, head_row=False),
            f"<details><summary>Settings</summary><pre>{_e(settings)}</pre></details>",
        ]
    )


# ---- small helpers --------------------------------------------------------------------------------


def _table(head: Sequence[str], rows: Iterable[tuple[Sequence[str], str]], head_row: bool = True) -> str:
    """An escaped HTML table in a horizontally scrolling box; each row is (cells, css class)."""
    lines = ['<div class="scroll"><table>']
    if head_row:
        lines.append("<thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr></thead>")
    lines.append("<tbody>")
    for cells, css in rows:
        attr = f' class="{css}"' if css else ""
        lines.append(f"<tr{attr}>" + "".join(f"<td>{_e(cell)}</td>" for cell in cells) + "</tr>")
    lines.append("</tbody></table></div>")
    return "\n".join(lines)


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _finite(value: float | None, default: float) -> float:
    return default if value is None or not math.isfinite(value) else float(value)


def _num(value: float | None, digits: int = 2) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.{digits}f}" if abs(value) < 1e4 else f"{value:.3g}"


def _cell(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return _num(value, 3)
    return "" if value is None else str(value)


_HEAD = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body{font:16px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1b1f24;background:#fff;
  max-width:60rem;margin:0 auto;padding:1rem}
h1{font-size:1.4rem;margin:.2rem 0 .8rem}
h2{font-size:1.15rem;margin:1.8rem 0 .6rem;border-bottom:1px solid #d0d7de}
h3{font-size:1rem}
.verdict{padding:.8rem 1rem;border-radius:.4rem;font-weight:600;font-size:1.1rem;margin:0}
.verdict.bad{background:#ffebe9;border-left:6px solid #cf222e}
.verdict.good{background:#dafbe1;border-left:6px solid #1a7f37}
.verdict.warn{background:#fff8c5;border-left:6px solid #bf8700}
.note{color:#57606a;font-size:.9rem}
.scroll{overflow-x:auto;-webkit-overflow-scrolling:touch;max-width:100%}
table{border-collapse:collapse;font-variant-numeric:tabular-nums;white-space:nowrap}
th,td{padding:.3rem .6rem;border-bottom:1px solid #d0d7de;text-align:right}
th:first-child,td:first-child{text-align:left}
tr.flagged td{background:#ffebe9;font-weight:600}
figure{margin:0 0 1rem}
figcaption{font-size:.9rem;color:#57606a}
svg{display:block;width:100%;height:auto;max-width:40rem}
svg .axis{stroke:#57606a}
svg .grid{stroke:#d0d7de}
svg .bar{fill:#8c959f}
svg .bar.flagged{fill:#cf222e}
svg .threshold{stroke:#cf222e;stroke-dasharray:6 4;stroke-width:1.5}
svg .round{stroke:#8c959f;stroke-dasharray:2 3}
svg .tick{font-size:13px;fill:#57606a}
svg .tlabel{font-size:13px;fill:#cf222e}
svg .acc{fill:none;stroke:#0969da;stroke-width:2}
svg .asr{fill:none;stroke:#cf222e;stroke-width:2}
svg .acc-label{font-size:13px;fill:#0969da}
svg .asr-label{font-size:13px;fill:#cf222e}
.gallery{display:flex;flex-wrap:wrap;gap:.8rem}
figure.trigger{padding:.5rem;border:1px solid #d0d7de;border-radius:.4rem;max-width:100%;box-sizing:border-box}
figure.trigger.flagged{border-color:#cf222e}
.row{display:flex;flex-wrap:wrap;gap:.4rem;margin-top:.3rem}
.row div{font-size:.75rem;text-align:center;color:#57606a}
img{display:block;width:56px;height:auto;image-rendering:pixelated;border:1px solid #d0d7de}
pre{overflow-x:auto;font-size:.8rem}
@media (min-width:40rem){img{width:96px}}
@media (max-width:40rem){table{font-size:.85rem}th,td{padding:.25rem .4rem}}
</style>
</head>
<body>"""
