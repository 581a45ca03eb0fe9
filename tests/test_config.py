from pathlib import Path

import pytest
import yaml

from ardetect.config import Config, ConfigError, config_from_dict, load_config

REPO = Path(__file__).resolve().parents[1]


def raw_params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def load(raw: dict) -> Config:
    return config_from_dict(raw, source="params.yaml", profiles_dir=REPO / "profiles")


def test_repo_params_load_for_every_profile():
    cfg = load_config(REPO / "params.yaml")
    assert cfg.profile == "default"
    assert cfg.world.n_concepts * cfg.world.queries_per_concept >= 2000
    assert round(cfg.world.n_concepts * cfg.tuples.split.test) - 1 >= 100  # negatives per test query
    smoke = load({**raw_params(), "profile": "smoke"})
    assert smoke.world.n_concepts < cfg.world.n_concepts
    assert smoke.world.image_size == 96
    paper = load({**raw_params(), "profile": "paper"})
    assert paper.exemplars.source == "lvis" and paper.generate.backend == "break_a_scene"
    assert paper.generate.customization.base_model == "stabilityai/stable-diffusion-2-1-base"


def test_unknown_key_is_named():
    raw = raw_params()
    raw["world"]["n_concept"] = 5
    with pytest.raises(ConfigError, match=r"unknown key 'world\.n_concept'"):
        load(raw)


def test_unknown_section_is_named():
    raw = raw_params()
    raw["trainig"] = {}
    with pytest.raises(ConfigError, match=r"unknown key 'trainig'"):
        load(raw)
    del raw["trainig"]
    raw["world"]["colours"] = list(range(100))
    with pytest.raises(ConfigError) as err:
        load(raw)
    line = str(err.value).splitlines()[1]  # nothing close enough to offer; the long value shortened
    assert line == "  - unknown key 'world.colours' (value " + repr(list(range(100)))[:80] + " ...)", line


@pytest.mark.parametrize("path,typo,meant", [
    ((), "pretrian", "pretrain"),  # a whole section: its value is shortened, not dumped
    (("pretrain",), "epoch", "pretrain.epochs"),
    (("pretrain", "loss"), "weight_clas", "pretrain.loss.weight_class"),
    (("validate",), "box_iou_mn", "validate.box_iou_min"),  # the section's YAML key, not its Python field name
    (("exemplars", "real"), "sam_chekpoint", "exemplars.real.sam_checkpoint"),
])
def test_a_mistyped_key_is_given_the_one_it_is_close_to(path, typo, meant):
    raw = raw_params()
    section = raw
    for key in path:
        section = section[key]
    section[typo] = section.pop(meant.rsplit(".", 1)[-1])
    with pytest.raises(ConfigError) as err:
        load(raw)
    line = str(err.value).splitlines()[1]
    assert line.startswith(f"  - unknown key '{'.'.join([*path, typo])}' (value ")
    assert line.endswith(f"; did you mean '{meant}'?") and len(line) < 200, line


def test_a_check_across_sections_gives_its_message_without_dumping_the_configuration():
    raw = raw_params()
    raw["world"]["seed"] = raw["evaluate"]["generalisation_world_seed"]
    with pytest.raises(ConfigError) as err:
        load(raw)
    lines = str(err.value).splitlines()
    assert lines[1].startswith("  - Value error, evaluate.generalisation_world_seed=") and "equals world.seed" in lines[1]
    assert len(lines) == 2 and len(lines[1]) < 200, lines


def test_a_detector_field_set_directly_under_model_is_pointed_to_model_overrides():
    raw = raw_params()
    raw["model"]["phrase_position_start"] = 0
    with pytest.raises(ConfigError) as err:
        load(raw)
    line = str(err.value).splitlines()[1]
    assert line.startswith("  - unknown key 'model.phrase_position_start' (value 0)")
    assert line.endswith("goes under model.overrides: 'model.overrides.phrase_position_start'"), line
    raw["model"]["pdevice"] = raw["model"].pop("phrase_position_start")  # a typo of the section's own key keeps its hint
    with pytest.raises(ConfigError, match=r"did you mean 'model.device'\?"):
        load(raw)


def test_a_mistyped_model_override_is_given_the_field_it_is_close_to():
    from ardetect.model.config import ModelConfig

    with pytest.raises(ValueError, match=r"unknown ModelConfig field\(s\) \['num_querys'\] for size='nano' "
                                         r"\('num_querys': did you mean 'num_queries'\?\)"):
        ModelConfig.named("nano", num_querys=16)


