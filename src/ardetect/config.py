"""Typed configuration, loaded from ``params.yaml``.

``params.yaml`` is sectioned by stage. Its ``profile`` key names an overlay in
``profiles/<name>.yaml`` that is deep-merged over it (``default`` has none), so
``dvc exp run -S profile=smoke`` switches the whole pipeline. Every section is a
pydantic model with ``extra="forbid"``: an unknown key or an out-of-range value
fails at load time with a message that names the key path and the value.
"""

from __future__ import annotations

import copy
import difflib
import math
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ardetect.data.classes import WORLD_CLASSES

PROFILES = ("default", "smoke", "paper", "tiny_real")



def _pooling_grids(v: list[int]) -> list[int]:
    bad = [g for g in v if not 1 <= g <= 8]
    if bad:
        raise ValueError(f"identity_grids has {bad}: each pooling grid must be an integer from 1 to 8")
    return sorted(set(v))


def _identity_weights(v: list[float]) -> list[float]:
    bad = [w for w in v if not math.isfinite(w) or w < 0]
    if bad:
        raise ValueError(f"identity_weights has {bad}: each weight must be a finite number >= 0")
    return sorted(set(v))


IdentityGrids = Annotated[list[int], AfterValidator(_pooling_grids)]  # sorted, unique, each 1..8
IdentityWeights = Annotated[list[float], AfterValidator(_identity_weights)]  # sorted, unique, finite, >= 0
FitMetric = Literal["recall@1", "recall@5", "recall@10", "inverse_rank@5", "inverse_rank@10", "box_accuracy"]  # harness summary keys

class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DistractorConfig(_Section):
    """Distractor objects placed around the concept instance."""

    min_count: int = Field(1, ge=0, le=8)
    max_count: int = Field(3, ge=0, le=8)
    same_class_prob: float = Field(0.4, ge=0.0, le=1.0, description="chance a distractor shares the concept's base class")
    scale: tuple[float, float] = Field(
        (0.2, 0.45),
        description="distractor size as a fraction of the image side; overlapping the concept's own range keeps "
        "'the largest object' from giving the concept away",
    )

    @model_validator(mode="after")
    def _ordered(self) -> "DistractorConfig":
        if self.max_count < self.min_count:
            raise ValueError(f"max_count={self.max_count} is below min_count={self.min_count}")
        lo, hi = self.scale
        if not (0.05 <= lo <= hi <= 0.95):
            raise ValueError(f"scale={list(self.scale)} must satisfy 0.05 <= low <= high <= 0.95")
        return self


