"""``ard model``: facts about the detector's named sizes."""

from __future__ import annotations

import typer

from .config import SIZES, ModelConfig

app = typer.Typer(help="The Attribution Region Detector: named sizes and their parameter counts.", no_args_is_help=True)


@app.callback()
def _main() -> None:
    """The Attribution Region Detector: named sizes and their parameter counts."""


def _fmt(n: int) -> str:
    return f"{n:,} ({n / 1e6:.1f}M)" if n >= 1e6 else f"{n:,} ({n / 1e3:.1f}K)"


@app.command("info")
def info(size: str = typer.Argument(..., help=f"one of {', '.join(SIZES)}")) -> None:
    """Print parameter counts, trainable counts per phase and the input resolution of SIZE.

    Big sizes are built with random weights (nothing is downloaded); their counts are
    the architecture's. Trainable counts assume the paper's setting for that size:
    backbones frozen when pretrained (nano: MiniLM pretrained, CNN random; T-B/B-B/B-L
    as if started from GroundingDINO weights).
    """
    import torch

    from .detector import build, count_parameters

    if size not in SIZES:
        raise typer.BadParameter(f"size={size!r} is not one of {list(SIZES)}")
    overrides = {} if size == "nano" else {"freeze_backbones": True}
    cfg = ModelConfig.named(size, **overrides)
    with torch.device("meta") if size != "nano" else torch.device("cpu"):
        model = build(cfg)
    counts = count_parameters(model)
    h, w = cfg.image_size
    typer.echo(f"size                 {size}")
    typer.echo(f"image backbone       {cfg.image_backbone} ({cfg.cnn_name if cfg.image_backbone == 'cnn' else f'embed {cfg.swin_embed_dim}, depths {list(cfg.swin_depths)}'})")
    typer.echo(f"text backbone        {cfg.text_backbone}")
    typer.echo(f"input resolution     {h} x {w} (h x w)")
    typer.echo(f"hidden / heads       {cfg.hidden_dim} / {cfg.num_heads}")
    typer.echo(f"encoder / decoder    {cfg.encoder_layers} / {cfg.decoder_layers} layers, {cfg.num_queries} queries")
    typer.echo(f"parameters           {_fmt(counts['total'])}")
    typer.echo(f"  image backbone     {_fmt(counts['image_backbone'])}")
    typer.echo(f"  text backbone      {_fmt(counts['text_backbone'])}")
    typer.echo(f"trainable, phase 1   {_fmt(counts['trainable_phase1'])}")
    typer.echo(f"trainable, phase 2   {_fmt(counts['trainable_phase2'])} (adapters F, F~)")


if __name__ == "__main__":  # pragma: no cover
    app()