@pytest.mark.parametrize(
    "path,value,pattern",
    [
        (("world", "n_concepts"), 5, r"world\.n_concepts.*greater than or equal to 6.*got 5"),
        (("world", "image_size"), 20, r"world\.image_size.*got 20"),
        (("world", "placeholder"), "V*", r"world\.placeholder.*exactly one"),
        (("world", "placeholder"), " {} ", r"world\.placeholder.*nothing besides '\{\}'"),  # the phrase: the bare class
        (("world", "base_classes"), [], r"world\.base_classes.*name at least one class, or null"),
        (("world", "base_classes"), ["cat", "car", "cat"], r"world\.base_classes.*\['cat'\] twice"),
        (("world", "base_classes"), ["cat", "unicorn"], r"world\.base_classes.*\['unicorn'\] not among the world's shape families"),
        (("world", "object_scale"), [0.6, 0.2], r"world\.object_scale"),
        (("world", "distractors", "same_class_prob"), 1.5, r"world\.distractors\.same_class_prob.*got 1\.5"),
        (("world", "distractors", "scale"), [0.5, 0.1], r"world\.distractors.*scale=\[0\.5, 0\.1\]"),
        (("train_phase2", "k_negatives"), 0, r"train_phase2\.k_negatives.*got 0"),
        (("model", "size"), "huge", r"model\.size.*got 'huge'"),
        (("evaluate", "iou_threshold"), 1.5, r"evaluate\.iou_threshold.*got 1\.5"),
        (("tuples", "split", "train"), 0.5, r"tuples\.split.*sum to 1"),
        (("validate", "max_examples"), 0, r"validate\.max_examples.*got 0"),
        (("world", "template_set"), "imagenet", r"world\.template_set.*got 'imagenet'"),
        (("evaluate", "identity_weights"), [0, -2], r"evaluate\.identity_weights.*\[-2\.0\]"),
        (("evaluate", "identity_weights"), [], r"evaluate\.identity_weights.*at least 1"),
        (("evaluate", "identity_grids"), [1, 0], r"evaluate\.identity_grids.*\[0\]"),
        (("evaluate", "identity_grids"), [], r"evaluate\.identity_grids.*at least 1"),
        (("evaluate", "identity_top_k"), 0, r"evaluate\.identity_top_k.*got 0"),
        (("evaluate", "fit_metrics"), ["recall@1", "recall@3"], r"evaluate\.fit_metrics.*recall@3"),
        (("evaluate", "fit_metrics"), ["recall@5", "recall@5"], r"evaluate\.fit_metrics.*each metric once"),
        (("evaluate", "fit_metrics"), [], r"evaluate\.fit_metrics.*at least 1"),
        (("train_phase1", "loss", "align_negatives"), -1, r"train_phase1\.loss\.align_negatives.*got -1"),
        (("train_phase2", "rank_grid"), 9, r"train_phase2\.rank_grid.*got 9"),
        (("train_phase2", "lambda_rank"), -1, r"train_phase2\.lambda_rank.*got -1"),
        (("train_phase2", "same_class_negatives"), 5, r"train_phase2.*same_class_negatives=5 and distractor_class_negatives=0 add up to 5, above k_negatives=4"),
        (("train_phase1", "same_class_negatives"), 2, r"train_phase1.*same_class_negatives=2 and distractor_class_negatives=0 add up to 2, above k_negatives=1"),
        (("train_phase1", "distractor_class_negatives"), 2, r"train_phase1.*distractor_class_negatives=2 add up to 2, above k_negatives=1"),
        (("train_phase2", "distractor_class_negatives"), -1, r"train_phase2\.distractor_class_negatives"),
        (("train_phase1", "k_negatives"), -1, r"train_phase1\.k_negatives.*got -1"),
    ],
)
def test_out_of_range_values_are_named(path, value, pattern):
    raw = raw_params()
    node = raw
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(ConfigError, match=pattern):
        load(raw)


