"""Training engine shared by both phases: batching, one epoch, validation, checkpoints, resume.

Determinism: the epoch's order comes from a generator seeded with (seed, epoch), and
each sample's augmentation from (seed, epoch, index), so an interrupted run resumed
from its latest checkpoint ends with the same weights as an uninterrupted one, and
any number of DataLoader workers or DDP processes sees the same samples.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torchvision.ops import box_convert, box_iou

from ardetect.data.datasets import NegativeSampler, Sample, TupleDataset
from ardetect.devices import to_device
from ardetect.tmpdirs import replaced_atomically
from ardetect.train.losses import SetCriterion
from ardetect.train.matcher import Target


class NonFiniteLoss(FloatingPointError):
    """A loss became NaN or infinite: training stops instead of corrupting the weights."""


@dataclass
class Batch:
    """B target images, each paired with one of P queries (``query_of`` maps image -> query)."""

    images: Tensor  # [B, 3, S, S]
    boxes: list[Tensor]  # B x [n_i, 4] normalised cxcywh (n_i = 0 for negatives)
    query_images: Tensor  # [P, 3, S, S]
    query_boxes: Tensor  # [P, 4] pixel xyxy
    prompts: list[str]  # P
    phrases: list[str]  # P
    query_of: Tensor  # [B] long
    positive: Tensor  # [B] bool
    tuple_ids: list[str]  # B
    image_keys: list[str]  # B target image paths (equal paths = the same concept)

    @property
    def num_positive(self) -> int:
        return int(self.positive.sum())


def collate_groups(groups: Sequence[Sequence[Sample]]) -> Batch:
    """Each group shares one query: its first sample is the positive, the rest negatives."""
    images, boxes, q_images, q_boxes, prompts, phrases, query_of, positive, ids, keys = [], [], [], [], [], [], [], [], [], []
    for gi, group in enumerate(groups):
        first = group[0]
        q_images.append(first.query_image)
        q_boxes.append(first.query_box)
        prompts.append(first.prompt)
        phrases.append(first.concept_phrase)
        for s in group:
            images.append(s.image)
            boxes.append(s.box.reshape(-1, 4))
            query_of.append(gi)
            positive.append(s.positive)
            ids.append(s.tuple_id)
            keys.append(s.image_key)
    return Batch(
        torch.stack(images), boxes, torch.stack(q_images), torch.stack(q_boxes), prompts, phrases,
        torch.tensor(query_of), torch.tensor(positive), ids, keys,
    )


STEP_SEED_SALT = 104729  # keeps the per-step seeds of torch's generator apart from the batches' own


def sample_seed(*keys: int) -> int:
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


def seeded_item(ds: TupleDataset, index: int, seed: int, target_image: str | None = None) -> Sample:
    """``ds.item`` with its augmentation drawn from a private RNG seeded by ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ds.item(index, target_image)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(sample_seed(seed, epoch, 7919))
    return torch.randperm(n, generator=g).tolist()


def shard(indices: list[int], rank: int, world: int) -> list[int]:
    """This process's share of an epoch (DDP): every world-th index, padded to equal length."""
    if world == 1:
        return indices
    per = math.ceil(len(indices) / world)
    padded = indices + indices[: per * world - len(indices)]
    return padded[rank::world]


class EpochBatches(torch.utils.data.Dataset):
    """One epoch's batches by step: what ``iter_batches`` yields, built where a DataLoader
    worker can make them ahead of the training step (each sample's augmentation is seeded
    by (seed, epoch, index), so a worker builds exactly what the training process would)."""

    def __init__(self, ds: TupleDataset, order: list[int], seed: int, epoch: int, batch_size: int, negatives: NegativeSampler | None = None):
        self.ds, self.order, self.seed, self.epoch, self.batch_size, self.negatives = ds, order, seed, epoch, batch_size, negatives

    def __len__(self) -> int:
        return math.ceil(len(self.order) / self.batch_size)

    def __getitem__(self, step: int) -> tuple[int, Batch]:
        seed, epoch = self.seed, self.epoch
        groups = []
        for idx in self.order[step * self.batch_size : (step + 1) * self.batch_size]:
            group = [seeded_item(self.ds, idx, sample_seed(seed, epoch, idx))]
            if self.negatives is not None:
                for j, img in enumerate(self.negatives.draw(idx, epoch)):
                    group.append(seeded_item(self.ds, idx, sample_seed(seed, epoch, idx, j + 1), target_image=img))
            groups.append(group)
        return step, collate_groups(groups)


