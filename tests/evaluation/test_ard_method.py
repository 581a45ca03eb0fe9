"""ARD in the harness: cached candidate features score exactly as a fresh forward pass."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from ardetect.evaluation.ard import ARDMethod
from ardetect.model import ModelConfig, build


def test_cached_features_match_a_fresh_forward(tmp_path):
    torch.manual_seed(0)
    model = build(ModelConfig.named("nano", num_queries=16, image_size=(64, 64))).eval()
    rng = np.random.default_rng(0)
    paths = []
    for i, side in enumerate((64, 80, 64, 72)):  # the originals' sizes differ: boxes scale back to each
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(tmp_path / f"x{i}.png")
        paths.append(f"x{i}.png")
    query = pd.Series({"query_image": "x0.png", "query_box": [8.0, 10.0, 40.0, 50.0], "prompt": "A photo of a V* cat.", "concept_phrase": "V* cat"})
    method = ARDMethod(model, tmp_path, 64, batch=3, max_cached=3)
    first = method.score(query, paths[1:])
    assert len(method._features) == 3
    again = method.score(query, paths[::-1])  # x0 is new: the oldest entry is evicted, the rest reused
    assert len(method._features) == 3
    np.testing.assert_allclose(again.scores[::-1][1:], first.scores, atol=1e-5)

    # the same through a plain forward pass on the images
    q_img, q_box = method._image("x0.png")[0][None], torch.tensor([[8.0, 10.0, 40.0, 50.0]]) * 64 / 64
    cache = model.encode_query(q_img, q_box, [query["prompt"]], [query["concept_phrase"]])
    imgs = torch.stack([method._image(p)[0] for p in paths[1:]])
    sizes = torch.tensor([method._image(p)[1] for p in paths[1:]])
    boxes, scores = model.predict_region(imgs, cache, image_sizes=sizes)
    np.testing.assert_allclose(first.scores, scores.numpy(), atol=1e-5)
    np.testing.assert_allclose(first.boxes, boxes.numpy(), atol=1e-3)
    assert first.boxes[0, 2] <= 80 and (first.boxes >= 0).all()


def _variants(tmp_path):
    """ARD- and an ARD that differs only in its adapters, four random images and two queries."""
    import copy

    torch.manual_seed(0)
    minus = build(ModelConfig.named("nano", num_queries=16, image_size=(64, 64))).eval()
    with torch.no_grad():  # random logits are large enough to saturate the sigmoid: scale them down
        minus.adapter_query.weight.mul_(1e-3)
    ard = copy.deepcopy(minus)
    with torch.no_grad():  # phase 2 changes only the adapters
        ard.adapter_query.weight.add_(1e-3 * torch.randn_like(ard.adapter_query.weight))
        ard.adapter_text.bias.add_(0.5)
    rng = np.random.default_rng(1)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / f"x{i}.png")
    tuples = pd.DataFrame({
        "tuple_id": ["t0", "t1"], "query_image": ["x0.png", "x1.png"], "query_box": [[8.0, 10.0, 40.0, 50.0], [4.0, 4.0, 30.0, 60.0]],
        "prompt": ["A photo of a V* cat.", "An ink drawing of a V* mug."], "concept_phrase": ["V* cat", "V* mug"],
        "train_image": ["x2.png", "x3.png"], "train_box": [[0.0, 0.0, 32.0, 32.0]] * 2, "medium": ["photo", "ink drawing"],
        "base_class": ["cat", "mug"],
    })
    negatives = pd.DataFrame({"tuple_id": ["t0", "t0", "t1"], "neg_image": ["x3.png", "x1.png", "x2.png"]})
    return ard, minus, tuples, negatives


def test_shared_trunk_scores_each_variant_as_its_own_model(tmp_path):
    from ardetect.evaluation.ard import SharedTrunkARD
    from ardetect.evaluation.harness import evaluate_method

    ard, minus, tuples, negatives = _variants(tmp_path)
    shared = SharedTrunkARD({"ARD": ard, "ARD-": minus}, tmp_path, 64, batch=2)
    together = {m.name: evaluate_method(m, tuples, negatives, progress=False) for m in shared.methods()}
    for name, model in (("ARD", ard), ("ARD-", minus)):
        alone = evaluate_method(ARDMethod(model, tmp_path, 64, name=name), tuples, negatives, progress=False)
        np.testing.assert_allclose(together[name].per_query["score"], alone.per_query["score"], atol=1e-5)
        assert together[name].summary == alone.summary
    assert not shared._pending  # every stashed answer was collected
    assert not np.allclose(together["ARD"].per_query["score"], together["ARD-"].per_query["score"])
    with torch.no_grad():
        ard.input_proj[0][0].weight.add_(1.0)  # outside the adapters: not a variant any more
    with pytest.raises(ValueError, match="outside the adapters"):
        SharedTrunkARD({"ARD": ard, "ARD-": minus}, tmp_path, 64).methods()[1].score(tuples.iloc[0], ["x2.png"])
    from ardetect.model.detector import check_variants

    classified = copy.deepcopy(minus)
    classified.add_region_classifier(["cat", "mug"], 16)
    with pytest.raises(ValueError, match=r"variant 'ARD' has other parameters than the shared model .*region_classifier"):
        check_variants(minus, {"ARD": classified})  # was a bare KeyError naming one weight


def test_shared_trunk_identity_weights_match_each_model_alone(tmp_path):
    from ardetect.evaluation.ard import SharedTrunkARD
    from ardetect.evaluation.harness import evaluate_method

    ard, minus, tuples, negatives = _variants(tmp_path)
    shared = SharedTrunkARD({"ARD": ard, "ARD-": minus}, tmp_path, 64, batch=2, top_k=3, identity=True, grids=[1, 2])
    methods = [*shared.methods({"ARD": (4.0, 1), "ARD-": (3.0, 2)}), shared.method("ARD paper", "ARD")]
    together = {m.name: evaluate_method(m, tuples, negatives, progress=False) for m in methods}
    assert not shared._pending
    for name, model, w, g in (("ARD", ard, 4.0, 1), ("ARD-", minus, 3.0, 2), ("ARD paper", ard, 0.0, 1)):
        alone = evaluate_method(ARDMethod(model, tmp_path, 64, name=name, identity_weight=w, top_k=3, grid=g), tuples, negatives, progress=False)
        np.testing.assert_allclose(together[name].per_query["score"], alone.per_query["score"], atol=1e-5)
    # the re-ranked score is the probability discounted by the region similarity: never above it
    assert (together["ARD"].per_query["score"] <= together["ARD paper"].per_query["score"] + 1e-6).all()
    assert not np.allclose(together["ARD"].per_query["score"], together["ARD paper"].per_query["score"])
    # fitting both variants' weights runs the detector once per query
    from ardetect.evaluation.ard import fit_identity_weights

    fresh = SharedTrunkARD({"ARD": ard, "ARD-": minus}, tmp_path, 64, batch=2, top_k=3, identity=True)
    calls = []
    run = fresh.runner.candidates_variants
    fresh.runner.candidates_variants = lambda *a, **k: calls.append(1) or run(*a, **k)
    fitted = fit_identity_weights(fresh, ["ARD", "ARD-"], tuples, negatives, [0.0, 4.0])
    assert len(calls) == len(tuples) and not fresh._pending
    assert set(fitted) == {"ARD", "ARD-"} and all(w in (0.0, 4.0) and g == 1 and a == 0.0 for w, g, a, _ in fitted.values())
    # with two pooling grids: still one detector pass per query; w = 0 is tried once
    two = SharedTrunkARD({"ARD": ard, "ARD-": minus}, tmp_path, 64, batch=2, top_k=3, identity=True, grids=[2, 1])
    calls.clear()
    run2 = two.runner.candidates_variants
    two.runner.candidates_variants = lambda *a, **k: calls.append(1) or run2(*a, **k)
    fitted = fit_identity_weights(two, ["ARD"], tuples, negatives, [0.0, 4.0])
    assert len(calls) == len(tuples) and set(fitted["ARD"][3]) == {(1, 0.0, 0.0), (1, 4.0, 0.0), (2, 4.0, 0.0)}
    with pytest.raises(ValueError, match="grid=3"):
        two.method("x", "ARD", 1.0, 3)
    # the paper's score (w = 0) uses no grid: a trunk of 2x2 descriptors only still scores it
    only2 = SharedTrunkARD({"ARD": ard}, tmp_path, 64, batch=2, top_k=3, identity=True, grids=[2])
    paper = evaluate_method(only2.method("ARD paper", "ARD"), tuples, negatives, progress=False)
    np.testing.assert_allclose(paper.per_query["score"], together["ARD paper"].per_query["score"], atol=1e-5)
    with pytest.raises(ValueError, match="grids=\\[0\\]"):
        SharedTrunkARD({"ARD": ard}, tmp_path, 64, grids=[0])
    with pytest.raises(ValueError, match="already a method"):
        shared.method("ARD", "ARD-")
    with pytest.raises(ValueError, match="variant='ARD2'"):
        shared.method("x", "ARD2")
    with pytest.raises(ValueError, match="identity=True"):
        SharedTrunkARD({"ARD": ard}, tmp_path, 64).method("ARD", "ARD", 1.0)


def _four_queries() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Four made-up test tuples with 11 negatives each (the stub trunks below score them)."""
    tuples = pd.DataFrame({
        "tuple_id": [f"t{i}" for i in range(4)], "query_image": ["q.png"] * 4, "query_box": [[0.0, 0.0, 10.0, 10.0]] * 4,
        "prompt": ["p"] * 4, "concept_phrase": ["V* cat"] * 4, "train_image": [f"x{i}.png" for i in range(4)],
        "train_box": [[0.0, 0.0, 10.0, 10.0]] * 4, "medium": ["photo"] * 4, "base_class": ["cat"] * 4,
    })
    return tuples, pd.DataFrame({"tuple_id": np.repeat(tuples["tuple_id"], 11), "neg_image": [f"n{j}.png" for j in range(11)] * 4})


