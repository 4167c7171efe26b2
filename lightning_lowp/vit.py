"""A small vision transformer as a LightningModule: ``ViT``, for MNIST-sized images.

The model is plain PyTorch (no fused attention), so every GEMM can be seen by
:class:`~lightning_lowp.QuantizeMatmuls`: the ``nn.Linear`` layers (``qkv``, ``proj``, ``fc1``,
``fc2``, ``head``) through ``F.linear``, and attention's two matmuls, ``q @ kᵀ`` and
``softmax(·) @ v``, as explicit ``@`` calls inside :class:`Attention` (select it with
``modules=(nn.Linear, Attention)`` and ``attention=True``):

    >>> import lightning.pytorch as pl
    >>> import lightning_lowp as lp
    >>> from torch import nn
    >>> from lightning_lowp.vit import Attention, ViT
    >>> callback = lp.QuantizeMatmuls(input="bf16", weight="bf16", grad_output="bf16",
    ...                               attention=True, modules=(nn.Linear, Attention))
    >>> pl.Trainer(callbacks=[callback]).fit(ViT(), datamodule=lp.MNISTFamily())  # doctest: +SKIP

The patch embedding is a ``Conv2d`` (not selected by the default ``modules=(nn.Linear,)``).
"""

from __future__ import annotations

import math

import torch
from lightning.pytorch.utilities.types import OptimizerLRScheduler
from torch import nn
from typing_extensions import override

from lightning_lowp.data import ClassifierModule

__all__ = ["ViT", "Attention", "Block"]


def _positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


class Attention(nn.Module):
    """Multi-head self-attention with explicit matmuls.

    ``qkv`` projects to queries, keys and values; the scores are ``q @ kᵀ * scale`` (scale
    ``1/sqrt(head_dim)``), their softmax multiplies ``v`` (``attn @ v``), and ``proj`` mixes the
    heads. Written with ``@`` rather than ``F.scaled_dot_product_attention`` so that a
    ``TorchFunctionMode`` (such as :class:`~lightning_lowp.QuantizeMatmuls` with
    ``attention=True``) sees both matmuls.

    Args:
        dim: the token width; a multiple of ``heads``.
        heads: the number of attention heads.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        _positive_int("dim", dim)
        _positive_int("heads", heads)
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be a multiple of heads ({heads})")
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (b, heads, n, head_dim)
        attn = q @ k.transpose(-2, -1) * self.scale
        attn = attn.softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, n, d)
        return self.proj(out)


class Block(nn.Module):
    """A pre-norm transformer encoder block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``.

    The MLP is ``fc2(gelu(fc1(·)))``.

    Args:
        dim: the token width; a multiple of ``heads``.
        heads: the number of attention heads.
        mlp_dim: the MLP's hidden width.
    """

    def __init__(self, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        _positive_int("mlp_dim", mlp_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(mlp_dim, dim)

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class ViT(ClassifierModule):
    """A small vision transformer (ViT) and its AdamW.

    The network: a patch embedding ``patch_embed`` (``Conv2d(channels, dim, patch_size,
    stride=patch_size)``: one token per non-overlapping patch), a learned class token and
    learned position embedding, ``depth`` pre-norm encoder blocks in ``blocks`` (each:
    ``norm1``, ``attn`` (:class:`Attention`: ``qkv``, ``proj``), ``norm2``, ``fc1``, GELU,
    ``fc2``), a final LayerNorm ``norm`` and a linear ``head`` on the class token. Linear
    weights, the class token and the position embedding start from a truncated normal of std
    0.02, biases at zero. ``forward`` returns logits; the loss is ``F.cross_entropy``. Logs
    ``train/loss``, ``val/loss``, ``val/acc``, ``test/loss`` and ``test/acc`` (accuracy as a
    fraction).

    The optimizer is AdamW; weight decay applies to the weight matrices and convolution
    kernels only (not to biases, LayerNorms, the class token or the position embedding). With
    ``max_steps`` the learning rate follows a schedule stepped every optimizer step: a linear
    warmup over the first 10% of ``max_steps`` (at least one step; the first step takes
    ``lr / warmup``), then a cosine decay to 0 at ``max_steps``; without it the learning rate is constant.

    Args:
        image_size: the height and width of the (square) input images; a multiple of
            ``patch_size``.
        patch_size: the height and width of a patch.
        channels: the input channels.
        num_classes: the number of outputs of ``head`` (logits).
        dim: the token width; a multiple of ``heads``.
        depth: the number of encoder blocks.
        heads: the number of attention heads.
        mlp_dim: the hidden width of each block's MLP.
        lr: AdamW's (peak) learning rate.
        weight_decay: AdamW's weight decay (of the weight matrices and kernels).
        max_steps: the total number of optimizer steps, for the warmup and cosine schedule
            (e.g. the Trainer's ``max_steps``, or epochs × batches per epoch); ``None``: a
            constant learning rate.
    """

    def __init__(
        self,
        image_size: int = 28,
        patch_size: int = 7,
        channels: int = 1,
        num_classes: int = 10,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        mlp_dim: int = 128,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        max_steps: int | None = None,
    ) -> None:
        super().__init__()
        for name, value in (
            ("image_size", image_size),
            ("patch_size", patch_size),
            ("channels", channels),
            ("num_classes", num_classes),
            ("dim", dim),
            ("depth", depth),
            ("heads", heads),
            ("mlp_dim", mlp_dim),
        ):
            _positive_int(name, value)
        if image_size % patch_size:
            raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
        if max_steps is not None:
            _positive_int("max_steps", max_steps)
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr!r}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be non-negative, got {weight_decay!r}")
        self.save_hyperparameters()
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (b, patches, dim)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0]))

    @override
    def configure_optimizers(self) -> OptimizerLRScheduler:
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            if param.dim() >= 2 and name not in ("cls_token", "pos_embed"):
                decay.append(param)
            else:
                no_decay.append(param)
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": self.hparams["weight_decay"]},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=self.hparams["lr"],
        )
        max_steps = self.hparams["max_steps"]
        if max_steps is None:
            return optimizer
        warmup = max(1, max_steps // 10)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
            return 0.5 * (1.0 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
