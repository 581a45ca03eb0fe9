"""Attribution by Customization (AbC, Wang et al. ICCV 2023): the image-level baseline.

A frozen base encoder F_base; two affine heads h (training images) and h~
(synthesized images), initialised to identity; features L2-normalised; score =
cosine similarity. The heads train with the symmetric NT-Xent loss (temperature
1, negatives are other exemplars in the batch) plus λ_reg·(‖WWᵀ−I‖_F + ‖W̃W̃ᵀ−I‖_F). The
NT-Xent here is the mean of its two directions, where the paper's eq. 3 adds them, and the
regulariser has no ½, where eq. 4 has one: against the contrastive term it weighs 4x the
paper's, so ``lambda_reg`` 0.05 here is the paper's 0.2 (with Adam only that ratio matters).
Soft influence: p ∝ ReLU(exp((s − s_max)/τ) − λ), with τ and λ fitted by gradient
descent on the negative log-probability of the true exemplar (ReLU replaced by
softplus with β = 100 while fitting).

The base encoder is pluggable:

- ``world``: no pretrained image weights exist on the machines this project is built
  on, so a CNN is trained self-supervised (SimCLR: two augmented views, NT-Xent) on the
  training split's images only, at the detector's resolution. Its views keep what
  identifies a concept in this world (colour, palette, texture, marks): random
  resized crops, flips and mild brightness/contrast changes, but no hue jitter and no
  greyscale, which would teach the encoder to ignore identity (``identity_views``).
- ``ard``: the control row, AbC on ARD's backbone: the frozen image side of the
  trained phase-1 detector (``ARDBackboneEncoder``), image level: either its region map
  (the backbone's three maps fused by the region projection, the features ARD compares
  regions with) or the three backbone maps, pooled over the whole image, standardised
  with the training split's feature statistics.
- a timm model name, when its weights are available locally.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from ardetect.train.losses import orthogonality


def nt_xent(a: Tensor, b: Tensor, temperature: float = 1.0) -> Tensor:
    """Symmetric NT-Xent over a batch of paired, L2-normalised features a[i] <-> b[i]."""
    logits = a @ b.t() / temperature  # [N, N]
    labels = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def global_pool(maps: Tensor, how: str) -> Tensor:
    """[B, C, H, W] -> [B, C]: ``avg`` (the mean over the image) or ``max`` (its strongest response,
    which keeps an object's features from being averaged away by the background and the other objects)."""
    if how == "avg":
        return maps.mean(dim=(2, 3))
    if how == "max":
        return maps.amax(dim=(2, 3))
    raise ValueError(f"pooling={how!r} must be 'avg' or 'max'")


class WorldEncoder(nn.Module):
    """A small CNN (conv-BN-ReLU stages, global pooling) for the synthetic world."""

    def __init__(self, dim: int = 128, width: int = 32, pooling: str = "avg"):
        super().__init__()
        chans = [3, width, width * 2, width * 4, dim]
        layers: list[nn.Module] = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers)
        self.dim = dim
        self.pooling = pooling

    def forward(self, x: Tensor) -> Tensor:  # [B, 3, H, W] -> [B, dim]
        return global_pool(self.body(x), self.pooling)