class WorldConfig(_Section):
    """The synthetic attribution world (embedded default data source)."""

    seed: int = Field(0, ge=0)
    n_concepts: int = Field(1040, ge=6, description="exemplars, one concept identity each (at least 2 a split)")
    queries_per_concept: int = Field(3, ge=1, le=10, description="generated images per concept (paper: about 10)")
    image_size: int = Field(160, ge=64, le=1024, description="square side of every image, pixels")
    base_classes: list[str] | None = Field(None, description="subset of the world's shape families; null = all")
    placeholder: str = Field("V* {}", description="personalised-concept phrase; '{}' is replaced by the base class")
    template_set: Literal["lvis", "coco"] = "lvis"
    object_scale: tuple[float, float] = Field((0.3, 0.55), description="concept size as a fraction of the image side")
    pose_jitter: float = Field(0.35, ge=0.0, le=3.2, description="max rotation of a re-rendered concept, radians")
    identity_drift: float = Field(0.06, ge=0.0, le=1.0, description="how far a generated instance drifts from its identity")
    distractors: DistractorConfig = DistractorConfig()
    workers: int = Field(0, ge=0, description="worker processes; 0 = every core this process may use (its CPU affinity, and no more than its CPU quota)")

    @field_validator("base_classes")
    @classmethod
    def _base_classes(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and not v:
            raise ValueError("base_classes=[]: name at least one class, or null for every shape family")
        if v is not None and len(set(v)) < len(v):
            raise ValueError(f"base_classes={v} names {sorted({c for c in v if v.count(c) > 1})} twice: name each class once")
        unknown = [c for c in v or () if c not in WORLD_CLASSES]
        if unknown:
            raise ValueError(f"base_classes={v}: {unknown} not among the world's shape families {list(WORLD_CLASSES)}")
        return v

    @model_validator(mode="after")
    def _distractor_classes(self) -> "WorldConfig":
        d = self.distractors
        if self.base_classes is not None and len(self.base_classes) == 1 and d.max_count > 0 and d.same_class_prob == 0:
            raise ValueError(f"distractors.same_class_prob=0 with the one base class {self.base_classes}: there is no other class to "
                             f"draw a distractor from, so every one would be a {self.base_classes[0]}; name another class in "
                             "base_classes, or set distractors.min_count and max_count to 0 for none")
        return self

    @field_validator("placeholder")
    @classmethod
    def _placeholder(cls, v: str) -> str:
        if v.count("{}") != 1:
            raise ValueError(f"placeholder={v!r} must hold exactly one '{{}}' for the base class")
        if not v.replace("{}", "").strip():  # the validation's phrase_has_placeholder: something besides the class
            raise ValueError(f"placeholder={v!r} holds nothing besides '{{}}': the concept phrase would be the bare class name")
        return v

    @field_validator("object_scale")
    @classmethod
    def _scale(cls, v: tuple[float, float]) -> tuple[float, float]:
        lo, hi = v
        if not (0.05 <= lo <= hi <= 0.95):
            raise ValueError(f"object_scale={list(v)} must satisfy 0.05 <= low <= high <= 0.95")
        return v


class RealSourceConfig(_Section):
    """The real path's inputs (COCO / LVIS exemplars, detection and segmentation models)."""

    annotations: str | None = Field(None, description="COCO/LVIS instances JSON (validation split)")
    images: str | None = Field(None, description="folder of the annotation file's images")
    classes: list[str] | None = Field(None, description="category names of the annotation file to draw from; null = all")
    max_exemplars: int | None = Field(None, ge=1, description="stop after this many accepted exemplars; null = all")
    seed: int = Field(0, ge=0, description="order of classes and images, and each exemplar's generation seed")
    grounding_dino: str = Field("IDEA-Research/grounding-dino-base", description="local path or hub id")
    sam_checkpoint: str | None = Field(None, description="segment-anything checkpoint (.pth), local path")
    sam_model_type: Literal["vit_h", "vit_l", "vit_b", "vit_tiny"] = Field(
        "vit_h", description="vit_tiny is the test-size architecture of ardetect.generation.tiny"
    )
    box_threshold: float = Field(0.35, ge=0.0, le=1.0)
    text_threshold: float = Field(0.25, ge=0.0, le=1.0)
    min_box_side: float = Field(4.0, ge=0.0, description="pixels; a smaller concept mask box skips the exemplar")
    min_box_area: float = Field(64.0, ge=0.0, description="square pixels; a smaller concept mask box skips the exemplar")
    device: str | None = Field(None, description="torch device for GroundingDINO and SAM; null = cuda when present, else cpu")
    fixtures: str | None = Field(
        None, description="tests only: a folder the exemplars stage fills first (when absent) with tiny random models and "
        "a COCO file over scikit-image's sample photographs (ardetect.generation.fixtures)",
    )


class ExemplarsConfig(_Section):
    source: Literal["synthetic", "coco", "lvis"] = "synthetic"
    real: RealSourceConfig = RealSourceConfig()


class CustomizationConfig(_Section):
    """Break-a-Scene customization of Stable Diffusion (the real path)."""

    base_model: str = Field("stabilityai/stable-diffusion-2-1-base", description="local path or hub id")
    resolution: int = Field(512, ge=16, multiple_of=8, description="square side of training and generated images, pixels")
    ti_steps: int = Field(400, ge=0)
    ti_lr: float = Field(5e-4, gt=0)
    joint_steps: int = Field(400, ge=0)
    joint_lr: float = Field(2e-6, gt=0)
    inference_steps: int = Field(50, ge=1)
    guidance_scale: float = Field(7.5, ge=0)
    method: Literal["break_a_scene", "lora"] = Field(
        "break_a_scene", description="joint phase: the whole UNet + text encoder (Break-a-Scene) or LoRA adapters on the "
        "UNet's attention (cheaper, DreamBooth-LoRA style through peft); both start with the textual-inversion phase",
    )
    lora_rank: int = Field(4, ge=1, description="LoRA rank (method lora)")
    lora_lr: float = Field(1e-4, gt=0, description="LoRA learning rate in the joint phase (method lora)")
    token: str = Field("<asset0>", description="the new token; the record's placeholder 'V*' is sampled as it")
    attn_res: int = Field(16, ge=1, description="grid of the cross-attention maps the attention loss reads (16 at 512 px)")
    attn_loss_weight: float = Field(0.01, ge=0.0, description="cross-attention loss weight; 0 = off")
    attn_loss_in_ti: bool = Field(False, description="also apply the cross-attention loss in the textual-inversion phase")
    prior_preservation: bool = Field(True, description="train on base-model images of the plain class beside the instance")
    prior_images: int = Field(10, ge=1, description="plain-class images sampled from the base model, once per base class")
    prior_weight: float = Field(1.0, ge=0.0)
    grad_clip: float = Field(1.0, gt=0.0)
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("bf16", description="autocast on CUDA; the CPU runs fp32")
    sample_batch: int = Field(
        4, ge=1, description="images per sampling call (generated images and prior images); each image keeps its own "
        "seeded generator, so it does not depend on the batch it was drawn in",
    )
    compile: bool = Field(
        False, description="torch.compile the UNet for the customization steps; GPU-oriented (the first steps of each "
        "phase pay the compile time, and inductor needs a C++ compiler on the CPU)",
    )
    device: str | None = Field(None, description="torch device; null = cuda when present, else cpu")


class GenerateConfig(_Section):
    backend: Literal["synthetic", "break_a_scene"] = "synthetic"
    customization: CustomizationConfig = CustomizationConfig()
    box_threshold: float = Field(0.35, ge=0.0, le=1.0, description="GroundingDINO box threshold on generated images")
    text_threshold: float = Field(0.25, ge=0.0, le=1.0)
    max_instances: int = Field(1, ge=1, description="a generated image with more concept detections is dropped")
    workers: int = Field(1, ge=1, description="Dask workers of a local cluster (one GPU each); 1 = in this process")
    scheduler: str | None = Field(None, description="address of an existing Dask scheduler, e.g. tcp://host:8786")
    batch_size: int = Field(8, ge=1, description="exemplars per MLflow child run of the fan-out")


MIN_SPLIT_CONCEPTS = 2  # a query ranks its own training image against the other concepts of its split: it needs one


class SplitConfig(_Section):
    train: float = Field(0.8, ge=0.0, le=1.0)
    val: float = Field(0.1, ge=0.0, le=1.0)
    test: float = Field(0.1, ge=0.0, le=1.0)

    def concept_counts(self, n: int) -> dict[str, int]:
        """Concepts of each split among ``n``: each share rounded, and every split with a share at least
        ``MIN_SPLIT_CONCEPTS`` (a query's negatives are the other concepts of its split, and phase 1 draws its
        negatives from train's); what train lacks is taken back from the larger of val and test."""
        least = {k: MIN_SPLIT_CONCEPTS if getattr(self, k) > 0 else 0 for k in ("train", "val", "test")}
        need = sum(least.values())
        if n < need:
            raise ValueError(f"{n} concepts cannot fill the three splits of tuples.split (train {self.train:g}, val {self.val:g}, "
                             f"test {self.test:g}): each needs {MIN_SPLIT_CONCEPTS} concepts, since a query ranks its own training "
                             f"image against the other concepts of its split; give the world at least {need} concepts")
        test = max(int(round(n * self.test)), least["test"])
        val = max(int(round(n * self.val)), least["val"])
        while test + val > n - least["train"]:
            if (test >= val or val == least["val"]) and test > least["test"]:
                test -= 1
            else:
                val -= 1
        return {"train": n - test - val, "val": val, "test": test}

    @model_validator(mode="after")
    def _sum(self) -> "SplitConfig":
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split fractions train+val+test={total:.4f} must sum to 1")
        for name, why in (("train", "the trainings"), ("val", "each training's checkpoint and the re-ranking's weights are chosen on it"),
                          ("test", "the evaluation")):
            if getattr(self, name) == 0:
                raise ValueError(f"{name}=0: every split needs concepts ({name}: {why}); give it a share above 0")
        return self


class TuplesConfig(_Section):
    split: SplitConfig = SplitConfig()
    split_seed: int = Field(42, ge=0)
    gallery_size: int = Field(8, ge=1, le=64, description="sample tuples drawn in the gallery figure")


class ValidateConfig(_Section):
    min_box_side: float = Field(4.0, ge=0.0, description="pixels")
    min_box_area: float = Field(64.0, ge=0.0, description="square pixels")
    class_balance_tolerance: float = Field(
        3.0, ge=1.0, description="max ratio of the most to the least frequent base class among tuples"
    )
    split_tolerance: float = Field(0.15, ge=0.0, le=1.0, description="max abs deviation of a split's concept share")
    min_negatives: int = Field(1, ge=0, description="fewest negatives any tuple may have")
    max_examples: int = Field(5, ge=1, description="example rows shown per failed expectation")
    box_iou_min: float = Field(
        0.7, ge=0.0, le=1.0, description="least IoU of R_X / R_Q with the bounding box of the mask of the object it claims"
    )
    box_in_hull_min: float = Field(
        0.4, ge=0.0, le=1.0, description="least share of a box's area inside the convex hull of its object's mask"
    )
    detection_iou_min: float = Field(
        0.5, ge=0.0, le=1.0, description="least IoU of R_Q with the best second detection of the concept in Q (real path)"
    )
    distractor_count_share: float = Field(
        0.95, ge=0.0, le=1.0,
        description="least share of tuple images (synthetic world) whose visible distractors number from world.distractors."
                    "min_count to max_count (a few are covered whole by the concept or find no free spot); a world of few images "
                    "may have 2 outside it whatever the share",
    )
    min_pixel_std: float = Field(3.0, ge=0.0, description="least spread (std, grey levels 0-255) of an image's pixels")
    min_box_pixel_std: float = Field(3.0, ge=0.0, description="least spread (std, grey levels) of the pixels in a box")
    hash_size: int = Field(16, ge=4, le=64, description="perceptual hash side: hash_size**2 bits")
    copy_max_distance: int = Field(
        16, ge=0, description="a query within this hash distance (bits) of its own training image is a copy"
    )
    max_copy_share: float = Field(
        0.05, ge=0.0, le=1.0, description="most share of queries that may be copies (each is excluded) before the gate fails"
    )
    duplicate_max_distance: int = Field(
        16, ge=0, description="training images of two concepts within this hash distance (bits) are near-duplicates"
    )

    @model_validator(mode="after")
    def _distances_fit_the_hash(self) -> "ValidateConfig":
        # unrelated images differ in about half of a perceptual hash's bits: a distance past a quarter of them would
        # call unrelated images copies (hash_size 4 has 16 bits, and the default distance 16 is every one of them)
        most = self.hash_size**2 // 4
        for name in ("copy_max_distance", "duplicate_max_distance"):
            if getattr(self, name) > most:
                raise ValueError(f"{name}={getattr(self, name)} is more than a quarter of hash_size={self.hash_size}'s "
                                 f"{self.hash_size**2} bits ({most}): unrelated images would count as copies; give "
                                 f"{name} <= {most} or a larger hash_size")
        return self


class ModelSection(_Section):
    """The detector: a named size (``ardetect.model.ModelConfig.named``) plus overrides."""

    size: Literal["nano", "T-B", "B-B", "B-L"] = "nano"
    image_size: int | None = Field(
        None, ge=32, le=2048, description="square input side of the detector, pixels (images are resized to it); null = world.image_size",
    )
    overrides: dict[str, Any] = Field(default_factory=dict, description="ModelConfig fields to override")
    pretrained: str | None = Field(
        None, description="transformers GroundingDINO checkpoint (local path or cached hub id) to start from"
    )
    device: str | None = Field(
        None, pattern=r"^(cpu|cuda(:\d+)?)$", description="torch device the detector trains and is scored on (pretrain, both "
        "phases, evaluate): cpu, cuda or cuda:N; null = cuda when present, else cpu",
    )

    @model_validator(mode="after")
    def _one_image_size(self) -> "ModelSection":
        if self.image_size is not None and "image_size" in self.overrides:
            raise ValueError(f"image_size={self.image_size} and overrides.image_size={self.overrides['image_size']!r}: give the input size once")
        return self


class LossConfig(_Section):
    """Matcher costs and loss weights (GroundingDINO's recipe by default)."""

    cost_class: float = Field(2.0, ge=0)
    cost_bbox: float = Field(5.0, ge=0)
    cost_giou: float = Field(2.0, ge=0)
    weight_class: float = Field(2.0, ge=0)
    weight_bbox: float = Field(5.0, ge=0)
    weight_giou: float = Field(2.0, ge=0)
    focal_alpha: float = Field(0.25, ge=0, le=1)
    focal_gamma: float = Field(2.0, ge=0)
    aux_loss: bool = True
    weight_align: float = Field(
        3.0, ge=0, description="region contrast between query and target regions (ours, for from-scratch training); 0 = the paper's recipe"
    )
    align_temperature: float = Field(0.1, gt=0, description="temperature of the region contrast")
    align_negatives: int = Field(
        4, ge=0, description="region-contrast negatives from each target image: regions at its most probable boxes clear of the target (ours)"
    )


class ValidationConfig(_Section):
    """How a training phase picks its checkpoint: ranking on a fixed, seeded val subset after each epoch."""

    queries: int = Field(24, ge=1, description="val queries (seeded subset)")
    negatives: int = Field(15, ge=1, description="negatives per val query (seeded)")
    score: Literal["reranked", "paper"] = Field(
        "reranked", description="'reranked': the best val Recall@5 over identity_weights x identity_grids, the score the model "
        "is read with (the evaluation fits w and g on val the same way); 'paper': the most probable box's probability only",
    )
    identity_weights: IdentityWeights = Field([0.0, 1.0, 2.0, 5.0, 10.0, 20.0], min_length=1)
    identity_grids: IdentityGrids = Field([1, 2, 4], min_length=1)
    top_k: int = Field(5, ge=1, description="boxes per candidate the re-ranking chooses among")


class PretrainConfig(_Section):
    """Detection pre-training (GroundingDINO-style) on every object of the training split's images.

    Each image's prompt lists its objects' classes and ``absent_classes`` sampled absent ones,
    in shuffled order ("mug . cat . car ."); every object is a target on its class's tokens,
    with phase 1's matcher and losses. Phase 1 starts from the result.
    """

    epochs: int = Field(2, ge=0, description="0 = no pre-training: phase 1 starts from the built (random or model.pretrained) weights")
    classify_epochs: int = Field(
        5, ge=0, description="before detection: the image backbone classifies the training split's object crops (ours: the "
        "ImageNet start GroundingDINO's Swin has); 0 = none. A world of one base class has nothing to classify: passed over",
    )
    classify_crop: int = Field(64, ge=32, description="object crops' side, pixels")
    classify_batch_size: int = Field(64, ge=2)
    classify_lr: float = Field(2e-3, gt=0, description="peak of the one-cycle schedule")
    region_classifier_epochs: int | None = Field(
        None, ge=1, description="the region classifier's own crop classification, a fresh backbone, this many passes over its "
        "crops (after the backbone's, which the detector goes on from); null = the backbone's crop classification is kept as it",
    )
    region_classifier_copies: int = Field(
        1, ge=1, description="crops of every object the region classifier trains on: the exact box, then copies - 1 jittered ones",
    )
    region_classifier_jitter: float = Field(
        0.0, ge=0, lt=0.5, description="each side of a jittered copy's box moves by up to this fraction of the box's width "
        "(x) or height (y), uniformly: crops as imprecise as the detector's boxes",
    )
    batch_size: int = Field(4, ge=1)
    lr: float = Field(1e-3, gt=0)
    lr_backbone: float = Field(1e-3, ge=0)
    lr_linear_proj_mult: float = Field(0.1, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    clip_grad: float = Field(0.1, ge=0)
    lr_drop_epochs: int = Field(100, ge=1, description="StepLR step size, epochs")
    lr_gamma: float = Field(0.1, gt=0, le=1)
    absent_classes: int = Field(4, ge=0, description="classes not in the image added to its prompt (negatives for their tokens)")
    image_size: int | None = Field(
        None, ge=32, description="side the detection steps train at (the weights do not depend on it: phase 1 and the val "
        "diagnostics read the model's model.image_size); null = the model's",
    )
    min_area: int = Field(64, ge=1, description="objects with fewer visible pixels are left out (mostly covered distractors)")
    images: Literal["all", "exemplars", "generated"] = Field("all", description="which training-split images to pre-train on")
    checkpoint_every: int = Field(100, ge=1)
    diagnostics_every: int | None = Field(
        1, ge=1, description="the val diagnostics (grounding, class R-precision) after every N-th detection epoch and always after "
        "the last; null = after the last only. They read the detector and never change its weights",
    )
    augment: bool = True
    seed: int = Field(0, ge=0)
    max_steps_per_epoch: int | None = Field(None, ge=1, description="batches an epoch (a fresh shuffle each); null = every image once")
    loader_workers: int = Field(
        0, ge=0, description="DataLoader processes building the detection steps' batches ahead of training (the same batches); 0 = "
        "in the training process. Beside a GPU, use 2-4: a batch of 64 took 0.14-0.21 s to build on one CPU core, against 0.34 s "
        "for a whole step on an H200",
    )
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="the detection steps' forward: fp32, or bf16 under torch.autocast (the weights, the optimiser and the "
        "losses stay fp32)",
    )
    loss: LossConfig = Field(LossConfig(), description="matcher costs and loss weights (phase 1's defaults; the region contrast is not used)")

    @model_validator(mode="after")
    def _region_classifier(self):
        if self.region_classifier_epochs and not self.classify_epochs:
            raise ValueError(f"region_classifier_epochs={self.region_classifier_epochs} with classify_epochs=0: the region classifier "
                             "comes with the crop classification; give classify_epochs > 0 or region_classifier_epochs null")
        if self.region_classifier_copies > 1 and self.region_classifier_jitter == 0:
            raise ValueError(f"region_classifier_copies={self.region_classifier_copies} with region_classifier_jitter=0: the copies "
                             "would be the same crops; give a jitter > 0 or copies 1")
        return self


_DISTRACTOR_CLASS_NEGATIVES = (  # both phases' setting
    "of the k, how many come from images of another class's concept that hold a distractor of the query's base class (ours; the "
    "record's objects table): the images a score reading the class alone confuses with the concept's; 0 = none"
)


def _same_class_within_k(section):
    """A phase's negatives: the same-class and distractor-class shares together cannot exceed k."""
    hard = section.same_class_negatives + section.distractor_class_negatives
    if hard > section.k_negatives:
        raise ValueError(f"same_class_negatives={section.same_class_negatives} and distractor_class_negatives="
                         f"{section.distractor_class_negatives} add up to {hard}, above k_negatives={section.k_negatives}")
    return section


class Phase1Config(_Section):
    """Phase 1: positives (and optionally k negatives each, ours), Hungarian matching, focal + L1 + GIoU."""

    epochs: int = Field(3, ge=1)
    batch_size: int = Field(4, ge=1)
    lr: float = Field(1e-3, gt=0, description="from scratch (nano); the paper's 1e-4 fine-tunes pretrained GroundingDINO")
    lr_backbone: float = Field(1e-3, ge=0, description="image backbone lr when it trains (randomly initialised)")
    lr_linear_proj_mult: float = Field(0.1, gt=0, description="lr multiplier of sampling offsets and reference points")
    weight_decay: float = Field(1e-4, ge=0)
    clip_grad: float = Field(0.1, ge=0, description="max grad norm; 0 = off")
    lr_drop_epochs: int = Field(100, ge=1, description="StepLR step size, epochs")
    lr_gamma: float = Field(0.1, gt=0, le=1)
    checkpoint_every: int = Field(100, ge=1, description="save the latest checkpoint every N steps (resume point)")
    augment: bool = True
    seed: int = Field(0, ge=0)
    max_steps_per_epoch: int | None = Field(None, ge=1, description="cap for quick runs; null = the whole split")
    loader_workers: int = Field(0, ge=0, description="DataLoader processes building batches ahead of training; 0 = in the training process (same batches)")
    k_negatives: int = Field(
        0, ge=0, description="negatives per positive (ours): other concepts' training images, every box pushed down by the focal "
        "loss, so the whole detector learns to score an image without the concept low; 0 = the paper's positives-only phase 1",
    )
    same_class_negatives: int = Field(0, ge=0, description="of the k, how many come from the query's base class; 0 = a uniform draw")
    distractor_class_negatives: int = Field(0, ge=0, description=_DISTRACTOR_CLASS_NEGATIVES)
    validation: ValidationConfig = ValidationConfig()
    loss: LossConfig = LossConfig()

    @model_validator(mode="after")
    def _hard_within_k(self):
        return _same_class_within_k(self)


class Phase2Config(_Section):
    """Phase 2: adapters only; each positive with k fresh negatives per epoch."""

    epochs: int = Field(2, ge=1)
    k_negatives: int = Field(4, ge=1, description="negatives per positive (paper: 4)")
    same_class_negatives: int = Field(0, ge=0, description="of the k, how many come from the query's base class (ours); 0 = the paper's uniform draw")
    distractor_class_negatives: int = Field(0, ge=0, description=_DISTRACTOR_CLASS_NEGATIVES)
    lambda_reg: float = Field(0.05, ge=0, description="weight of the adapters' orthogonality regulariser")
    lambda_cls: float = Field(1.0, gt=0)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    clip_grad: float = Field(0.1, ge=0)
    checkpoint_every: int = Field(50, ge=1)
    seed: int = Field(0, ge=0)
    max_steps_per_epoch: int | None = Field(
        None, ge=1, description="steps per epoch (a step: groups_per_step positives, each with its k negatives); null = every training positive once an epoch (paper)",
    )
    groups_per_step: int = Field(1, ge=1, description="positives per optimiser step, each with its own k negatives and query; 1 = the paper's batch")
    augment: bool = True
    loader_workers: int = Field(0, ge=0, description="DataLoader processes building batches ahead of training; 0 = in the training process (same batches)")
    lambda_rank: float = Field(
        0.0, ge=0, description="weight of the ranking loss on the re-ranked attribution score of each positive against its k negatives (ours); 0 = the paper's phase 2",
    )
    rank_grid: int = Field(4, ge=1, le=8, description="pooling grid of the region similarity in the ranking loss's score")
    rank_identity_weight: float = Field(5.0, ge=0, description="identity weight w of the ranking loss's score, prob * exp(w (sim - 1))")
    rank_top_k: int = Field(5, ge=1, description="boxes per image the ranking loss's score chooses among (as evaluate.identity_top_k)")
    validation: ValidationConfig = ValidationConfig()

    @model_validator(mode="after")
    def _hard_within_k(self):
        return _same_class_within_k(self)


class AbCSection(_Section):
    """The AbC baseline's base encoder and heads (both AbC rows: the world encoder and ARD's backbone)."""

    encoder: str = Field("world", description="'world' (SSL-trained on the training split) or a timm name with local weights")
    image_size: int | None = Field(None, ge=32, description="resolution AbC reads images at; null = the detector's (model.image_size, else world.image_size)")
    feature_dim: int = Field(128, ge=8, description="the world encoder's feature size")
    width: int = Field(32, ge=4, description="channels of the world encoder's first stage (doubling each stage)")
    ssl_epochs: int = Field(8, ge=0)
    ssl_batch_size: int = Field(128, ge=2)
    jitter: float = Field(0.2, ge=0.0, lt=1.0, description="brightness/contrast range of the SSL views (no hue or greyscale: they carry identity)")
    pooling: Literal["avg", "max"] = Field(
        "max", description="global pooling of the base encoders' feature maps (both AbC rows); max keeps an object's features "
        "from being averaged away by the background and the other objects (chosen on val)",
    )
    ard_features: Literal["region_map", "backbone"] = Field(
        "region_map", description="the control row's features from ARD's phase-1 detector: its region map (the backbone's "
        "maps fused by the region projection) or the three backbone maps, pooled over the image (region_map chosen on val)",
    )
    head_epochs: int = Field(40, ge=1)
    lr: float = Field(1e-3, gt=0)
    lambda_reg: float = Field(0.05, ge=0)
    seed: int = Field(0, ge=0)


class EvaluateConfig(_Section):
    iou_threshold: float = Field(0.5, gt=0, le=1)
    max_queries: int | None = Field(None, ge=1, description="evaluate a seeded subset of test queries; null = all")
    candidate_batch: int = Field(64, ge=1)
    workers: int = Field(0, ge=0, description="queries scored side by side, one intra-op thread each; 0 = one per core")
    generalisation_world_seed: int = Field(
        1, ge=0, description="seed of a second world with unseen identities (must differ from world.seed)"
    )
    generalisation_concepts: int = Field(208, ge=3, description="concepts of the second world (all in its test split)")
    generalisation_block: int | None = Field(
        104, ge=2, description="world2 concepts ranked together: a query's negatives are the other concepts of its seeded block "
        "(104 = as many candidates as a test query of the default world has); null = all of world2",
    )
    generalisation_queries_per_concept: int = Field(1, ge=1, le=10)
    figure_queries: int = Field(2, ge=0, description="queries drawn in the top-10 retrieval figure")
    identity_weights: IdentityWeights = Field(
        [0.0, 1.0, 2.0, 5.0, 10.0, 20.0], min_length=1,
        description="grid the identity re-ranking weight is fitted over on the val split (README); 0 = the paper's score",
    )
    identity_grids: IdentityGrids = Field(
        [1, 2, 3, 4], min_length=1,
        description="pooling grids of the re-ranking's region descriptor fitted over with the weight (1 = the region token, 2 = 2x2 cells, ...)",
    )
    identity_top_k: int = Field(5, ge=1, description="boxes per candidate image the identity re-ranking chooses among")
    class_weights: IdentityWeights = Field(
        [0.0, 1.0, 2.0, 3.0], min_length=1,
        description="grid the re-ranking's class-match exponent is fitted over with the weight and grid (a detector with a region "
        "classifier; 0 = no class factor)",
    )
    fit_queries: int | None = Field(64, ge=1, description="val queries the identity weight and grid are fitted on; null = all")
    fit_metrics: list[FitMetric] = Field(
        ["recall@1", "recall@5", "recall@10"], min_length=1,
        description="val metrics whose mean decides the fit of the weight, grid and class weight (each once)",
    )

    @field_validator("fit_metrics")
    @classmethod
    def _distinct_fit_metrics(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"fit_metrics={v}: each metric once")
        return v


class ExportConfig(_Section):
    opset: int = Field(17, ge=17, le=23, description="ONNX opset of the graphs")
    parity_queries: int = Field(32, ge=1, description="the first test tuples parity is measured on (every candidate of each)")
    variant_queries: int = Field(8, ge=1, description="the first of those the fp16 scorer's parity (reported, not gated) runs on")
    int8_queries: int | None = Field(
        None, ge=1, description="the first of those the int8 scorer's parity and Recall@K (reported, not gated) run on; null = all of them",
    )
    score_tolerance: float = Field(1e-4, gt=0, description="largest |ONNX - PyTorch| score the fp32 export may show")
    box_tolerance_px: float = Field(0.5, gt=0, description="largest |ONNX - PyTorch| box coordinate, pixels")
    fp16: bool = Field(True, description="also write an fp16 scorer (for a GPU); its parity is reported, not gated")
    int8: bool = Field(True, description="also write an int8 dynamically quantized scorer (CPU); parity and Recall@10 reported")
    registry: bool = Field(True, description="log the export as an MLflow model and register it (alias champion / challenger)")
    model_name: str = Field("ardetect-detector", min_length=1, description="registered model name")


class ServeConfig(_Section):
    """``ard serve`` and ``ard index build``: where the model and the index are, and the limits of a request."""

    model: str = Field("models:/ardetect-detector@champion", min_length=1,
                       description="a registry URI (models:/name@alias or models:/name/version) or an export folder")
    index: str = Field("models/index", min_length=1, description="the candidate index folder (`ard index build` writes it)")
    host: str = Field("127.0.0.1", min_length=1, description="address to bind; 0.0.0.0 exposes the service to the network")
    port: int = Field(8000, ge=1, le=65535)
    providers: list[str] | None = Field(None, description="onnxruntime providers in order; null = TensorRT, CUDA, CPU, those usable")
    threads: int | None = Field(None, ge=1, description="onnxruntime intra-op threads a session; null = onnxruntime's default")
    shortlist: int = Field(50, ge=1, description="images the embedding search passes to the scorer; >= the index size scores every image")
    top_k: int = Field(10, ge=1, description="results returned when a request does not say")
    max_top_k: int = Field(100, ge=1, description="largest top_k a request may ask for")
    max_candidates: int = Field(1000, ge=1, description="largest explicit candidate list a request may send")
    max_shortlist: int = Field(1000, ge=1, description="largest shortlist a request may ask for (each image in it is scored)")
    max_upload_bytes: int = Field(10_000_000, ge=1024, description="largest request body, bytes")
    max_pixels: int = Field(16_777_216, ge=1, description="largest uploaded image, width x height; checked from the header before decoding")
    max_prompt_chars: int = Field(500, ge=1, description="longest prompt, characters")
    workers: int = Field(1, ge=1, le=64, description="requests scored at once (threads running onnxruntime)")
    queue_size: int = Field(8, ge=0, description="requests waiting beyond the workers; more get 503 with Retry-After")
    request_timeout_s: float = Field(60.0, gt=0, description="a request still unanswered after this gets 504")
    token_env: str = Field("ARD_SERVE_TOKEN", min_length=1,
                           description="environment variable holding a bearer token; when set, every route but /health needs it")
    cors_origins: list[str] = Field([], description="origins allowed by CORS; empty = no CORS headers at all")
    batch: int = Field(64, ge=1, description="images encoded a batch when the index is built (a resume point each); scoring chunks by provider: 4 candidates a call side by side on the CPU, 64 on a GPU")

    @model_validator(mode="after")
    def _limits(self) -> "ServeConfig":
        if self.top_k > self.max_top_k:
            raise ValueError(f"top_k={self.top_k} exceeds max_top_k={self.max_top_k}")
        if self.shortlist > self.max_shortlist:
            raise ValueError(f"shortlist={self.shortlist} exceeds max_shortlist={self.max_shortlist}")
        return self


class TrackingConfig(_Section):
    experiment: str = "ardetect"
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; null = sqlite mlflow.db at the repository root; MLFLOW_TRACKING_URI overrides"
    )