def _as_is(item):
    return item


def iter_batches(
    ds: TupleDataset, seed: int, epoch: int, batch_size: int, rank: int = 0, world: int = 1,
    negatives: NegativeSampler | None = None, start: int = 0, max_steps: int | None = None, workers: int = 0,
) -> Iterator[tuple[int, Batch]]:
    """(step, batch) of one epoch from ``start``; with ``negatives``, each positive brings k negatives.

    ``workers`` > 0 builds the batches in that many DataLoader processes, a few steps ahead
    of training (the same batches as ``workers=0``, which builds them in this process).
    """
    batches = EpochBatches(ds, shard(epoch_order(len(ds), seed, epoch), rank, world), seed, epoch, batch_size, negatives)
    steps = len(batches) if max_steps is None else min(len(batches), max_steps)
    yield from batches_by_step(batches, start, steps, workers)


def batches_by_step(batches, start: int, stop: int, workers: int = 0) -> Iterator:
    """``batches[start]`` .. ``batches[stop - 1]`` of a dataset indexed by step, in order: built in this
    process (``workers`` 0), or in that many DataLoader processes a few steps ahead (the same batches)."""
    if workers < 0:
        raise ValueError(f"workers={workers}: give 0 (build batches in this process) or more")
    if workers == 0:
        for step in range(start, stop):
            yield batches[step]
        return
    if start >= stop:
        return
    yield from torch.utils.data.DataLoader(
        batches, batch_size=None, sampler=range(start, stop), num_workers=workers, collate_fn=_as_is, prefetch_factor=4,
    )


def steps_per_epoch(n: int, batch_size: int, world: int = 1, max_steps: int | None = None) -> int:
    steps = math.ceil(math.ceil(n / world) / batch_size)
    return min(steps, max_steps) if max_steps is not None else steps


def model_outputs(
    model, batch: Batch, aux: bool = True, align: bool = False, align_negatives: int = 0, rank: tuple[int, float, int] | None = None,
) -> tuple[dict, Tensor, list[Target]]:
    """Run the detector on a batch: queries encoded once each, then paired with their images.

    ``aux=False`` keeps only the last decoder layer (phase 2's loss). ``align=True`` also
    returns ``outputs["align"]``: each positive's query region token, the same pooling of
    its target region in the target image, which pairs show the same concept, and the
    regions at the ``align_negatives`` most probable predicted boxes of each target image
    that stay clear of its target region (``region_contrast``); the target images'
    backbone runs once for all. ``rank`` = (grid, weight, k) also returns ``outputs["rank"]``,
    each image's re-ranked score (``_ranked_scores``).
    """
    cache = model.encode_query(batch.query_images, batch.query_boxes, batch.prompts, batch.phrases, region_map=rank is not None)
    feats = model.image_features(batch.images) if (align or rank) else None
    images = model.encode_images(batch.images, features=feats) if feats is not None else batch.images
    out = model(images, cache.select(batch.query_of))  # each query reused by its negatives
    concept = cache.concept_mask[batch.query_of].float()  # [B, T]
    targets = [Target(b, concept[i : i + 1].expand(len(b), -1)) for i, b in enumerate(batch.boxes)]
    outputs = {"pred_logits": out.pred_logits, "pred_boxes": out.pred_boxes}
    if aux:
        outputs.update(aux_outputs=out.aux_outputs, enc_outputs=out.enc_outputs)
    if align:
        outputs["align"] = _region_pairs(model, cache, feats, batch, out, align_negatives)
    if rank is not None:
        outputs["rank"] = _ranked_scores(model, cache, feats, batch, out, *rank)
    return outputs, out.token_mask, targets


