"""A figure lives in one place: every measurement README.md quotes is one BENCHMARKS.md holds.

The rule for "a measurement" in README.md (outside fenced code blocks and `inline code`, which
hold commands and sample output, not figures):
  - a number with a unit of time, rate, size or ratio: `6.1 h`, `~16 min`, `2.4 s`, `16.4 ms`,
    `20.5 images/s`, `10.38 MB`, `1.56x` (or with the multiplication sign), `13%`;
  - a number after a COCO metric's name: `AP 0.4135`, `AP50 0.746`, `AR100 0.56`.
Each must appear in BENCHMARKS.md as the same number with the same unit (or after the same
metric's name, or in a table row naming the metric). Counts (images, boxes) are not covered.
Also: every link to a BENCHMARKS.md section, from README.md, docs/ or BENCHMARKS.md's own
table of contents, names a heading that exists.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMES = "\u00d7"  # the multiplication sign, as BENCHMARKS.md writes ratios
UNIT = rf"(images/s|min|ms|h|s|GB|MB|KB|%|{TIMES}|x)"
# "~6.1 h", "1,106 s", "1.56x": the number, then the unit, not followed by more of a word.
WITH_UNIT = re.compile(r"(?<![\w.])~?(\d[\d,]*(?:\.\d+)?)\s?" + UNIT + r"(?![\w/])")
METRIC = re.compile(r"\b(AP|AP50|AP75|AR1|AR10|AR100)\s+(\d\.\d+)")


def prose(markdown: str) -> str:
    """The text outside fenced code blocks and inline code."""
    markdown = re.sub(r"^```.*?^```", "", markdown, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", markdown)


def same_unit(unit: str) -> str:
    return f"[x{TIMES}]" if unit in ("x", TIMES) else re.escape(unit)


def missing_figures(readme: str, benchmarks: str) -> list[str]:
    """The measurements `readme` quotes that `benchmarks` does not hold."""
    missing = []
    text = prose(readme)
    for number, unit in WITH_UNIT.findall(text):
        if unit in ("x", TIMES) and "." not in number:
            continue  # "2 x 3", "8x": a size or a count, not a measured ratio
        held = re.compile(r"(?<![\d.])" + re.escape(number) + r"\s?" + same_unit(unit) + r"(?![\w/])")
        if not held.search(benchmarks):
            missing.append(f"{number} {unit}")
    for metric, number in METRIC.findall(text):
        near = re.compile(rf"\b{metric}\b[^\n]*?(?<![\d.]){re.escape(number)}(?!\d)")
        row = re.compile(rf"^\|[^\n]*\b{metric}\b[^\n]*(?<![\d.]){re.escape(number)}(?!\d)", re.M)
        if not (near.search(benchmarks) or row.search(benchmarks)):
            missing.append(f"{metric} {number}")
    return missing


def test_the_readme_quotes_only_figures_benchmarks_holds():
    readme = (ROOT / "README.md").read_text()
    benchmarks = (ROOT / "BENCHMARKS.md").read_text()
    assert WITH_UNIT.search(prose(readme)), "README quotes no measurement: the rule above no longer finds any"
    assert missing_figures(readme, benchmarks) == []


def test_the_check_flags_a_figure_benchmarks_lacks():
    """The checker itself, on planted text: a wrong figure is caught, a held one is not."""
    benchmarks = "| train | ~20,900 s = **~5.8 h** |\n| AP / AP50 | 0.4135 / 0.746 |\nint8 is 1.56" + TIMES + " faster"
    readme = "Training takes ~5.8 h, int8 1.56x faster, AP50 0.746.\n```\nsample 9.9 h\n```\n`7 min`"
    assert missing_figures(readme, benchmarks) == []
    assert missing_figures(readme + " It took 4.7 h and AP 0.409.", benchmarks) == ["4.7 h", "AP 0.409"]


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_to_benchmarks_sections_name_existing_headings():
    benchmarks = (ROOT / "BENCHMARKS.md").read_text()
    anchors = {slug(h) for h in re.findall(r"^#{1,6} (.+)$", benchmarks, re.M)}
    links = [("BENCHMARKS.md", anchor) for anchor in re.findall(r"\]\(#([\w\-]+)\)", benchmarks)]
    for source in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        links += [(source.name, anchor) for anchor in re.findall(r"BENCHMARKS\.md#([\w\-]+)\)", source.read_text())]
    assert links, "no link to a BENCHMARKS.md section found"
    broken = [(name, anchor) for name, anchor in links if anchor not in anchors]
    assert broken == []