class Config(_Section):
    profile: Literal["default", "smoke", "paper", "tiny_real"] = "default"
    world: WorldConfig = WorldConfig()
    exemplars: ExemplarsConfig = ExemplarsConfig()
    generate: GenerateConfig = GenerateConfig()
    tuples: TuplesConfig = TuplesConfig()
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")
    model: ModelSection = ModelSection()
    pretrain: PretrainConfig = PretrainConfig()
    train_phase1: Phase1Config = Phase1Config()
    train_phase2: Phase2Config = Phase2Config()
    abc: AbCSection = AbCSection()
    evaluate: EvaluateConfig = EvaluateConfig()
    export: ExportConfig = ExportConfig()
    serve: ServeConfig = ServeConfig()
    tracking: TrackingConfig = TrackingConfig()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, protected_namespaces=())

    @property
    def detector_image_size(self) -> int:
        """The detector's square input side: ``model.image_size``, else ``model.overrides.image_size``, else the world's."""
        if self.model.image_size is not None:
            return self.model.image_size
        over = self.model.overrides.get("image_size")
        if over is None:
            return self.world.image_size
        h, w = (over, over) if isinstance(over, int) else over
        if h != w:
            raise ValueError(f"model.overrides.image_size={over!r}: the training pipeline feeds square images")
        return int(h)

    @property
    def model_overrides(self) -> dict:
        """``model.overrides`` with the detector's square input side."""
        side = self.detector_image_size
        return {**self.model.overrides, "image_size": (side, side)}

    @model_validator(mode="after")
    def _compatible(self) -> "Config":
        if self.exemplars.source == "synthetic" and self.generate.backend != "synthetic":
            raise ValueError(
                f"generate.backend={self.generate.backend!r} needs real exemplars; exemplars.source='synthetic' "
                "pairs only with generate.backend='synthetic'"
            )
        if self.evaluate.generalisation_world_seed == self.world.seed:
            raise ValueError(
                f"evaluate.generalisation_world_seed={self.evaluate.generalisation_world_seed} equals world.seed: "
                "the second world must hold unseen identities"
            )
        if self.exemplars.source != "synthetic" and self.generate.backend == "synthetic":
            raise ValueError(
                f"exemplars.source={self.exemplars.source!r} is a real source; generate.backend='synthetic' "
                "renders only synthetic identities"
            )
        return self


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Return ``base`` with ``over`` merged in, recursively for nested dicts."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def closest(name: str, known) -> str | None:
    """The one of ``known`` that ``name`` is most likely a typo of (difflib's ratio at least 0.75), else None: the
    "did you mean" of mistyped keys, model fields and stage names."""
    found = difflib.get_close_matches(str(name), list(known), n=1, cutoff=0.75)
    return found[0] if found else None


