"""Detection pre-training: GroundingDINO's recipe on every object of the world.

ARD starts from a detector that already grounds (GroundingDINO, pre-trained on
detection data with class-name prompts). Trained from nothing in minutes, our
detector learns objectness before grounding; this stage gives it the same start on
the training split's images (exemplars and generated), where the ``objects`` table
names every object drawn. Each image's prompt lists the classes of its objects and
``absent_classes`` sampled absent ones, in shuffled order, separated by " . " as
GroundingDINO writes them ("mug . cat . car ."); each object is a target on its
class's tokens, and phase 1's matcher and losses (token-level focal, L1, GIoU, on
every decoder layer and the encoder proposals) train the whole detector. Tokens of
absent classes have no target: their focal loss teaches the detector to say no.

The loop keeps ``latest.pt`` (every ``checkpoint_every`` steps and at each epoch's
end) and resumes from it with the same weights as an uninterrupted run; the result
is ``model.pt`` (a model file as the phases write, loaded by ``load_model``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from torchvision.ops import box_convert
from tqdm import tqdm

from ardetect.config import Config
from ardetect.data.datasets import build_transform, load_uint8, transform_with_boxes
from ardetect.train.engine import (
    StepProgress, TrainState, batches_by_step, epoch_order, load_checkpoint, model_file_state, read_resume_point, sample_seed, save_atomic,
    save_checkpoint, train_steps,
)
from ardetect.devices import device_of, resolve_device, to_device
from ardetect.model.config import unsaturated_head
from ardetect.train.losses import SetCriterion
from ardetect.train.matcher import HungarianMatcher, Target


@dataclass
class DetectionSample:
    image: Tensor  # [3, S, S] in [0, 1]
    boxes: Tensor  # [n, 4] pixel xyxy in the transformed image
    classes: list[str]  # n base classes
    key: str  # the image's path


class ObjectDataset(torch.utils.data.Dataset):
    """Images with every recorded object (``objects`` table rows with at least ``min_area`` visible pixels)."""

    def __init__(self, objects: pd.DataFrame, images: Sequence[str], data_root: Path, image_size: int, train: bool, min_area: int = 1):
        self.images = sorted(set(images))
        if not self.images:
            raise ValueError("ObjectDataset: no images")
        unknown = sorted(set(self.images) - set(objects["image"]))
        if unknown:
            raise ValueError(f"ObjectDataset: {len(unknown)} image(s) have no row in the objects table, e.g. {unknown[0]!r}")
        kept = objects[objects["image"].isin(self.images) & (objects["area"] >= min_area)]
        self.objects = {
            img: (np.stack([np.asarray(b, dtype=np.float32) for b in g["box"]]), g["base_class"].astype(str).tolist())
            for img, g in kept.groupby("image", sort=False)
        }
        concepts = kept[kept["role"] == "concept"] if "role" in kept.columns else kept.iloc[:0]
        self.concept_class = dict(zip(concepts["image"], concepts["base_class"].astype(str)))
        self.root, self.size = Path(data_root), image_size
        self.transform = build_transform(train, image_size)
        self._decoded: dict[str, Tensor] = {}

    def __len__(self) -> int:
        return len(self.images)

    def item(self, index: int) -> DetectionSample:
        key = self.images[index]
        img = self._decoded.get(key)
        if img is None:
            img = self._decoded[key] = load_uint8(self.root / key)
        boxes, classes = self.objects.get(key, (np.zeros((0, 4), np.float32), []))
        x, out = transform_with_boxes(self.transform, img, boxes)
        keep = ((out[:, 2] - out[:, 0]) >= 2) & ((out[:, 3] - out[:, 1]) >= 2)  # objects an augmentation pushed out
        return DetectionSample(x, out[keep], [c for c, k in zip(classes, keep.tolist()) if k], key)

    def __getitem__(self, index: int) -> DetectionSample:
        return self.item(index)


def class_prompt(tokenizer, present: Sequence[str], vocabulary: Sequence[str], absent: int, rng: np.random.Generator,
                 max_len: int) -> tuple[list[int], dict[str, tuple[int, int]]]:
    """Token ids of a GroundingDINO detection prompt and each class's token span [start, stop).

    The prompt lists the distinct ``present`` classes and up to ``absent`` others from
    ``vocabulary``, shuffled, each closed by "." ([CLS] a . b . c . [SEP]). Absent classes
    are dropped first when the prompt would pass ``max_len`` tokens.
    """
    names = list(dict.fromkeys(present))
    pool = [c for c in vocabulary if c not in names]
    extra = [str(c) for c in rng.choice(pool, size=min(absent, len(pool)), replace=False)] if absent and pool else []
    words = {c: tokenizer(c, add_special_tokens=False)["input_ids"] for c in names + extra}
    while extra and 2 + sum(len(words[c]) + 1 for c in names + extra) > max_len:
        extra.pop()
    order = [names[i] if i < len(names) else extra[i - len(names)] for i in rng.permutation(len(names) + len(extra))]
    dot = tokenizer.convert_tokens_to_ids(".")
    ids, spans = [tokenizer.cls_token_id], {}
    for c in order:
        spans[c] = (len(ids), len(ids) + len(words[c]))
        ids += list(words[c]) + [dot]
    ids.append(tokenizer.sep_token_id)
    if len(ids) > max_len:
        raise ValueError(f"the classes {names} need {len(ids)} prompt tokens, more than the model's max_text_len={max_len}")
    return ids, spans


@dataclass
class DetectionBatch:
    images: Tensor  # [B, 3, S, S]
    input_ids: Tensor  # [B, L]
    attention_mask: Tensor  # [B, L]
    boxes: list[Tensor]  # B x [n_i, 4] normalised cxcywh
    token_maps: list[Tensor]  # B x [n_i, L]: 1 on the tokens of each object's class
    keys: list[str]
    classes: list[list[str]]  # B x n_i: each object's class


class PretrainBatches(torch.utils.data.Dataset):
    """One epoch's batches by step; each sample's augmentation and prompt are seeded by (seed, epoch, index)."""

    def __init__(self, ds: ObjectDataset, tokenizer, vocabulary: Sequence[str], absent: int, max_len: int,
                 order: list[int], seed: int, epoch: int, batch_size: int):
        self.ds, self.tok, self.vocabulary, self.absent, self.max_len = ds, tokenizer, list(vocabulary), absent, max_len
        self.order, self.seed, self.epoch, self.batch_size = order, seed, epoch, batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.order) / self.batch_size)

    def __getitem__(self, step: int) -> tuple[int, DetectionBatch]:
        samples, rows, spans = [], [], []
        for idx in self.order[step * self.batch_size : (step + 1) * self.batch_size]:
            s = sample_seed(self.seed, self.epoch, idx)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(s)
                sample = self.ds.item(idx)
            ids, span = class_prompt(self.tok, sample.classes, self.vocabulary, self.absent, np.random.default_rng(s), self.max_len)
            samples.append(sample)
            rows.append(ids)
            spans.append(span)
        n = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), n), self.tok.pad_token_id or 0, dtype=torch.long)
        attention = torch.zeros((len(rows), n), dtype=torch.long)
        boxes, maps = [], []
        for i, (sample, ids, span) in enumerate(zip(samples, rows, spans)):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            attention[i, : len(ids)] = 1
            boxes.append(box_convert(sample.boxes, "xyxy", "cxcywh") / self.ds.size)
            m = torch.zeros((len(sample.classes), n))
            for j, c in enumerate(sample.classes):
                m[j, span[c][0] : span[c][1]] = 1.0
            maps.append(m)
        images = torch.stack([s.image for s in samples])
        return step, DetectionBatch(images, input_ids, attention, boxes, maps, [s.key for s in samples], [s.classes for s in samples])


def class_name_ids(tokenizer, vocabulary: Sequence[str]) -> tuple[Tensor, Tensor, Tensor]:
    """Each class name as its own prompt ([CLS] name . [SEP]): (input ids [C, L], attention [C, L], name tokens [C, L] bool)."""
    dot = tokenizer.convert_tokens_to_ids(".")
    words = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in vocabulary]
    n = 3 + max(len(w) for w in words)
    ids = torch.full((len(words), n), tokenizer.pad_token_id or 0, dtype=torch.long)
    attention = torch.zeros((len(words), n), dtype=torch.long)
    name = torch.zeros((len(words), n), dtype=torch.bool)
    for i, w in enumerate(words):
        row = [tokenizer.cls_token_id, *w, dot, tokenizer.sep_token_id]
        ids[i, : len(row)] = torch.tensor(row)
        attention[i, : len(row)] = 1
        name[i, 1 : 1 + len(w)] = True
    return ids, attention, name


def detection_outputs(model, batch: DetectionBatch, aux: bool = True) -> tuple[dict, Tensor, list[Target]]:
    """The detector on a batch of detection prompts (no query region): outputs, token mask, targets."""
    cache = model.encode_text_ids(batch.input_ids, batch.attention_mask)
    out = model(batch.images, cache)
    targets = [Target(b, m) for b, m in zip(batch.boxes, batch.token_maps)]
    outputs = {"pred_logits": out.pred_logits, "pred_boxes": out.pred_boxes}
    if aux:
        outputs.update(aux_outputs=out.aux_outputs, enc_outputs=out.enc_outputs)
    return outputs, out.token_mask, targets


@torch.no_grad()
def grounding_metrics(model, ds: ObjectDataset, vocabulary: Sequence[str], absent: int, seed: int, limit: int = 128) -> dict[str, float]:
    """How well the detector grounds class names on ``limit`` seeded (val) images.

    ``val_grounding``: for each class present in an image (its prompt as in training), is the box
    scoring highest on that class's tokens within IoU 0.5 of an object of the class? Averaged over
    (image, class) pairs; ``val_concept_grounding`` over the images' concept objects' classes.
    ``val_class_rprecision``: across images, as ARD's score ranks candidates: each class alone as the
    prompt ("cat ."), the images ranked by their best box's probability on it; the R-precision of the
    images holding the class (R of them), averaged over the classes present.
    """
    from torchvision.ops import box_iou

    if len(ds) == 0:
        return {}
    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(len(ds), size=min(limit, len(ds)), replace=False))
    was_training = model.training
    model.eval()
    hits, concept_hits, present, class_scores = [], [], [], []
    device = device_of(model)
    ids, attention, name = class_name_ids(model.tokenizer, vocabulary)
    name = name.to(device)
    try:
        batches = PretrainBatches(ds, model.tokenizer, vocabulary, absent, model.cfg.max_text_len, picks.tolist(), seed, 0, 8)
        names = [model.encode_text_ids(ids[c : c + 1], attention[c : c + 1]) for c in range(len(vocabulary))]
        for step in range(len(batches)):
            _, b = batches[step]
            b = to_device(b, device)
            cache = model.encode_images(b.images)
            out = model(cache, model.encode_text_ids(b.input_ids, b.attention_mask))
            probs = out.pred_logits.sigmoid()  # [B, Q, T]
            present += [set(c) for c in b.classes]
            class_scores.append(torch.stack([  # [B, C]: each class alone as the prompt, the best box's probability
                model(cache, names[c]).pred_logits.float().sigmoid()[:, :, name[c]].amax((1, 2))
                for c in range(len(vocabulary))
            ], 1))
            for i in range(len(b.keys)):
                gt = box_convert(b.boxes[i], "cxcywh", "xyxy")
                pred = box_convert(out.pred_boxes[i], "cxcywh", "xyxy")
                for cls in dict.fromkeys(b.classes[i]):
                    same = torch.tensor([c == cls for c in b.classes[i]], device=device)  # the objects of this class
                    on = b.token_maps[i][same][0].bool()  # its tokens
                    score = probs[i][:, : on.shape[0]][:, on].amax(-1)  # [Q]
                    ok = bool(box_iou(pred[score.argmax()][None], gt[same]).max() >= 0.5)
                    hits.append(ok)
                    if ds.concept_class.get(b.keys[i]) == cls:
                        concept_hits.append(ok)
        scores, precision = torch.cat(class_scores).cpu(), []  # [N, C]
        for c, cls in enumerate(vocabulary):
            holds = np.array([cls in p for p in present])
            if holds.any():
                top = torch.argsort(scores[:, c], descending=True, stable=True)[: int(holds.sum())].numpy()
                precision.append(float(holds[top].mean()))
    finally:
        model.train(was_training)
    out = {"val_grounding": float(np.mean(hits))} if hits else {}
    if concept_hits:
        out["val_concept_grounding"] = float(np.mean(concept_hits))
    if precision:
        out["val_class_rprecision"] = float(np.mean(precision))
    return out


def training_images(tuples: pd.DataFrame, which: str = "all", split: str = "train") -> list[str]:
    """A split's images (the training split's by default): its exemplars (``train_image``) and/or
    generated images (``query_image``)."""
    train = tuples[tuples["split"] == split]
    if train.empty:
        raise ValueError(f"pretrain: the tuples have no {split} split")
    out: set[str] = set()
    if which in ("all", "exemplars"):
        out |= set(train["train_image"])
    if which in ("all", "generated"):
        out |= set(train["query_image"])
    if not out:
        raise ValueError(f"pretrain.images={which!r} must be 'all', 'exemplars' or 'generated'")
    return sorted(out)


def diagnosed(epoch: int, epochs: int, every: int | None) -> bool:
    """Whether the val diagnostics run after (1-based) ``epoch`` of ``epochs``: every ``every``-th and the last."""
    return epoch == epochs or (every is not None and epoch % every == 0)


def pretrain_fingerprint(cfg: Config, model, objects: pd.DataFrame, images: list[str]) -> str:
    h = hashlib.sha256()
    # the diagnostics' cadence and the loader's processes change no weight: a run may resume under others
    parts = {"pretrain": cfg.pretrain.model_dump(mode="json", exclude={"diagnostics_every", "loader_workers"}), "model": model.cfg.model_dump(mode="json"), "pretrained": cfg.model.pretrained}
    h.update(json.dumps(parts, sort_keys=True, default=str).encode())
    h.update("\n".join(images).encode())
    h.update(pd.util.hash_pandas_object(objects[["image", "object", "base_class", "area"]], index=False).to_numpy().tobytes())
    return h.hexdigest()[:16]


SATURATED_CLASS_LOSS = 10.0  # an epoch's mean focal class loss; the default recipe's first epoch: 0.53, the Swin recipe's (lr 1e-4): under 1


def saturated(record: dict, logit_scale: float, logit_bias: float, hidden_dim: int, lr: float, stage: str = "pretrain") -> str | None:
    """The warning for a training epoch (``stage``: pretrain or train_phase1) whose mean class loss is
    above ``SATURATED_CLASS_LOSS``, or None: the contrastive logits saturate, and the run ends no
    better than chance at grounding. A detector from scratch with GroundingDINO's head (logit scale 1, bias 0) at lr 0.001 does that
    (docs/research.md, "The GPU recipe, from scratch"). The head's start is advised only where it is not already the
    named sizes' (1/sqrt(hidden_dim), the prior bias -log 99); the lower lr always."""
    loss = record.get("train_loss_class")
    if loss is None or loss <= SATURATED_CLASS_LOSS:
        return None
    scale, bias = unsaturated_head(hidden_dim)
    message = (f"{stage} epoch {record.get('epoch')}: the mean class loss is {loss:.4g} (a run that learns stays near 1): "
               "the contrastive logits saturate. ")
    if math.isclose(logit_scale, scale, rel_tol=1e-3) and math.isclose(logit_bias, bias, abs_tol=1e-3):
        return message + (f"The head already starts unsaturated (logit_scale {logit_scale:g}, logit_bias {logit_bias:g}): "
                          f"lower {stage}.lr (now {lr:g})")
    return message + (f"From scratch, start the head at model.overrides logit_scale {scale:g} (1/sqrt(hidden_dim)) and logit_bias "
                      f"{bias:.4g} (now {logit_scale:g} and {logit_bias:g}), and lower {stage}.lr (now {lr:g})")


