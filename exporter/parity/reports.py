"""What parity writes: report.json, junit.xml and a self-contained report.html."""

from __future__ import annotations

import html
import json
import math
import os
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from core.errors import OutputError


def write_reports(report: dict[str, Any], out_dir: Path) -> None:
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot write parity reports to {out_dir}: {e.strerror or e}") from e
    _write_atomic(out_dir / "report.json", json.dumps(report, indent=2, sort_keys=True) + "\n")
    _write_atomic(out_dir / "report.html", render_html(report))
    _write_atomic(out_dir / "junit.xml", render_junit(report))


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def render_junit(report: dict[str, Any]) -> str:
    a = report["artifact"]
    checks = report["checks"]
    suite = ET.Element(
        "testsuite",
        name=f"parity.{a['target']}.{a['recipe']}",
        tests=str(len(checks)),
        failures=str(sum(not c["passed"] for c in checks)),
        errors="0",
        time=f"{report.get('wall_s', 0):.3f}",
    )
    props = ET.SubElement(suite, "properties")
    ET.SubElement(props, "property", name="provenance", value=report["provenance"]["artifact"])
    ET.SubElement(props, "property", name="numbers", value=report["provenance"]["artifact_numbers"])
    for c in checks:
        case = ET.SubElement(suite, "testcase", classname=f"parity.{a['target']}.{a['recipe']}", name=c["name"])
        if not c["passed"]:
            f = ET.SubElement(case, "failure", message=failure_text(c), type="ParityFailure")
            f.text = failure_text(c)
    root = ET.Element("testsuites", name="autoglm-export parity")
    root.append(suite)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def fmt(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    return f"{v:.{digits}f}" if digits > 3 else f"{v:.3e}"


def fmt_db(v: float | None) -> str:
    return "exact" if v is None else f"{v:.1f} dB"


def _svg_lines(series: list[tuple[str, list[float | None]]], title: str, ylabel: str, w: int = 640, h: int = 180) -> str:
    """A small inline SVG line chart (no scripts, no external resources)."""
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    vals = [v for _, s in series for v in s if v is not None and math.isfinite(v)]
    if not vals:
        return ""
    lo, hi = min(vals), max(vals)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5 * (abs(lo) + 1e-6), hi + 0.5 * (abs(hi) + 1e-6)
    n = max(len(s) for _, s in series)
    pl, pr, pt, pb = 70, 10, 20, 28
    x = lambda i: pl + (w - pl - pr) * (i / (n - 1) if n > 1 else 0.5)  # noqa: E731
    y = lambda v: pt + (h - pt - pb) * (1 - (v - lo) / (hi - lo))  # noqa: E731
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" aria-label="{html.escape(title)}">',
        f'<text x="{pl}" y="13" font-size="12">{html.escape(title)}</text>',
        f'<line x1="{pl}" y1="{h - pb}" x2="{w - pr}" y2="{h - pb}" stroke="#888"/>',
        f'<line x1="{pl}" y1="{pt}" x2="{pl}" y2="{h - pb}" stroke="#888"/>',
        f'<text x="4" y="{pt + 8}" font-size="10">{hi:.7g}</text>',
        f'<text x="4" y="{h - pb}" font-size="10">{lo:.7g}</text>',
        f'<text x="4" y="{(h) // 2}" font-size="10">{html.escape(ylabel)}</text>',
        f'<text x="{pl}" y="{h - 8}" font-size="10">0</text>',
        f'<text x="{w - pr - 30}" y="{h - 8}" font-size="10">{n - 1}</text>',
    ]
    for k, (label, s) in enumerate(series):
        c = colors[k % len(colors)]
        pts = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(s) if v is not None and math.isfinite(v))
        parts.append(f'<polyline fill="none" stroke="{c}" stroke-width="1.5" points="{pts}"/>')
        if len(s) <= 64:  # markers, so single calls show too
            parts += [
                f'<circle cx="{x(i):.1f}" cy="{y(v):.1f}" r="2.5" fill="{c}"/>'
                for i, v in enumerate(s)
                if v is not None and math.isfinite(v)
            ]
        parts.append(f'<text x="{w - pr - 200}" y="{pt + 12 * (k + 1)}" font-size="10" fill="{c}">{html.escape(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:24px;color:#222;max-width:1100px}
h1{font-size:20px}h2{font-size:16px;margin-top:28px}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}
.pass{color:#087f23;font-weight:600}.fail{color:#b00020;font-weight:600}
.note{background:#fff8e1;border:1px solid #f0d060;padding:8px;font-size:13px}
.tok{font-family:ui-monospace,monospace;font-size:12px}.div{background:#ffd6d6}
"""


def render_html(report: dict[str, Any]) -> str:
    """A self-contained page: inline CSS and SVG, no scripts, no external URLs."""
    e = html.escape
    a, prov = report["artifact"], report["provenance"]
    status = '<span class="pass">PASS</span>' if report["passed"] else '<span class="fail">FAIL</span>'
    out = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>parity {e(a['target'])}/{e(a['recipe'])}</title><style>{_CSS}</style></head><body>",
        f"<h1>Parity: {e(a['target'])} / {e(a['recipe'])} ({e(a['model'])}) — {status}</h1>",
        f"<p class='note'>Artifact numbers from: <b>{e(prov['artifact'])}</b> ({e(prov['artifact_numbers'])}). "
        f"Reference: {e(prov['reference'])}. Inputs: {e(report['inputs']['manifest'])} "
        f"({report['inputs']['items']} held-out items, {report['inputs']['steps']} greedy steps).</p>",
    ]
    if report["failures"]:
        out.append("<p class='fail'>Failed: " + e("; ".join(report["failures"])) + "</p>")
    out.append("<h2>Per method</h2><table><tr><th class='l'>method</th><th>calls</th><th>max abs</th><th>mean abs</th>"
               "<th>cosine</th><th>SQNR</th><th class='l'>obtained from</th></tr>")
    for name, m in report["methods"].items():
        out.append(
            f"<tr><td class='l'>{e(name)}</td><td>{m['calls']}</td><td>{fmt(m['max_abs'])}</td><td>{fmt(m['mean_abs'])}</td>"
            f"<td>{fmt(m['cosine'], 6)}</td><td>{fmt_db(m['sqnr_db'])}</td><td class='l'>{e(prov['artifact_numbers'])}</td></tr>"
        )
    d = report["decoder"]
    out.append("</table>")
    out.append(
        f"<p>Decoder: top-1 agreement <b>{d['top1_agreement']:.4f}</b>, greedy match (worst prompt) "
        f"<b>{d['greedy_match']:.4f}</b> over {d['steps']} steps ({e(prov['artifact_numbers'])}).</p>"
    )
    out.append("<h2>Checks</h2><table><tr><th class='l'>check</th><th>value</th><th>needs</th><th class='l'>result</th></tr>")
    for c in report["checks"]:
        v = "n/a" if c["value"] is None else f"{c['value']:.6g}"
        r = "<span class='pass'>pass</span>" if c["passed"] else "<span class='fail'>FAIL</span>"
        out.append(f"<tr><td class='l'>{e(c['name'])}</td><td>{v}</td><td>{e(c['op'])} {c['threshold']:g}</td><td class='l'>{r}</td></tr>")
    out.append("</table>")
    # per-call error per method
    out.append("<h2>Error per call</h2>")
    for name, m in report["methods"].items():
        out.append(_svg_lines([("cosine", [c["cosine"] for c in m["per_call"]])], f"{name}: cosine per call (in call order)", "cosine"))
        out.append(_svg_lines([("max abs", [c["max_abs"] for c in m["per_call"]])], f"{name}: max abs per call", "max abs"))
    out.append("<h2>Decoder, per position (teacher-forced)</h2>")
    for p in d["prompts"]:
        pp = p["per_position"]
        out.append(f"<h3>item {p['item']}: {e(p['text'][:80])}</h3>")
        out.append(
            f"<p>prompt {p['prompt_len']} tokens; top-1 agreement {p['top1_agreement']:.4f}; greedy match {p['greedy_match']:.4f}; "
            f"first divergence: {'none' if p['first_divergence'] is None else 'step ' + str(p['first_divergence'])}</p>"
        )
        out.append(_svg_lines([("logits cosine", pp["cosine"])], "logits cosine per position", "cosine"))
        out.append(_svg_lines([("top-1 equal", [float(t) for t in pp["top1"]])], "top-1 agreement per position (1 = same argmax)", "equal"))
        out.append(_token_table(p))
    out.append("</body></html>\n")
    return "\n".join(out)


def _token_table(p: dict[str, Any]) -> str:
    e = html.escape
    ref, art, fd = p["reference_tokens"], p["artifact_tokens"], p["first_divergence"]
    rows = ["<table class='tok'><tr><th>step</th><th class='l'>reference</th><th class='l'>artifact</th></tr>"]
    lo = 0 if fd is None else max(0, fd - 3)
    hi = min(max(len(ref), len(art)), (lo + 12) if fd is not None else 12)
    for i in range(lo, hi):
        r = ref[i] if i < len(ref) else None
        a_ = art[i] if i < len(art) else None
        cls = " class='div'" if r != a_ else ""
        rows.append(f"<tr{cls}><td>{i}</td><td class='l'>{e(str(r))}</td><td class='l'>{e(str(a_))}</td></tr>")
    rows.append("</table>")
    rows.append(f"<p class='tok'>reference text: {e(repr(p['reference_text'][:200]))}<br>artifact text: {e(repr(p['artifact_text'][:200]))}</p>")
    return "".join(rows)


def failure_text(c: dict[str, Any]) -> str:
    v = "non-finite" if c["value"] is None else f"{c['value']:.6g}"
    return f"{c['name']} = {v} (needs {c['op']} {c['threshold']:g})"
