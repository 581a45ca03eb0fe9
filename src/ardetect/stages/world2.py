"""Stage ``world2``: a second synthetic world with unseen identities (another seed), all test.

The trained models never see it; ``evaluate`` reports it beside the main test split
as a generalisation check. Its concepts are dealt into seeded blocks of
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
from ardetect.stages.common import DATA, atomic_dir, rebase_paths, run_stage

OUT = DATA / "world2"


def build(cfg: Config) -> dict:
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
        for table, columns in ((ex, ("image", "mask")), (gen, ("image",)), (objects, ("image", "mask"))):
            for column in columns:
                table[column] = rebase_paths(table[column], tmp, OUT, DATA)
        for table in (ex, gen):  # ids unique across both worlds
            table["concept_id"] = "w2_" + table["concept_id"]
        objects["concept_id"] = objects["concept_id"].map(lambda c: None if c is None else f"w2_{c}")
        check_columns(objects, OBJECT_COLUMNS, "world2 objects")
        write_parquet_atomic(objects, tmp / "objects.parquet")
        gen["query_id"] = "w2_" + gen["query_id"]
        splits = pd.Series("test", index=pd.Index(ex["concept_id"], name="concept_id"), name="split")
        tuples = build_tuples(ex, gen, splits)
        blocks = concept_blocks(ex["concept_id"], ev.generalisation_block, ev.generalisation_world_seed)
        negatives = pd.concat(
            [build_negatives(tuples[tuples["concept_id"].isin(b)], ex[ex["concept_id"].isin(b)], splits.loc[b]) for b in blocks],
            ignore_index=True,
        )
        write_parquet_atomic(tuples, tmp / "tuples.parquet")
        write_parquet_atomic(negatives, tmp / "negatives.parquet")
        stats = statistics(tuples, negatives)
        tracking.write_json_atomic(stats, tmp / "stats.json")
    return {"tuples": stats["tuples"], "concepts": stats["concepts"], "blocks": len(blocks), "negatives_min": stats["negatives"]["min_per_tuple"]}


def main() -> None:
    run_stage("world2", build, lambda c: {"world": c.world.model_dump(), "evaluate": c.evaluate.model_dump()})


if __name__ == "__main__":
    main()