def _keys_beside(loc: tuple) -> list[str]:
    """The keys the configuration knows where ``loc``'s last key stands (the section it is in), as written in YAML."""
    model: Any = Config
    for part in loc[:-1]:
        by_key = {(f.alias or name): f for name, f in model.model_fields.items()}
        field = by_key.get(part) or model.model_fields.get(part)
        inner = [a for a in (field.annotation, *get_args(field.annotation)) if field is not None]
        models = [a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)]
        if not models:
            return []
        model = models[0]
    return [f.alias or name for name, f in model.model_fields.items()]


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + " ..."


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]).replace("validate_", "validate")
        if e["type"] == "extra_forbidden":
            close = closest(e["loc"][-1], _keys_beside(e["loc"]))
            hint = f"; did you mean '{'.'.join([*map(str, e['loc'][:-1]), close])}'?" if close else ""
            if not close and len(e["loc"]) == 2 and e["loc"][0] == "model":  # the detector's own fields: model.overrides
                hint = f"; a setting of the detector itself goes under model.overrides: 'model.overrides.{e['loc'][-1]}'"
            lines.append(f"  - unknown key '{loc}' (value {_short(e['input'])}){hint}")
        elif not loc:  # a check across sections: its message names the keys; the input is the whole configuration
            lines.append(f"  - {e['msg']}")
        else:
            lines.append(f"  - {loc}: {e['msg']} (got {_short(e.get('input'))})")
    return "\n".join(lines)


