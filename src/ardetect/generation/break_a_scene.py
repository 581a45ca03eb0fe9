"""Generated images Q per real exemplar: Break-a-Scene customization, sampling from the templates, R_Q by
GroundingDINO and SAM, written in the synthetic world's record. Resumable per exemplar.

Each exemplar's work goes to a folder of its own under a work root keyed by everything
that shapes it (the ``generate`` section, the detection and segmentation settings, the
template set, placeholder and queries per concept). It is built in a temp folder and
renamed into place whole when finished, so a killed run leaves no partial exemplar,
and a rerun skips the exemplars whose folder exists. The stage then assembles the
finished folders into ``data/generated``. Prior-preservation images are sampled once per
base class and kept beside them (``priors/<class>/``) for every exemplar of that class.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ardetect.config import Config
from ardetect.data.schema import GENERATED_COLUMNS, OBJECT_COLUMNS
from ardetect.data.templates import fill, templates_for
from ardetect.generation.detect import detect, label_map, mask_box, segment
from ardetect.generation.exemplars import object_rows
from ardetect.generation.models import load_grounding_dino, load_sam, load_stable_diffusion
from ardetect.tmpdirs import temp_dir_beside

log = logging.getLogger("ardetect.generation")

BACKEND = "break_a_scene"
DROP_REASONS = ("no_detection", "multi_instance", "empty_mask", "box_too_small")
DONE = "done.json"


@dataclass(frozen=True)
class ExemplarJob:
    """One exemplar to customize on (plain values, so it pickles to a Dask worker)."""

    concept_id: str
    base_class: str
    group: str
    image: str  # absolute path
    mask: str  # absolute path
    seed: int


def jobs_from_table(exemplars: pd.DataFrame, data_root: Path) -> list[ExemplarJob]:
    root = Path(data_root).resolve()
    return [ExemplarJob(str(r.concept_id), str(r.base_class), str(r.group), str(root / r.image), str(root / r.mask), int(r.seed))
            for r in exemplars.itertuples(index=False)]


def settings(cfg: Config) -> dict:
    """Everything that shapes an exemplar's generated images (the work root's key). How the work is spread (workers,
    scheduler, MLflow batches, the device) is left out: changing it after a stop resumes the finished exemplars."""
    real = cfg.exemplars.real
    return {
        "generate": cfg.generate.model_dump(exclude={"workers": True, "scheduler": True, "batch_size": True,
                                                     "customization": {"device"}}),
        "detect": {k: getattr(real, k) for k in ("grounding_dino", "sam_checkpoint", "sam_model_type", "min_box_side", "min_box_area")},
        "world": {k: getattr(cfg.world, k) for k in ("template_set", "placeholder", "queries_per_concept")},
    }


def work_root(cfg: Config, data_root: Path) -> Path:
    key = hashlib.sha256(json.dumps(settings(cfg), sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(data_root) / ".generate-work" / key


def query_seed(seed: int, j: int) -> int:
    return int(np.random.SeedSequence([seed, 29, j]).generate_state(1)[0] >> 1)


def choose_templates(job: ExemplarJob, cfg: Config):
    """``queries_per_concept`` templates of the exemplar's group, in a seeded order (repeating when more are asked)."""
    temps = templates_for(job.group, cfg.world.template_set)
    rng = np.random.default_rng([job.seed, 31])
    order = list(rng.permutation(len(temps)))
    while len(order) < cfg.world.queries_per_concept:
        order += list(rng.permutation(len(temps)))
    return [temps[i] for i in order[: cfg.world.queries_per_concept]]


@lru_cache(maxsize=2)
def _detectors(grounding_dino: str, sam_checkpoint: str | None, sam_model_type: str, device: str | None):
    """GroundingDINO and SAM, loaded once per process."""
    return load_grounding_dino(grounding_dino, device=device), load_sam(sam_checkpoint, sam_model_type, device=device)