def _ranked_scores(model, cache, feats: list[Tensor], batch: Batch, out, grid: int, weight: float, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The re-ranked attribution score of every image of the batch, as ``RegionCandidates.pick``
    computes it at evaluation, in log form and differentiable in the class logits: the best of the
    k most probable boxes of log prob + weight (similarity - 1), the similarity pooled on ``grid``.
    A positive image's score counts only its boxes with IoU >= 0.5 to its target region (the
    evaluation's gate). Returns (scores [B], group [B], positive [B]); a positive whose top boxes
    all miss its target scores -inf."""
    from ardetect.model.detector import MASKED_LOGIT  # loaded with the model already

    size = torch.tensor(batch.images.shape[-2:][::-1] * 2, dtype=torch.float32, device=out.pred_boxes.device)  # (W, H, W, H)
    logit = out.pred_logits.float().masked_fill(~out.concept_mask[:, None, :], MASKED_LOGIT).max(-1).values  # [B, Q]
    top = logit.detach().topk(min(k, logit.shape[1]), dim=-1).indices  # [B, k]
    with torch.no_grad():
        boxes = torch.gather(box_convert(out.pred_boxes.float(), "cxcywh", "xyxy") * size, 1, top[..., None].expand(-1, -1, 4))  # [B, k, 4]
        pooled = model.pool_map(model.region_map(feats), boxes, grid).float()  # [B, k, D g^2]
        sim = torch.nn.functional.cosine_similarity(pooled, cache.descriptor(grid).float()[batch.query_of.to(pooled.device)][:, None], dim=-1)
        allowed = torch.ones_like(sim, dtype=torch.bool)
        for b in torch.nonzero(batch.positive).flatten().tolist():
            gt = box_convert(batch.boxes[b][:1].float().to(size.device), "cxcywh", "xyxy") * size
            allowed[b] = box_iou(boxes[b], gt)[:, 0] >= 0.5
    score = torch.nn.functional.logsigmoid(torch.gather(logit, 1, top)) + weight * (sim - 1.0)  # [B, k]
    return score.masked_fill(~allowed, float("-inf")).max(-1).values, batch.query_of.to(score.device), batch.positive.to(score.device)


CLEAR_IOU = 0.3  # a predicted box this far from the target region shows another object (each image holds one concept)


def _region_pairs(model, cache, feats: list[Tensor], batch: Batch, out=None, k: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(query region tokens [M, D], target region tokens [M, D], same concept [M, M] bool,
    other regions [E, D]) of the M positives; the other regions are pooled at the k most
    probable boxes of ``out`` in each target image whose IoU with its target box is below
    ``CLEAR_IOU`` (E <= M k)."""
    pos = torch.nonzero(batch.positive).flatten()
    region = cache.text[cache.region_mask].view(len(batch.prompts), -1, cache.text.shape[-1])[:, 0]  # [P, D]
    size = torch.tensor(batch.images.shape[-2:][::-1] * 2, dtype=torch.float32, device=batch.images.device)  # (W, H, W, H)
    boxes = torch.stack([box_convert(batch.boxes[int(i)][0], "cxcywh", "xyxy") for i in pos]) * size  # [M, 4] pixels
    rmap = model.region_map([f[pos] for f in feats])  # [M, D, h, w]
    boxes = boxes.to(rmap.device)
    target = model.pool_map(rmap, boxes[:, None])[:, 0]  # [M, D]
    keys = [batch.image_keys[int(i)] for i in pos]
    same = torch.tensor([[a == b for b in keys] for a in keys], dtype=torch.bool, device=rmap.device)
    others = target.new_zeros(0, target.shape[-1])
    if k > 0 and out is not None:
        with torch.no_grad():
            prob = out.pred_logits[pos].float().sigmoid().masked_fill(~out.concept_mask[pos][:, None, :], 0.0).max(-1).values  # [M, Q]
            pred = box_convert(out.pred_boxes[pos].float(), "cxcywh", "xyxy") * size.to(rmap.device)  # [M, Q, 4] pixels
            clear = torch.stack([box_iou(pred[i], boxes[i : i + 1])[:, 0] < CLEAR_IOU for i in range(len(pos))])  # [M, Q]
            score, top = prob.masked_fill(~clear, -1.0).topk(min(k, prob.shape[1]), dim=-1)  # [M, k]
            picked = torch.gather(pred, 1, top[..., None].expand(-1, -1, 4))  # [M, k, 4]
        others = model.pool_map(rmap, picked)[score >= 0]  # [E, D]
    return region[batch.query_of[pos]], target, same, others


def check_finite(losses: dict[str, Tensor], where: str) -> None:
    bad = {k: float(v.detach()) for k, v in losses.items() if not torch.isfinite(v)}
    if bad:
        raise NonFiniteLoss(f"non-finite loss at {where}: {bad}; training stopped (latest checkpoint kept)")


def load_named(path: Path, what: str):
    """``torch.load`` of a file a user points at: one torch cannot read (cut short, another format) raises
    ``ValueError`` naming ``what`` (the option or field it came from) and the path."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001 - pickle, zip and EOF errors all occur for a file that is no checkpoint
        raise ValueError(f"{what} {path}: not a checkpoint torch can read ({type(err).__name__}: {err})") from None


def save_atomic(obj, path: Path) -> Path:
    """``torch.save`` to a temp file renamed over ``path``; equal objects give equal bytes.

    ``torch.save`` to a path names the archive's root folder after the file, so the temp
    file's random name would make every save of the same weights differ (and DVC would see
    a changed output, and re-run every stage after it); through a file object the root is
    always ``archive``.
    """
    with replaced_atomically(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
    return path


def trainable_state(model: torch.nn.Module) -> dict[str, Tensor]:
    """The parameters and buffers that training can change (frozen pretrained backbones left out)."""
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k not in frozen}


def reloaded_prefixes(model: torch.nn.Module) -> tuple[str, ...]:
    """State-dict prefixes of the frozen backbones that building ``model.cfg`` loads again
    from their pretrained source (the bundled MiniLM, a timm checkpoint): a model file
    can leave them out."""
    cfg = model.cfg
    out: list[str] = []
    if cfg.text_pretrained_loaded and cfg.text_frozen():
        out.append("text_backbone.")
    if cfg.image_pretrained_loaded and cfg.image_frozen():
        out += ["backbone.", "query_backbone."]
    return tuple(out)


def weights_digest(state: dict[str, Tensor], prefixes: tuple[str, ...]) -> str:
    """sha256 of the tensors under ``prefixes`` (names, shapes, dtypes and bytes)."""
    h = hashlib.sha256()
    for k in sorted(k for k in state if k.startswith(prefixes)):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_file_state(model: torch.nn.Module) -> dict:
    """The weights a model file stores: everything but the frozen pretrained backbones that
    ``build`` loads again (``reloaded_prefixes``), with a digest of those to check at load."""
    state = model.state_dict()
    skip = reloaded_prefixes(model)
    return {
        "model": {k: v for k, v in state.items() if not k.startswith(skip)} if skip else state,
        "reloaded_prefixes": list(skip),
        "reloaded_digest": weights_digest(state, skip) if skip else None,
    }


def load_model_file_state(model: torch.nn.Module, ck: dict, path: Path) -> None:
    """Load ``model_file_state`` contents into a freshly built ``model``; a file written
    before the backbones were left out (no ``reloaded_prefixes``) loads strictly."""
    skip = tuple(ck.get("reloaded_prefixes") or ())
    if not skip:
        model.load_state_dict(ck["model"])
        return
    missing, unexpected = model.load_state_dict(ck["model"], strict=False)
    bad = [k for k in missing if not k.startswith(skip)]
    if unexpected or bad:
        raise ValueError(f"model file {path}: unexpected keys {unexpected[:5]}, missing keys {bad[:5]}")
    found = weights_digest(model.state_dict(), skip)
    if found != ck["reloaded_digest"]:
        raise ValueError(
            f"model file {path} was trained on other frozen weights under {list(skip)} than this machine's "
            f"text_pretrained={model.cfg.text_pretrained!r} / image_pretrained={model.cfg.image_pretrained!r} load "
            f"(digest {found[:12]} != {str(ck['reloaded_digest'])[:12]}): install the same packages or checkpoints"
        )


@dataclass
class TrainState:
    epoch: int = 0  # epoch in progress
    step: int = 0  # next step within the epoch
    global_step: int = 0
    best: float = -math.inf
    best_epoch: int = -1
    # the epoch in progress's running loss sums and step count: a run resumed mid-epoch reports the whole epoch's mean
    loss_sums: dict = field(default_factory=dict)
    loss_steps: int = 0


def save_checkpoint(path: Path, model, optimizer, scheduler, state: TrainState, history: list[dict], extra: dict | None = None) -> Path:
    return save_atomic(
        {
            "model": trainable_state(model),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "state": state.__dict__.copy(),
            "history": history,
            **(extra or {}),
        },
        path,
    )


def read_resume_point(path: Path, who: str) -> dict | None:
    """The contents of the resume checkpoint ``path``; None when there is none or it cannot be read.

    Checkpoints are written atomically, but a file cut short or overwritten from outside
    would otherwise fail every later run of the stage. An unreadable one is moved aside to
    ``<name>.unreadable`` (kept for a look, never deleted) and the stage starts afresh.
    """
    if not path.exists():
        return None
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(ck, dict):
            raise TypeError(f"it holds a {type(ck).__name__}, not a checkpoint's dict")
    except MemoryError:  # the machine, not the file: a good resume point is not set aside for it
        raise
    except Exception as exc:  # noqa: BLE001 - any unreadable file: pickle, zip and EOF errors all occur
        aside = path.with_name(path.name + ".unreadable")
        try:
            os.replace(path, aside)
        except FileNotFoundError:  # another rank of a distributed run moved it first
            pass
        print(f"[{who}] {path} cannot be read ({type(exc).__name__}: {exc}); moved it to {aside} and starting afresh")
        return None
    return ck


def load_checkpoint(path: Path, model, optimizer=None, scheduler=None, ck: dict | None = None) -> tuple[TrainState, list[dict], dict]:
    """Restore a checkpoint written by ``save_checkpoint`` (``ck``: its already loaded contents)."""
    if ck is None:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    missing, unexpected = model.load_state_dict(ck["model"], strict=False)
    if unexpected:
        raise ValueError(f"checkpoint {path}: unexpected keys {unexpected[:5]}")
    if optimizer is not None:
        optimizer.load_state_dict(ck["optimizer"])
    if scheduler is not None and ck.get("scheduler") is not None:
        scheduler.load_state_dict(ck["scheduler"])
    return TrainState(**ck["state"]), ck.get("history", []), ck


def distributed() -> tuple[int, int]:
    """(rank, world size): from torch.distributed when torchrun started us, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> tuple[int, int]:
    """Join the process group when run under torchrun (gloo on CPU, nccl on GPU)."""
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return distributed()