def config_from_dict(raw: dict[str, Any], source: str = "<dict>", profiles_dir: Path | None = None) -> Config:
    """Validate a raw params mapping (after applying its profile overlay)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: top level must be a mapping, got {type(raw).__name__}")
    profile = raw.get("profile", "default")
    if profile not in PROFILES:
        raise ConfigError(f"invalid configuration in {source}:\n  - profile: unknown profile {profile!r}; choose one of {PROFILES}")
    merged = raw
    if profile != "default":
        pdir = profiles_dir if profiles_dir is not None else Path("profiles")
        overlay_path = pdir / f"{profile}.yaml"
        if not overlay_path.is_file():
            raise ConfigError(f"profile={profile!r}: overlay file {overlay_path} not found")
        try:
            overlay = yaml.safe_load(overlay_path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"profile={profile!r}: {overlay_path}: not valid YAML: {err}") from None
        if not isinstance(overlay, dict):
            raise ConfigError(f"profile={profile!r}: {overlay_path}: top level must be a mapping, got {type(overlay).__name__}")
        merged = deep_merge(raw, overlay)
        merged["profile"] = profile
        source = f"{source} + {overlay_path}"
    try:
        return Config.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def load_config(path: str | Path = "params.yaml") -> Config:
    """Load ``params.yaml`` (profiles are looked up in ``profiles/`` beside it)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file {path} not found (run from the repository root)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    return config_from_dict(raw, source=str(path), profiles_dir=path.parent / "profiles")