def test_fit_identity_weight_takes_the_best_recall_and_the_smaller_weight_on_ties():
    from ardetect.evaluation.ard import fit_identity_weights
    from ardetect.evaluation.harness import Scores

    # query q_i's positive scores 1 - rank_w(i) / 20 against 11 negatives at 0.9, 0.8, ...: rank = 1 + negatives above it
    ranks = {
        (1, 0.0): [12, 12, 1, 1], (1, 1.0): [1, 12, 1, 1], (1, 2.0): [1, 12, 1, 12], (1, 5.0): [1, 12, 1, 1],
        (2, 1.0): [12, 12, 12, 1], (2, 2.0): [1, 12, 1, 1], (2, 5.0): [1, 12, 1, 12],
    }

    class Trunk:
        grids = (1, 2)

        def prefetch(self, tuples, negatives, workers=None, progress=False, keep=None):  # the scores are made up: nothing to run ahead
            pass

        def method(self, label, variant, w, grid, class_weight=0.0):
            class M:
                name, region_level, identity_weight = label, True, w

                def score(self, query, candidates):
                    r = ranks[(M.grid, w)][int(query["tuple_id"][1])]
                    neg = 0.95 - 0.05 * np.arange(len(candidates) - 1)
                    pos = 1.0 if r == 1 else neg[r - 2] - 0.01
                    box = np.array([[0.0, 0.0, 10.0, 10.0]] * len(candidates))
                    return Scores(np.concatenate([[pos], neg]), box)

            M.grid, M.class_weight = grid, class_weight
            return M()

    tuples, negatives = _four_queries()
    fitted = fit_identity_weights(Trunk(), ["ARD", "ARD-"], tuples, negatives, [5.0, 0.0, 1.0, 2.0])
    best, grid, a, recalls = fitted["ARD"]
    assert a == 0.0
    assert recalls == {(g, w, 0.0): r for (g, w), r in {
        (1, 0.0): 0.5, (1, 1.0): 0.75, (1, 2.0): 0.5, (1, 5.0): 0.75, (2, 1.0): 0.25, (2, 2.0): 0.75, (2, 5.0): 0.5}.items()}
    assert (best, grid) == (1.0, 1)  # (1, 1x1), (5, 1x1) and (2, 2x2) tie at 0.75: the coarser grid, then the smaller weight
    ranks[(2, 5.0)] = [1, 1, 1, 1]  # 2x2 alone best: it wins
    assert fit_identity_weights(Trunk(), ["ARD"], tuples, negatives, [5.0, 0.0, 1.0, 2.0])["ARD"][:2] == (5.0, 2)
    assert fitted["ARD-"] == fitted["ARD"]  # the stub scores both variants alike
    with pytest.raises(ValueError, match="grid is empty"):
        fit_identity_weights(Trunk(), ["ARD"], tuples, negatives, [])
    # several metrics: their mean decides. Recall@10 alone ties (1, 1x1) with (2, 2x2) and the coarser grid wins;
    # Recall@1 separates them (the positive 5th for three queries under (1, 1x1), first under (2, 2x2))
    ranks.clear()
    ranks.update({key: [12] * 4 for key in ((1, 0.0), (1, 2.0), (1, 5.0), (2, 1.0), (2, 5.0))})
    ranks.update({(1, 1.0): [5, 5, 5, 12], (2, 2.0): [1, 12, 1, 1]})
    assert fit_identity_weights(Trunk(), ["ARD"], tuples, negatives, [5.0, 0.0, 1.0, 2.0])["ARD"][:2] == (1.0, 1)
    w, g, _, means = fit_identity_weights(Trunk(), ["ARD"], tuples, negatives, [5.0, 0.0, 1.0, 2.0], metric=["recall@1", "recall@10"])["ARD"]
    assert (w, g) == (2.0, 2) and means[(1, 1.0, 0.0)] == 0.375 and means[(2, 2.0, 0.0)] == 0.75
    with pytest.raises(ValueError, match="recall@3"):
        fit_identity_weights(Trunk(), ["ARD"], tuples, negatives, [1.0], metric=["recall@1", "recall@3"])
    with pytest.raises(ValueError, match="metric is empty"):
        fit_identity_weights(Trunk(), ["ARD"], tuples, negatives, [1.0], metric=[])


