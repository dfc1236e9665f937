"""``vit``: a small vision transformer with timm-compatible parameter names.

Notable features:
- Parameter names and maths follow timm's ``VisionTransformer`` (class token, learned position
  embedding that includes the class token, pre-norm blocks with LayerNorm eps 1e-6, fused
  ``attn.qkv``, GELU MLP, final ``norm``, ``head``), so a timm ViT state dict (``cls_token``,
  ``pos_embed``, ``patch_embed.proj.*``, ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``,
  ``norm``, ``head``) loads strictly; ``head.*`` is dropped at extraction. Checked once against
  timm 1.0.31's ``VisionTransformer`` (same sizes): identical state-dict keys, and identical logits,
  features and last-block CLS tokens after loading its state dict.
- Cached outputs: ``pooled/cls`` (normed CLS token), ``pooled/mean`` (mean of the normed patch
  tokens), optionally ``pooled/cls_last<k>`` (the CLS tokens of the last k blocks, each passed
  through the final norm and concatenated: DINOv2 linear-evaluation style; option
  ``last_k_blocks``) and ``objects/embed`` (the normed patch tokens; option ``patch_tokens``).
- Stage one (``pipeline/pretrain/vit.py``): cross-entropy on the image labels through ``head`` (a Linear on
  ``pooled/cls``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.backbones.base import (
    STAGE_ONE_RULES,
    BackboneFamily,
    CheckpointRules,
    DefaultData,
    TinyCase,
    builtin_resolved_config,
    register_family,
    resolve_init_args,
)
from pipeline.config import BackboneConfig
from pipeline.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# Part of the cache key: bump when this family's cached outputs change (names, shapes or values).
FAMILY_VERSION = 1

# Demo size: trains on the `images` generator's 32x32 shapes in well under two minutes on two cores.
DEFAULT_INIT_ARGS: dict[str, Any] = {
    "img_size": 32,
    "patch_size": 8,
    "in_chans": 3,
    "embed_dim": 64,
    "depth": 4,
    "num_heads": 4,
    "mlp_ratio": 4.0,
    "num_classes": 4,
}


class PatchEmbed(nn.Module):
    def __init__(self, *, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ConfigError(f"vit: img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.img_size = img_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise DataError(f"vit: images are {tuple(x.shape[-2:])}, the model expects {self.img_size}x{self.img_size}")
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, P, D), row-major patches as in timm


class Attention(nn.Module):
    def __init__(self, *, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"vit: embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        # timm layout: qkv -> (B, N, 3, H, hd) -> (3, B, H, N, hd)
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, *, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, *, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim=dim, num_heads=num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim=dim, hidden=int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """timm-named ViT; ``head`` is the stage-one classifier (Identity when ``num_classes == 0``)."""

    def __init__(
        self,
        *,
        img_size: int = 32,
        patch_size: int = 8,
        in_chans: int = 3,
        embed_dim: int = 64,
        depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        num_classes: int = 0,
    ) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.randn(1, self.patch_embed.num_patches + 1, embed_dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head: nn.Module = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        nn.init.normal_(self.cls_token, std=1e-6)
        self.apply(_init_weights)

    def tokens(self, images: torch.Tensor, *, keep_blocks: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Final tokens before ``norm`` (B, 1+P, D) and the outputs of the last ``keep_blocks`` blocks."""
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        kept: list[torch.Tensor] = []
        first_kept = len(self.blocks) - keep_blocks
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i >= first_kept:
                kept.append(x)
        return x, kept

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x, _ = self.tokens(images)
        return self.head(self.norm(x)[:, 0])


def _init_weights(m: nn.Module) -> None:
    # timm's default: truncated normal (std .02) for Linear weights, zero biases
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


