"""Phase 1 (positives, detector) and phase 2 (adapters, positives + negatives).

Library functions: they take the config, the tuple table and folders, and report
through callbacks; the DVC stages do the tracking. Each phase keeps ``latest.pt``
(the resume point, saved every N steps and at each epoch's end) and ``best.pt``
(best validation metric) in its output folder, and resumes from ``latest.pt``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from ardetect.config import Config
from ardetect.data.datasets import NegativeSampler, TupleDataset
from ardetect.devices import resolve_device
from ardetect.evaluation.ard import ARDMethod
from ardetect.evaluation.harness import evaluate_method
from ardetect.train.engine import (
    StepProgress, TrainState, distributed, load_checkpoint, load_model_file_state, load_named, model_file_state, read_resume_point,
    save_atomic, save_checkpoint, steps_per_epoch, train_one_epoch, wrap_ddp,
)
from ardetect.train.losses import SetCriterion, adapter_regulariser
from ardetect.train.matcher import HungarianMatcher

Logger = Callable[[dict, int], None]


def model_config(cfg: Config):
    """The ``ModelConfig`` that ``build_model`` builds from (without a ``model.pretrained`` checkpoint):
    checks a size, its overrides and the input side together (e.g. ``num_queries`` against the
    encoder tokens of the image size) without building the model."""
    from ardetect.model import ModelConfig

    return ModelConfig.named(cfg.model.size, **cfg.model_overrides)


def build_model(cfg: Config):
    """The detector of ``cfg.model`` (a named size plus overrides), from pretrained weights if named."""
    from ardetect.model import build

    if cfg.model.pretrained:
        from ardetect.model.convert import load_transformers_checkpoint

        return load_transformers_checkpoint(cfg.model.pretrained, **cfg.model_overrides)
    return build(model_config(cfg))


def image_size_of(model) -> int:
    h, w = model.cfg.image_size
    if h != w:
        raise ValueError(f"model image_size={[h, w]}: the training pipeline feeds square images")
    return h


def criterion_of(cfg: Config, phase: int) -> SetCriterion:
    loss = cfg.train_phase1.loss
    matcher = HungarianMatcher(loss.cost_class, loss.cost_bbox, loss.cost_giou, loss.focal_alpha, loss.focal_gamma)
    if phase == 1:
        return SetCriterion(
            matcher, loss.weight_class, loss.weight_bbox, loss.weight_giou, loss.focal_alpha, loss.focal_gamma,
            weight_align=loss.weight_align, align_temperature=loss.align_temperature, align_negatives=loss.align_negatives,
        )
    # phase 2: focal loss (the adapters change class logits, never boxes), and optionally the ranking loss (ours)
    p2 = cfg.train_phase2
    return SetCriterion(
        matcher, p2.lambda_cls, 0.0, 0.0, loss.focal_alpha, loss.focal_gamma,
        weight_rank=p2.lambda_rank, rank_grid=p2.rank_grid, rank_identity_weight=p2.rank_identity_weight, rank_top_k=p2.rank_top_k,
    )


@torch.no_grad()
def validation_metrics(model, tuples: pd.DataFrame, data_root: Path, image_size: int, vcfg=None, seed: int = 0) -> dict[str, float]:
    """Ranking metrics (IoU gate on) on a fixed, seeded subset of the val split against a fixed set of negatives.

    ``val_*`` are the paper's score (the most probable box). With ``vcfg.score`` 'reranked' (and a
    model with region tokens), ``val_reranked_*`` are the identity re-ranking's at the weight and
    pooling grid of ``vcfg``'s with the best Recall@5 there, and ``val_select`` (what the checkpoint
    is chosen by) is that Recall@5; else ``val_select`` is the paper score's. Both add 1e-3 x box accuracy.
    """
    from ardetect.config import ValidationConfig
    from ardetect.evaluation.ard import SharedTrunkARD, fit_identity_weights

    vcfg = vcfg or ValidationConfig()
    val = tuples[tuples["split"] == "val"]
    if val.empty:
        return {}
    rng = np.random.default_rng(seed)
    q = val.iloc[np.sort(rng.choice(len(val), size=min(vcfg.queries, len(val)), replace=False))]
    pool = val.drop_duplicates("concept_id")[["concept_id", "train_image"]]
    rows = []
    for _, t in q.iterrows():
        others = pool[pool["concept_id"] != t["concept_id"]]["train_image"].to_numpy()
        pick = others[rng.choice(len(others), size=min(vcfg.negatives, len(others)), replace=False)]
        rows.extend({"tuple_id": t["tuple_id"], "neg_image": p} for p in pick)
    negatives = pd.DataFrame(rows)
    was_training = model.training
    try:
        reranked = vcfg.score == "reranked" and model.cfg.region_tokens and max(vcfg.identity_weights) > 0
        if not reranked:
            summary = evaluate_method(ARDMethod(model, data_root, image_size, name="val"), q, negatives, progress=False).summary
            out = {f"val_{k}": v for k, v in summary.items() if k != "queries"}
            out["val_select"] = out["val_recall@5"] + 1e-3 * out["val_box_accuracy"]
            return out
        trunk = SharedTrunkARD({"val": model}, data_root, image_size, top_k=vcfg.top_k, identity=True, grids=vcfg.identity_grids)
        summaries: dict = {}
        weights = sorted(set(vcfg.identity_weights) | {0.0})
        w, g, _, _ = fit_identity_weights(trunk, ["val"], q, negatives, weights, metric="recall@5", summaries=summaries)["val"]
        paper = summaries[("val", min(trunk.grids), 0.0, 0.0)]
        best = summaries[("val", g, w, 0.0)]
    finally:
        model.train(was_training)
    out = {f"val_{k}": v for k, v in paper.items() if k != "queries"}
    out.update({f"val_reranked_{k}": v for k, v in best.items() if k in ("recall@1", "recall@5", "recall@10", "box_accuracy")})
    out.update(val_reranked_weight=float(w), val_reranked_grid=float(g))
    out["val_select"] = best["recall@5"] + 1e-3 * best["box_accuracy"]
    return out


def run_fingerprint(cfg: Config, phase: int, model, tuples: pd.DataFrame, start_from: Path | None = None) -> str:
    """What a resumable run depends on: the phase's settings, the model, the tuples, the starting weights.

    A ``latest.pt`` with another fingerprint belongs to another run (changed params or
    data): it is not resumed.
    """
    h = hashlib.sha256()
    section = cfg.train_phase1 if phase == 1 else cfg.train_phase2
    # the loader's processes build the same batches: a run may resume under others
    parts = {"phase": phase, "section": section.model_dump(mode="json", exclude={"loader_workers"}),
             "model": model.cfg.model_dump(mode="json"), "pretrained": cfg.model.pretrained}
    if phase == 2:  # phase 2's matcher and losses are phase 1's (phase 1's section already holds them)
        parts["loss"] = cfg.train_phase1.loss.model_dump(mode="json")
    h.update(json.dumps(parts, sort_keys=True, default=str).encode())
    h.update(pd.util.hash_pandas_object(tuples[["tuple_id", "split", "query_image", "train_image", "prompt"]], index=False).to_numpy().tobytes())
    if start_from is not None:
        h.update(hashlib.sha256(Path(start_from).read_bytes()).digest())
    return h.hexdigest()[:16]


def negative_sampler(p, tuples: pd.DataFrame, data_root: Path) -> NegativeSampler:
    """The phase's ``NegativeSampler`` over the training split; the distractor-class draw reads the
    exemplars' objects table (``data_root/exemplars/objects.parquet``)."""
    objects = None
    if p.distractor_class_negatives:
        from ardetect.data.schema import OBJECT_COLUMNS, read_table

        objects = read_table(data_root / "exemplars" / "objects.parquet", OBJECT_COLUMNS, "exemplars objects")
    return NegativeSampler(tuples, "train", p.k_negatives, p.seed, same_class=p.same_class_negatives,
                           distractor_class=p.distractor_class_negatives, objects=objects)


