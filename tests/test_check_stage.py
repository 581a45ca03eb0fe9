"""The ``check`` stage's preflight: every setting a later stage would fail on, named at once."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ardetect.config import config_from_dict
from ardetect.stages.check import preflight


def _real(tmp_path, **real) -> dict:
    return {"exemplars": {"source": "coco", "real": real}, "generate": {"backend": "break_a_scene"}}


def test_the_default_world_passes():
    preflight(config_from_dict({}))


def test_every_missing_real_input_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    raw = _real(tmp_path, annotations=str(tmp_path / "lvis_v1_val.json"), images=str(tmp_path / "val2017"),
                grounding_dino="nobody/no-such-grounding-dino", sam_checkpoint=str(tmp_path / "sam.pth"))
    raw["generate"]["customization"] = {"base_model": str(tmp_path / "sd")}
    with pytest.raises(ValueError) as info:
        preflight(config_from_dict(raw))
    msg = str(info.value)
    assert msg.startswith("5 settings cannot work:")
    for needle in ("exemplars.real.annotations=", "lvis_v1_val.json' is not a COCO/LVIS instances JSON on this machine",
                   "exemplars.real.images=", "exemplars.real.grounding_dino='nobody/no-such-grounding-dino' is not in the local Hugging Face cache",
                   "generate.customization.base_model=", "sd' does not exist on this machine",
                   "exemplars.real.sam_checkpoint=", "sam.pth' is not a file on this machine"):
        assert needle in msg, (needle, msg)


def test_real_inputs_that_are_there_pass(tmp_path):
    (tmp_path / "ann.json").write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    (tmp_path / "images").mkdir()
    for folder, marker in (("gd", "config.json"), ("sd", "model_index.json")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / marker).write_text("{}")
    (tmp_path / "sam.pth").write_bytes(b"weights")
    raw = _real(tmp_path, annotations=str(tmp_path / "ann.json"), images=str(tmp_path / "images"), grounding_dino=str(tmp_path / "gd"),
                sam_checkpoint=str(tmp_path / "sam.pth"))
    raw["generate"]["customization"] = {"base_model": str(tmp_path / "sd")}
    preflight(config_from_dict(raw))
    (tmp_path / "sd" / "model_index.json").unlink()  # a folder that is not a diffusers pipeline
    with pytest.raises(ValueError, match=r"^generate\.customization\.base_model=.*has no model_index\.json$"):
        preflight(config_from_dict(raw))


def test_fixtures_are_written_by_the_exemplars_stage_so_they_are_not_checked(tmp_path):
    raw = _real(tmp_path, fixtures=str(tmp_path / "fixtures"), annotations=str(tmp_path / "fixtures/coco/annotations.json"),
                images=str(tmp_path / "fixtures/coco/images"), grounding_dino=str(tmp_path / "fixtures/gd"),
                sam_checkpoint=str(tmp_path / "fixtures/sam.pth"))
    preflight(config_from_dict(raw))


def test_the_preflight_reads_the_model_config_without_importing_torch():
    """The preflight (the `check` stage, and `ard pipeline run` before any stage) imported the whole training
    module for the model's config: torch, torchvision and transformers, about 6 s and 800 MiB a process on 2 cores.
    It reads the config alone now, and still names a model config that cannot work."""
    code = ("import sys\n"
            "from ardetect.config import config_from_dict\n"
            "from ardetect.stages.check import preflight\n"
            "preflight(config_from_dict({}))\n"
            "try:\n"
            "    preflight(config_from_dict({'model': {'size': 'T-B', 'image_size': 160, 'overrides': {'num_queries': 900}}}))\n"
            "except ValueError as err:\n"
            "    print(err)\n"
            "print(sorted(m for m in ('torch', 'torchvision', 'transformers') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    said, imported = out.stdout.strip().splitlines()[-2:]
    assert "params model (size='T-B'" in said and "num_queries" in said, said
    assert imported == "[]", imported


def test_a_model_problem_and_a_real_path_problem_are_both_named(tmp_path):
    raw = {"model": {"pretrained": str(tmp_path / "gdino")}, "exemplars": {"source": "lvis", "real": {"grounding_dino": str(tmp_path / "gd")}},
           "generate": {"backend": "break_a_scene", "customization": {"base_model": str(tmp_path / "sd")}}}
    with pytest.raises(ValueError) as info:
        preflight(config_from_dict(raw))
    msg = str(info.value)
    assert msg.startswith("6 settings cannot work:")  # the checkpoint; annotations, images and SAM unset; GroundingDINO and SD missing
    assert "model.pretrained=" in msg and "gdino' does not exist on this machine" in msg
    assert "exemplars.real.annotations is null" in msg and "exemplars.real.sam_checkpoint is null" in msg


def test_relative_paths_are_read_from_the_repository_root(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    (repo / "in" / "images").mkdir(parents=True)
    (repo / "in" / "ann.json").write_text("{}")
    (repo / "in" / "sam.pth").write_bytes(b"weights")
    for folder, marker in (("gd", "config.json"), ("sd", "model_index.json")):
        (repo / "in" / folder).mkdir()
        (repo / "in" / folder / marker).write_text("{}")
    raw = _real(repo, annotations="in/ann.json", images="in/images", grounding_dino="in/gd", sam_checkpoint="in/sam.pth")
    raw["generate"]["customization"] = {"base_model": "in/sd"}
    cfg = config_from_dict(raw)
    monkeypatch.chdir(tmp_path)  # `ard pipeline run --params repo/params.yaml` from the folder above
    preflight(cfg, repo)
    with pytest.raises(ValueError, match="^5 settings cannot work"):  # read from here, none of them is there
        preflight(cfg)


def test_an_output_folder_linked_out_of_the_repository_is_named_with_dvcs_way(tmp_path):
    """`data -> /mnt/big/data` (the data on another disk): DVC refused every output under it at the first stage,
    "'.../data/check.json' is outside of git repository". The preflight names the link and DVC's own way, its cache
    on that disk (tried on the smoke pipeline: it ran through, the outputs links into the cache)."""
    repo, big = tmp_path / "repo", tmp_path / "big"
    (repo / "kept").mkdir(parents=True)
    (big / "data").mkdir(parents=True)
    (repo / "dvc.yaml").write_text("stages:\n  a:\n    cmd: x\n    outs: [data/check.json, {models/m.pt: {cache: true}}]\n"
                                   "    metrics: [{reports/metrics.json: {cache: false}}]\n  b:\n    cmd: y\n    outs: [data/b]\n")
    (repo / "data").symlink_to(big / "data")
    (repo / "models").symlink_to(repo / "kept")  # a link inside the repository is no problem
    with pytest.raises(ValueError) as err:
        preflight(config_from_dict({}), repo)
    assert str(err.value) == (
        f"data is a link to {big / 'data'}, outside the repository, and DVC keeps a stage's outputs inside it: make data a "
        f"folder again, and to keep the data on that disk put DVC's cache there instead (`dvc cache dir --local "
        f"{big / 'dvc-cache'}` and `dvc config --local cache.type symlink`: the outputs become links into it)")
    (repo / "data").unlink()
    (repo / "data").mkdir()
    (big / "cache").mkdir()
    (big / "cache" / "ab12").write_text("{}")
    (repo / "data" / "check.json").symlink_to(big / "cache" / "ab12")  # an output as DVC links it into a cache elsewhere
    preflight(config_from_dict({}), repo)
