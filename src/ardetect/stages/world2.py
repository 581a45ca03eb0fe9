"""Stage ``world2``: a second synthetic world with unseen identities (another seed), all test.

The trained models never see it; ``evaluate`` reports it beside the main test split
as a generalisation check. It passes the same quality gate as the main world (``validate``'s
expectations, the split's shares aside: all of it is test), its report in ``checks.json``; a
world that fails it is not written. Its concepts are dealt into seeded blocks of
``evaluate.generalisation_block`` (by default as many as the test split holds, so a
world2 query ranks as many candidates as a test query does); a query's negatives are
the other concepts of its block.
"""

from __future__ import annotations


import pandas as pd

from ardetect import tracking
from ardetect.config import Config
from ardetect.data.tuples import build_negatives, build_tuples, concept_blocks, statistics
from ardetect.data.schema import OBJECT_COLUMNS, check_columns, write_parquet_atomic
from ardetect.stages.common import DATA, StageError, atomic_dir, rebase_paths, run_stage

OUT = DATA / "world2"


def build(cfg: Config) -> dict:
    from ardetect.config import SplitConfig
    from ardetect.data.quality import validate_tuples
    from ardetect.data.world import make_exemplars, make_generated

    ev = cfg.evaluate
    wcfg = cfg.world.model_copy(
        update={"seed": ev.generalisation_world_seed, "n_concepts": ev.generalisation_concepts,
                "queries_per_concept": ev.generalisation_queries_per_concept}
    )
    with atomic_dir(OUT) as tmp:
        ex, ex_objects = make_exemplars(wcfg, tmp / "exemplars", DATA)
        gen, gen_objects = make_generated(wcfg, ex, tmp / "generated", DATA)
        objects = pd.concat([ex_objects, gen_objects], ignore_index=True)
        for table in (ex, gen):  # ids unique across both worlds
            table["concept_id"] = "w2_" + table["concept_id"]
        # a distractor has no concept (None, which the concatenation may read back as NaN)
        objects["concept_id"] = [None if pd.isna(c) else f"w2_{c}" for c in objects["concept_id"]]
        check_columns(objects, OBJECT_COLUMNS, "world2 objects")
        gen["query_id"] = "w2_" + gen["query_id"]
        splits = pd.Series("test", index=pd.Index(ex["concept_id"], name="concept_id"), name="split")
        tuples = build_tuples(ex, gen, splits)
        blocks = concept_blocks(ex["concept_id"], ev.generalisation_block, ev.generalisation_world_seed)
        negatives = pd.concat(
            [build_negatives(tuples[tuples["concept_id"].isin(b)], ex[ex["concept_id"].isin(b)], splits.loc[b]) for b in blocks],
            ignore_index=True,
        )
        all_test = SplitConfig.model_construct(train=0.0, val=0.0, test=1.0)  # (a config refuses an empty split)
        dc = wcfg.distractors
        result = validate_tuples(tuples, negatives, DATA, cfg.validate_, all_test, placeholder=wcfg.placeholder, objects=objects,
                                 exemplars=ex, generated=gen, distractors=(dc.min_count, dc.max_count))  # as written, in tmp
        if not result.success:
            raise StageError(f"world2 failed its quality gate, so it is not written:\n{result.message()}")
        tracking.write_json_atomic(result.summary(), tmp / "checks.json")
        for table, columns in ((ex, ("image", "mask")), (gen, ("image",)), (objects, ("image", "mask")),
                               (tuples, ("query_image", "train_image")), (negatives, ("neg_image",))):
            for column in columns:
                table[column] = rebase_paths(table[column], tmp, OUT, DATA)
        write_parquet_atomic(objects, tmp / "objects.parquet")
        write_parquet_atomic(tuples, tmp / "tuples.parquet")
        write_parquet_atomic(negatives, tmp / "negatives.parquet")
        stats = statistics(tuples, negatives)
        tracking.write_json_atomic(stats, tmp / "stats.json")
    return {"tuples": stats["tuples"], "concepts": stats["concepts"], "blocks": len(blocks), "negatives_min": stats["negatives"]["min_per_tuple"],
            "expectations": len(result.checks), "memorisation_events": len(result.memorisation)}


def main() -> None:
    run_stage("world2", build, lambda c: {"world": c.world.model_dump(), "evaluate": c.evaluate.model_dump(),
                                          "validate": c.validate_.model_dump()})


if __name__ == "__main__":
    main()
