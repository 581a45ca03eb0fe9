"""Attribution by Customization (AbC, Wang et al. ICCV 2023): the image-level baseline.

A frozen base encoder F_base; two affine heads h (training images) and h~
(synthesized images), initialised to identity; features L2-normalised; score =
cosine similarity. The heads train with the symmetric NT-Xent loss (temperature
1, negatives are other exemplars in the batch) plus λ_reg·(‖WWᵀ−I‖_F + ‖W̃W̃ᵀ−I‖_F).
Soft influence: p ∝ ReLU(exp((s − s_max)/τ) − λ), with τ and λ fitted by gradient
descent on the negative log-probability of the true exemplar (ReLU replaced by
softplus with β = 100 while fitting).

The base encoder is pluggable: a timm model name or a transformers model id when
weights are available locally, or ``world``: a small CNN trained self-supervised
(SimCLR-style, two augmented views, NT-Xent) on the training split's images only,
since no pretrained image weights exist on the machines this project is built on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.transforms import v2

from ardetect.train.losses import orthogonality


def nt_xent(a: Tensor, b: Tensor, temperature: float = 1.0) -> Tensor:
    """Symmetric NT-Xent over a batch of paired, L2-normalised features a[i] <-> b[i]."""
    logits = a @ b.t() / temperature  # [N, N]
    labels = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


class WorldEncoder(nn.Module):
    """A small CNN (conv-BN-ReLU stages, global pooling) for the synthetic world."""

    def __init__(self, dim: int = 128, width: int = 32):
        super().__init__()
        chans = [3, width, width * 2, width * 4, dim]
        layers: list[nn.Module] = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers)
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:  # [B, 3, H, W] -> [B, dim]
        return self.body(x).mean(dim=(2, 3))


def ssl_views(size: int) -> v2.Compose:
    return v2.Compose(
        [
            v2.RandomResizedCrop((size, size), scale=(0.35, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
        ]
    )


def train_world_encoder(
    images: Tensor, dim: int = 128, epochs: int = 6, batch_size: int = 128, lr: float = 2e-3, temperature: float = 0.2,
    seed: int = 0, progress: Callable[[int, float], None] | None = None,
) -> WorldEncoder:
    """SimCLR on ``images`` ([N, 3, S, S] float in [0, 1], training split only)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    enc = WorldEncoder(dim)
    proj = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))
    opt = torch.optim.AdamW([*enc.parameters(), *proj.parameters()], lr=lr, weight_decay=1e-4)
    aug = ssl_views(images.shape[-1])
    enc.train()
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=g)
        total = 0.0
        for i in range(0, len(order) - 1, batch_size):
            x = images[order[i : i + batch_size]]
            if len(x) < 2:
                continue
            v1 = torch.stack([aug(im) for im in x])
            v2_ = torch.stack([aug(im) for im in x])
            z1 = F.normalize(proj(enc(normalize(v1))), dim=-1)
            z2 = F.normalize(proj(enc(normalize(v2_))), dim=-1)
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


def build_base_encoder(name: str, dim: int) -> tuple[nn.Module, int]:
    """A pretrained timm model (local weights only) as the frozen base; ``world`` is trained by ``fit_abc``."""
    import timm

    model = timm.create_model(name, pretrained=True, num_classes=0)
    return model.eval(), int(model.num_features)


def fit_abc(cfg, tuples, data_root, log: Callable[[dict, int], None] | None = None) -> tuple[AbC, Calibration, dict]:
    """Fit AbC on the training split (encoder and heads) and calibrate τ, λ on the val split."""
    torch.manual_seed(cfg.seed)
    train = tuples[tuples["split"] == "train"].reset_index(drop=True)
    if train.empty:
        raise ValueError("fit_abc: no training tuples")
    stats: dict = {}
    decoded: dict[str, Tensor] = {}  # the world encoder's training images, reused below instead of decoded again

    def images_of(paths: list[str]) -> Tensor:
        if decoded and all(p in decoded for p in paths):
            return torch.stack([decoded[p] for p in paths])
        return load_images(paths, data_root, cfg.image_size)

    if cfg.encoder == "world":
        pool = sorted(set(train["train_image"]) | set(train["query_image"]))
        imgs = load_images(pool, data_root, cfg.image_size)
        decoded.update(zip(pool, imgs))
        base = train_world_encoder(
            imgs, dim=cfg.feature_dim, epochs=cfg.ssl_epochs, seed=cfg.seed,
            progress=(lambda e, loss: log({"abc_ssl_loss": loss}, e + 1)) if log else None,
        )
        dim = cfg.feature_dim
    else:
        base, dim = build_base_encoder(cfg.encoder, cfg.feature_dim)
    model = AbC(base, dim)
    synth = model.base_features(images_of(train["query_image"].tolist()))
    exem = model.base_features(images_of(train["train_image"].tolist()))
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
            t = model.embed_train(model.base_features(load_images(pool["train_image"].tolist(), data_root, cfg.image_size)))
            s = model.embed_synth(model.base_features(load_images(val["query_image"].tolist(), data_root, cfg.image_size)))
        index = {c: i for i, c in enumerate(pool["concept_id"])}
        cal = fit_calibration(s @ t.t(), torch.tensor([index[c] for c in val["concept_id"]]))
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


def save_abc(path, model: AbC, cal: Calibration, cfg) -> None:
    from ardetect.train.engine import save_atomic

    save_atomic({"base": model.base, "heads": {"train": model.head_train.state_dict(), "synth": model.head_synth.state_dict()},
                 "dim": model.head_train.in_features, "tau": cal.tau, "lam": cal.lam, "config": cfg.model_dump()}, path)


def load_abc(path) -> tuple[AbC, Calibration]:
    ck = torch.load(path, map_location="cpu", weights_only=False)
    model = AbC(ck["base"], ck["dim"])
    model.head_train.load_state_dict(ck["heads"]["train"])
    model.head_synth.load_state_dict(ck["heads"]["synth"])
    return model.eval(), Calibration(ck["tau"], ck["lam"])