def pretrain_criterion(loss) -> SetCriterion:
    """Pre-training's matcher and losses (``pretrain.loss``: phase 1's, without the region contrast)."""
    return SetCriterion(HungarianMatcher(loss.cost_class, loss.cost_bbox, loss.cost_giou, loss.focal_alpha, loss.focal_gamma),
                        loss.weight_class, loss.weight_bbox, loss.weight_giou, loss.focal_alpha, loss.focal_gamma)


def run_pretrain(cfg: Config, objects: pd.DataFrame, tuples: pd.DataFrame, data_root: Path, out_dir: Path,
                 log=None, resume: bool = True, stop_after_steps: int | None = None):
    """Pre-train the detector of ``cfg.model`` on the training split's objects; write ``out_dir/model.pt``.

    Returns (model, history). ``pretrain.epochs: 0`` writes the built weights unchanged (random,
    or the ``model.pretrained`` checkpoint's). ``stop_after_steps`` interrupts the run (a test hook).
    """
    from ardetect.model import param_groups
    from ardetect.train.phases import build_model, image_size_of

    p = cfg.pretrain
    torch.manual_seed(p.seed)
    model = build_model(cfg)
    vocabulary = sorted(objects["base_class"].astype(str).unique())
    classify = p.epochs > 0 and p.classify_epochs > 0
    if classify and len(vocabulary) < 2:
        print(f"[pretrain] one base class ({', '.join(vocabulary) or 'none'}): no class to tell apart, so no crop classification and "
              f"no region classifier (pretrain.classify_epochs={p.classify_epochs} is passed over)")
        classify = False
    if classify:  # the crop classification becomes the region classifier (its weights: classify_step)
        model.add_region_classifier(vocabulary, p.classify_crop)
    device = resolve_device(cfg.model.device)
    model.to(device).set_phase(1)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = training_images(tuples, p.images)
    fingerprint = pretrain_fingerprint(cfg, model, objects, images)
    meta = {"model_config": model.cfg.model_dump(mode="json"), "fingerprint": fingerprint, "pretrain": p.model_dump(mode="json")}
    history: list[dict] = []
    if p.epochs > 0:
        size = image_size_of(model)
        ds = ObjectDataset(objects, images, data_root, p.image_size or size, train=p.augment, min_area=p.min_area)
        val = tuples[tuples["split"] == "val"]
        val_ds = ObjectDataset(objects, training_images(tuples, p.images, "val"), data_root, size, train=False, min_area=p.min_area) if len(val) else None
        optimizer = torch.optim.AdamW(param_groups(model, p.lr, p.lr_backbone, p.lr_linear_proj_mult), lr=p.lr,
                                      weight_decay=p.weight_decay, fused=True)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, p.lr_drop_epochs, p.lr_gamma)
        criterion = pretrain_criterion(p.loss)
        latest = out_dir / "latest.pt"
        state = TrainState()
        resumed = False
        ck = read_resume_point(latest, "pretrain") if resume else None
        if ck is not None:
            classifier_kept = model.region_classifier is None or "region_classifier" in ck
            if ck.get("fingerprint") == fingerprint and classifier_kept:
                state, history, _ = load_checkpoint(latest, model, optimizer, scheduler, ck=ck)
                if model.region_classifier is not None:
                    model.region_classifier.load_state_dict(ck["region_classifier"])
                resumed = True
                print(f"[pretrain] resuming from {latest}: epoch {state.epoch}, step {state.step}")
            elif ck.get("fingerprint") != fingerprint:
                print(f"[pretrain] {latest} is from another run (fingerprint {ck.get('fingerprint')} != {fingerprint}): starting afresh")
            else:
                print(f"[pretrain] {latest} lacks the region classifier's weights (written by an earlier version): starting afresh")
        if classify and not resumed:
            history = classify_step(model, p, objects, images, tuples, data_root, vocabulary, out_dir / "classify.pt", fingerprint, resume)
        n_steps = math.ceil(len(ds) / p.batch_size)
        if p.max_steps_per_epoch is not None:
            n_steps = min(n_steps, p.max_steps_per_epoch)
        progress = StepProgress(stop_after_steps)

        def checkpoint() -> None:  # the region classifier is frozen, so not in the trainable state: it goes in beside it
            classifier = {} if model.region_classifier is None else {"region_classifier": model.region_classifier.state_dict()}
            save_checkpoint(latest, model, optimizer, scheduler, state, history, {**meta, **classifier})

        while state.epoch < p.epochs:
            epoch = state.epoch
            batches = PretrainBatches(ds, model.tokenizer, vocabulary, p.absent_classes, model.cfg.max_text_len,
                                      epoch_order(len(ds), p.seed, epoch), p.seed, epoch, p.batch_size)
            bar = progress.bar = tqdm(total=n_steps, initial=state.step, desc=f"pretrain epoch {epoch + 1}/{p.epochs}", leave=False)

            model.train()
            stats = train_steps(
                criterion, optimizer, batches_by_step(batches, state.step, n_steps, p.loader_workers), lambda b: detection_outputs(model, b, aux=p.loss.aux_loss),
                n_steps, state, epoch=epoch, clip_grad=p.clip_grad, on_checkpoint=checkpoint, checkpoint_every=p.checkpoint_every,
                progress=progress, device=device, autocast=torch.bfloat16 if p.precision == "bf16" else None, seed=p.seed,
            )
            bar.close()
            scheduler.step()
            record = {"epoch": epoch + 1, **{f"train_{k}": v for k, v in stats.items()}, "lr": optimizer.param_groups[0]["lr"]}
            if val_ds is not None and diagnosed(epoch + 1, p.epochs, p.diagnostics_every):  # the last epoch is kept whatever they say
                record.update(grounding_metrics(model, val_ds, vocabulary, p.absent_classes, p.seed))
            history.append(record)
            warning = saturated(record, model.cfg.logit_scale, model.cfg.logit_bias, model.cfg.hidden_dim, p.lr)
            if warning:
                logging.getLogger("ardetect").warning(warning)
            state.epoch, state.step = epoch + 1, 0
            checkpoint()
            if log is not None:
                log({k: v for k, v in record.items() if isinstance(v, (int, float))}, epoch + 1)
            print(f"[pretrain] epoch {epoch + 1}: " + json.dumps({k: round(v, 4) for k, v in record.items() if isinstance(v, float)}))
    save_atomic({**model_file_state(model), **meta, "epochs": p.epochs, "history": history}, out_dir / "model.pt")
    return model, history


