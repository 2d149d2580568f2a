"""Networks of the continuous-data families (Diffusion's denoiser, FlowMatching's velocity field):
a U-Net for images and a residual MLP for vectors, with the option groups that build them.

Read bottom-up: the timestep embedding, the U-Net's blocks (residual block, self-attention,
down/up-sampling), the U-Net, then the MLP denoiser. Both networks map (x_t, t, y) to a tensor of
x_t's shape (the predicted noise eps, v, or a velocity); ``t`` is an integer timestep or a
real time (the sinusoidal embedding takes either); ``y`` is a class label in 0 .. num_classes - 1, or
``num_classes`` for "no label" (the null label of classifier-free guidance, Ho & Salimans 2021).

The U-Net follows Ho et al. 2020 (appendix B; the PixelCNN++ / Wide-ResNet backbone): residual
blocks with GroupNorm, conditioned on the timestep (and label) embedding by a scale and shift of
their second normalization (Dhariwal & Nichol 2021, see ``ResBlock``), self-attention at low
resolution, skip connections from each down-sampling block to its mirror block. Up-sampling
resizes to the size of the matching skip, so odd sizes (28 -> 14 -> 7 -> 4 and back) work without
padding the images.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def sinusoidal_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Transformer position encoding of the timesteps (Vaswani et al. 2017; Ho et al. 2020, app. B).

    t (B,) integer or real -> (B, dim): [cos(t w_0), ..., cos(t w_{k-1}), sin(t w_0), ...] with
    frequencies w_i = max_period^(-i / k), k = dim / 2.
    """
    half = dim // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)  # (k,)
    angles = t.float()[:, None] * frequencies[None]  # (B, k)
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding  # (B, dim)


class TimestepEmbedding(nn.Module):
    """Sinusoidal embedding of t followed by a two-layer MLP, plus a learned class embedding.

    Args:
        base_dim: width of the sinusoidal features.
        embedding_dim: output width.
        num_classes: number of labels (None: unconditional); row ``num_classes`` is the null label.
    """

    def __init__(self, base_dim: int, embedding_dim: int, num_classes: int | None = None) -> None:
        super().__init__()
        self.base_dim = base_dim
        self.num_classes = num_classes
        self.mlp = nn.Sequential(nn.Linear(base_dim, embedding_dim), nn.SiLU(),
                                 nn.Linear(embedding_dim, embedding_dim))
        self.label_embedding = (nn.Embedding(num_classes + 1, embedding_dim)
                                if num_classes is not None else None)

    def forward(self, t: Tensor, y: Tensor | None = None) -> Tensor:  # (B,), (B,) -> (B, E)
        embedding = self.mlp(sinusoidal_embedding(t, self.base_dim))
        if self.label_embedding is not None:
            if y is None:  # no labels given: the null label (unconditional prediction)
                y = torch.full_like(t, self.num_classes, dtype=torch.long)
            embedding = embedding + self.label_embedding(y)
        elif y is not None:
            raise ValueError("this network is unconditional (num_classes=None) but labels y were given")
        return embedding


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm with the largest group count that divides ``channels`` and is at most ``groups``."""
    return nn.GroupNorm(math.gcd(groups, channels), channels)


def zero_init(module: nn.Module) -> nn.Module:
    """Zero the weights (and bias) of a residual branch's last layer: each block starts as identity."""
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv3x3 -> GroupNorm scaled and shifted by the embedding -> SiLU ->
    dropout -> conv3x3, added to the input (1x1 conv on the skip when the width changes).

    The embedding enters as a scale and shift after the second GroupNorm (adaptive group
    normalization, Dhariwal & Nichol 2021, sec. 3), not as a bias added before it (Ho et al. 2020):
    a GroupNorm whose groups hold one channel each (32 channels, 32 groups, this U-Net's first
    level) subtracts a per-channel bias again, so the timestep and label would not reach that level.
    """

    def __init__(self, in_channels: int, out_channels: int, embedding_dim: int, dropout: float = 0.0,
                 norm_groups: int = 32) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.embedding_projection = nn.Linear(embedding_dim, 2 * out_channels)  # scale, shift
        self.norm2 = group_norm(out_channels, norm_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = (nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels
                     else nn.Identity())

    def forward(self, x: Tensor, embedding: Tensor) -> Tensor:  # (B, C, H, W), (B, E)
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C', H, W)
        scale, shift = self.embedding_projection(F.silu(embedding))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H * W positions (scaled_dot_product_attention), residual."""

    def __init__(self, channels: int, num_heads: int = 4, norm_groups: int = 32) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"attention channels ({channels}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.norm = group_norm(channels, norm_groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.projection = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W)
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.num_heads, C // self.num_heads, H * W)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (B, heads, H*W, C/heads)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, heads, H*W, C/heads)
        h = h.transpose(-1, -2).reshape(B, C, H, W)
        return x + self.projection(h)


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 conv (odd sizes round up: 7 -> 4)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour resize to the matching skip's size, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, size: Sequence[int]) -> Tensor:
        return self.conv(F.interpolate(x, size=tuple(size), mode="nearest"))


