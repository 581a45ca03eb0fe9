"""Break-a-Scene customization of a Stable Diffusion pipeline on one masked exemplar, and sampling from it.

The recipe (Avrahami et al., SIGGRAPH Asia 2023, as used by ARD Sec. 4.1):

1. a new token is added to the tokenizer, its embedding initialised from the class word;
2. textual-inversion phase: only the new token's embedding row trains (high lr), UNet frozen;
3. joint phase: UNet and text encoder train together (low lr), gradients clipped; or, as the
   cheaper ``method: lora``, only LoRA adapters (peft) on the UNet's attention projections;
4. the diffusion loss is taken inside the exemplar's mask only (mask at latent size);
5. a cross-attention loss pulls the new token's cross-attention maps (at ``attn_res``
   x ``attn_res``, averaged over heads and layers, normalised to a maximum of 1) to the mask;
6. optional prior preservation: images of the plain class from the base model, trained
   on with the plain diffusion loss beside the instance.

With one concept per exemplar, Break-a-Scene's union sampling of token subsets has a
single subset: the token itself. The token stands for the record's placeholder: a
prompt holding ``"V* cat"`` is sampled as ``"<asset0> cat"``.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ardetect.config import CustomizationConfig
from ardetect.generation.models import LOAD_LOCK


@dataclass
class CustomizeReport:
    """What a customization did: steps, seconds per phase, last losses."""

    ti_steps: int = 0
    joint_steps: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    losses: dict[str, float] = field(default_factory=dict)


class CrossAttentionStore:
    """Collects head-averaged cross-attention probabilities of the layers whose query grid is ``res`` x ``res``."""

    def __init__(self, res: int):
        self.res = res
        self.maps: list[torch.Tensor] = []  # each [B, res*res, tokens]
        self.active = False

    def reset(self) -> None:
        self.maps = []


class _StoringCrossAttnProcessor:
    """Cross-attention that hands its head-averaged probabilities to a store when the store asks for this layer.

    Only the layers the attention loss reads during an active step (store active, query grid ``res`` x ``res``)
    compute explicit probabilities (as diffusers' ``AttnProcessor`` does); every other call goes through
    diffusers' fused ``AttnProcessor2_0`` (``scaled_dot_product_attention``), which never forms them.
    ``fused=False`` computes them explicitly everywhere (the unfused baseline the benchmark compares with).
    """

    def __init__(self, store: CrossAttentionStore, fused: bool = True):
        with LOAD_LOCK:
            from diffusers.models.attention_processor import AttnProcessor2_0

        self.store = store
        self.fused = AttnProcessor2_0() if fused else None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        if hidden_states.ndim != 3 or attn.spatial_norm is not None or attn.group_norm is not None or attn.residual_connection:
            raise ValueError("the cross-attention store supports Stable Diffusion's plain cross-attention layers only")
        batch, seq, _ = hidden_states.shape
        wanted = self.store.active and seq == self.store.res**2
        if self.fused is not None and not wanted:
            return self.fused(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))  # [B*h, seq, d]
        key = attn.head_to_batch_dim(attn.to_k(context))  # [B*h, tokens, d]
        value = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(query, key, attention_mask)  # [B*h, seq, tokens]
        if wanted:
            self.store.maps.append(probs.view(batch, attn.heads, seq, -1).mean(1))  # [B, seq, tokens]
        out = attn.batch_to_head_dim(torch.bmm(probs, value))  # [B, seq, h*d]
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor


def install_attention_store(unet, res: int, fused: bool = True) -> CrossAttentionStore:
    """Route every cross-attention layer (``attn2``) of ``unet`` through a store; self-attention keeps its processor.

    The UNet's processors before the call are ``unet.attn_processors``; set them back with ``unet.set_attn_processor``.
    """
    store = CrossAttentionStore(res)
    procs = {
        name: (_StoringCrossAttnProcessor(store, fused) if name.endswith("attn2.processor") else proc)
        for name, proc in unet.attn_processors.items()
    }
    unet.set_attn_processor(procs)
    return store


def add_concept_token(tokenizer, text_encoder, token: str, init_word: str) -> int:
    """Add ``token`` to the tokenizer and give it the embedding of ``init_word``'s first sub-token; return its id."""
    if token in tokenizer.get_vocab():
        raise ValueError(f"generate.customization.token={token!r} is already a word of the base model's tokenizer")
    init_ids = tokenizer(init_word, add_special_tokens=False).input_ids
    if not init_ids:
        raise ValueError(f"class word {init_word!r} has no token in the base model's tokenizer")
    tokenizer.add_tokens([token])
    token_id = tokenizer.convert_tokens_to_ids(token)
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    emb = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        emb[token_id] = emb[init_ids[0]].clone()
    return token_id


def square(image: Image.Image, mask: np.ndarray, res: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The exemplar resized to ``res`` x ``res``: image in [-1, 1] ``[1, 3, res, res]`` and mask ``[1, 1, res, res]``."""
    img = np.asarray(image.convert("RGB").resize((res, res), Image.Resampling.BICUBIC), dtype=np.float32) / 127.5 - 1.0
    m = Image.fromarray(mask.astype(np.uint8) * 255).resize((res, res), Image.Resampling.NEAREST)
    return (torch.from_numpy(img).permute(2, 0, 1)[None],
            torch.from_numpy(np.asarray(m, dtype=np.float32) / 255.0)[None, None])


def _autocast(device: torch.device, mixed_precision: str):
    if device.type != "cuda" or mixed_precision == "no":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if mixed_precision == "bf16" else torch.float16)


def _encode(pipe, ids: torch.Tensor) -> torch.Tensor:
    return pipe.text_encoder(ids.to(pipe.device))[0]  # [B, 77, D]


def _ids(pipe, prompts: list[str]) -> torch.Tensor:
    return pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
                          return_tensors="pt").input_ids


def _finite(losses: dict[str, torch.Tensor], phase: str) -> dict[str, float]:
    out = {k: float(v) for k, v in losses.items()}
    bad = {k: v for k, v in out.items() if not np.isfinite(v)}
    if bad:
        raise FloatingPointError(f"customization: non-finite loss in the {phase} phase: {bad}")
    return out


def customize(pipe, image: Image.Image, mask: np.ndarray, class_word: str, cfg: CustomizationConfig, seed: int,
              prior_images: list[Image.Image] | None = None, *, fused_attention: bool = True,
              cache_text: bool = True) -> tuple[str, CustomizeReport]:
    """Customize ``pipe`` in place on the masked exemplar; return the prompt phrase of the concept and a report.

    ``prior_images`` (plain-class images from the base model) are used when ``cfg.prior_preservation`` is on.
    ``fused_attention`` (fused attention wherever the attention loss does not read the probabilities) and
    ``cache_text`` (text encodings that cannot change within a phase computed once per phase) are speed-ups that
    keep the results the same up to float rounding; they are switched off only to measure what they give (the
    benchmark). The UNet's attention processors are set back when this returns or raises, so sampling runs
    diffusers' own.
    """
    unet = pipe.unet
    originals = unet.attn_processors
    try:
        return _customize(pipe, image, mask, class_word, cfg, seed, prior_images, fused_attention, cache_text)
    finally:
        unet.set_attn_processor(originals)


def _customize(pipe, image, mask, class_word, cfg, seed, prior_images, fused_attention, cache_text):
    device = pipe.device
    report = CustomizeReport()
    g = torch.Generator(device="cpu").manual_seed(seed)
    token_id = add_concept_token(pipe.tokenizer, pipe.text_encoder, cfg.token, class_word)
    phrase = f"{cfg.token} {class_word}"
    store = install_attention_store(pipe.unet, cfg.attn_res, fused=fused_attention)
    vae, unet, text_encoder, sched = pipe.vae, pipe.unet, pipe.text_encoder, pipe.scheduler
    net = torch.compile(unet) if cfg.compile else unet  # shares unet's parameters; recompiles when the phase changes them
    with LOAD_LOCK:
        from diffusers import DDPMScheduler

    noise_sched = DDPMScheduler.from_config(sched.config)
    vae.requires_grad_(False)
    img, m = square(image, mask, cfg.resolution)
    with torch.no_grad():  # the latent distributions do not change between steps
        inst_dist = vae.encode(img.to(device, vae.dtype)).latent_dist
        prior = [square(p, np.ones((p.height, p.width), bool), cfg.resolution)[0] for p in (prior_images or [])]
        prior_dists = [vae.encode(p.to(device, vae.dtype)).latent_dist for p in prior] if cfg.prior_preservation else []
    scale = vae.config.scaling_factor
    lat_hw = inst_dist.mean.shape[-2:]
    m_lat = F.interpolate(m, size=lat_hw, mode="nearest").to(device)  # [1, 1, h, w]
    m_att = F.interpolate(m, size=(cfg.attn_res, cfg.attn_res), mode="area").to(device).flatten(1)  # [1, res*res]
    inst_ids = _ids(pipe, [f"a photo of {phrase}"])
    prior_ids = _ids(pipe, [f"a photo of a {class_word}"])
    tok_pos = int((inst_ids[0] == token_id).nonzero()[0, 0])
    if cfg.prior_preservation and not prior_dists:
        raise ValueError("generate.customization.prior_preservation is on but no prior images were given")
    batch_ids = torch.cat([inst_ids, prior_ids]) if prior_dists else inst_ids  # the prompt of each row of a step

    def fixed(ids: torch.Tensor) -> torch.Tensor:
        """An encoding that cannot change within a phase, computed once (no grad) as a step would compute it."""
        with torch.no_grad(), _autocast(device, cfg.mixed_precision):
            return _encode(pipe, ids)

    def encode_all() -> torch.Tensor:
        return _encode(pipe, batch_ids)

    def step_loss(use_attn: bool, conditioning) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One step's loss; ``conditioning()`` gives the text encoding of the step's rows ``[B, 77, D]``."""
        latents = inst_dist.mean + inst_dist.std * torch.randn(inst_dist.mean.shape, generator=g).to(device)
        latents = latents * scale
        if prior_dists:
            k = int(torch.randint(len(prior_dists), (1,), generator=g))
            d = prior_dists[k]
            latents = torch.cat([latents, (d.mean + d.std * torch.randn(d.mean.shape, generator=g).to(device)) * scale])
        noise = torch.randn(latents.shape, generator=g).to(device)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (latents.shape[0],), generator=g).to(device)
        noisy = noise_sched.add_noise(latents, noise, t)
        store.reset()
        store.active = use_attn
        with _autocast(device, cfg.mixed_precision):
            pred = net(noisy, t, conditioning()).sample  # [B, 4, h, w]
        pred = pred.float()
        if noise_sched.config.prediction_type == "v_prediction":
            target = noise_sched.get_velocity(latents, noise, t)
        else:
            target = noise
        loss = F.mse_loss(pred[:1] * m_lat, target[:1] * m_lat)
        parts = {"masked": loss.detach()}
        if prior_dists:
            prior_loss = F.mse_loss(pred[1:], target[1:])
            loss = loss + cfg.prior_weight * prior_loss
            parts["prior"] = prior_loss.detach()
        if use_attn:
            if not store.maps:
                raise ValueError(f"generate.customization.attn_res={cfg.attn_res}: no cross-attention layer of the UNet "
                                 "works at that grid size")
            att = torch.stack([a[0, :, tok_pos] for a in store.maps]).mean(0, keepdim=True).float()  # [1, res*res]
            att = att / att.amax(dim=1, keepdim=True).clamp_min(1e-8)
            attn_loss = F.mse_loss(att, m_att)
            loss = loss + cfg.attn_loss_weight * attn_loss
            parts["attention"] = attn_loss.detach()
        store.active = False
        return loss, parts

    # phase 1: textual inversion, only the new token's row
    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    emb = text_encoder.get_input_embeddings().weight
    emb.requires_grad_(True)
    frozen_rows = emb.detach().clone()
    keep = torch.ones(emb.shape[0], dtype=torch.bool, device=emb.device)
    keep[token_id] = False
    opt = torch.optim.AdamW([emb], lr=cfg.ti_lr, weight_decay=0.0)
    # fp16 autocast needs loss scaling against gradient underflow; bf16 and fp32 do not
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and cfg.mixed_precision == "fp16")
    start = time.perf_counter()
    text_encoder.train()
    ti_conditioning = encode_all
    if cache_text and prior_dists and cfg.ti_steps:
        # the prior prompt holds no new token and the rest of the encoder is frozen: its encoding is fixed here
        prior_cond = fixed(prior_ids)

        def ti_conditioning() -> torch.Tensor:
            return torch.cat([_encode(pipe, inst_ids), prior_cond])

    for _ in range(cfg.ti_steps):
        loss, parts = step_loss(cfg.attn_loss_in_ti, ti_conditioning)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        with torch.no_grad():
            emb[keep] = frozen_rows[keep]
        report.ti_steps += 1
        last = {f"ti_{k}": v for k, v in parts.items()}
    if cfg.ti_steps:
        report.losses.update(_finite(last, "textual-inversion"))  # read once per phase: no sync per step
    report.seconds["ti"] = time.perf_counter() - start

    # phase 2: UNet and text encoder together (break_a_scene), or LoRA adapters on the UNet's attention (lora)
    emb.requires_grad_(False)
    if cfg.method == "lora":
        with LOAD_LOCK:
            from peft import LoraConfig

        with torch.random.fork_rng(devices=[]):  # the adapters' random start follows the exemplar's seed
            torch.manual_seed(seed)
            unet.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank, init_lora_weights="gaussian",
                                        target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        params = [p for p in unet.parameters() if p.requires_grad]  # the adapters only
        opt = torch.optim.AdamW(params, lr=cfg.lora_lr, weight_decay=1e-2)
    else:
        unet.requires_grad_(True)
        text_encoder.requires_grad_(True)
        params = [p for p in list(unet.parameters()) + list(text_encoder.parameters()) if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.joint_lr, weight_decay=1e-2)
    start = time.perf_counter()
    unet.train()
    joint_conditioning = encode_all  # break_a_scene trains the text encoder: every step encodes anew
    if cache_text and cfg.method == "lora" and cfg.joint_steps:
        # lora freezes the whole text encoder, new row included: both prompts' encodings are fixed here
        joint_cond = fixed(batch_ids)

        def joint_conditioning() -> torch.Tensor:
            return joint_cond

    for _ in range(cfg.joint_steps):
        loss, parts = step_loss(cfg.attn_loss_weight > 0, joint_conditioning)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        scaler.step(opt)
        scaler.update()
        report.joint_steps += 1
        last = {f"joint_{k}": v for k, v in parts.items()}
    if cfg.joint_steps:
        report.losses.update(_finite(last, "joint"))
    report.seconds["joint"] = time.perf_counter() - start
    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    unet.eval()
    text_encoder.eval()
    return phrase, report