def classify_step(model, p, objects: pd.DataFrame, images: list[str], tuples: pd.DataFrame, data_root: Path, vocabulary: list[str],
                  path: Path, fingerprint: str, resume: bool) -> list[dict]:
    """The backbone's object-crop classification (``ardetect.train.classify``), kept in ``path``
    (the backbone's state and the history) so that a restart after it does not repeat it."""
    from ardetect.train.classify import classify_backbone, object_crops

    from ardetect.train.phases import image_size_of

    classifier = model.region_classifier
    ck = read_resume_point(path, "pretrain") if resume else None
    if ck is not None:
        if ck.get("fingerprint") == fingerprint and "region_classifier" in ck:
            model.backbone.load_state_dict(ck["backbone"])
            classifier.load_state_dict(ck["region_classifier"])
            print(f"[pretrain] backbone classification done before: {path}")
            return ck["history"]
    size = image_size_of(model)
    train = object_crops(objects, images, data_root, vocabulary, p.classify_crop, size, p.min_area)
    val_images = training_images(tuples, p.images, "val") if (tuples["split"] == "val").any() else []
    val = object_crops(objects, val_images, data_root, vocabulary, p.classify_crop, size, p.min_area) if val_images else None
    print(f"[pretrain] backbone classification: {len(train[0])} object crops of {len(vocabulary)} classes, {p.classify_epochs} epochs")
    history, head = classify_backbone(model, train, val, len(vocabulary), p.classify_epochs, p.classify_batch_size, p.classify_lr, p.seed,
                                      p.weight_decay)
    if p.region_classifier_epochs:  # the classifier gets a crop classification of its own, longer and on imprecise boxes too
        from ardetect.train.classify import train_region_classifier

        history += train_region_classifier(model, objects, images, val, data_root, vocabulary, p.classify_crop, size, p.min_area,
                                           p.region_classifier_epochs, p.region_classifier_copies, p.region_classifier_jitter,
                                           p.classify_batch_size, p.classify_lr, p.seed + 1, p.weight_decay)
    else:  # the detector's backbone trains on; the classifier keeps these
        classifier.backbone.load_state_dict(model.backbone.state_dict())
        classifier.head.load_state_dict(head.state_dict())
    save_atomic({"backbone": model.backbone.state_dict(), "region_classifier": classifier.state_dict(), "history": history,
                 "fingerprint": fingerprint}, path)
    return history


