"""Stage ``generate``: customized-generator images Q of each concept, with boxes R_Q."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from ardetect import tracking
from ardetect.config import Config
from ardetect.data.schema import EXEMPLAR_COLUMNS, GENERATED_COLUMNS, read_table, write_parquet_atomic
from ardetect.stages.common import DATA, atomic_dir, rebase_paths, run_stage, write_image_record

OUT = DATA / "generated"


def log_batches(summaries: list[dict], table, data_root, batch_size: int) -> int:
    """One MLflow child run per ``batch_size`` exemplars: timings, kept and dropped counts by reason, a sample image
    of each exemplar. Needs an active run (the stage's); returns how many child runs were logged."""
    if not tracking.tracks():
        return 0
    import mlflow
    from PIL import Image

    if mlflow.active_run() is None:
        return 0
    first = table.drop_duplicates("concept_id").set_index("concept_id")["image"] if len(table) else {}
    n = 0
    for b in range(0, len(summaries), batch_size):
        batch = summaries[b : b + batch_size]
        ids = [s["job"]["concept_id"] for s in batch]
        reasons = Counter(d["reason"] for s in batch for d in s["drops"])
        seconds: Counter = Counter()
        for s in batch:
            seconds.update(s["seconds"])
        with mlflow.start_run(run_name=f"generate {ids[0]}-{ids[-1]}", nested=True,
                              tags={"ard.kind": "generate_batch", "ard.exemplars": ",".join(ids), **tracking.process_tags()}):
            tracking.log_metrics({
                "exemplars": len(batch), "resumed": sum(bool(s.get("resumed")) for s in batch),
                "kept": sum(s["kept"] for s in batch), "dropped": sum(reasons.values()),
                **{f"dropped_{k}": v for k, v in reasons.items()},
                **{f"seconds_{k}": v for k, v in seconds.items()},
                "seconds_per_exemplar": sum(seconds.values()) / len(batch),
            })
            tracking.log_dict({"exemplars": batch}, "batch.json")
            for cid in ids:
                if cid in first:
                    with Image.open(data_root / first[cid]) as im:
                        mlflow.log_image(im.copy(), artifact_file=f"samples/{cid}.png")
        n += 1
    return n


def build_real(cfg: Config, exemplars) -> dict:
    """Break-a-Scene customization per exemplar, generated images boxed by GroundingDINO and SAM, in the same record."""
    from ardetect.generation.real import generate_real

    with atomic_dir(OUT) as tmp:
        res = generate_real(cfg, exemplars, tmp, DATA)
        batches = log_batches(res.summaries, res.table, DATA, cfg.generate.batch_size)  # images still under tmp
        table, objects = res.table.copy(), res.objects.copy()
        write_image_record(tmp, OUT, table, objects, GENERATED_COLUMNS, "generated", "generated.parquet", ("image",))
        tracking.write_json_atomic({"drops": res.drops, "counts": res.drop_counts}, tmp / "drops.json")
        detections = second_detections(cfg, table, exemplars, tmp, OUT, DATA)
        write_parquet_atomic(detections, tmp / "detections.parquet")
    tracking.log_dict({"per_medium": dict(Counter(table["medium"])), "drops": res.drop_counts}, "generated_counts.json")
    tracking.log_dict({"drops": res.drops, "exemplars": res.summaries}, "generated_exemplars.json")
    return {"generated": len(table), "media": table["medium"].nunique(), "scenes": table["scene"].nunique(),
            "objects": len(objects), "dropped": len(res.drops), **{f"dropped_{k}": v for k, v in res.drop_counts.items()},
            "exemplars_resumed": sum(bool(s.get("resumed")) for s in res.summaries), "batch_runs": batches}


def second_detections(cfg: Config, table, exemplars, tmp: Path, out: Path, data_root: Path):
    """GroundingDINO run again on every generated image with its base class alone: the independent
    box the quality gate holds each R_Q (GroundingDINO's box refined by SAM's mask) against."""
    from ardetect.data.content import detect_phrases
    from ardetect.generation.detect import detect
    from ardetect.generation.models import load_grounding_dino

    r, g = cfg.exemplars.real, cfg.generate
    gd = load_grounding_dino(r.grounding_dino, device=r.device)
    base = dict(zip(exemplars["concept_id"].astype(str), exemplars["base_class"].astype(str)))
    queries = table.assign(base_class=table["concept_id"].astype(str).map(base), query_image=table["image"])
    # the images still sit under ``tmp``: read them there, record them by their final paths
    queries["query_image"] = [str(Path(tmp).relative_to(data_root) / Path(i).relative_to(Path(out).relative_to(data_root)))
                              for i in queries["image"].astype(str)]
    found = detect_phrases(queries, data_root, lambda im, text: [(d.box, d.score) for d in
                                                                 detect(gd, im, text, g.box_threshold, g.text_threshold)])
    return found.assign(image=rebase_paths(found["image"], tmp, out, data_root))


def build(cfg: Config) -> dict:
    exemplars = read_table(DATA / "exemplars" / "exemplars.parquet", EXEMPLAR_COLUMNS, "exemplars")
    if cfg.generate.backend != "synthetic":
        return build_real(cfg, exemplars)
    from ardetect.data.world import make_generated

    with atomic_dir(OUT) as tmp:
        table, objects = make_generated(cfg.world, exemplars, tmp, DATA)
        write_image_record(tmp, OUT, table, objects, GENERATED_COLUMNS, "generated", "generated.parquet", ("image",))
    tracking.log_dict(
        {"per_medium": dict(Counter(table["medium"])), "per_scene": dict(Counter(table["scene"]))}, "generated_counts.json"
    )
    return {"generated": len(table), "media": table["medium"].nunique(), "scenes": table["scene"].nunique(), "objects": len(objects)}


def main() -> None:
    run_stage("generate", build, lambda c: {"world": c.world.model_dump(), "generate": c.generate.model_dump()})


if __name__ == "__main__":
    main()