def identity_views(
    images: Tensor, generator: torch.Generator, scale: tuple[float, float] = (0.35, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
    jitter: float = 0.2,
) -> Tensor:
    """One augmented view of each of [N, 3, S, S] images in [0, 1], drawn per image, in one batched call.

    Random resized crop (area share in ``scale``, aspect in ``ratio``; bilinear through
    ``torchvision.ops.roi_align``), horizontal flip, brightness and contrast each scaled by a
    factor in [1 - jitter, 1 + jitter]. Hue, saturation and greyscale stay as they are: they
    carry the concept's identity in this world.
    """
    n, _, h, w = images.shape
    u = torch.rand(n, 6, generator=generator)
    area = (scale[0] + (scale[1] - scale[0]) * u[:, 0]) * h * w
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    aspect = torch.exp(log_r)
    cw = torch.sqrt(area * aspect).clamp(max=w)  # [N]
    ch = torch.sqrt(area / aspect).clamp(max=h)
    x0 = (w - cw) * u[:, 2]
    y0 = (h - ch) * u[:, 3]
    rois = torch.stack([torch.arange(n, dtype=torch.float32), x0, y0, x0 + cw, y0 + ch], 1)  # [N, 5] (index, xyxy)
    out = roi_align(images, rois.to(images), output_size=(h, w), spatial_scale=1.0, sampling_ratio=2, aligned=True)  # [N, 3, h, w]
    flip = u[:, 4] < 0.5
    out = torch.where(flip.view(n, 1, 1, 1).to(out.device), out.flip(-1), out)
    if jitter > 0:
        g = torch.rand(n, 2, generator=generator).to(out) * 2 * jitter + (1 - jitter)  # [N, 2] brightness, contrast factors
        out = out * g[:, 0].view(n, 1, 1, 1)
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        out = (out - mean) * g[:, 1].view(n, 1, 1, 1) + mean
    return out.clamp(0.0, 1.0)


def train_world_encoder(
    images: Tensor, dim: int = 128, epochs: int = 6, batch_size: int = 128, lr: float = 2e-3, temperature: float = 0.2,
    seed: int = 0, width: int = 32, jitter: float = 0.2, pooling: str = "avg", progress: Callable[[int, float], None] | None = None,
) -> WorldEncoder:
    """SimCLR on ``images`` ([N, 3, S, S] float in [0, 1], training split only), views from ``identity_views``;
    the encoder pools its last map with ``pooling`` (while it trains and when it is read)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    enc = WorldEncoder(dim, width, pooling)
    proj = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))
    opt = torch.optim.AdamW([*enc.parameters(), *proj.parameters()], lr=lr, weight_decay=1e-4, fused=True)
    enc.train()
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=g)
        total = 0.0
        for i in range(0, len(order) - 1, batch_size):
            x = images[order[i : i + batch_size]]
            if len(x) < 2:
                continue
            z1 = F.normalize(proj(enc(normalize(identity_views(x, g, jitter=jitter)))), dim=-1)
            z2 = F.normalize(proj(enc(normalize(identity_views(x, g, jitter=jitter)))), dim=-1)
            loss = nt_xent(z1, z2, temperature)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"world encoder: non-finite loss at epoch {epoch}")
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(x)
        if progress is not None:
            progress(epoch, total / len(images))
    return enc.eval()


_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def normalize(x: Tensor) -> Tensor:
    return (x - _MEAN.to(x)) / _STD.to(x)


class AffineHead(nn.Linear):
    """H(x) = W x + b, W initialised to identity and b to zero."""

    def __init__(self, dim: int):
        super().__init__(dim, dim)
        with torch.no_grad():
            self.weight.copy_(torch.eye(dim))
            self.bias.zero_()


class AbC(nn.Module):
    def __init__(self, base: nn.Module, dim: int):
        super().__init__()
        self.base = base.eval()
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.head_train = AffineHead(dim)
        self.head_synth = AffineHead(dim)

    @torch.no_grad()
    def base_features(self, images: Tensor, batch_size: int = 256) -> Tensor:
        """Frozen base features of [N, 3, S, S] images in [0, 1]."""
        self.base.eval()
        return torch.cat([self.base(normalize(images[i : i + batch_size])) for i in range(0, len(images), batch_size)])

    def embed_train(self, feats: Tensor) -> Tensor:
        return F.normalize(self.head_train(feats), dim=-1)

    def embed_synth(self, feats: Tensor) -> Tensor:
        return F.normalize(self.head_synth(feats), dim=-1)

    def regulariser(self) -> Tensor:
        return orthogonality(self.head_train.weight) + orthogonality(self.head_synth.weight)


def train_heads(
    model: AbC, synth_feats: Tensor, train_feats: Tensor, concepts: Sequence[str], epochs: int = 30,
    batch_size: int = 64, lr: float = 1e-3, lambda_reg: float = 0.05, seed: int = 0,
) -> list[float]:
    """Fit the heads on positive pairs (synth_feats[i], train_feats[i]) of exemplar ``concepts[i]``.

    Other pairs in a batch are the negatives, so a batch must never hold two pairs of
    one exemplar: each epoch takes one pair per exemplar (a fresh, seeded choice).
    """
    if not (len(synth_feats) == len(train_feats) == len(concepts)):
        raise ValueError(f"train_heads: {len(synth_feats)} synth, {len(train_feats)} train, {len(concepts)} concepts")
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([*model.head_train.parameters(), *model.head_synth.parameters()], lr=lr)
    history = []
    for epoch in range(epochs):
        chosen = torch.as_tensor(pairs_by_epoch(concepts, seed * 1000 + epoch))
        order = chosen[torch.randperm(len(chosen), generator=g)]
        total = 0.0
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            if len(idx) < 2:
                continue
            loss = nt_xent(model.embed_train(train_feats[idx]), model.embed_synth(synth_feats[idx]), 1.0)
            loss = loss + lambda_reg * model.regulariser()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        history.append(total / len(order))
    return history


@dataclass
class Calibration:
    tau: float
    lam: float

    def influence(self, sims: Tensor) -> Tensor:
        """Soft influence over candidates: sims [..., C] -> probabilities [..., C] (rows sum to 1)."""
        t = torch.relu(torch.exp((sims - sims.max(-1, keepdim=True).values) / self.tau) - self.lam)
        return t / t.sum(-1, keepdim=True).clamp(min=1e-12)


def fit_calibration(sims: Tensor, positive: Tensor, steps: int = 300, lr: float = 0.05) -> Calibration:
    """Fit τ and λ on held-out queries: sims [Nq, C] and the index of each query's true exemplar [Nq]."""
    log_tau = torch.tensor(math.log(0.05), requires_grad=True)
    raw_lam = torch.tensor(-3.0, requires_grad=True)  # lam = sigmoid(raw) in (0, 1)
    opt = torch.optim.Adam([log_tau, raw_lam], lr=lr)
    s = sims - sims.max(-1, keepdim=True).values
    for _ in range(steps):
        t = F.softplus(torch.exp(s / log_tau.exp()) - torch.sigmoid(raw_lam), beta=100.0)
        p = t / t.sum(-1, keepdim=True)
        loss = -(p.gather(1, positive[:, None]).clamp(min=1e-12).log()).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return Calibration(tau=float(log_tau.detach().exp()), lam=float(torch.sigmoid(raw_lam.detach())))


def pairs_by_epoch(concepts: Sequence[str], seed: int) -> list[int]:
    """One pair index per concept (chosen with ``seed``), so no batch holds two pairs of one exemplar."""
    g = torch.Generator().manual_seed(seed)
    by: dict[str, list[int]] = {}
    for i, c in enumerate(concepts):
        by.setdefault(c, []).append(i)
    return [idx[int(torch.randint(len(idx), (1,), generator=g))] for idx in by.values()]


# --- pipeline glue: fit on the record, score in the harness ---------------------------


def load_images(paths: Sequence[str], root, size: int) -> Tensor:
    """[N, 3, size, size] float images in [0, 1]."""
    from pathlib import Path

    from PIL import Image

    out = []
    for p in paths:
        with Image.open(Path(root) / p) as im:
            arr = torch.frombuffer(bytearray(im.convert("RGB").resize((size, size), Image.BILINEAR).tobytes()), dtype=torch.uint8)
        out.append(arr.view(size, size, 3).permute(2, 0, 1).float() / 255.0)
    return torch.stack(out) if out else torch.zeros(0, 3, size, size)


class ARDBackboneEncoder(nn.Module):
    """ARD's trained image side as an image-level encoder (the ``AbC on ARD's backbone`` row).

    ``features="region_map"``: the region map (the backbone's strides 8/16/32 fused by the
    region projection: what ARD pools a region's descriptor from), pooled over the image;
    ``"backbone"``: the three backbone maps, each pooled over the image, concatenated.
    [B, 3, H, W] normalised images -> [B, dim], standardised per feature once
    ``fit_standardisation`` has seen the training split's features (AbC's affine heads
    train better on standardised inputs: chosen on val). ``AbC.base_features``
    normalises with the ImageNet mean and std, which must be the detector's own (checked here).
    """

    def __init__(self, detector: nn.Module, pooling: str = "max", features: str = "region_map"):
        super().__init__()
        global_pool(torch.zeros(1, 1, 1, 1), pooling)  # checks the name
        if features not in ("region_map", "backbone"):
            raise ValueError(f"features={features!r} must be 'region_map' or 'backbone'")
        self.pooling, self.features = pooling, features
        cfg = detector.cfg
        mean, std = _MEAN.flatten().tolist(), _STD.flatten().tolist()
        if any(abs(a - b) > 1e-6 for a, b in zip((*cfg.pixel_mean, *cfg.pixel_std), (*mean, *std))):
            raise ValueError(f"ARDBackboneEncoder: the detector normalises with mean {cfg.pixel_mean} / std {cfg.pixel_std}, not AbC's {mean} / {std}")
        self.backbone = copy.deepcopy(detector.backbone).eval()
        if features == "region_map":
            if getattr(detector, "region_proj", None) is None:
                raise ValueError("ARDBackboneEncoder(features='region_map'): the detector has no region projection (cfg.region_tokens=False)")
            self.region_proj = copy.deepcopy(detector.region_proj).eval()
            self.dim = int(self.region_proj.out_channels)
        else:
            self.region_proj = None
            self.dim = int(sum(self.backbone.channels))
        self.register_buffer("shift", torch.zeros(self.dim))
        self.register_buffer("scale", torch.ones(self.dim))

    def pooled(self, x: Tensor) -> Tensor:  # [B, 3, H, W] -> [B, dim], not standardised
        from ardetect.model.detector import fuse_region_map

        feats = self.backbone(x)
        if self.region_proj is None:
            return torch.cat([global_pool(f, self.pooling) for f in feats], 1)
        return global_pool(fuse_region_map(self.region_proj, feats), self.pooling)

    def forward(self, x: Tensor) -> Tensor:
        return (self.pooled(x) - self.shift) / self.scale

    @torch.no_grad()
    def fit_standardisation(self, feats: Tensor) -> Tensor:
        """Set the per-feature shift and scale from [N, dim] features of this encoder (training
        images) and return them standardised."""
        raw = feats * self.scale + self.shift  # undo any earlier standardisation
        self.shift.copy_(raw.mean(0))
        self.scale.copy_(raw.std(0).clamp_min(1e-6))
        return (raw - self.shift) / self.scale


def build_base_encoder(name: str, dim: int) -> tuple[nn.Module, int]:
    """A pretrained timm model (local weights only) as the frozen base; ``world`` is trained by ``fit_abc``."""
    import timm

    model = timm.create_model(name, pretrained=True, num_classes=0)
    return model.eval(), int(model.num_features)


def fit_abc(
    cfg, tuples, data_root, image_size: int, base: nn.Module | None = None, log: Callable[[dict, int], None] | None = None,
) -> tuple[AbC, Calibration, dict]:
    """Fit AbC on the training split (encoder and heads) and calibrate τ, λ on the val split.

    ``base``: a ready frozen base encoder with a ``dim`` attribute (``ARDBackboneEncoder``);
    None builds the one ``cfg.encoder`` names (``world`` trains it here, self-supervised).
    Images are read at ``image_size`` (the detector's resolution).
    """
    torch.manual_seed(cfg.seed)
    train = tuples[tuples["split"] == "train"].reset_index(drop=True)
    if train.empty:
        raise ValueError("fit_abc: no training tuples")
    stats: dict = {}
    decoded: dict[str, Tensor] = {}  # the world encoder's training images, reused below instead of decoded again

    def images_of(paths: list[str]) -> Tensor:
        if decoded and all(p in decoded for p in paths):
            return torch.stack([decoded[p] for p in paths])
        return load_images(paths, data_root, image_size)

    if base is not None:
        dim = int(base.dim)
    elif cfg.encoder == "world":
        pool = sorted(set(train["train_image"]) | set(train["query_image"]))
        imgs = load_images(pool, data_root, image_size)
        decoded.update(zip(pool, imgs))
        base = train_world_encoder(
            imgs, dim=cfg.feature_dim, epochs=cfg.ssl_epochs, batch_size=cfg.ssl_batch_size, seed=cfg.seed, width=cfg.width,
            jitter=cfg.jitter, pooling=cfg.pooling, progress=(lambda e, loss: log({"abc_ssl_loss": loss}, e + 1)) if log else None,
        )
        dim = cfg.feature_dim
    elif cfg.encoder == "ard":
        raise ValueError("abc.encoder='ard': pass the detector's backbone as base=ARDBackboneEncoder(detector)")
    else:
        base, dim = build_base_encoder(cfg.encoder, cfg.feature_dim)
    model = AbC(base, dim)
    synth = model.base_features(images_of(train["query_image"].tolist()))
    exem = model.base_features(images_of(train["train_image"].tolist()))
    if hasattr(base, "fit_standardisation"):  # statistics of the training split's features only
        both = base.fit_standardisation(torch.cat([synth, exem]))
        synth, exem = both[: len(synth)], both[len(synth):]
    decoded.clear()
    hist = train_heads(model, synth, exem, train["concept_id"].tolist(), epochs=cfg.head_epochs, lr=cfg.lr, lambda_reg=cfg.lambda_reg, seed=cfg.seed)
    if log:
        for i, v in enumerate(hist):
            log({"abc_head_loss": v}, i + 1)
    stats["head_loss_first"], stats["head_loss_last"] = hist[0], hist[-1]
    val = tuples[tuples["split"] == "val"].reset_index(drop=True)
    if len(val):
        pool = val.drop_duplicates("concept_id").reset_index(drop=True)
        with torch.no_grad():
            t = model.embed_train(model.base_features(load_images(pool["train_image"].tolist(), data_root, image_size)))
            s = model.embed_synth(model.base_features(load_images(val["query_image"].tolist(), data_root, image_size)))
        index = {c: i for i, c in enumerate(pool["concept_id"])}
        sims = s @ t.t()
        positive = torch.tensor([index[c] for c in val["concept_id"]])
        cal = fit_calibration(sims, positive)
        # Recall@10 of the true exemplar among the val split's training images (a diagnostic; ties against it)
        rank = (sims >= sims.gather(1, positive[:, None])).sum(1)  # the positive itself counts once
        stats["val_recall@10"] = float((rank <= 10).float().mean())
    else:
        cal = Calibration(tau=1.0, lam=0.0)
    stats["tau"], stats["lambda"] = cal.tau, cal.lam
    return model, cal, stats


class AbCMethod:
    """AbC in the harness: rank by cosine similarity (the calibrated influence is monotone in it)."""

    region_level = False

    def __init__(self, model: AbC, calibration: Calibration, data_root, image_size: int, name: str = "AbC"):
        self.model, self.calibration, self.root, self.size, self.name = model.eval(), calibration, data_root, image_size, name
        self._emb: dict[str, Tensor] = {}

    def _train_embedding(self, paths: list[str]) -> Tensor:
        todo = [p for p in paths if p not in self._emb]
        if todo:
            with torch.no_grad():
                e = self.model.embed_train(self.model.base_features(load_images(todo, self.root, self.size)))
            self._emb.update(zip(todo, e))
        return torch.stack([self._emb[p] for p in paths])

    @torch.no_grad()
    def score(self, query, candidates: list[str]):
        from ardetect.evaluation.harness import Scores

        q = self.model.embed_synth(self.model.base_features(load_images([query["query_image"]], self.root, self.size)))
        sims = (self._train_embedding(candidates) @ q[0]).numpy().astype("float64")
        return Scores(sims)

    def influence(self, sims: Tensor) -> Tensor:
        return self.calibration.influence(sims)


def save_abc(path, model: AbC, cal: Calibration, cfg, image_size: int, stats: dict | None = None) -> None:
    from ardetect.train.engine import save_atomic

    save_atomic({"base": model.base, "heads": {"train": model.head_train.state_dict(), "synth": model.head_synth.state_dict()},
                 "dim": model.head_train.in_features, "tau": cal.tau, "lam": cal.lam, "config": cfg.model_dump(),
                 "image_size": int(image_size), "stats": dict(stats or {})}, path)


def load_abc(path) -> tuple[AbC, Calibration, int]:
    """(model, calibration, the image size it reads images at) from a ``save_abc`` file."""
    ck = torch.load(path, map_location="cpu", weights_only=False)
    if "image_size" not in ck:
        raise ValueError(f"{path}: an AbC file without its image size (written by an older version): run the train_abc stage again")
    model = AbC(ck["base"], ck["dim"])
    model.head_train.load_state_dict(ck["heads"]["train"])
    model.head_synth.load_state_dict(ck["heads"]["synth"])
    return model.eval(), Calibration(ck["tau"], ck["lam"]), int(ck["image_size"])