@dataclass
class VitBackbone:
    """Adapter: builds the ViT, declares its cache arrays, runs it on a batch of images."""

    module: VisionTransformer
    init_args: dict[str, Any]
    last_k_blocks: int = 0
    patch_tokens: bool = False
    image_key: str = "images"
    rules: CheckpointRules = STAGE_ONE_RULES
    probe_samples: int = 0  # output shapes follow from init_args

    def probe(self, batch: dict, *, device: Any, float_dtype: str) -> None:
        pass

    def resolved_config(self, config: BackboneConfig) -> dict[str, Any]:
        return builtin_resolved_config(config, self.init_args)

    @property
    def embed_dim(self) -> int:
        return int(self.init_args["embed_dim"])

    def output_specs(self, *, plan: Any, float_dtype: str) -> list[Any]:
        from cache.schema import ArraySpec

        d = self.embed_dim
        specs = [
            ArraySpec("pooled/cls", float_dtype, (d,), meaning="CLS token after the final norm"),
            ArraySpec("pooled/mean", float_dtype, (d,), meaning="mean of the patch tokens after the final norm"),
        ]
        if self.last_k_blocks:
            k = self.last_k_blocks
            specs.append(ArraySpec(f"pooled/cls_last{k}", float_dtype, (k * d,),
                                   meaning=f"CLS tokens of the last {k} blocks, each normed, concatenated (DINOv2 linear eval)"))
        if self.patch_tokens:
            specs.append(ArraySpec("objects/embed", float_dtype, (self.module.patch_embed.num_patches, d),
                                   meaning="patch tokens after the final norm, row-major patch order"))
        return specs

    def ragged_lengths(self, *, plan: Any) -> dict[str, np.ndarray]:
        return {}

    def images(self, batch: dict, *, device: torch.device) -> torch.Tensor:
        x = batch.get(self.image_key)
        if x is None:
            raise DataError(f"vit: the batch has no {self.image_key!r} array; it has {sorted(batch)}")
        x = torch.as_tensor(x).to(device=device, dtype=torch.float32)
        if x.ndim != 4:
            raise DataError(f"vit: expected images (B, C, H, W), got shape {tuple(x.shape)}")
        return x

    def run(self, batch: dict, *, device: torch.device) -> dict[str, torch.Tensor]:
        x, kept = self.module.tokens(self.images(batch, device=device), keep_blocks=self.last_k_blocks)
        x = self.module.norm(x)
        out = {"pooled/cls": x[:, 0], "pooled/mean": x[:, 1:].mean(dim=1)}
        if self.last_k_blocks:
            out[f"pooled/cls_last{self.last_k_blocks}"] = torch.cat([self.module.norm(t)[:, 0] for t in kept], dim=-1)
        if self.patch_tokens:
            out["objects/embed"] = x[:, 1:]
        return out


def build_vit(config: BackboneConfig, *, hparams: dict[str, Any], plan: Any, **_: Any) -> VitBackbone:
    args = resolve_init_args(family="vit", defaults=DEFAULT_INIT_ARGS, hparams=hparams, overrides=dict(config.init_args))
    options = dict(config.options)
    k = int(options.pop("last_k_blocks", 0) or 0)
    patch_tokens = bool(options.pop("patch_tokens", False))
    inputs = dict((getattr(plan, "meta", None) or {}).get("inputs") or {})
    # a single array input is the images whatever its name; several need options.image_key
    default_key = next(iter(inputs)) if len(inputs) == 1 else "images"
    image_key = str(options.pop("image_key", default_key))
    if options:
        raise ConfigError(f"vit: unknown option(s) {sorted(options)}; known: last_k_blocks, patch_tokens, image_key")
    if not 0 <= k <= int(args["depth"]):
        raise ConfigError(f"vit: last_k_blocks={k} must be between 0 and depth={args['depth']}")
    shape = (inputs.get(image_key) or {}).get("shape")
    expected = [int(args["in_chans"]), int(args["img_size"]), int(args["img_size"])]
    if shape is not None and list(shape) != expected:
        raise ConfigError(f"vit: input {image_key!r} has samples of shape {list(shape)}, the model expects {expected} "
                          "(C, H, W); set init_args img_size / in_chans, or options.image_key")
    # The head exists only to load/compute stage one; extraction never calls it and drops head.* keys.
    module = VisionTransformer(**{**args, "num_classes": 0})
    return VitBackbone(module=module, init_args=args, last_k_blocks=k, patch_tokens=patch_tokens, image_key=image_key)


def finetune_groups(module: VisionTransformer) -> dict[str, list[str]]:
    """Phase three (``ftpipe finetune``): regexes over parameter names. ``layers``: input to output, one per
    LLRD depth (embeddings 0, block i at i + 1, final norm last); ``gradual``: what each phase after the
    head-only one adds (the vision scripts' head + last 2 blocks + final norm; the last phase is everything)."""
    n = len(module.blocks)
    last = "|".join(str(i) for i in range(max(0, n - 2), n))
    return {"layers": [r"^(patch_embed|cls_token|pos_embed)\b"] + [rf"^blocks\.{i}\." for i in range(n)] + [r"^norm\."],
            "gradual": [rf"^blocks\.({last})\.|^norm\."]}


# ---------------------------------------------------------------- family record

FAMILY = register_family(BackboneFamily(
    name="vit",
    build=build_vit,
    version=FAMILY_VERSION,
    rules=STAGE_ONE_RULES,
    # images generator (pipeline/data/generators/images.py)
    data=DefaultData(generator="images", file="images.npz", layout={
        "format": "arrays",
        "inputs": ["images"],
        "targets": ["label"],
        "split": "split",
        "sample_id": "sample_id",
    }),
    pretrainer="pipeline.pretrain.vit:pretrain_vit",
    finetune_groups=finetune_groups,
    tiny=TinyCase(n=12, backbone={"name": "vit", "init_args": {"embed_dim": 16, "depth": 2, "num_heads": 2},
                                  "options": {"last_k_blocks": 2, "patch_tokens": True}}),
))