def sample_many(pipe, prompts: list[str], seeds: list[int], cfg: CustomizationConfig) -> list[Image.Image]:
    """One image per (prompt, seed), ``cfg.sample_batch`` images to a pipeline call, DDIM as :func:`sample`.

    Each image's starting noise comes from a generator of its own seeded with its seed (diffusers draws one latent per
    generator of a list), and DDIM adds no noise after it, so an image depends on its own prompt and seed only, not on
    the batch it was drawn in (up to float rounding).
    """
    with LOAD_LOCK:
        from diffusers import DDIMScheduler

    if len(prompts) != len(seeds):
        raise ValueError(f"sample_many: {len(prompts)} prompts but {len(seeds)} seeds")
    if not isinstance(pipe.scheduler, DDIMScheduler):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    images: list[Image.Image] = []
    for i in range(0, len(prompts), cfg.sample_batch):
        gens = [torch.Generator(device="cpu").manual_seed(s) for s in seeds[i : i + cfg.sample_batch]]
        with torch.no_grad(), _autocast(pipe.device, cfg.mixed_precision):
            out = pipe(prompts[i : i + cfg.sample_batch], num_inference_steps=cfg.inference_steps,
                       guidance_scale=cfg.guidance_scale, height=cfg.resolution, width=cfg.resolution, generator=gens,
                       output_type="pil")
        images += out.images
    return images


def sample(pipe, prompt: str, seed: int, cfg: CustomizationConfig) -> Image.Image:
    """One image of ``prompt`` with DDIM, ``cfg.inference_steps`` steps, guidance ``cfg.guidance_scale``, seeded."""
    return sample_many(pipe, [prompt], [seed], cfg)[0]


def prior_class_images(pipe, class_word: str, n: int, seed: int, cfg: CustomizationConfig) -> list[Image.Image]:
    """``n`` images of the plain class from the (not yet customized) base model, for prior preservation, seeds
    ``seed`` .. ``seed + n - 1``, ``cfg.sample_batch`` to a call."""
    return sample_many(pipe, [f"a photo of a {class_word}"] * n, [seed + i for i in range(n)], cfg)