def test_prefetch_side_by_side_scores_as_one_query_at_a_time(tmp_path):
    """Queries scored ahead on two worker threads give the lazy path's scores, run the detector
    once per query, and leave torch's thread count as it was."""
    from ardetect.evaluation.ard import SharedTrunkARD
    from ardetect.evaluation.harness import evaluate_method

    ard, minus, tuples, negatives = _variants(tmp_path)
    # six queries over two candidate sets: the workers share the cached blocks of both
    tuples = pd.concat([tuples.assign(tuple_id=tuples["tuple_id"] + f"_{i}") for i in range(3)], ignore_index=True)
    negatives = pd.concat([negatives.assign(tuple_id=negatives["tuple_id"] + f"_{i}") for i in range(3)], ignore_index=True)
    make = lambda: SharedTrunkARD({"ARD": ard, "ARD-": minus}, tmp_path, 64, batch=2, top_k=3, identity=True, grids=[1, 2])  # noqa: E731
    lazy = make()
    expected = {m.name: evaluate_method(m, tuples, negatives, progress=False) for m in lazy.methods({"ARD": (4.0, 2)})}
    ahead = make()
    methods = ahead.methods({"ARD": (4.0, 2)})
    calls = []
    run = ahead.runner.candidates_variants
    ahead.runner.candidates_variants = lambda *a, **k: calls.append(torch.get_num_threads()) or run(*a, **k)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # (a parallel suite gives each worker one): the caller's count must come back
    try:
        ahead.prefetch(tuples, negatives, workers=2, progress=False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert calls == [1] * len(tuples)  # each query once, on one intra-op thread
    assert len(ahead._pending) == len(tuples)
    got = {m.name: evaluate_method(m, tuples, negatives, progress=False) for m in methods}
    assert len(calls) == len(tuples) and not ahead._pending  # the methods read what was scored ahead
    for name in expected:
        np.testing.assert_allclose(got[name].per_query["score"], expected[name].per_query["score"], atol=1e-5)
        assert got[name].summary == expected[name].summary
    ahead.prefetch(tuples.iloc[:0], negatives)  # nothing to do
    with pytest.raises(ValueError, match="workers=0"):
        make().prefetch(tuples, negatives, workers=0)


def test_fit_tries_each_class_weight_and_prefers_the_smaller_on_ties():
    from ardetect.evaluation.ard import fit_identity_weights
    from ardetect.evaluation.harness import Scores

    # Recall@10 of each (grid, w, a): the positive ranks first for the queries listed, 12th otherwise
    firsts = {(1, 0.0, 0.0): 1, (1, 0.0, 1.0): 2, (1, 0.0, 2.0): 2, (1, 4.0, 0.0): 2, (1, 4.0, 1.0): 3, (1, 4.0, 2.0): 3}

    class Trunk:
        grids = (1,)

        def prefetch(self, tuples, negatives, workers=None, progress=False, keep=None):
            pass

        def method(self, label, variant, w, grid, class_weight=0.0):
            class M:
                name, region_level, identity_weight = label, True, w

                def score(self, query, candidates):
                    top = int(query["tuple_id"][1]) < firsts[(grid, w, class_weight)]
                    neg = 0.95 - 0.05 * np.arange(len(candidates) - 1)
                    box = np.array([[0.0, 0.0, 10.0, 10.0]] * len(candidates))
                    return Scores(np.concatenate([[1.0 if top else 0.0], neg]), box)

            M.grid, M.class_weight = grid, class_weight
            return M()

    tuples, negatives = _four_queries()
    w, g, a, recalls = fit_identity_weights(Trunk(), ["ARD"], tuples, negatives, [0.0, 4.0], class_weights=[2.0, 0.0, 1.0])["ARD"]
    assert set(recalls) == set(firsts) and recalls[(1, 4.0, 1.0)] == 0.75
    assert (w, g, a) == (4.0, 1, 1.0)  # (4, 1) and (4, 2) tie at 0.75: the smaller class weight
    assert fit_identity_weights(Trunk(), ["ARD"], tuples, negatives, [0.0, 4.0])["ARD"][2] == 0.0  # default: no class weight


def test_prefetch_keeps_its_blocks_so_a_killed_evaluation_goes_on(tmp_path, capsys):
    """Blocks of scored queries are kept on disk: a run killed after the first block scores only the
    rest when run again, with the same scores; a changed image, a cut file or other weights are scored again."""
    from ardetect.evaluation.ard import SharedTrunkARD
    from ardetect.evaluation.harness import evaluate_method

    ard, minus, tuples, negatives = _variants(tmp_path)
    tuples = pd.concat([tuples.assign(tuple_id=tuples["tuple_id"] + f"_{i}") for i in range(3)], ignore_index=True)
    negatives = pd.concat([negatives.assign(tuple_id=negatives["tuple_id"] + f"_{i}") for i in range(3)], ignore_index=True)
    kept = tmp_path / "kept"
    make = lambda a=ard: SharedTrunkARD({"ARD": a, "ARD-": minus}, tmp_path, 64, batch=2, top_k=3, identity=True, grids=[1, 2])  # noqa: E731

    def counted(trunk, fail_after=None):
        calls, run = [], trunk.runner.candidates_variants

        def one(*a, **k):
            if fail_after is not None and len(calls) >= fail_after:
                raise KeyboardInterrupt("killed")
            calls.append(a[1]["tuple_id"])
            return run(*a, **k)

        trunk.runner.candidates_variants = one
        return calls

    lazy = make()
    expected = {m.name: evaluate_method(m, tuples, negatives, progress=False) for m in lazy.methods({"ARD": (4.0, 2)})}

    killed = make()
    counted(killed, fail_after=5)
    with pytest.raises(KeyboardInterrupt):
        killed.prefetch(tuples, negatives, workers=1, progress=False, keep=kept, block=4)
    files = sorted(kept.rglob("*.pt"))
    assert len(files) == 1 and files[0].parent.name == killed.fingerprint()  # the first block of 4; the second was cut short

    again = make()
    methods = again.methods({"ARD": (4.0, 2)})
    calls = counted(again)
    again.prefetch(tuples, negatives, workers=2, progress=False, keep=kept, block=4)
    assert calls == list(tuples["tuple_id"].iloc[4:])  # only the block that was not kept
    assert f"4 of 6 queries read back from {kept / again.fingerprint()}" in capsys.readouterr().out
    got = {m.name: evaluate_method(m, tuples, negatives, progress=False) for m in methods}
    assert calls == list(tuples["tuple_id"].iloc[4:])  # the methods read the kept and the new results alike
    for name in expected:
        np.testing.assert_allclose(got[name].per_query["score"], expected[name].per_query["score"], atol=1e-5)
        assert got[name].summary == expected[name].summary
    assert len(sorted(kept.rglob("*.pt"))) == 2

    # a changed candidate image: the blocks that name it are scored again
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(tmp_path / "x3.png")
    changed = make()
    calls = counted(changed)
    changed.prefetch(tuples, negatives, workers=1, progress=False, keep=kept, block=4)
    assert calls == list(tuples["tuple_id"])  # x3 is a candidate of every query
    # a kept file cut short: said, and scored again
    victim = sorted(kept.rglob("*.pt"))[0]
    victim.write_bytes(victim.read_bytes()[:100])
    cut = make()
    calls = counted(cut)
    cut.prefetch(tuples, negatives, workers=1, progress=False, keep=kept, block=4)
    assert len(calls) == 4 and "cannot be read" in capsys.readouterr().out
    # other weights: another folder, everything scored again
    import copy

    other = copy.deepcopy(ard)
    with torch.no_grad():
        other.adapter_text.bias.add_(0.1)
    retrained = make(other)
    assert retrained.fingerprint() != cut.fingerprint()
    calls = counted(retrained)
    retrained.prefetch(tuples, negatives, workers=1, progress=False, keep=kept, block=4)
    assert calls == list(tuples["tuple_id"])
    with pytest.raises(ValueError, match="block=0"):
        make().prefetch(tuples, negatives, keep=kept, block=0)
