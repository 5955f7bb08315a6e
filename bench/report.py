"""The markdown table: every series as median/min/max, ratio and overhead vs its baseline."""

from __future__ import annotations

from collections.abc import Sequence

from bench.util import SectionResult, Series, differences, ratios, summarize


def _fmt(value: float, unit: str, scale_s: bool) -> str:
    if unit == "s":
        return f"{value:.2f} s" if scale_s else f"{value * 1000:.1f} ms"
    if unit == "MB":
        return f"{value:.1f} MB"
    return f"{value:.3g} {unit}"


def _triple(values: Sequence[float], unit: str) -> tuple[str, str, str]:
    s = summarize(values)
    if s is None:
        return ("-", "-", "-")
    big = unit == "s" and s["median"] >= 10
    return (_fmt(s["median"], unit, big), _fmt(s["min"], unit, big), _fmt(s["max"], unit, big))


def series_row(sec: SectionResult, s: Series) -> str:
    med, lo, hi = _triple(s.samples, s.unit)
    ratio = over = ""
    base = sec.get(s.baseline) if s.baseline else None
    if base is not None and base.samples:
        r = summarize(ratios(s.samples, base.samples))
        if r is not None:
            ratio = f"{r['median']:.3f}x [{r['min']:.3f}-{r['max']:.3f}] vs {base.key}"
        d = summarize(differences(s.samples, base.samples))
        if d is not None and s.unit == "s":
            over = (f"{d['median'] * 1000:+.0f} ms [{d['min'] * 1000:+.0f} .. "
                    f"{d['max'] * 1000:+.0f}]")
        elif d is not None:
            over = f"{d['median']:+.2f} {s.unit}"
    return f"| {s.label} | {med} | {lo} | {hi} | {len(s.samples)} | {ratio} | {over} |"


def section_table(sec: SectionResult) -> list[str]:
    lines = [f"### {sec.name} ({sec.seconds:.0f} s)", "",
             "| measurement | median | min | max | n | ratio vs baseline (median [min-max]) "
             "| overhead vs baseline |",
             "|---|---:|---:|---:|---:|---|---|"]
    lines += [series_row(sec, s) for s in sec.series if s.samples]
    empty = [s.label for s in sec.series if not s.samples]
    if empty:
        lines += ["", "no samples: " + "; ".join(empty)]
    if sec.notes:
        lines += [""] + [f"- {n}" for n in sec.notes]
    return lines


def targets_table(sections: Sequence[SectionResult]) -> list[str]:
    lines = ["### targets", "", "| target | measured | limit | verdict | note |",
             "|---|---|---|---|---|"]
    for sec in sections:
        for t in sec.targets:
            verdict = {True: "met", False: "**not met**", None: "n/a"}[t.met]
            lines.append(f"| {t.name} | {t.value} | {t.limit} | {verdict} | {t.why} |")
    return lines


def render(sections: Sequence[SectionResult], header: Sequence[str],
           errors: dict[str, str]) -> str:
    lines = list(header) + [""]
    for sec in sections:
        lines += section_table(sec) + [""]
    lines += targets_table(sections)
    for name, err in errors.items():
        lines += ["", f"**section {name} failed**: {err}"]
    return "\n".join(lines) + "\n"