@dataclass
class PhaseResult:
    history: list[dict]
    best_metric: float
    best_epoch: int
    out_dir: Path


def _run(
    cfg: Config, phase: int, model, tuples: pd.DataFrame, data_root: Path, out_dir: Path, log: Logger | None, resume: bool,
    stop_after_steps: int | None = None, start_from: Path | None = None,
) -> PhaseResult:
    p = cfg.train_phase1 if phase == 1 else cfg.train_phase2
    rank, world = distributed()
    size = image_size_of(model)
    torch.manual_seed(p.seed)
    device = resolve_device(cfg.model.device)
    model.to(device).set_phase(phase)
    ddp_model = wrap_ddp(model)
    if phase == 1:
        from ardetect.model import param_groups

        groups = param_groups(model, p.lr, p.lr_backbone, p.lr_linear_proj_mult)
        batch_size, reg, lam = p.batch_size, None, 0.0  # batch_size groups: a positive and its k negatives (k = 0: the paper's phase 1)
        negatives = negative_sampler(p, tuples, data_root) if p.k_negatives else None
    else:
        groups = [{"params": model.adapter_parameters(), "lr": p.lr, "name": "adapters"}]
        batch_size = p.groups_per_step  # groups: one positive and its k negatives share the query (paper: 1 group a step)
        negatives = negative_sampler(p, tuples, data_root)
        reg = lambda: adapter_regulariser(model.adapter_query.weight, model.adapter_text.weight)  # noqa: E731
        lam = p.lambda_reg
    # the fused implementation updates every tensor of a group in one kernel: 34 -> 6 ms a phase-1 step on
    # 2 CPU cores (350 trainable tensors), where the default loops over the tensors op by op
    optimizer = torch.optim.AdamW(groups, lr=p.lr, weight_decay=p.weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, cfg.train_phase1.lr_drop_epochs, cfg.train_phase1.lr_gamma) if phase == 1 else None
    criterion = criterion_of(cfg, phase)
    train_ds = TupleDataset(tuples, data_root, "train", size, train=p.augment)
    out_dir.mkdir(parents=True, exist_ok=True)
    latest, best_path = out_dir / "latest.pt", out_dir / "best.pt"
    state, history = TrainState(), []
    fingerprint = run_fingerprint(cfg, phase, model, tuples, start_from)
    ck = read_resume_point(latest, f"phase {phase}") if resume else None
    if ck is not None:
        found = ck.get("fingerprint")
        if found == fingerprint:
            state, history, _ = load_checkpoint(latest, model, optimizer, scheduler, ck=ck)
            if rank == 0:
                print(f"[phase {phase}] resuming from {latest}: epoch {state.epoch}, step {state.step}")
        elif rank == 0:
            print(f"[phase {phase}] {latest} is from another run (fingerprint {found} != {fingerprint}): starting afresh")
    n_steps = steps_per_epoch(len(train_ds), batch_size, world, p.max_steps_per_epoch)
    meta = {"phase": phase, "model_config": model.cfg.model_dump(mode="json"), "fingerprint": fingerprint}

    def checkpoint() -> None:
        if rank == 0:
            save_checkpoint(latest, model, optimizer, scheduler, state, history, meta)

    progress = StepProgress(stop_after_steps)

    while state.epoch < p.epochs:
        epoch = state.epoch
        bar = progress.bar = tqdm(total=n_steps, initial=state.step, desc=f"phase {phase} epoch {epoch + 1}/{p.epochs}", disable=rank != 0, leave=False)

        train_stats = train_one_epoch(
            model, ddp_model, criterion, optimizer, train_ds, epoch, state, seed=p.seed, batch_size=batch_size,
            clip_grad=p.clip_grad, negatives=negatives, max_steps=p.max_steps_per_epoch, regulariser=reg, lambda_reg=lam,
            on_checkpoint=checkpoint, checkpoint_every=p.checkpoint_every, progress=progress,
            aux=phase == 1 and cfg.train_phase1.loss.aux_loss, workers=p.loader_workers, device=device,
        )
        bar.close()
        if scheduler is not None:
            scheduler.step()
        record = {"epoch": epoch + 1, **{f"train_{k}": v for k, v in train_stats.items()}}
        if rank == 0:
            record.update(validation_metrics(model, tuples, data_root, size, p.validation, seed=p.seed))
            record["lr"] = optimizer.param_groups[0]["lr"]
        history.append(record)
        if phase == 1 and rank == 0:
            from ardetect.train.pretrain import saturated

            warning = saturated(record, model.cfg.logit_scale, model.cfg.logit_bias, model.cfg.hidden_dim, p.lr, "train_phase1")
            if warning:
                logging.getLogger("ardetect").warning(warning)
        state.epoch, state.step = epoch + 1, 0
        metric = record.get("val_select", -math.inf)  # the score the model is read with (validation_metrics)
        if rank == 0:
            unchosen = "val_select" not in record  # no val tuples to choose by: the last epoch is the checkpoint
            if unchosen:
                print(f"[phase {phase}] no val tuples to choose the checkpoint by: epoch {epoch + 1} is kept as the latest")
            if unchosen or metric > state.best:
                state.best, state.best_epoch = metric, epoch + 1
                save_atomic({**model_file_state(model), **meta, "epoch": epoch + 1, "metric": metric}, best_path)
            checkpoint()
            if log is not None:
                log({k: v for k, v in record.items() if isinstance(v, (int, float))}, epoch + 1)
            print(f"[phase {phase}] epoch {epoch + 1}: " + json.dumps({k: round(v, 4) for k, v in record.items() if isinstance(v, float)}))
    return PhaseResult(history, state.best, state.best_epoch, out_dir)


