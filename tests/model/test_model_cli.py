import re

from typer.testing import CliRunner

from ardetect.model.cli import app


def test_info_nano_prints_counts_and_resolution():
    result = CliRunner().invoke(app, ["info", "nano"])
    assert result.exit_code == 0, result.output
    assert "160 x 160" in result.output
    counts = {m[1]: int(m[2].replace(",", "")) for m in re.finditer(r"^\s*(\S.*?)\s{2,}([\d,]+) \(", result.output, re.M)}
    hidden = 64
    assert counts["trainable, phase 2"] == 2 * (hidden * hidden + hidden)  # the two adapters F and F~, each a linear layer
    # phase 1 trains all but the frozen text backbone and the adapters
    assert counts["trainable, phase 1"] == counts["parameters"] - counts["text backbone"] - counts["trainable, phase 2"]


def test_info_bb_matches_paper_trainable_count():
    result = CliRunner().invoke(app, ["info", "B-B"])
    assert result.exit_code == 0, result.output
    assert "800 x 1333" in result.output
    line = next(l for l in result.output.splitlines() if l.startswith("trainable, phase 1"))
    assert "37.0M" in line  # REFERENCE.md: 37M of 233M train with backbones frozen


def test_info_rejects_unknown_size():
    result = CliRunner().invoke(app, ["info", "huge"])
    assert result.exit_code == 2 and "is not one of" in result.output, result.output