def class_priors(pipe, base_class: str, c, root: Path, prior_class_images) -> list[Image.Image]:
    """The plain-class images of prior preservation, sampled once per class from the base model and kept under
    ``root/priors/<class>/`` (built in a temp folder, renamed into place) for every exemplar of that class."""
    folder = Path(root) / "priors" / base_class.replace("/", "_").replace(" ", "_")
    if not (folder / DONE).is_file():
        seed = int(np.random.SeedSequence([37, *base_class.encode()]).generate_state(1)[0] >> 1)
        images = prior_class_images(pipe, base_class, c.prior_images, seed, c)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_dir_beside(folder)
        try:
            for i, im in enumerate(images):
                im.save(tmp / f"{i:03d}.png", format="PNG")
            (tmp / DONE).write_text(json.dumps({"class": base_class, "seed": seed, "images": len(images)}))
            try:
                os.replace(tmp, folder)
            except OSError:  # another worker finished the same class first
                if not (folder / DONE).is_file():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    out = []
    for f in sorted(folder.glob("*.png"))[: c.prior_images]:
        with Image.open(f) as im:
            out.append(im.convert("RGB"))
    return out


def finished(job: ExemplarJob, root: Path) -> bool:
    return (Path(root) / job.concept_id / DONE).is_file()


def job_inputs(job: ExemplarJob) -> str:
    """A digest of what an exemplar's work folder was made from: the job and its image's and mask's bytes. The work
    root's key holds the settings only, and a concept id names another exemplar once the exemplars are drawn again
    (another seed, classes or annotation file, another detection threshold)."""
    h = hashlib.sha256(json.dumps(asdict(job), sort_keys=True).encode())
    for f in (job.image, job.mask):
        h.update(hashlib.sha256(Path(f).read_bytes()).digest())
    return h.hexdigest()[:16]


def run_exemplar(job: ExemplarJob, cfg: Config, root: Path) -> dict:
    """Customize on one exemplar, sample its queries, box them; return its summary (skipped if already finished from
    the same inputs; made again, replacing the old folder once done, if they changed)."""
    from ardetect.generation.customize import customize, prior_class_images, sample_many

    root = Path(root)
    final = root / job.concept_id
    inputs = job_inputs(job)
    if (final / DONE).is_file():
        done = json.loads((final / DONE).read_text())
        if done.get("inputs") == inputs:
            return {**done, "resumed": True}
        log.info("exemplar %s: its finished work folder was made from other inputs (%s, not %s): made again",
                 job.concept_id, done.get("inputs"), inputs)
    root.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_beside(root / job.concept_id)
    try:
        summary = _build(job, cfg, tmp, customize, prior_class_images, sample_many, inputs)
        if final.exists():  # a folder without its done marker cannot come from a rename; clear it
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return {**summary, "resumed": False}


