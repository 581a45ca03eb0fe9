"""Table 6's base classes and groups, and the words a class name is prompted with."""

from ardetect.data.classes import COCO_CLASSES, LVIS_GROUP_CLASSES, class_word, group_of
from ardetect.data.templates import GROUPS


def test_table6_groups_and_lookup():
    assert set(LVIS_GROUP_CLASSES) <= set(GROUPS) and "misc_objects" not in LVIS_GROUP_CLASSES  # the printed table stops before it
    assert len(LVIS_GROUP_CLASSES["living_creatures"]) == 101 and len(LVIS_GROUP_CLASSES["transportation"]) == 63
    assert group_of("bat_(animal)") == "living_creatures"
    assert group_of("baseball_cap") == group_of("baseball cap") == "wearables"
    assert group_of("motorcycle") == "transportation" and group_of("cup") == "food_drink"
    assert group_of("teddy bear") == "misc_objects"  # not in table 6
    assert len(COCO_CLASSES) == 80 and len(set(COCO_CLASSES)) == 80


def test_class_word():
    assert class_word("bat_(animal)") == "bat"
    assert class_word("tank_top_(clothing)") == "tank top"
    assert class_word("pug-dog") == "pug-dog"
    assert class_word("traffic light") == "traffic light"