class UNetBlock(nn.Module):
    """A residual block, optionally followed by self-attention."""

    def __init__(self, in_channels: int, out_channels: int, embedding_dim: int, attention: bool,
                 num_heads: int, dropout: float, norm_groups: int) -> None:
        super().__init__()
        self.resblock = ResBlock(in_channels, out_channels, embedding_dim, dropout, norm_groups)
        self.attention = (AttentionBlock(out_channels, num_heads, norm_groups) if attention
                          else nn.Identity())

    def forward(self, x: Tensor, embedding: Tensor) -> Tensor:
        return self.attention(self.resblock(x, embedding))


class UNet(nn.Module):
    """The denoising U-Net of Ho et al. 2020 (appendix B) for (B, C, H, W) images of any size.

    Args:
        in_channels: image channels (the output has the same number).
        base_channels: width of the first level.
        channel_multipliers: width of each level as a multiple of base_channels; one level per
            entry, each after the first at half the previous resolution.
        num_res_blocks: residual blocks per level on the way down (one more on the way up).
        attention_levels: indices of the levels with self-attention after each residual block
            (the middle block always has it).
        num_heads: attention heads.
        dropout: dropout inside the residual blocks.
        num_classes: labels for class conditioning (None: unconditional).
        norm_groups: GroupNorm groups (reduced to a divisor of the width for narrow layers).
    """

    def __init__(
        self,
        in_channels: int = 1,
        base_channels: int = 32,
        channel_multipliers: Sequence[int] = (1, 2, 4),
        num_res_blocks: int = 2,
        attention_levels: Sequence[int] = (2,),
        num_heads: int = 4,
        dropout: float = 0.0,
        num_classes: int | None = None,
        norm_groups: int = 32,
    ) -> None:
        super().__init__()
        if not channel_multipliers or any(m < 1 for m in channel_multipliers):
            raise ValueError(f"channel_multipliers must be positive ints, got {channel_multipliers}")
        if num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be >= 1, got {num_res_blocks}")
        if any(not 0 <= level < len(channel_multipliers) for level in attention_levels):
            raise ValueError(f"attention_levels must be level indices in 0..{len(channel_multipliers) - 1}, "
                             f"got {attention_levels}")
        embedding_dim = 4 * base_channels
        self.embedding = TimestepEmbedding(base_channels, embedding_dim, num_classes)
        self.input_conv = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        def block(width_in: int, width_out: int, attention: bool) -> UNetBlock:
            return UNetBlock(width_in, width_out, embedding_dim, attention, num_heads, dropout, norm_groups)

        self.down = nn.ModuleList()
        skip_widths = [base_channels]
        width = base_channels
        last = len(channel_multipliers) - 1
        for level, multiplier in enumerate(channel_multipliers):
            for _ in range(num_res_blocks):
                self.down.append(block(width, base_channels * multiplier, level in attention_levels))
                width = base_channels * multiplier
                skip_widths.append(width)
            if level != last:
                self.down.append(Downsample(width))
                skip_widths.append(width)
        self.middle = nn.ModuleList([block(width, width, True), block(width, width, False)])
        self.up = nn.ModuleList()
        for level, multiplier in reversed(list(enumerate(channel_multipliers))):
            for _ in range(num_res_blocks + 1):
                self.up.append(block(width + skip_widths.pop(), base_channels * multiplier,
                                     level in attention_levels))
                width = base_channels * multiplier
            if level != 0:
                self.up.append(Upsample(width))
        self.output_norm = group_norm(width, norm_groups)
        self.output_conv = zero_init(nn.Conv2d(width, in_channels, 3, padding=1))

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        # x (B, C, H, W), t (B,), y (B,) or None -> (B, C, H, W)
        embedding = self.embedding(t, y)  # (B, 4 * base_channels)
        h = self.input_conv(x)
        skips = [h]
        for layer in self.down:
            h = layer(h) if isinstance(layer, Downsample) else layer(h, embedding)
            skips.append(h)
        for layer in self.middle:
            h = layer(h, embedding)
        for layer in self.up:
            if isinstance(layer, Upsample):
                h = layer(h, skips[-1].shape[-2:])
            else:
                h = layer(torch.cat([h, skips.pop()], dim=1), embedding)
        return self.output_conv(F.silu(self.output_norm(h)))