def load_pretrained_into(model, path: Path) -> dict:
    """Load a ``run_pretrain`` model file into ``model`` (built from the same model config); returns the file.

    A file of another model (size, resolution, text encoder, ...) is refused, naming the fields that differ.
    """
    from ardetect.train.engine import load_model_file_state, load_named

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pre-trained detector {path} not found: run the pretrain stage first (dvc repro pretrain)")
    ck = load_named(path, "pre-trained detector")
    if not isinstance(ck, dict) or "model_config" not in ck or "model" not in ck:
        raise ValueError(f"pre-trained detector {path}: not a detector checkpoint (the pretrain stage's model.pt holds "
                         "'model' and 'model_config'); run the pretrain stage again (dvc repro pretrain)")
    got = ck.get("model_config") or {}
    if got.get("region_classes") and model.region_classifier is None:  # the pre-training's region classifier comes with it
        model.add_region_classifier(got["region_classes"], got.get("region_crop"))
    want = model.cfg.model_dump(mode="json")
    diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
    if diff:
        shown = ", ".join(f"{k}: file {got.get(k)!r} vs model {want.get(k)!r}" for k in diff[:4])
        raise ValueError(f"{path} was pre-trained for another detector ({shown}); run the pretrain stage again for this model")
    load_model_file_state(model, ck, path)
    return ck