def _build(job: ExemplarJob, cfg: Config, out: Path, customize, prior_class_images, sample_many, inputs: str | None = None) -> dict:
    c, real, g = cfg.generate.customization, cfg.exemplars.real, cfg.generate
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    gd, sam = _detectors(real.grounding_dino, real.sam_checkpoint, real.sam_model_type, real.device or c.device)
    pipe = load_stable_diffusion(c.base_model, device=c.device)
    timings["load"] = time.perf_counter() - t0
    with Image.open(job.image) as im:
        image = im.convert("RGB")
    mask = np.asarray(Image.open(job.mask)) > 0
    t0 = time.perf_counter()
    prior = class_priors(pipe, job.base_class, c, out.parent, prior_class_images) if c.prior_preservation else None
    timings["prior"] = time.perf_counter() - t0
    phrase, report = customize(pipe, image, mask, job.base_class, c, job.seed, prior_images=prior)
    timings.update({f"customize_{k}": v for k, v in report.seconds.items()})
    (out / "images").mkdir()
    (out / "labels").mkdir()
    rows, objects, drops = [], [], []
    idx = int(job.concept_id.lstrip("c"))
    templates = choose_templates(job, cfg)
    seeds = [query_seed(job.seed, j) for j in range(len(templates))]
    t0 = time.perf_counter()  # every query sampled first, c.sample_batch to a call, each with its own recorded seed
    images = sample_many(pipe, [fill(t.text, job.base_class, c.token + " {}")[0] for t in templates], seeds, c)
    t_sample = time.perf_counter() - t0
    t_detect = 0.0
    for j, (t, seed, q) in enumerate(zip(templates, seeds, images)):
        qid = f"q{idx:05d}_{j:02d}"
        prompt, record_phrase = fill(t.text, job.base_class, cfg.world.placeholder)
        t0 = time.perf_counter()
        dets = detect(gd, q, job.base_class, g.box_threshold, g.text_threshold)
        drop = None
        if not dets:
            drop = ("no_detection", f"no {job.base_class!r} box at box_threshold={g.box_threshold}")
        elif len(dets) > g.max_instances:
            drop = ("multi_instance", f"{len(dets)} {job.base_class!r} boxes, max_instances={g.max_instances}")
        else:
            masks = segment(sam, np.asarray(q), [d.box for d in dets])
            labels = label_map(masks)
            box = mask_box(labels == 1)
            if box is None:
                drop = ("empty_mask", f"SAM's mask of box {list(dets[0].box)} is empty")
            elif min(box[2] - box[0], box[3] - box[1]) < real.min_box_side or (box[2] - box[0]) * (box[3] - box[1]) < real.min_box_area:
                drop = ("box_too_small", f"mask box {list(box)} under min_box_side={real.min_box_side} or min_box_area={real.min_box_area}")
        t_detect += time.perf_counter() - t0
        if drop is not None:
            drops.append({"query_id": qid, "concept_id": job.concept_id, "prompt": prompt, "seed": seed,
                          "reason": drop[0], "detail": drop[1]})
            log.info("generated image %s dropped (%s): %s", qid, *drop)
            continue
        q.save(out / "images" / f"{qid}.png", format="PNG")
        Image.fromarray(labels, mode="L").save(out / "labels" / f"{qid}.png", format="PNG")
        rows.append({
            "query_id": qid, "concept_id": job.concept_id, "prompt": prompt, "concept_phrase": record_phrase,
            "template": t.text, "medium": t.medium, "scene": t.scene, "image": f"images/{qid}.png",
            "width": q.width, "height": q.height, "box": list(box), "backend": BACKEND, "seed": seed,
        })
        roles = [("concept", job.concept_id)] + [("distractor", None)] * (len(dets) - 1)
        objects += object_rows(labels, roles, job.base_class, rows[-1]["image"], f"labels/{qid}.png")
    timings["sample"], timings["detect"] = t_sample, t_detect
    pd.DataFrame(rows, columns=list(GENERATED_COLUMNS)).to_parquet(out / "generated.parquet", index=False)
    pd.DataFrame(objects, columns=list(OBJECT_COLUMNS)).to_parquet(out / "objects.parquet", index=False)
    summary = {"job": asdict(job), "inputs": inputs, "kept": len(rows), "drops": drops, "seconds": timings, "losses": report.losses,
               "ti_steps": report.ti_steps, "joint_steps": report.joint_steps}
    (out / DONE).write_text(json.dumps(summary, indent=1))  # last: marks the folder finished
    return summary


def assemble(jobs: list[ExemplarJob], root: Path, out_dir: Path, data_root: Path) -> tuple[pd.DataFrame, pd.DataFrame, list[dict]]:
    """Copy the finished exemplars' images under ``out_dir``; return the generated and objects tables and all drops."""
    for sub in ("images", "labels"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    rel = Path(out_dir).relative_to(data_root).as_posix()
    tables, objects, drops = [], [], []
    for job in jobs:
        src = Path(root) / job.concept_id
        if not (src / DONE).is_file():
            raise FileNotFoundError(f"exemplar {job.concept_id} has no finished work folder at {src}")
        t = pd.read_parquet(src / "generated.parquet")
        o = pd.read_parquet(src / "objects.parquet")
        for sub in ("images", "labels"):
            for f in sorted((src / sub).iterdir()):
                shutil.copy2(f, out_dir / sub / f.name)
        t["image"] = [f"{rel}/{p}" for p in t["image"]]
        o["image"] = [f"{rel}/{p}" for p in o["image"]]
        o["mask"] = [f"{rel}/{p}" for p in o["mask"]]
        tables.append(t)
        objects.append(o)
        drops += json.loads((src / DONE).read_text())["drops"]
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=list(GENERATED_COLUMNS))
    objs = pd.concat(objects, ignore_index=True) if objects else pd.DataFrame(columns=list(OBJECT_COLUMNS))
    return table, objs, drops


def clear_stale(root: Path) -> int:
    """Remove temp folders a killed run left in the work root; return how many."""
    n = 0
    if Path(root).is_dir():
        for p in [*Path(root).glob(".c*.tmp-*"), *Path(root).glob("priors/.*.tmp-*")]:
            shutil.rmtree(p, ignore_errors=True)
            n += 1
    return n
