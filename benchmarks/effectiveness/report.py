"""Results -> markdown table, PNG plot (when matplotlib is installed) and JSON."""

from __future__ import annotations

import json
from pathlib import Path


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"# Effectiveness benchmark ({meta['grid']} grid)",
        "",
        (
            f"{meta['machine']}; torch threads {meta['threads']}; total {meta['seconds']:.0f} s; "
            f"baerase source {meta.get('baerase_source', 'unknown')}. "
            "CA / ASR in % on the held-out evaluation images; ASR = share of non-target images classified "
            "as the target once the real trigger is stamped. Bar (baerase): ASR after <= 1%, CA drop <= 1 "
            "point, target flagged, nothing else flagged (clean models: no flag)."
        ),
        "",
        (
            "| cell | defense | CA before | CA after | ASR before | ASR after | flagged | target flagged "
            "| false flags | time s | bar |"
        ),
        "|---|---|---:|---:|---:|---:|---|---|---|---:|---|",
    ]
    for row in rows:
        weak = " (weak attack)" if row.get("weak_attack") else ""
        for name, res in row["defenses"].items():
            if "skipped" in res:
                lines.append(f"| {row['cell']}{weak} | {name} | | | | | | | | | skipped: {res['skipped']} |")
                continue
            flagged = res.get("flagged")
            tf = res.get("target_flagged")
            lines.append(
                f"| {row['cell']}{weak} | {name} | {_pct(row['ca_before'])} | {_pct(res['ca_after'])} "
                f"| {_pct(row['asr_before'])} | {_pct(res['asr_after'])} "
                f"| {'-' if flagged is None else flagged} | {'-' if tf is None else ('yes' if tf else 'NO')} "
                f"| {'-' if flagged is None else (res['false_flags'] or 'none')} | {res['seconds']:.0f} "
                f"| {'-' if res['bar'] is None else ('pass' if res['bar'] else 'MISS')} |"
            )
    clean = [r for r in rows if r["attack"] is None]
    false = sum(bool(r["defenses"].get("baerase", {}).get("false_flags")) for r in clean)
    lines += ["", f"baerase false flags on clean models: {false} of {len(clean)}.", "", _attack_tally(rows)]
    for note in meta.get("notes", []):
        lines += ["", note]
    return "\n".join(lines) + "\n"


def _attack_tally(rows: list[dict]) -> str:
    """Backdoored models (rows) baerase passes, and how many of its misses never learned their backdoor."""
    runs = [(r, r["defenses"].get("baerase", {})) for r in rows if r["attack"]]
    runs = [(r, res) for r, res in runs if "bar" in res]
    passed = sum(bool(res["bar"]) for _, res in runs)
    weak = sum(bool(r.get("weak_attack")) and not res["bar"] for r, res in runs)
    tally = f"baerase meets the bar on {passed} of {len(runs)} backdoored models"
    return tally + (f"; weak attacks (ASR before < 50%) among its misses: {weak}." if weak else ".")


def plot(rows: list[dict], path: Path) -> str | None:
    """ASR after and CA drop per defense for each backdoored cell; returns a note when skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot written (pip install matplotlib)."
    cells = [r for r in rows if r["attack"] is not None]
    if not cells:
        return None
    names = sorted({n for r in cells for n, res in r["defenses"].items() if "skipped" not in res})
    # Panels stacked, so a full grid stays a readable page wide instead of a strip.
    fig, axes = plt.subplots(2, 1, figsize=(min(40, max(8, 0.06 * len(cells) * len(names))), 9))
    width = 0.8 / max(len(names), 1)
    for ax, key, title in (
        (axes[0], "asr", "ASR after defense (%)"),
        (axes[1], "drop", "clean accuracy drop (points)"),
    ):
        for j, name in enumerate(names):
            vals = []
            for r in cells:
                res = r["defenses"].get(name, {})
                if "ca_after" not in res:
                    vals.append(float("nan"))
                elif key == "asr":
                    vals.append(100 * res["asr_after"])
                else:
                    vals.append(100 * (r["ca_before"] - res["ca_after"]))
            ax.bar([i + j * width for i in range(len(cells))], vals, width, label=name)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_title(title)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cells))])
        ax.set_xticklabels([r["cell"].replace("/", "\n") for r in cells], fontsize=6)
    axes[0].legend(fontsize=7, ncol=min(len(names), 5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write(rows: list[dict], meta: dict, out: Path, stem: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(meta)
    note = plot(rows, out / f"{stem}.png")
    if note:
        meta.setdefault("notes", []).append(note)
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    (out / f"{stem}.md").write_text(markdown(rows, meta))
    return [out / f"{stem}.{ext}" for ext in ("md", "json", "png") if (out / f"{stem}.{ext}").exists()]