def run_phase1(cfg: Config, tuples: pd.DataFrame, data_root: Path, out_dir: Path, log: Logger | None = None, resume: bool = True,
               stop_after_steps: int | None = None, init: Path | None = None):
    """Train the detector on positives, from the pre-trained detector file ``init`` (``run_pretrain``)
    when given. Returns (model, PhaseResult); the model holds the last epoch's weights."""
    torch.manual_seed(cfg.train_phase1.seed)  # the initial weights are part of the run
    model = build_model(cfg)
    if init is not None:
        from ardetect.train.pretrain import load_pretrained_into

        load_pretrained_into(model, init)
    result = _run(cfg, 1, model, tuples, data_root, out_dir, log, resume, stop_after_steps, start_from=init)
    return model, result


def load_model(path: Path, phase: int | None = None, what: str = "checkpoint"):
    """A detector from a ``best.pt`` / ``model.pt`` file written by a phase (by phase ``phase``, when given).

    A file that is no detector checkpoint, or one of another phase than asked for, raises ``ValueError`` naming
    ``what`` (the option or field it came from) and the path."""
    from ardetect.model import ModelConfig, build

    ck = load_named(path, what)
    if not isinstance(ck, dict) or "model_config" not in ck or "model" not in ck:
        raise ValueError(f"{what} {path}: not a detector checkpoint (a phase's model.pt or best.pt holds 'model' and "
                         "'model_config')")
    found = ck.get("phase", 0 if "pretrain" in ck else None)  # None: a file of an older version, which did not say
    if phase is not None and found is not None and found != phase:
        was = "the pre-training's" if found == 0 else f"a phase-{found}"
        raise ValueError(f"{what} {path} is {was} checkpoint, not phase {phase}'s (models/phase{phase}/model.pt)")
    model = build(ModelConfig.model_validate(ck["model_config"]))
    load_model_file_state(model, ck, path)
    return model


def run_phase2(cfg: Config, phase1_model_path: Path, tuples: pd.DataFrame, data_root: Path, out_dir: Path, log: Logger | None = None, resume: bool = True, stop_after_steps: int | None = None):
    """Train only the adapters F and F~ on positives with k fresh negatives each."""
    model = load_model(phase1_model_path)
    result = _run(cfg, 2, model, tuples, data_root, out_dir, log, resume, stop_after_steps, start_from=phase1_model_path)
    return model, result