def train_one_epoch(
    model, ddp_model, criterion: SetCriterion, optimizer, ds: TupleDataset, epoch: int, state: TrainState, *,
    seed: int, batch_size: int, clip_grad: float, negatives: NegativeSampler | None = None,
    max_steps: int | None = None, regulariser: Callable[[], Tensor] | None = None, lambda_reg: float = 0.0,
    on_checkpoint: Callable[[], None] | None = None, checkpoint_every: int = 50,
    log: Callable[[dict], None] | None = None, progress: Callable[[int, int, dict], None] | None = None,
    aux: bool = True, workers: int = 0, device: torch.device | None = None,
) -> dict[str, float]:
    """One epoch from ``state.step``; returns mean losses. Calls ``on_checkpoint`` every N steps.
    ``workers``: DataLoader processes building the batches ahead (``iter_batches``); ``device``:
    where each batch goes (the model's device)."""
    rank, world = distributed()
    ddp_model.train()
    n_steps = steps_per_epoch(len(ds), batch_size, world, max_steps)
    batches = iter_batches(ds, seed, epoch, batch_size, rank, world, negatives, start=state.step, max_steps=max_steps, workers=workers)

    def forward(batch: Batch):
        return _forward(model, ddp_model, batch, aux=aux, align=criterion.uses_align, align_negatives=criterion.align_negatives, rank=criterion.rank_inputs)

    return train_steps(
        criterion, optimizer, batches, forward, n_steps, state, epoch=epoch, clip_grad=clip_grad, regulariser=regulariser,
        lambda_reg=lambda_reg, on_checkpoint=on_checkpoint, checkpoint_every=checkpoint_every, log=log, progress=progress,
        device=device, seed=seed,
    )