class MLPResBlock(nn.Module):
    """h + Linear(SiLU(Linear(SiLU(LayerNorm(h))) + projection of the embedding))."""

    def __init__(self, hidden_dim: int, embedding_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_dim)
        self.linear1 = nn.Linear(hidden_dim, hidden_dim)
        self.embedding_projection = nn.Linear(embedding_dim, hidden_dim)
        self.linear2 = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, h: Tensor, embedding: Tensor) -> Tensor:  # (B, hidden), (B, E)
        update = self.linear1(F.silu(self.norm(h))) + self.embedding_projection(F.silu(embedding))
        return h + self.linear2(F.silu(update))


class MLPDenoiser(nn.Module):
    """The denoiser for (B, D) vectors: input layer, ``num_layers`` residual MLP blocks that each
    add the timestep (and label) embedding, output layer.

    Args:
        data_dim: D.
        hidden_dim: width of the hidden layers (also the embedding width).
        num_layers: residual blocks.
        num_classes: labels for class conditioning (None: unconditional).
    """

    def __init__(self, data_dim: int = 2, hidden_dim: int = 128, num_layers: int = 3,
                 num_classes: int | None = None) -> None:
        super().__init__()
        if hidden_dim < 2 or num_layers < 1:
            raise ValueError(f"hidden_dim must be >= 2 and num_layers >= 1, got {hidden_dim}, {num_layers}")
        self.embedding = TimestepEmbedding(hidden_dim, hidden_dim, num_classes)
        self.input_layer = nn.Linear(data_dim, hidden_dim)
        self.blocks = nn.ModuleList([MLPResBlock(hidden_dim, hidden_dim) for _ in range(num_layers)])
        self.output_norm = nn.LayerNorm(hidden_dim)
        self.output_layer = nn.Linear(hidden_dim, data_dim)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        # x (B, D), t (B,), y (B,) or None -> (B, D)
        embedding = self.embedding(t, y)  # (B, hidden)
        h = self.input_layer(x)
        for block in self.blocks:
            h = block(h, embedding)
        return self.output_layer(F.silu(self.output_norm(h)))


# ----------------------------------------------------------------------------- option groups
@dataclass(frozen=True)
class UNetConfig:
    """The U-Net's size, one nested group of a family's arguments (``unet:`` in a config,
    ``--model.init_args.unet.base_channels 64`` on the command line). See ``UNet`` for each field.
    """

    base_channels: int = 32
    channel_multipliers: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = (2,)
    num_heads: int = 4
    norm_groups: int = 32
    dropout: float = 0.0

    def build(self, in_channels: int, num_classes: int | None = None) -> UNet:
        return UNet(in_channels, self.base_channels, tuple(self.channel_multipliers), self.num_res_blocks,
                    tuple(self.attention_levels), self.num_heads, self.dropout, num_classes,
                    self.norm_groups)


@dataclass(frozen=True)
class MLPDenoiserConfig:
    """The residual MLP's size for vector data (``mlp:`` in a config). See ``MLPDenoiser``."""

    hidden_dim: int = 128
    num_layers: int = 3

    def build(self, data_dim: int, num_classes: int | None = None) -> MLPDenoiser:
        return MLPDenoiser(data_dim, self.hidden_dim, self.num_layers, num_classes)


def as_config(cls: type, value: object) -> object:
    """A config dataclass from itself or from a mapping of its fields (how a checkpoint's
    hyperparameters hold it)."""
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        return cls(**value)
    raise TypeError(f"expected a {cls.__name__} or a mapping of its fields, got {type(value).__name__}")


def time_network(data_shape: Sequence[int], unet: UNetConfig | Mapping, mlp: MLPDenoiserConfig | Mapping,
                 num_classes: int | None) -> tuple[nn.Module, dict[str, dict]]:
    """The network ``(x, t, y) -> tensor of x's shape`` for (C, H, W) images (the U-Net) or (D,)
    vectors (the MLP), and both groups as plain dicts (for the checkpoint's hyperparameters).

    Only one group applies to a data shape; changing the other from its defaults is refused, so
    that a command-line option is never silently ignored."""
    unet, mlp = as_config(UNetConfig, unet), as_config(MLPDenoiserConfig, mlp)
    if len(data_shape) == 3:
        if mlp != MLPDenoiserConfig():
            raise ValueError(f"the mlp options apply to vector data, not to images {tuple(data_shape)}: "
                             "set the unet options instead")
        network: nn.Module = unet.build(data_shape[0], num_classes)
    else:
        if unet != UNetConfig():
            raise ValueError(f"the unet options apply to images, not to vectors {tuple(data_shape)}: "
                             "set the mlp options instead")
        network = mlp.build(data_shape[0], num_classes)
    return network, {"unet": asdict(unet), "mlp": asdict(mlp)}
