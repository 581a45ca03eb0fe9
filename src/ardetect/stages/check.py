"""Stage ``check``: the checks of ``params.yaml`` that later stages would otherwise make only
when they reach them, run first so that a bad setting stops the pipeline in seconds, before
the data stages (hours on the real path).

- the detector's size, ``overrides`` and input side fit together (``num_queries`` against
  the encoder tokens of the image size, for one), as ``pretrain`` will build it;
- a ``model.pretrained`` checkpoint is an existing folder or a hub id in the local cache,
  with its ``config.json`` (its own config is checked when it is loaded);
- on the real path, the inputs the data stages will load: the annotation file and image
  folder, GroundingDINO (``config.json``) and the SAM checkpoint for COCO/LVIS exemplars or
  Break-a-Scene, and the Stable Diffusion pipeline (``model_index.json``) for Break-a-Scene.
  Skipped when ``exemplars.real.fixtures`` is set: the exemplars stage writes those first.

Every problem found is reported, not only the first. ``ard pipeline run`` and the Prefect flow
call :func:`preflight` before any stage too; this stage is what ``dvc repro`` and
``dvc exp run`` meet. Its output, ``data/check.json``, names the checks and nothing of the
settings, so it is the same file whatever passes: the data stages depend on it for their
order only, and a changed setting re-runs this stage alone, not them.
"""

from __future__ import annotations

from pathlib import Path

from ardetect import tracking
from ardetect.config import Config
from ardetect.stages.common import DATA, run_stage

OUT = DATA / "check.json"
CHECKS = (
    "model: the size, its overrides and the input side fit together",
    "model.pretrained: an existing folder or a hub id in the local cache, with its config.json",
    "real path: annotations, images, GroundingDINO, SAM and Stable Diffusion are on this machine",
)


def _at(root: Path, value: str | None) -> str | None:
    """``value`` as the stages, run from the repository ``root``, will read it: a relative path that
    exists there joined to it; anything else (absolute, missing, a hub id) as it is."""
    if value is None or Path(value).expanduser().is_absolute() or not (root / value).exists():
        return value
    return str(root / value)


def _model_problems(cfg: Config, root: Path) -> list[str]:
    from ardetect.weights import WeightsError, local_folder

    if cfg.model.pretrained:
        try:
            local_folder(_at(root, cfg.model.pretrained), "model.pretrained", "config.json")
        except WeightsError as err:
            return [str(err)]
        return []
    from ardetect.model.config import ModelConfig  # not the detector's torch (the preflight of `ard pipeline run` too)

    try:
        ModelConfig.named(cfg.model.size, **cfg.model_overrides)  # as train.phases.model_config builds it
    except ValueError as err:
        errors = getattr(err, "errors", None)  # pydantic's ValidationError: its messages without the input dump
        detail = "; ".join(e["msg"].removeprefix("Value error, ") for e in errors()) if callable(errors) else str(err)
        return [f"params model (size={cfg.model.size!r}, image_size={cfg.model.image_size!r}, overrides={dict(cfg.model.overrides)}): "
                f"{detail}"]
    return []


def _real_path_problems(cfg: Config, root: Path) -> list[str]:
    from ardetect.weights import WeightsError, local_folder

    real, bas = cfg.exemplars.real, cfg.generate.backend == "break_a_scene"
    if real.fixtures or (cfg.exemplars.source == "synthetic" and not bas):
        return []
    problems = []
    if cfg.exemplars.source != "synthetic":
        for field, value, is_there, what in (("annotations", real.annotations, Path.is_file, "a COCO/LVIS instances JSON"),
                                             ("images", real.images, Path.is_dir, "the folder of its images")):
            if value is None:
                problems.append(f"exemplars.real.{field} is null; {what} is needed (exemplars.source={cfg.exemplars.source!r})")
            elif not is_there(Path(_at(root, value)).expanduser()):
                problems.append(f"exemplars.real.{field}={value!r} is not {what} on this machine")
    weights = [(real.grounding_dino, "exemplars.real.grounding_dino", "config.json")]
    if bas:
        weights.append((cfg.generate.customization.base_model, "generate.customization.base_model", "model_index.json"))
    for value, field, marker in weights:
        try:
            local_folder(_at(root, value), field, marker)
        except WeightsError as err:
            problems.append(str(err))
    if real.sam_checkpoint is None:
        problems.append("exemplars.real.sam_checkpoint is null; a segment-anything checkpoint (.pth) is needed")
    elif not Path(_at(root, real.sam_checkpoint)).expanduser().is_file():
        problems.append(f"exemplars.real.sam_checkpoint={real.sam_checkpoint!r} is not a file on this machine")
    return problems


def preflight(cfg: Config, root: str | Path = ".") -> None:
    """Raise a ``ValueError`` naming every setting that a later stage would fail on; relative paths
    are read from ``root``, the repository root the stages run in."""
    root = Path(root)
    problems = _model_problems(cfg, root) + _real_path_problems(cfg, root) + _layout_problems(root)
    if len(problems) == 1:
        raise ValueError(problems[0])
    if problems:
        raise ValueError(f"{len(problems)} settings cannot work:\n" + "\n".join(f"  - {p}" for p in problems))


def _layout_problems(root: Path) -> list[str]:
    """An output folder that is a link out of the repository (``data -> /mnt/big/data``, to keep the data on another
    disk): DVC refuses every output under it ("... is outside of git repository") at the first stage. DVC's own way
    is its cache on the other disk, the outputs linked to it (tried on the smoke pipeline: it ran through)."""
    from ardetect.pipeline import stage_outputs

    if not (root / "dvc.yaml").is_file():
        return []
    problems, seen, repo = [], set(), root.resolve()
    for out in (out for paths in stage_outputs(root).values() for out in paths):
        parts = Path(out).parts
        for i in range(1, len(parts)):  # the folders above it: an output itself is a link into DVC's cache with that way
            here = root.joinpath(*parts[:i])
            if here in seen or not here.is_symlink():
                continue
            seen.add(here)
            target = here.resolve()
            if not target.is_relative_to(repo):
                where = target.parent / "dvc-cache"
                problems.append(f"{Path(*parts[:i])} is a link to {target}, outside the repository, and DVC keeps a stage's "
                                f"outputs inside it: make {Path(*parts[:i])} a folder again, and to keep the data on that disk "
                                f"put DVC's cache there instead (`dvc cache dir --local {where}` and `dvc config --local "
                                "cache.type symlink`: the outputs become links into it)")
    return problems


def build(cfg: Config) -> dict:
    preflight(cfg)
    tracking.write_json_atomic({"passed": list(CHECKS)}, OUT)
    return {"checks_passed": len(CHECKS)}


def main() -> None:
    run_stage("check", build, lambda c: {"model": c.model.model_dump(mode="json"), "exemplars": c.exemplars.model_dump(mode="json"),
                                          "generate.backend": c.generate.backend, "generate.base_model": c.generate.customization.base_model})


if __name__ == "__main__":
    main()