class StepProgress:
    """A training loop's ``progress`` callback: advances the epoch's bar, shows the losses, and
    interrupts the run after ``stop_after`` steps in all (a test hook: a kill at a known point)."""

    def __init__(self, stop_after: int | None = None):
        self.stop_after, self.done, self.bar = stop_after, 0, None

    def __call__(self, i: int, total: int, losses: dict) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({k: f"{v:.3f}" for k, v in losses.items()})
        self.done += 1
        if self.stop_after is not None and self.done >= self.stop_after:
            raise KeyboardInterrupt(f"stopped after {self.done} steps (test hook)")


PROGRESS_LOSSES = ("loss", "loss_class", "loss_bbox", "loss_giou", "loss_align", "loss_rank", "loss_reg")


def train_steps(
    criterion: SetCriterion, optimizer, batches, forward: Callable, n_steps: int, state: TrainState, *, epoch: int,
    clip_grad: float, regulariser: Callable[[], Tensor] | None = None, lambda_reg: float = 0.0,
    on_checkpoint: Callable[[], None] | None = None, checkpoint_every: int = 50,
    log: Callable[[dict], None] | None = None, progress: Callable[[int, int, dict], None] | None = None,
    device: torch.device | None = None, autocast: torch.dtype | None = None, seed: int | None = None,
) -> dict[str, float]:
    """The optimisation steps of one epoch: ``batches`` yields (step, batch) from ``state.step``,
    ``forward(batch)`` gives (outputs, token_mask, targets) for ``criterion``; each batch is moved
    to ``device`` first (``to_device``). ``autocast`` (e.g. ``torch.bfloat16``): ``forward`` runs
    under ``torch.autocast`` of that dtype and its floating outputs are cast back to fp32 for the
    matcher and the losses. ``seed``: torch's global generator is seeded from (seed, epoch, step, rank)
    before each step, so what draws from it (dropout, DropPath) draws the same after a resume as in an
    unbroken run. Returns the epoch's mean losses (over its steps before a resume too: ``state`` keeps
    the running sums)."""
    from torch.utils._pytree import tree_map

    rank, _ = distributed()
    totals: dict[str, float] = state.loss_sums
    count = state.loss_steps
    device_type = torch.device(device).type if device is not None else "cpu"
    to_fp32 = lambda t: t.float() if isinstance(t, Tensor) and t.is_floating_point() else t  # noqa: E731
    for step, batch in batches:
        # the generator is forked: what runs outside the steps draws from it as it would without the seeding
        with torch.random.fork_rng(devices=[], enabled=seed is not None), \
                torch.autocast(device_type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            if seed is not None:
                torch.manual_seed(sample_seed(seed, epoch, step, rank, STEP_SEED_SALT))
            outputs, token_mask, targets = forward(to_device(batch, device))
        if autocast is not None:
            outputs = tree_map(to_fp32, outputs)
        losses = criterion(outputs, targets, token_mask)
        if regulariser is not None and lambda_reg > 0:
            losses["loss_reg"] = regulariser()
            losses["loss"] = losses["loss"] + lambda_reg * losses["loss_reg"]
        check_finite(losses, f"epoch {epoch} step {step}")
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        if clip_grad > 0:
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], clip_grad)
        optimizer.step()
        state.step = step + 1
        state.global_step += 1
        for k, v in losses.items():
            totals[k] = totals.get(k, 0.0) + float(v.detach())
        count += 1
        state.loss_sums, state.loss_steps = totals, count
        if log is not None and rank == 0:
            log({"train_step_loss": float(losses["loss"]), "step": state.global_step})
        if progress is not None and rank == 0:
            progress(step + 1, n_steps, {k: float(v.detach()) for k, v in losses.items() if k in PROGRESS_LOSSES})
        if on_checkpoint is not None and state.step % checkpoint_every == 0 and state.step < n_steps:
            on_checkpoint()
    state.loss_sums, state.loss_steps = {}, 0  # the next epoch starts its own
    return {k: v / max(count, 1) for k, v in totals.items()}


class _DDPForward(torch.nn.Module):
    """Wraps the two-step forward (encode query, detect) so DDP sees one call and syncs gradients."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch: Batch, aux: bool = True, align: bool = False, align_negatives: int = 0, rank=None):
        return model_outputs(self.model, batch, aux, align, align_negatives, rank)


def _forward(model, ddp_model, batch: Batch, aux: bool = True, align: bool = False, align_negatives: int = 0, rank=None):
    if ddp_model is model:
        return model_outputs(model, batch, aux, align, align_negatives, rank)
    return ddp_model(batch, aux, align, align_negatives, rank)


def wrap_ddp(model) -> torch.nn.Module:
    """DistributedDataParallel around the detector when a process group is up, else the model itself."""
    if not (dist.is_available() and dist.is_initialized()):
        return model
    return torch.nn.parallel.DistributedDataParallel(_DDPForward(model), find_unused_parameters=True)
