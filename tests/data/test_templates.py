"""The paper's prompt templates as data: counts, parsing, filling."""

from __future__ import annotations

import pytest

from ardetect.data.templates import (
    ALL_MEDIA,
    COCO_TEMPLATES,
    LVIS_TEMPLATES,
    SCENES,
    Template,
    fill,
    parse_template,
    templates_for,
)
from ardetect.data.world import WORLD_CLASSES


def test_counts_and_placeholders():
    assert len(COCO_TEMPLATES) == 10
    assert len(LVIS_TEMPLATES) == 10
    assert all(len(v) == 10 for v in LVIS_TEMPLATES.values())
    for t in COCO_TEMPLATES + [t for v in LVIS_TEMPLATES.values() for t in v]:
        assert t.count("{}") == 1, t
    assert len({t for v in LVIS_TEMPLATES.values() for t in v}) >= 99  # one repeat across groups in the paper


@pytest.mark.parametrize(
    "text,group,medium,scene",
    [
        ("A charcoal sketch of a {} sitting on a rock.", "living_creatures", "charcoal sketch", "mountain"),
        ("A {} is wandering through a dense forest.", "living_creatures", "photo", "forest"),
        ("A {} is captured in a stunning wildlife photograph.", "living_creatures", "photo", "field"),
        ("A photorealistic rendering of a {} speeding on a freeway.", "transportation", "photorealistic rendering", "street"),
        ("A {} is silhouetted against a golden sunset.", "living_creatures", "photo", "sunset"),
        ("A vintage poster featuring a {} in a retro advertisement.", "transportation", "vintage poster", "room"),
        ("A watercolor illustration of {} standing on the beach.", "living_creatures", "watercolor illustration", "beach"),
        ("A {} is sitting next to a steaming cup of herbal tea.", "food_drink", "photo", "table"),
        ("An ink drawing of a {} in a cyberpunk environment.", "tech_electronics", "ink drawing", "lab"),
        ("A {} is partially covered in snow during winter.", "outdoor_nature", "photo", "snow"),
    ],
)
def test_parse(text, group, medium, scene):
    t = parse_template(text, group)
    assert t == Template(text=text, group=group, medium=medium, scene=scene)


def test_every_template_parses_to_known_medium_and_scene():
    for group in LVIS_TEMPLATES:
        for ts in ("lvis", "coco"):
            temps = templates_for(group, ts)
            assert len(temps) == 10
            for t in temps:
                assert t.medium in ALL_MEDIA and t.scene in SCENES and t.group == group
    media = {t.medium for g in LVIS_TEMPLATES for t in templates_for(g, "lvis")}
    assert {"photo", "oil painting", "charcoal sketch", "ink drawing", "vintage poster", "photorealistic rendering"} <= media
    assert [t.text for t in templates_for("wearables", "coco")] == COCO_TEMPLATES


def test_unknown_group_and_bad_template():
    with pytest.raises(KeyError):
        templates_for("nope", "lvis")
    with pytest.raises(ValueError):
        parse_template("no placeholder here", "wearables")


def test_fill():
    assert fill("A charcoal sketch of a {} sitting on a rock.", "cat", "V* {}") == (
        "A charcoal sketch of a V* cat sitting on a rock.",
        "V* cat",
    )
    assert fill("A photo of {} standing in a forest.", "dog", "sks {}") == ("A photo of sks dog standing in a forest.", "sks dog")
    with pytest.raises(ValueError):
        fill("A {} x", "cat", "no placeholder")


def test_world_classes_map_onto_groups():
    assert set(WORLD_CLASSES.values()) == set(LVIS_TEMPLATES)
    assert 16 <= len(WORLD_CLASSES) <= 30
