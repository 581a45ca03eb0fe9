from typer.testing import CliRunner

from ardetect.model.cli import app


def test_info_nano_prints_counts_and_resolution():
    result = CliRunner().invoke(app, ["info", "nano"])
    assert result.exit_code == 0, result.output
    assert "160 x 160" in result.output
    for field in ("parameters", "trainable, phase 1", "trainable, phase 2"):
        assert field in result.output


def test_info_bb_matches_paper_trainable_count():
    result = CliRunner().invoke(app, ["info", "B-B"])
    assert result.exit_code == 0, result.output
    assert "800 x 1333" in result.output
    line = next(l for l in result.output.splitlines() if l.startswith("trainable, phase 1"))
    assert "37.0M" in line  # REFERENCE.md: 37M of 233M train with backbones frozen


def test_info_rejects_unknown_size():
    result = CliRunner().invoke(app, ["info", "huge"])
    assert result.exit_code != 0