def test_distractors_of_another_class_with_one_class_are_refused_by_name():
    """One base class and ``same_class_prob: 0`` ask for distractors of another class where there is none (the world
    drew them of the one class anyway); with a share above 0, or with no distractors, one class is fine."""
    raw = raw_params()
    raw["world"]["base_classes"] = ["cat"]
    raw["world"]["distractors"]["same_class_prob"] = 0.0
    with pytest.raises(ConfigError, match=r"world.*same_class_prob=0 with the one base class \['cat'\].*every one would be a cat"):
        load(raw)
    raw["world"]["distractors"].update(min_count=0, max_count=0)
    assert load(raw).world.distractors.max_count == 0
    raw["world"]["distractors"].update(min_count=1, max_count=3, same_class_prob=0.4)
    assert load(raw).world.base_classes == ["cat"]
    raw["world"]["base_classes"] = ["cat", "car"]
    raw["world"]["distractors"]["same_class_prob"] = 0.0
    assert load(raw).world.distractors.same_class_prob == 0.0


@pytest.mark.parametrize("name, split", [
    ("train", {"train": 0.0, "val": 0.5, "test": 0.5}),
    ("val", {"train": 0.9, "val": 0.0, "test": 0.1}),
    ("test", {"train": 0.9, "val": 0.1, "test": 0.0}),
])
def test_a_split_of_no_share_is_refused_before_anything_runs(name, split):
    """The pipeline trains on train, chooses checkpoints and the re-ranking's weights on val and evaluates
    on test: a split given no share would fail only after the trainings (phase 1 without a val checkpoint)."""
    raw = raw_params()
    raw["tuples"]["split"] = split
    with pytest.raises(ConfigError, match=rf"tuples\.split.*{name}=0: every split needs concepts"):
        load(raw)


@pytest.mark.parametrize("hash_size, field, value", [(4, "copy_max_distance", 16), (8, "duplicate_max_distance", 17)])
def test_a_copy_distance_past_a_quarter_of_the_hash_is_refused(hash_size, field, value):
    """Unrelated images differ in about half of the hash's bits: such a distance would make every tuple a copy."""
    raw = raw_params()
    raw["validate"].update(hash_size=hash_size, **{field: value})
    with pytest.raises(ConfigError, match=rf"validate.*{field}={value} is more than a quarter of hash_size={hash_size}'s "
                                          rf"{hash_size**2} bits \({hash_size**2 // 4}\)"):
        load(raw)
    raw["validate"].update(copy_max_distance=hash_size**2 // 4, duplicate_max_distance=hash_size**2 // 4)
    assert getattr(load(raw).validate_, field) == hash_size**2 // 4


def test_distractor_bounds_ordered():
    raw = raw_params()
    raw["world"]["distractors"] = {"min_count": 3, "max_count": 1, "same_class_prob": 0.5}
    with pytest.raises(ConfigError, match=r"max_count=1 is below min_count=3"):
        load(raw)


def test_unknown_profile_and_incompatible_backends():
    with pytest.raises(ConfigError, match=r"unknown profile 'huge'"):
        load({**raw_params(), "profile": "huge"})
    raw = raw_params()
    raw["generate"]["backend"] = "break_a_scene"
    with pytest.raises(ConfigError, match=r"generate\.backend='break_a_scene' needs real exemplars"):
        load(raw)


def test_missing_params_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("world: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "params.yaml")


@pytest.mark.parametrize("overlay, said", [("world: [unclosed\n", "not valid YAML: "),
                                           ("- a\n- b\n", "top level must be a mapping, got list")])
def test_a_broken_profile_overlay_is_named(tmp_path, overlay, said):
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "smoke.yaml").write_text(overlay)  # a traceback from the YAML parser or the merge before
    (tmp_path / "params.yaml").write_text("profile: smoke\n")
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "params.yaml")
    assert str(err.value).startswith(f"profile='smoke': {tmp_path / 'profiles' / 'smoke.yaml'}: {said}"), err.value


def test_detector_image_size_is_given_once():
    import yaml
    from ardetect.config import ConfigError, config_from_dict

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    cfg = config_from_dict(raw, profiles_dir=REPO / "profiles")
    assert cfg.detector_image_size == raw["model"]["image_size"] or (raw["model"]["image_size"] is None and cfg.detector_image_size == cfg.world.image_size)
    raw["model"]["image_size"] = None
    assert config_from_dict(raw, profiles_dir=REPO / "profiles").detector_image_size == raw["world"]["image_size"]
    raw["model"]["overrides"] = {"image_size": [96, 96]}
    assert config_from_dict(raw, profiles_dir=REPO / "profiles").detector_image_size == 96
    raw["model"]["image_size"] = 128
    with pytest.raises(ConfigError, match="give the input size once"):
        config_from_dict(raw, profiles_dir=REPO / "profiles")
