"""Networks of the autoregressive family: masked convolutions, PixelCNN (plain and gated) and a
decoder-only transformer over the pixel sequence with a key/value cache.

Plain ``nn.Module``s (no Lightning). Read bottom-up: masks, masked convolution, the PixelCNN
blocks and networks, then attention, the key/value cache, the transformer block and network.

Order: an image (C, H, W) is the sequence of its C*H*W values in raster order, rows top to
bottom, pixels left to right, and the C channels of a pixel one after another (R before G before
B). Every network here returns, at each position, logits that depend only on earlier positions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MASK_TYPES = ("A", "B", "vertical_A", "vertical_B")


# ------------------------------------------------------------------------------------------ masks
def channel_groups(num_channels: int, data_channels: int) -> Tensor:
    """The data channel each feature channel belongs to: channel j serves data channel j % C.

    With C = 1 every channel is in group 0. With C > 1 (RGB) a feature of group c may use the
    current pixel's data channels < c only (van den Oord et al. 2016a, section 3.4). Interleaving
    (j % C rather than contiguous blocks) keeps the groups of the two halves of a gated layer's
    2h channels aligned when h is a multiple of C.
    """
    return torch.arange(num_channels) % data_channels


def causal_conv_mask(
    out_channels: int,
    in_channels: int,
    kernel_size: tuple[int, int],
    mask_type: str,
    data_channels: int = 1,
) -> Tensor:
    """The 0/1 mask (out_channels, in_channels, kH, kW) of a masked convolution.

    ``"A"`` / ``"B"`` (van den Oord et al. 2016a, fig. 2): the rows above the centre and the
    pixels left of the centre. At the centre itself, type A lets an output of channel group c see
    input groups < c, type B groups <= c; for one data channel, A hides the centre and B shows it.
    The first layer is type A (a pixel must not see itself), every later layer type B.
    A 1 x k kernel of these types is the horizontal stack of the gated PixelCNN.

        type A (5 x 5)         type B (5 x 5)         type B (1 x 3)
        1 1 1 1 1              1 1 1 1 1              1 1 0
        1 1 1 1 1              1 1 1 1 1
        1 1 0 0 0              1 1 1 0 0
        0 0 0 0 0              0 0 0 0 0
        0 0 0 0 0              0 0 0 0 0

    ``"vertical_A"`` / ``"vertical_B"``: the vertical stack of the gated PixelCNN (van den Oord et
    al. 2016b, fig. 1), which sees whole rows above, so the receptive field has no blind spot.
    Its features at (i, j) must depend on rows < i only: the first layer reads the image through
    the rows strictly above the centre (vertical_A); later layers read earlier vertical features,
    which already lie strictly above, so they may include the centre row (vertical_B).

        vertical_A (5 x 5)     vertical_B (5 x 5)
        1 1 1 1 1              1 1 1 1 1
        1 1 1 1 1              1 1 1 1 1
        0 0 0 0 0              1 1 1 1 1
        0 0 0 0 0              0 0 0 0 0
        0 0 0 0 0              0 0 0 0 0
    """
    if mask_type not in MASK_TYPES:
        raise ValueError(f"mask_type must be one of {MASK_TYPES}, got {mask_type!r}")
    kernel_height, kernel_width = kernel_size
    if kernel_height % 2 == 0 or kernel_width % 2 == 0:
        raise ValueError(f"kernel sizes must be odd (a centre pixel), got {kernel_size}")
    center_row, center_column = kernel_height // 2, kernel_width // 2
    mask = torch.zeros(out_channels, in_channels, kernel_height, kernel_width)
    if mask_type.startswith("vertical"):
        mask[:, :, : center_row + (mask_type == "vertical_B")] = 1
        return mask
    mask[:, :, :center_row] = 1
    mask[:, :, center_row, :center_column] = 1
    out_groups = channel_groups(out_channels, data_channels)[:, None]  # (out, 1)
    in_groups = channel_groups(in_channels, data_channels)[None, :]  # (1, in)
    center = in_groups < out_groups if mask_type == "A" else in_groups <= out_groups
    mask[:, :, center_row, center_column] = center.float()
    return mask


def zero_padded_slice(x: Tensor, dim: int, start: int, stop: int) -> Tensor:
    """Indices start..stop-1 of x along dim, zeros where they fall outside x."""
    size = x.shape[dim]
    inside_start, inside_stop = min(max(start, 0), size), max(min(stop, size), 0)
    if start == inside_start and stop == inside_stop:
        return x.narrow(dim, start, stop - start)
    shape = list(x.shape)
    shape[dim] = stop - start
    out = x.new_zeros(shape)
    if inside_start < inside_stop:
        out.narrow(dim, inside_start - start, inside_stop - inside_start).copy_(
            x.narrow(dim, inside_start, inside_stop - inside_start))
    return out


class MaskedConv2d(nn.Conv2d):
    """A 2-D convolution whose kernel is multiplied by a fixed causal mask (``causal_conv_mask``).

    'Same' zero padding, stride 1, so outputs line up with inputs pixel by pixel; ``dilation``
    spaces the kernel's taps ``dilation`` pixels apart (the receptive field grows, the cost does
    not). The forward pass convolves with the rows and columns of the kernel the mask keeps
    only (a 3 x 3 vertical_B kernel is a 2 x 3 convolution, a 1 x 3 horizontal one 1 x 2), padded
    so that the result equals the full masked convolution: a third or more of the multiply-adds
    of every k x k and 1 x k layer (k > 1) saved. The parameter keeps the full kernel shape.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        mask_type: str,
        data_channels: int = 1,
        dilation: int = 1,
    ) -> None:
        if isinstance(kernel_size, int):
            kernel_size = (kernel_size, kernel_size)
        if not isinstance(dilation, int) or dilation < 1:
            raise ValueError(f"dilation must be a positive int, got {dilation!r}")
        super().__init__(in_channels, out_channels, kernel_size,
                         padding=(dilation * (kernel_size[0] // 2), dilation * (kernel_size[1] // 2)),
                         dilation=dilation)
        self.mask_type = mask_type
        mask = causal_conv_mask(out_channels, in_channels, kernel_size, mask_type, data_channels)
        self.register_buffer("mask", mask, persistent=False)
        # the kernel's rows r0..r1 and columns c0..c1 that the mask keeps (all if it keeps none)
        kept = mask.flatten(0, 1).any(0)  # (kH, kW)
        if not kept.any():  # a 1x1 type A layer of one data channel sees nothing: keep its shape
            kept = torch.ones_like(kept)
        rows, columns = kept.any(1).nonzero(), kept.any(0).nonzero()
        r0, r1, c0, c1 = int(rows.min()), int(rows.max()), int(columns.min()), int(columns.max())
        self.kept_rows, self.kept_columns = slice(r0, r1 + 1), slice(c0, c1 + 1)
        # output (i, j) reads input (i + dilation (a - centre), ...) at kernel row a: pad (or,
        # where negative, crop) so the kept taps meet the same inputs with no further padding
        center_row, center_column = kernel_size[0] // 2, kernel_size[1] // 2
        self.input_padding = (dilation * (center_column - c0), dilation * (c1 - center_column),
                              dilation * (center_row - r0), dilation * (r1 - center_row))
        # rows and columns of input one output reads, beyond its own: (r1 - r0) and (c1 - c0) taps
        self.input_span = (dilation * (r1 - r0), dilation * (c1 - c0))

    def kept_kernel(self) -> Tensor:
        return (self.weight * self.mask)[:, :, self.kept_rows, self.kept_columns]

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(F.pad(x, self.input_padding), self.kept_kernel(), self.bias,
                        dilation=self.dilation)

    def region(self, x: Tensor, rows: tuple[int, int], columns: tuple[int, int],
               first_row: int = 0) -> Tensor:
        """``forward(x)[:, :, rows[0]:rows[1], columns[0]:columns[1]]``, computed there only.

        ``x`` may hold a band of rows of the input only, starting at row ``first_row``; the
        rows the region reads outside that band count as zero padding, so the band must hold
        every row of the input the region reads that lies inside the image.
        """
        left, _, top, _ = self.input_padding
        row_span, column_span = self.input_span
        band = zero_padded_slice(x, 2, rows[0] - top - first_row, rows[1] - top - first_row + row_span)
        band = zero_padded_slice(band, 3, columns[0] - left, columns[1] - left + column_span)
        return F.conv2d(band, self.kept_kernel(), self.bias, dilation=self.dilation)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mask_type={self.mask_type!r}"


# ------------------------------------------------------------------------------------ PixelCNN
class ResidualMaskedBlock(nn.Module):
    """PixelCNN residual block (van den Oord et al. 2016a, fig. 5):
    ReLU, 1x1 (2h -> h), ReLU, k x k type B (h -> h), ReLU, 1x1 (h -> 2h), plus the input.
    """

    def __init__(self, channels: int, kernel_size: int, data_channels: int, dilation: int = 1) -> None:
        super().__init__()
        self.reduce = MaskedConv2d(2 * channels, channels, 1, "B", data_channels)
        self.conv = MaskedConv2d(channels, channels, kernel_size, "B", data_channels, dilation)
        self.expand = MaskedConv2d(channels, 2 * channels, 1, "B", data_channels)

    def forward(self, x: Tensor) -> Tensor:  # x: (B, 2h, H, W)
        out = self.reduce(F.relu(x))
        out = self.conv(F.relu(out))
        return x + self.expand(F.relu(out))


def gate(x: Tensor) -> Tensor:
    """tanh(a) * sigmoid(b) over the two channel halves (van den Oord et al. 2016b, eq. 2)."""
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


class GatedBlock(nn.Module):
    """Gated PixelCNN layer with a vertical and a horizontal stack (van den Oord et al. 2016b,
    fig. 2 and eq. 4):

        v' = W_v * v                       (k x k, vertical mask: rows above only)
        h' = W_h * h + W_vh v'             (1 x k, raster mask; 1x1 link from the vertical stack)
        v_out = gate(v' + V_v^T y)
        h_out = h + W_o gate(h' + V_h^T y)   (1x1; residual except in the first layer)

    The vertical features at (i, j) depend on rows < i only, so the link into the horizontal
    stack at the same position is causal, and together the stacks cover every earlier pixel.
    """

    def __init__(self, in_channels: int, channels: int, kernel_size: int, data_channels: int,
                 first: bool, dilation: int = 1) -> None:
        super().__init__()
        self.first = first
        self.vertical = MaskedConv2d(in_channels, 2 * channels, kernel_size,
                                     "vertical_A" if first else "vertical_B", data_channels, dilation)
        self.horizontal = MaskedConv2d(in_channels, 2 * channels, (1, kernel_size),
                                       "A" if first else "B", data_channels, dilation)
        self.vertical_to_horizontal = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.horizontal_out = MaskedConv2d(channels, channels, 1, "B", data_channels)

    def forward(self, v: Tensor, h: Tensor, condition: Tensor | None = None) -> tuple[Tensor, Tensor]:
        # v, h: (B, C_in, H, W); condition: (B, 4h, 1, 1) class biases or None
        v_pre = self.vertical(v)  # (B, 2h, H, W)
        h_pre = self.horizontal(h) + self.vertical_to_horizontal(v_pre)  # (B, 2h, H, W)
        if condition is not None:
            v_bias, h_bias = condition.chunk(2, dim=1)
            v_pre, h_pre = v_pre + v_bias, h_pre + h_bias
        v_out = gate(v_pre)  # (B, h, H, W)
        h_out = self.horizontal_out(gate(h_pre))  # (B, h, H, W)
        return v_out, h_out if self.first else h + h_out


class PixelCNNNet(nn.Module):
    """PixelCNN: x (B, C, H, W) scaled to [-1, 1] -> logits (B, K, C, H, W).

    ``gated=False``: a k0 x k0 type A convolution, residual blocks of masked convolutions
    (van den Oord et al. 2016a), which leave a blind spot above-right of each pixel.
    ``gated=True``: gated blocks with vertical and horizontal stacks (van den Oord et al. 2016b),
    the first with kernel k0, no blind spot. Both end in ReLU, 1x1, ReLU, 1x1 to K logits per
    data channel. ``num_classes`` adds a learned per-layer bias for the label (2016b, eq. 4).

    ``dilations`` (cycled) space the taps of the k x k (and 1 x k) convolutions of the blocks
    after the first layer: [1, 2, 4] over six blocks gives them 1, 2, 4, 1, 2, 4, and a
    receptive field 2 * (1 + 2 + 4) rows taller than all-1 (k = 3) at the same cost per step,
    as WaveNet's dilated causal convolutions do in 1-D (van den Oord et al. 2016c).
    """

    def __init__(
        self,
        data_channels: int,
        num_levels: int,
        hidden_channels: int = 64,
        num_layers: int = 7,
        kernel_size: int = 3,
        first_kernel_size: int = 7,
        head_channels: int = 256,
        gated: bool = True,
        num_classes: int | None = None,
        dilations: Sequence[int] = (1,),
    ) -> None:
        super().__init__()
        self.data_channels = data_channels
        self.num_levels = num_levels
        self.gated = gated
        C, h = data_channels, hidden_channels
        # the dilation of each layer after the first (the gated net's block 0, the plain net's
        # input convolution, reads the image undilated)
        later_layers = num_layers - 1 if gated else num_layers
        later_dilations = [dilations[index % len(dilations)] for index in range(later_layers)]
        if gated:
            self.blocks = nn.ModuleList(
                GatedBlock(C if index == 0 else h, h, first_kernel_size if index == 0 else kernel_size,
                           C, first=index == 0, dilation=1 if index == 0 else later_dilations[index - 1])
                for index in range(num_layers)
            )
            features, condition_channels = h, 4 * h
        else:
            self.input_conv = MaskedConv2d(C, 2 * h, first_kernel_size, "A", C)
            self.blocks = nn.ModuleList(ResidualMaskedBlock(h, kernel_size, C, dilation)
                                        for dilation in later_dilations)
            features, condition_channels = 2 * h, 2 * h
        self.class_embedding = (nn.Embedding(num_classes, num_layers * condition_channels)
                                if num_classes else None)
        self.head = nn.Sequential(
            nn.ReLU(), MaskedConv2d(features, head_channels, 1, "B", C),
            nn.ReLU(), MaskedConv2d(head_channels, num_levels * C, 1, "B", C),
        )
        # How many rows above a pixel its logits can depend on (the receptive field's height
        # above it): the first layer reaches first_kernel_size // 2 rows up, every later k x k
        # layer dilation * (k // 2) more (the 1 x k horizontal stack and the 1x1 layers none).
        self.rows_above = first_kernel_size // 2 + sum(later_dilations) * (kernel_size // 2)

    def conditions(self, y: Tensor | None) -> list[Tensor | None]:
        """Each block's class bias (B, channels, 1, 1) for labels y, or None when unconditional."""
        if self.class_embedding is None:
            return [None] * len(self.blocks)
        if y is None:
            raise ValueError("this PixelCNN is class-conditional: pass labels y")
        return list(self.class_embedding(y)[:, :, None, None].chunk(len(self.blocks), dim=1))

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        # x: (B, C, H, W) in [-1, 1]; y: (B,) labels or None
        conditions = self.conditions(y)
        if self.gated:
            v = h = x
            for block, condition in zip(self.blocks, conditions):
                v, h = block(v, h, condition)
            features = h  # (B, h, H, W)
        else:
            features = self.input_conv(x)  # (B, 2h, H, W)
            for block, condition in zip(self.blocks, conditions):
                features = block(features if condition is None else features + condition)
        logits = self.head(features)  # (B, K * C, H, W), channel k * C + c
        B, _, H, W = logits.shape
        return logits.view(B, self.num_levels, self.data_channels, H, W)


class PixelCNNCache:
    """Every layer's activations at the values drawn so far in one sampling run of a
    ``PixelCNNNet``, so that each new value computes the layers at its own pixel only (as the fast
    generation of Ramachandran et al. 2017), instead of the whole network over the rows above it.

    A pixel's activations in every layer depend on earlier values only, so once computed they
    stay. The gated network's vertical stack at row i reads rows above and row i of the layer
    below (to the right of a pixel too), so it is computed a row at a time when the row starts;
    the horizontal stack and the plain network's layers a pixel at a time. With C > 1 channels a
    pixel's activations are computed again for each of its channels (channel c reads c' < c).
    Positions not asked for (given values of ``complete``) are computed when a later one is.

    ``logits(images, position, y)`` takes the images in [0, 1] as the sampler holds them (the
    values before ``position`` final), equal to ``network(to_input(images), y)`` at that value.
    """

    def __init__(self, network: PixelCNNNet, to_input: Callable[[Tensor], Tensor]) -> None:
        self.network = network
        self.to_input = to_input  # images [0, 1] -> the network's input space (elementwise)
        self.next_pixel = 0  # pixels before it have their final activations in every layer
        self.vertical_rows_done = 0  # the gated network's vertical stack: rows before it computed
        self.maps: list[Tensor] | None = None

    def logits(self, images: Tensor, position: int, y: Tensor | None) -> Tensor:
        B, C, H, W = images.shape
        if self.maps is None:
            self.conditions = self.network.conditions(y)
            self.allocate(images)
        pixel, channel = divmod(position, C)
        for earlier in range(self.next_pixel, pixel):
            self.compute_pixel(images, *divmod(earlier, W))
        features = self.compute_pixel(images, *divmod(pixel, W))  # (B, features, 1, 1)
        self.next_pixel = pixel + 1 if channel == C - 1 else pixel
        logits = self.network.head(features).view(B, self.network.num_levels, C)
        return logits[:, :, channel]  # (B, K)

    def allocate(self, images: Tensor) -> None:
        B, _, H, W = images.shape
        blocks = self.network.blocks
        if self.network.gated:
            # per block: its vertical output (all rows so far), its horizontal output (this row)
            # and the vertical stack's link into the horizontal one (this row)
            channels = blocks[0].horizontal_out.out_channels
            self.maps = [images.new_zeros(B, channels, H, W) for _ in blocks]
            self.horizontal = [images.new_zeros(B, channels, 1, W) for _ in blocks]
            self.links = [images.new_zeros(B, 2 * channels, 1, W) for _ in blocks]
        else:
            # per block: ReLU(reduce(ReLU(input))), which its k x k convolution reads
            self.maps = [images.new_zeros(B, block.conv.in_channels, H, W) for block in blocks]

    def input_rows(self, images: Tensor, start: int, stop: int) -> tuple[Tensor, int]:
        """Rows start..stop-1 of the images (from row 0 where start < 0) in the network's input
        space, and the first row's index."""
        start = max(start, 0)
        return self.to_input(images[:, :, start:stop]), start

    def compute_pixel(self, images: Tensor, i: int, j: int) -> Tensor:
        if self.network.gated:
            while self.vertical_rows_done <= i:
                self.compute_vertical_row(images, self.vertical_rows_done)
                self.vertical_rows_done += 1
            return self.compute_horizontal_pixel(images, i, j)
        return self.compute_plain_pixel(images, i, j)

    def compute_vertical_row(self, images: Tensor, i: int) -> None:
        blocks = self.network.blocks
        for index, (block, condition) in enumerate(zip(blocks, self.conditions)):
            if index == 0:  # the image's rows above row i
                band, first_row = self.input_rows(images, i - block.vertical.input_padding[2], i)
            else:
                band, first_row = self.maps[index - 1], 0
            v_pre = block.vertical.region(band, (i, i + 1), (0, images.shape[3]), first_row)
            self.links[index] = block.vertical_to_horizontal(v_pre)  # (B, 2h, 1, W)
            if condition is not None:
                v_pre = v_pre + condition.chunk(2, dim=1)[0]
            self.maps[index][:, :, i: i + 1] = gate(v_pre)

    def compute_horizontal_pixel(self, images: Tensor, i: int, j: int) -> Tensor:
        h = self.to_input(images[:, :, i: i + 1])  # (B, C, 1, W): block 0 reads the image row
        for index, (block, condition) in enumerate(zip(self.network.blocks, self.conditions)):
            h_pre = block.horizontal.region(h, (0, 1), (j, j + 1)) + self.links[index][..., j: j + 1]
            if condition is not None:
                h_pre = h_pre + condition.chunk(2, dim=1)[1]
            out = block.horizontal_out(gate(h_pre))  # (B, h, 1, 1)
            if not block.first:
                out = h[..., j: j + 1] + out
            self.horizontal[index][..., j: j + 1] = out
            h = self.horizontal[index]
        return h[..., j: j + 1]

    def compute_plain_pixel(self, images: Tensor, i: int, j: int) -> Tensor:
        convolution = self.network.input_conv
        band, first_row = self.input_rows(images, i - convolution.input_padding[2], i + 1)
        features = convolution.region(band, (i, i + 1), (j, j + 1), first_row)  # (B, 2h, 1, 1)
        for block, condition, inner in zip(self.network.blocks, self.conditions, self.maps):
            if condition is not None:
                features = features + condition
            inner[:, :, i: i + 1, j: j + 1] = F.relu(block.reduce(F.relu(features)))
            out = block.conv.region(inner, (i, i + 1), (j, j + 1))
            features = features + block.expand(F.relu(out))
        return features


# --------------------------------------------------------------------------------- transformer
class KeyValueCache:
    """Keys and values of every layer for the positions processed so far (one sampling run).

    Buffers (B, heads, max_length, head_dim) per layer are allocated on first use (so they take
    the dtype autocast gives the keys), then filled in place: a step of n new tokens costs
    O(n * length) attention, not a pass over the whole sequence.
    """

    def __init__(self, num_layers: int, max_length: int) -> None:
        self.max_length = max_length
        self.keys: list[Tensor | None] = [None] * num_layers
        self.values: list[Tensor | None] = [None] * num_layers
        self.length = 0  # positions cached in every layer
        # PixelTransformerNet's own progress: values whose logits were returned, and the output
        # of the blocks at each token so far (tokens of several values: ``token_size`` > 1)
        self.values_returned = 0
        self.contexts: Tensor | None = None

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store the new keys/values (B, heads, n, head_dim) of a layer; return all so far."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_length:
            raise ValueError(f"the cache holds {self.max_length} positions, asked for {end}")
        if self.keys[layer] is None:
            shape = (k.shape[0], k.shape[1], self.max_length, k.shape[3])
            self.keys[layer] = k.new_zeros(shape)
            self.values[layer] = v.new_zeros(shape)
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


def local_window_sources(image_shape: Sequence[int], window: int) -> Tensor:
    """For a (C, H, W) image as a raster sequence (pixels in rows, a pixel's channels adjacent):
    sources[t, c, s] = the sequence index of the s-th value of the window x window pixels (all
    C channels) centred on position t's pixel, as seen by a value of channel c there, or -1
    where that value is not strictly before it (below, right in the same row, channels >= c of
    the same pixel) or outside the image. (T, C, window * window * C), int64.

    The table is per channel c, not per t's own channel only, so that gathering it by each
    position's channel is one index.
    """
    if not isinstance(window, int) or window < 1 or window % 2 == 0:
        raise ValueError(f"local_window must be 0 (none) or a positive odd int, got {window!r}")
    C, H, W = image_shape
    half = window // 2
    offsets = torch.arange(-half, half + 1)
    di, dj, source_channel = torch.meshgrid(offsets, offsets, torch.arange(C), indexing="ij")
    di, dj, source_channel = di.flatten(), dj.flatten(), source_channel.flatten()  # (S,)
    pixel = torch.arange(H * W)
    rows, columns = (pixel // W)[:, None] + di, (pixel % W)[:, None] + dj  # (H W, S)
    inside = (rows >= 0) & (rows < H) & (columns >= 0) & (columns < W)
    before = (di < 0) | ((di == 0) & (dj < 0))  # an earlier pixel, (S,)
    same_pixel = (di == 0) & (dj == 0)
    index = (rows * W + columns) * C + source_channel  # (H W, S)
    tables = []
    for channel in range(C):
        allowed = inside & (before | (same_pixel & (source_channel < channel)))
        tables.append(torch.where(allowed, index, torch.full_like(index, -1)))
    per_pixel = torch.stack(tables, dim=1)  # (H W, C, S)
    return per_pixel.repeat_interleave(C, dim=0)  # (T, C, S): the C positions of a pixel alike


def token_count(sequence_length: int, token_size: int) -> int:
    """The tokens of a sequence cut into tokens of ``token_size`` values, the last one shorter
    when the size does not divide the length: ceil(sequence_length / token_size)."""
    if not isinstance(token_size, int) or isinstance(token_size, bool) or token_size < 1:
        raise ValueError(f"token_size must be a positive int (values per token), got {token_size!r}")
    return -(-sequence_length // token_size)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position t attends to positions <= t (Vaswani et al.
    2017), through ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels on GPU)."""

    def __init__(self, model_dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(model_dim, 3 * model_dim)
        self.out = nn.Linear(model_dim, model_dim)
        self.dropout = dropout

    def forward(self, x: Tensor, cache: KeyValueCache | None = None, layer: int = 0) -> Tensor:
        B, n, D = x.shape  # n new positions
        q, k, v = self.qkv(x).split(D, dim=2)  # (B, n, D) each
        q, k, v = (t.view(B, n, self.num_heads, D // self.num_heads).transpose(1, 2) for t in (q, k, v))
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.append(layer, k, v)  # (B, heads, past + n, head_dim)
        dropout = self.dropout if self.training else 0.0
        if past == 0:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        elif n == 1:  # one new token sees every cached position
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        else:  # new token i sits at position past + i and sees positions <= past + i
            allowed = (torch.arange(past + n, device=x.device)[None, :]
                       <= past + torch.arange(n, device=x.device)[:, None])  # (n, past + n)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout)
        y = y.transpose(1, 2).reshape(B, n, D)  # (B, n, D)
        return self.out(y)


class TransformerBlock(nn.Module):
    """Pre-norm block (as GPT-2): x + attn(LN(x)), then x + MLP(LN(x)) with a 4x GELU MLP."""

    def __init__(self, model_dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(model_dim)
        self.attention = CausalSelfAttention(model_dim, num_heads, dropout)
        self.mlp_norm = nn.LayerNorm(model_dim)
        self.mlp = nn.Sequential(
            nn.Linear(model_dim, 4 * model_dim), nn.GELU(), nn.Linear(4 * model_dim, model_dim),
            nn.Dropout(dropout),
        )

    def forward(self, x: Tensor, cache: KeyValueCache | None = None, layer: int = 0) -> Tensor:
        x = x + self.attention(self.attention_norm(x), cache, layer)
        return x + self.mlp(self.mlp_norm(x))


class PixelTransformerNet(nn.Module):
    """Decoder-only transformer over a sequence of T values with K levels (as ImageGPT,
    Chen et al. 2020, without the colour clustering).

    Input position 0 holds a learned start token and position t >= 1 the value x_{t-1}, so the
    output at position t gives the logits of x_t from x_<t. Each value x in [0, 1] (level / (K-1))
    is embedded by interpolating linearly between the embeddings of the two nearest levels: on the
    K-level grid that is the plain table lookup, and it keeps the logits differentiable in x, which
    lets a test check causality by gradient. Learned position embeddings; a class embedding (when
    ``num_classes``) is added at every position.

    ``local_window`` k > 0 adds to each position's input a linear map of the earlier values in
    the k x k pixels around its own (a type-A masked convolution's view, as PixelCNN's first
    layer): the pixel above and its neighbours arrive as input, where attention would have to
    learn to find them W positions back (``local_window_sources``).

    ``token_size`` g > 1 makes each token g consecutive values (the last token may be shorter):
    the blocks run over ceil(T / g) tokens, so attention costs about 1/g^2 and the blocks' MLPs
    1/g of the one-value-per-token network. Token j's input is the previous token's g values
    (the sum of a level embedding per offset in the token), so its output, the context, depends
    on the values of tokens < j only. Value t of token j = t // g then gets its logits from a
    per-value head: the context of token j, plus an embedding of its offset t - j g, plus a
    level embedding of each value of its token before it per pair of offsets
    (``token_prefix``), plus the local window when ``local_window`` > 0, through a residual GELU
    MLP. The order and the exact likelihood are those of the value sequence; the head is what
    sees the values of t's own token. The token tables hold g K and g^2 K embeddings: meant for
    a few levels (K = 2) or a few values per token.
    """

    def __init__(
        self,
        sequence_length: int,
        num_levels: int,
        model_dim: int = 256,
        num_layers: int = 4,
        num_heads: int = 4,
        dropout: float = 0.0,
        num_classes: int | None = None,
        image_shape: Sequence[int] | None = None,
        local_window: int = 0,
        token_size: int = 1,
    ) -> None:
        super().__init__()
        self.sequence_length = sequence_length
        self.num_levels = num_levels
        self.local_window = local_window
        self.token_size = token_size
        self.num_tokens = token_count(sequence_length, token_size)
        if local_window:
            if image_shape is None:
                raise ValueError("local_window needs the image_shape (C, H, W) of the sequence")
            sources = local_window_sources(image_shape, local_window)  # (T, C, k * k * C)
            self.register_buffer("window_sources", sources, persistent=False)
            # per target channel c, a linear map of the window's values into the residual stream
            self.window_embedding = nn.Parameter(torch.randn(sources.shape[1], sources.shape[2], model_dim) * 0.02)
        self.level_embedding = nn.Parameter(torch.randn(num_levels, model_dim) * 0.02)
        self.start_token = nn.Parameter(torch.randn(model_dim) * 0.02)
        self.position_embedding = nn.Parameter(torch.randn(self.num_tokens, model_dim) * 0.02)
        self.class_embedding = nn.Embedding(num_classes, model_dim) if num_classes else None
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(TransformerBlock(model_dim, num_heads, dropout)
                                    for _ in range(num_layers))
        if token_size > 1:
            g = token_size
            # a token's input: the sum over its g offsets of a level embedding per offset
            self.token_embedding = nn.Parameter(torch.randn(g, num_levels, model_dim) * 0.02)
            self.offset_embedding = nn.Parameter(torch.randn(g, model_dim) * 0.02)
            # prefix_embedding[i, i']: the level embedding of the value at offset i' < i as seen
            # by the head of offset i (entries with i' >= i are masked out)
            self.prefix_embedding = nn.Parameter(torch.randn(g, g, num_levels, model_dim) * 0.02)
            self.register_buffer("prefix_mask", torch.ones(g, g).tril(-1), persistent=False)
            self.value_norm = nn.LayerNorm(model_dim)
            self.value_mlp = nn.Sequential(nn.Linear(model_dim, 4 * model_dim), nn.GELU(),
                                           nn.Linear(4 * model_dim, model_dim))
        self.final_norm = nn.LayerNorm(model_dim)
        self.head = nn.Linear(model_dim, num_levels)
        self.apply(self._init_weights)
        for name, parameter in self.named_parameters():
            # GPT-2: scale the residual projections by 1/sqrt(2 * layers)
            if name.endswith("attention.out.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(parameter, std=0.02 / math.sqrt(2 * num_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def level_weights(self, x: Tensor) -> Tensor:
        """Values x (...) in [0, 1] -> (..., K): weights 1 - f and f on the two nearest levels
        (one-hot on the K-level grid), so that ``level_weights(x) @ table`` interpolates the
        table's rows linearly and stays differentiable in x."""
        u = x.float() * (self.num_levels - 1)
        lower = u.detach().floor().clamp(0, self.num_levels - 2)
        fraction = (u - lower).unsqueeze(-1)  # in [0, 1] on [0, 1] inputs
        levels = torch.arange(self.num_levels, device=x.device)
        lower = lower.long().unsqueeze(-1)
        return (1 - fraction) * (levels == lower) + fraction * (levels == lower + 1)

    def embed_values(self, x: Tensor) -> Tensor:
        """Values (B, n) in [0, 1] -> (B, n, D), linear between the two nearest level embeddings
        (a lookup, not ``level_weights``' K-wide rows, so that K = 65536 costs no more than K = 2)."""
        u = x.float() * (self.num_levels - 1)
        lower = u.detach().floor().clamp(0, self.num_levels - 2)  # (B, n)
        fraction = (u - lower).unsqueeze(-1)  # (B, n, 1), in [0, 1] on [0, 1] inputs
        lower = lower.long()
        return (1 - fraction) * self.level_embedding[lower] + fraction * self.level_embedding[lower + 1]

    def embed_window(self, x: Tensor, start: int, n: int) -> Tensor:
        """(B, n - start, D): at each position t, the linear map (of t's channel) of the earlier
        values in the k x k window around t's pixel, zeros for the others."""
        B = x.shape[0]
        sources = self.window_sources[start:n]  # (n - start, C, S), -1: not an earlier value
        C = sources.shape[1]
        channel = torch.arange(start, n, device=x.device) % C  # (n - start,)
        sources = sources[torch.arange(n - start, device=x.device), channel]  # (n - start, S)
        padded = torch.cat([x, x.new_zeros(B, 1)], dim=1)  # index n: the zero of missing values
        values = padded[:, torch.where(sources < 0, n, sources)].float()  # (B, n - start, S)
        if C == 1:
            return values @ self.window_embedding[0]
        # one matmul per channel's map (a gather of a map per position is slower to train, its
        # backward an indexed accumulation), each position keeping its own channel's
        per_channel = torch.stack([values @ self.window_embedding[c] for c in range(C)], dim=2)
        own = channel.view(1, -1, 1, 1).expand(B, -1, 1, per_channel.shape[-1])
        return per_channel.gather(2, own).squeeze(2)  # (B, n - start, D)

    def forward(self, x: Tensor, y: Tensor | None = None, cache: KeyValueCache | None = None) -> Tensor:
        """Logits (B, n - start, K) of x_start .. x_{n-1}, where x (B, n) holds the first n values
        of the sequence (x_{n-1} itself is not read) and start = the number of values whose
        logits the cache has returned (0 without a cache)."""
        B, n = x.shape
        if n > self.sequence_length:
            raise ValueError(f"sequence of {n} values is longer than {self.sequence_length}")
        start = cache.values_returned if cache is not None else 0
        if not 0 <= start < n:
            raise ValueError(f"nothing new to process: {start} positions cached, sequence of {n}")
        if self.class_embedding is not None and y is None:
            raise ValueError("this PixelTransformer is class-conditional: pass labels y")
        if self.token_size == 1:
            h = self.run_blocks(x, y, start, n, cache)  # (B, n - start, D), token t = value t
            if cache is not None:
                cache.values_returned = n
            return self.head(self.final_norm(h))  # (B, n - start, K)
        g = self.token_size
        first = cache.length if cache is not None else 0  # tokens through the blocks so far
        last = (n - 1) // g + 1  # tokens up to that of value n - 1
        if first < last:
            contexts = self.run_blocks(x, y, first, last, cache)  # (B, last - first, D)
            if cache is not None:
                if cache.contexts is None:
                    cache.contexts = contexts.new_zeros(B, self.num_tokens, contexts.shape[-1])
                cache.contexts[:, first:last] = contexts
        if cache is not None:
            contexts, first = cache.contexts, 0
            cache.values_returned = n
        positions = torch.arange(start, n, device=x.device)
        h = (contexts[:, positions // g - first] + self.offset_embedding[positions % g]
             + self.token_prefix(x, start, n))  # (B, n - start, D)
        if self.local_window:
            h = h + self.embed_window(x, start, n)
        h = h + self.value_mlp(self.value_norm(h))
        return self.head(self.final_norm(h))  # (B, n - start, K)

    def run_blocks(self, x: Tensor, y: Tensor | None, first: int, last: int,
                   cache: KeyValueCache | None) -> Tensor:
        """The blocks' output (B, last - first, D) at tokens first .. last - 1 (token j: values
        j g .. j g + g - 1), each from the tokens before it: token 0's input is the start token,
        token j's the values of token j - 1. ``first`` must be the tokens the cache holds."""
        B = x.shape[0]
        g = self.token_size
        previous = x[:, max(first - 1, 0) * g: (last - 1) * g]  # the values of tokens max(first-1, 0) .. last-2
        if g == 1:
            embedded = self.embed_values(previous)  # (B, last - max(first, 1), D)
        else:  # the sum over a token's g offsets of each offset's level embedding, as one matmul
            weights = self.level_weights(previous.reshape(B, -1, g)).flatten(2)  # (B, tokens, g K)
            embedded = weights @ self.token_embedding.flatten(0, 1)  # (B, tokens, D)
        if first == 0:
            embedded = torch.cat([self.start_token.expand(B, 1, -1), embedded], dim=1)
        h = embedded + self.position_embedding[first:last]  # (B, last - first, D)
        if g == 1 and self.local_window:
            h = h + self.embed_window(x, first, last)
        if self.class_embedding is not None:
            h = h + self.class_embedding(y)[:, None, :]
        h = self.dropout(h)
        for layer, block in enumerate(self.blocks):
            h = block(h, cache, layer)
        if cache is not None:
            cache.length = last
        return h

    def token_prefix(self, x: Tensor, start: int, n: int) -> Tensor:
        """(B, n - start, D): at each value t (offset i in its token), the sum over the values of
        its token before it (offsets i' < i) of their level embeddings in prefix_embedding[i, i']."""
        B = x.shape[0]
        g = self.token_size
        first, last = start // g, (n - 1) // g + 1  # the tokens of values start .. n - 1
        # the values of those tokens, zeros after x_{n-1}: a value reaches only later offsets,
        # so these zeros (and x_{n-1}) reach no logits returned here
        values = F.pad(x[:, first * g: n], (0, last * g - n))  # (B, (last - first) g)
        weights = self.level_weights(values.view(B, last - first, g)).flatten(2)  # (B, tokens, g K)
        table = self.prefix_embedding * self.prefix_mask[:, :, None, None]  # (g, g, K, D), i' < i only
        table = table.permute(1, 2, 0, 3).flatten(0, 1).flatten(1)  # (i' K, i D)
        embedded = (weights @ table).view(B, (last - first) * g, -1)  # (B, tokens g, D)
        return embedded[:, start - first * g: n - first * g]

    def new_cache(self) -> KeyValueCache:
        return KeyValueCache(len(self.blocks), self.num_tokens)
