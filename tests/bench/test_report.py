"""The result files of the tiny run: JSON (the report itself), Markdown and the PNG, and the
terminal table."""

import json

import torch

from attention.bench.report import format_table


def test_tiny_run_writes_json_markdown_and_png(tiny_run):
    _, report, paths, _ = tiny_run
    date = report["environment"]["date"][:10]
    assert [p.name for p in paths] == [f"cpu-tiny-{date}.{ext}" for ext in ("json", "md", "png")]
    assert json.loads(paths[0].read_text()) == report
    markdown = paths[1].read_text()
    assert "| contender | pass | case | length |" in markdown
    assert "`attention-bench test`" in markdown and torch.__version__ in markdown
    assert markdown.count("\n| ours-fused |") == 8  # 2 lengths × 2 passes × 2 cases
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = format_table(report).splitlines()
    assert len(table) == 1 + len(report["cells"]) and "GFLOP/s" in table[0]
