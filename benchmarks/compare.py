"""Compare a saved benchmark run with the committed baseline of machine-independent figures.

Wall times drift with the machine and its load; what a run can be held to is what it measures
against itself: the speed-up of a backend over the PyTorch reference timed in the same run, the
model images a scan spends per class, and the classes it flags. The benchmarks store these in
``benchmark.extra_info``; ``benchmarks/baseline.json`` holds the accepted values and a tolerance
for each.

    python -m pytest benchmarks/bench_trigger_apply.py -k cpu \
        --benchmark-autosave --benchmark-storage=benchmarks/.history
    python -m benchmarks.compare                   # the latest run saved under benchmarks/.history
    python -m benchmarks.compare RUN.json          # a given run
    python -m benchmarks.compare --update RUN...   # accept the runs' figures (each at its worst) as the baseline

Exit status 0 when every figure the run shares with the baseline is within its tolerance, 1 when
one is not (each named: benchmark and figure), 2 when the run or the baseline cannot be read or
they share no figure.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from baerase.errors import InputError

HERE = Path(__file__).parent
HISTORY = HERE / ".history"  # --benchmark-storage for the runs (git-ignored)
BASELINE = HERE / "baseline.json"

# extra_info key -> kind. A ratio (higher is better) fails when it falls more than its tolerance
# below the baseline, a count (lower is better) when it rises more than its tolerance above it, a
# verdict when it differs at all.
FIGURES = {
    "speedup_vs_ref": "ratio",
    "speedup": "ratio",  # bench_audit_cost: Neural Cleanse's seconds over baerase's, same run
    "batched_speedup_over_loop": "ratio",
    "images_per_class": "count",
    "baerase_images_per_class": "count",
    "flagged": "verdict",
    "baerase_flagged": "verdict",
    "target_flagged": "verdict",
    "false_flags": "verdict",
}
# Between two runs on a shared 2-core CPU the same-run speed-ups moved from -20% to +175% (a
# reference slowed by a neighbour); a baseline takes each at its lowest over several runs and a run
# may fall 40% below that, while a lost fast path (a ratio near 1) still fails. Image counts are
# seeded and move only when the method changes.
TOLERANCES = {"ratio": 0.4, "count": 0.05, "verdict": 0.0}


@dataclass
class Finding:
    benchmark: str
    figure: str
    baseline: object
    value: object
    tolerance: float
    ok: bool

    def line(self) -> str:
        kind = FIGURES.get(self.figure, "verdict")
        base, tol = self.baseline, self.tolerance
        if kind == "ratio":
            bound = f">= {base * (1 - tol):.3g} (baseline {base:.3g} - {tol:.0%})"
        elif kind == "count":
            bound = f"<= {base * (1 + tol):.4g} (baseline {base:.4g} + {tol:.0%})"
        else:
            bound = f"== {json.dumps(self.baseline)}"
        value = json.dumps(self.value) if kind == "verdict" else f"{self.value:.4g}"
        return f"{'ok  ' if self.ok else 'FAIL'} {self.benchmark} {self.figure}: {value}, wanted {bound}"


def latest_run(history: Path = HISTORY) -> Path:
    """The most recently written run file under ``history`` (pytest-benchmark's autosave layout)."""
    runs = sorted(history.glob("**/*.json"), key=lambda p: (p.stat().st_mtime, p.name))
    if not runs:
        raise InputError(
            f"no saved benchmark run under {history}; run the benchmarks with --benchmark-autosave "
            f"--benchmark-storage={history} first, or name a run file"
        )
    return runs[-1]


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read the {what} {path}: {exc}") from None
    if not isinstance(data, dict):
        raise InputError(f"the {what} {path} is not a JSON object")
    return data


def run_figures(run: dict) -> dict[str, dict[str, object]]:
    """Per benchmark name, the tracked figures its ``extra_info`` holds (a reference's own
    speed-up, 1 by definition, is left out)."""
    if not isinstance(run.get("benchmarks"), list):
        raise InputError("not a pytest-benchmark run: it has no 'benchmarks' list")
    out = {}
    for bench in run["benchmarks"]:
        info, params = bench.get("extra_info") or {}, bench.get("params") or {}
        is_ref = "ref" in (params.get("provider"), params.get("backend"))
        figures = {k: v for k, v in info.items() if k in FIGURES and v is not None}
        if is_ref:
            figures.pop("speedup_vs_ref", None)
        if figures:
            out[bench["name"]] = figures
    return out


def compare(baseline: dict, run: dict) -> tuple[list[Finding], list[str]]:
    """(one finding per figure both hold, the baseline's benchmarks and figures the run lacks)."""
    figures = run_figures(run)
    findings, missing = [], []
    for name, expected in baseline.get("benchmarks", {}).items():
        if name not in figures:
            missing.append(name)
            continue
        for figure, entry in expected.items():
            if not isinstance(entry, dict) or "value" not in entry:
                raise InputError(f"baseline entry {name} {figure} is not {{'value': ..., 'tolerance': ...}}")
            if figure in figures[name]:
                findings.append(_judge(name, figure, entry, figures[name][figure]))
            else:  # e.g. a speed-up whose reference the run's -k left out
                missing.append(f"{name} {figure}")
    return findings, missing


def _judge(name: str, figure: str, entry: dict, value: object) -> Finding:
    kind = FIGURES.get(figure, "verdict")
    base, tolerance = entry["value"], float(entry.get("tolerance", TOLERANCES[kind]))
    if kind == "ratio":
        ok = value >= base * (1 - tolerance)
    elif kind == "count":
        ok = value <= base * (1 + tolerance)
    else:
        ok = value == base
    return Finding(name, figure, base, value, tolerance, bool(ok))


def least_favourable(runs: list[dict]) -> dict[str, dict[str, object]]:
    """The runs' figures merged, each at its worst: the lowest ratio and the highest count over the
    runs that hold it (a baseline from several runs is not one lucky run). Verdicts must agree."""
    merged: dict[str, dict[str, object]] = {}
    for figures_by_name in map(run_figures, runs):
        for name, figures in figures_by_name.items():
            mine = merged.setdefault(name, {})
            for figure, value in figures.items():
                kind = FIGURES[figure]
                if figure not in mine:
                    mine[figure] = value
                elif kind == "verdict" and mine[figure] != value:
                    raise InputError(f"{name} {figure}: the runs disagree ({mine[figure]} vs {value})")
                elif kind != "verdict":
                    mine[figure] = (min if kind == "ratio" else max)(mine[figure], value)
    return merged


def updated(baseline: dict, runs: list[dict], sources: list[str]) -> dict:
    """The baseline with the runs' least favourable figures for every benchmark they hold (others
    kept; a figure's tolerance kept when the baseline already states one)."""
    benchmarks = dict(baseline.get("benchmarks", {}))
    for name, figures in least_favourable(runs).items():
        old = benchmarks.get(name, {})
        benchmarks[name] = {
            figure: {
                "value": round(value, 4) if isinstance(value, float) else value,
                **({} if FIGURES[figure] == "verdict" else {"tolerance": _tolerance(old, figure)}),
            }
            for figure, value in figures.items()
        }
    return {
        "about": (
            "Machine-independent benchmark figures that benchmarks/compare.py holds every run to: ratio figures "
            "may fall by at most their tolerance (a share), counts rise by at most theirs, verdicts must match. "
            "Each value is the least favourable over the source runs."
        ),
        "source": f"{', '.join(sources)} ({_machine(runs[0])})",
        "benchmarks": dict(sorted(benchmarks.items())),
    }


def _machine(run: dict) -> str:
    info = run.get("machine_info") or {}
    cpu = info.get("cpu") if isinstance(info.get("cpu"), dict) else {}
    return f"{cpu.get('brand_raw', info.get('processor', '?'))}, {cpu.get('count', '?')} CPUs"


def _tolerance(old: dict, figure: str) -> float:
    return float(old.get(figure, {}).get("tolerance", TOLERANCES[FIGURES[figure]]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "runs",
        nargs="*",
        metavar="RUN",
        help=f"pytest-benchmark JSON run(s) (default: the latest under {HISTORY}); several only with --update",
    )
    parser.add_argument("--baseline", default=str(BASELINE), help="baseline file (default: %(default)s)")
    parser.add_argument("--history", default=str(HISTORY), help="where autosaved runs are (default: %(default)s)")
    parser.add_argument(
        "--update", action="store_true", help="write the runs' figures (the least favourable of each) into the baseline"
    )
    args = parser.parse_args(argv)
    try:
        paths = [Path(p) for p in args.runs] or [latest_run(Path(args.history))]
        runs = [_read_json(p, "benchmark run") for p in paths]
        baseline_path = Path(args.baseline)
        if args.update:
            old = _read_json(baseline_path, "baseline") if baseline_path.exists() else {}
            new = updated(old, runs, [p.name for p in paths])
            baseline_path.write_text(json.dumps(new, indent=2) + "\n")
            print(f"wrote {baseline_path}: {len(least_favourable(runs))} benchmarks from {len(paths)} run(s)")
            return 0
        if len(runs) > 1:
            raise InputError("compare takes one run; several runs only make a baseline (--update)")
        return report(compare(_read_json(baseline_path, "baseline"), runs[0]), paths[0], baseline_path)
    except InputError as exc:
        print(f"benchmarks.compare: error: {exc}", file=sys.stderr)
        return 2


def report(result: tuple[list[Finding], list[str]], run: Path, baseline: Path) -> int:
    """Print every finding, failures last, and return the exit status."""
    findings, missing = result
    print(f"{run} against {baseline}:")
    for finding in sorted(findings, key=lambda f: f.ok, reverse=True):
        print(finding.line())
    if missing:
        print(f"not in this run ({len(missing)}): " + ", ".join(missing))
    failed = [f for f in findings if not f.ok]
    if not findings:
        print("benchmarks.compare: error: the run holds none of the baseline's figures", file=sys.stderr)
        return 2
    print(f"{len(findings)} figures compared, {len(failed)} outside their tolerance")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
