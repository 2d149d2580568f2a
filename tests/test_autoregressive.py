"""Autoregressive family: masks, causality by gradient, exact likelihood, cached sampling,
completion, and fit -> checkpoint -> predict through the CLI."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from lightning_gen import PixelCNN, PixelTransformer
from lightning_gen.autoregressive.nets import MaskedConv2d, causal_conv_mask, local_window_sources
from cli_helpers import fit_and_predict
from ema_helpers import fit_and_check_the_average


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The sampling loops run hundreds of tiny network calls in sequence; on a busy machine each
    multi-threaded call waits for descheduled OpenMP threads (100x slower), so use one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_pixelcnn(shape, gated=True, **options):
    settings = dict(hidden_channels=6 if shape[0] == 3 else 8, num_layers=3, head_channels=16,
                    gated=gated)
    settings.update(options)
    return PixelCNN(shape, **settings)


def tiny_transformer(shape, **options):
    settings = dict(model_dim=16, num_layers=2, num_heads=2)
    settings.update(options)
    return PixelTransformer(shape, **settings)


BUILDERS = {
    "pixelcnn_gated": lambda shape, **o: tiny_pixelcnn(shape, gated=True, **o),
    "pixelcnn_gated_dilated": lambda shape, **o: tiny_pixelcnn(shape, gated=True, dilations=[2], **o),
    "pixelcnn_plain": lambda shape, **o: tiny_pixelcnn(shape, gated=False, **o),
    "pixeltransformer": tiny_transformer,
    "pixeltransformer_local": lambda shape, **o: tiny_transformer(shape, local_window=3, **o),
    "pixeltransformer_tokens": lambda shape, **o: tiny_transformer(shape, token_size=2, **o),
    "pixeltransformer_tokens_local": lambda shape, **o: tiny_transformer(shape, token_size=4,
                                                                         local_window=3, **o),
}


def raster_jacobian(model, shape, seed=0):
    """J[i, j] = d (a random projection of the K logits of value i) / d (input value j), values
    in raster order (rows, pixels, channels), at a random input in [0, 1].

    One backward pass: the input is repeated once per value i (examples do not interact), and
    copy i back-propagates the logits of value i only.
    """
    C, H, W = shape
    T = C * H * W
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(1, *shape, generator=generator).expand(T, *shape).clone().requires_grad_(True)
    logits = model(x)  # (T, K, C, H, W)
    assert logits.shape == (T, model.num_levels, *shape)
    per_value = logits.permute(0, 3, 4, 2, 1).reshape(T, T, -1)  # (copy, value, K)
    projection = torch.randn(per_value.shape[-1], generator=generator)
    (per_value.diagonal(dim1=0, dim2=1).T @ projection).sum().backward()  # copy i, value i
    return x.grad.permute(0, 2, 3, 1).reshape(T, T)  # (value i, input value j)


# ------------------------------------------------------------------------------------- masks
def test_masks_match_the_drawings():
    type_a = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0],
                           [0, 0, 0, 0, 0]]).float()
    type_b = type_a.clone()
    type_b[2, 2] = 1
    vertical_a = torch.zeros(5, 5)
    vertical_a[:2] = 1
    vertical_b = vertical_a.clone()
    vertical_b[2] = 1
    for mask_type, expected in [("A", type_a), ("B", type_b), ("vertical_A", vertical_a),
                                ("vertical_B", vertical_b)]:
        mask = causal_conv_mask(4, 3, (5, 5), mask_type)
        assert torch.equal(mask, expected.expand(4, 3, 5, 5)), mask_type
    assert torch.equal(causal_conv_mask(1, 1, (1, 3), "B")[0, 0], torch.tensor([[1.0, 1.0, 0.0]]))
    # RGB: at the centre, output group c sees input channels < c (A) or <= c (B)
    center_a = causal_conv_mask(3, 3, (3, 3), "A", data_channels=3)[:, :, 1, 1]
    center_b = causal_conv_mask(3, 3, (3, 3), "B", data_channels=3)[:, :, 1, 1]
    assert torch.equal(center_a, torch.tril(torch.ones(3, 3), diagonal=-1))
    assert torch.equal(center_b, torch.tril(torch.ones(3, 3)))
    with pytest.raises(ValueError, match="mask_type"):
        causal_conv_mask(1, 1, (3, 3), "C")


@pytest.mark.parametrize("dilation", [1, 2, 3])
@pytest.mark.parametrize("data_channels", [1, 3])
@pytest.mark.parametrize("mask_type,kernel_size", [("A", (3, 3)), ("B", (5, 5)), ("A", (1, 3)),
                                                   ("B", (1, 5)), ("vertical_A", (7, 7)),
                                                   ("vertical_B", (3, 3)), ("A", (1, 1)),
                                                   ("B", (1, 1))])
def test_masked_convolution_equals_the_full_masked_kernel(mask_type, kernel_size, data_channels,
                                                          dilation):
    """The layer convolves with the kept rows and columns of its kernel only, padded (or cropped)
    to line up: the result must be the full k x k convolution with the masked kernel."""
    torch.manual_seed(0)
    layer = MaskedConv2d(6, 9, kernel_size, mask_type, data_channels, dilation).double()
    x = torch.randn(2, 6, 9, 11, dtype=torch.float64)
    expected = F.conv2d(x, layer.weight * layer.mask, layer.bias, dilation=dilation,
                        padding=(dilation * (kernel_size[0] // 2), dilation * (kernel_size[1] // 2)))
    torch.testing.assert_close(layer(x), expected, atol=1e-12, rtol=0)
    # the taps convolved: no row below the centre, no column right of it in a one-row kernel
    kernel_height, kernel_width = kernel_size
    if mask_type == "vertical_A":
        taps = (kernel_height // 2, kernel_width)
    elif mask_type == "vertical_B" or kernel_height > 1:
        taps = (kernel_height // 2 + 1, kernel_width)
    else:  # 1 x k: the pixels left of the centre, and the centre where some channel may see it
        center_seen = mask_type == "B" or data_channels > 1
        taps = (1, max(kernel_width // 2 + center_seen, 1))  # 1 x 1 type A grey: no tap, kept whole
    assert layer.weight[0, 0, layer.kept_rows, layer.kept_columns].shape == taps


# --------------------------------------------------------------------------------- causality
@pytest.mark.parametrize("shape", [(1, 6, 6), (3, 3, 3)], ids=["gray", "rgb"])
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_causal_by_gradient(name, shape):
    torch.manual_seed(0)
    model = BUILDERS[name](shape)
    jacobian = raster_jacobian(model, shape)
    T = jacobian.shape[0]
    # the logits of value i do not depend on value j >= i (itself included; value 0 on nothing)
    assert torch.all(jacobian.triu() == 0), "logits depend on the current or a later value"
    assert torch.all(jacobian[0] == 0)
    # ... and do depend on earlier values, so the check above could fail
    below = jacobian.tril(-1) != 0
    assert below.sum() > 0.5 * T * (T - 1) / 2
    assert below[1:].any(1).all(), "some value ignores every value before it"


def test_gated_pixelcnn_has_no_blind_spot_and_plain_one_has():
    shape = (1, 6, 6)
    torch.manual_seed(0)
    options = dict(num_layers=5, kernel_size=3, first_kernel_size=3)
    gated = raster_jacobian(tiny_pixelcnn(shape, gated=True, **options), shape)
    plain = raster_jacobian(tiny_pixelcnn(shape, gated=False, **options), shape)
    T = gated.shape[0]
    earlier = torch.ones(T, T, dtype=torch.bool).tril(-1)  # (i, j): j before i
    # with 5 layers of 3x3 every earlier pixel is in the receptive field of every pixel
    assert torch.all(gated[earlier] != 0) and torch.all(gated[~earlier] == 0)
    # the plain stack misses the pixels above-right of (3, 2) (van den Oord et al. 2016b, fig. 1)
    seen_by_3_2 = (plain[3 * 6 + 2] != 0).view(6, 6)
    for row, column in [(1, 5), (2, 4), (2, 5)]:
        assert not seen_by_3_2[row, column]
    assert seen_by_3_2[2, 3] and seen_by_3_2[3, 1] and seen_by_3_2[0, 5]
    assert torch.all(plain[~earlier] == 0)
    assert (plain[earlier] == 0).sum() > T  # more than one blind value per position on average


# -------------------------------------------------------------------------------- likelihood
@pytest.mark.parametrize("num_levels", [2, 256])
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_log_prob_is_minus_summed_cross_entropy(name, num_levels):
    torch.manual_seed(0)
    model = BUILDERS[name]((1, 5, 5), num_levels=num_levels).eval()
    levels = torch.randint(num_levels, (4, 1, 5, 5))
    x = levels.float() / (num_levels - 1)  # already on the grid: quantize keeps it
    logits = model(x)
    assert logits.shape == (4, num_levels, 1, 5, 5)
    log_probabilities = torch.log_softmax(logits, dim=1)  # over the K levels
    expected = log_probabilities.gather(1, levels[:, None]).flatten(1).sum(1)  # (B,)
    torch.testing.assert_close(model.log_prob(x), expected)
    per_value = F.cross_entropy(logits, levels, reduction="none")  # (B, C, H, W)
    torch.testing.assert_close(model.log_prob(x), -per_value.flatten(1).sum(1))


@pytest.mark.parametrize("num_levels", [2, 3])
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_probabilities_of_all_images_sum_to_one(name, num_levels):
    torch.manual_seed(0)
    model = BUILDERS[name]((1, 2, 2), num_levels=num_levels).eval()
    every_image = torch.tensor(list(itertools.product(range(num_levels), repeat=4))).view(-1, 1, 2, 2)
    log_prob = model.log_prob(every_image.float() / (num_levels - 1))
    torch.testing.assert_close(torch.logsumexp(log_prob, 0), torch.tensor(0.0), atol=1e-5, rtol=0)


def sharpen(model, every_image):
    """Scale the output layer until the tiny model's distribution is far from uniform (the most
    likely image has probability > 0.25) but not a point mass."""
    head = model.network.head[-1] if isinstance(model, PixelCNN) else model.network.head
    with torch.no_grad():
        for _ in range(40):
            if model.log_prob(every_image).exp().max() > 0.25:
                break
            head.weight.mul_(1.25)
            head.bias.mul_(1.25)
    return model


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_samples_follow_the_model_distribution(name):
    torch.manual_seed(0)
    every_image = torch.tensor(list(itertools.product(range(2), repeat=4))).view(-1, 1, 2, 2).float()
    model = sharpen(BUILDERS[name]((1, 2, 2)).eval(), every_image)
    probabilities = model.log_prob(every_image).exp()  # (16,)
    torch.manual_seed(1)
    samples = model.sample(3000)
    index = (samples.flatten(1).long() * torch.tensor([8, 4, 2, 1])).sum(1)
    frequencies = torch.bincount(index, minlength=16).float() / len(samples)
    assert 0.25 < probabilities.max() < 0.7  # not uniform, so a wrong order would show
    assert 0.5 * (frequencies - probabilities).abs().sum() < 0.05  # total variation


# ---------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("num_levels", [2, 256])
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_sample_shapes_and_values(name, num_levels):
    torch.manual_seed(0)
    model = BUILDERS[name]((1, 4, 4), num_levels=num_levels).eval()
    samples = model.sample(6, temperature=0.8)
    assert samples.shape == (6, 1, 4, 4) and samples.dtype == torch.float32
    assert samples.min() >= 0 and samples.max() <= 1
    levels = samples * (num_levels - 1)
    torch.testing.assert_close(levels, levels.round(), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="temperature"):
        model.sample(2, temperature=0.0)
    with pytest.raises(ValueError, match="num_samples"):
        model.sample(0)


def test_local_window_sources_are_the_earlier_values_around_a_pixel():
    # grey 3 x 4 image, window 3: the pixel at (1, 1) (position 5) sees (0, 0..2) and (1, 0)
    sources = local_window_sources((1, 3, 4), 3)  # (12, 1, 9)
    assert sources.shape == (12, 1, 9)
    assert sources[5, 0].tolist() == [0, 1, 2, 4, -1, -1, -1, -1, -1]
    assert (sources[0] == -1).all()  # the first pixel sees nothing
    # at (0, 3) the window's right column is outside, its rows above too: only (0, 2)
    assert sorted(sources[3, 0].tolist()) == [-1] * 8 + [2]
    # RGB 2 x 2: green of pixel (1, 1) (position 3 * 3 + 1 = 10) sees every channel of pixels
    # 0, 1, 2 in the window and the red (position 9) of its own pixel
    rgb = local_window_sources((3, 2, 2), 3)  # (12, 3, 27)
    seen = sorted(v for v in rgb[10, 1].tolist() if v >= 0)
    assert seen == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert sorted(v for v in rgb[9, 0].tolist() if v >= 0) == list(range(9))  # red: not itself
    assert all(v < t for t in range(12) for v in rgb[t, t % 3].tolist())  # only earlier values


CACHED_SAMPLERS = {
    "pixeltransformer": lambda: tiny_transformer((1, 6, 6), num_levels=4, num_classes=3),
    "pixeltransformer_local": lambda: tiny_transformer((1, 6, 6), num_levels=4, num_classes=3,
                                                       local_window=3),
    "pixeltransformer_tokens": lambda: tiny_transformer((3, 5, 5), num_levels=4, num_classes=3,
                                                        token_size=4, local_window=3),
    "pixelcnn_gated": lambda: tiny_pixelcnn((3, 5, 5), gated=True, num_levels=4, num_classes=3,
                                            dilations=[1, 2]),
    "pixelcnn_plain": lambda: tiny_pixelcnn((3, 5, 5), gated=False, num_levels=4, num_classes=3,
                                            dilations=[1, 2]),
}


@pytest.mark.parametrize("name", sorted(CACHED_SAMPLERS))
def test_cached_sampling_equals_uncached(name):
    torch.manual_seed(0)
    model = CACHED_SAMPLERS[name]().eval()
    C, H, W = model.data_shape
    y = torch.tensor([0, 1, 2, 1, 0])
    torch.manual_seed(5)
    cached = model.sample(5, y=y)  # the cache is the default
    torch.manual_seed(5)
    uncached = model.sample(5, y=y, use_cache=False)
    assert torch.equal(cached, uncached)
    assert cached.unique().numel() > 1
    # completion: a given prefix at once, later values one by one, and a given island after
    # missing values (in RGB, green and blue given where red is drawn)
    x = torch.rand(5, C, H, W)
    mask = torch.zeros(C, H, W, dtype=torch.bool)
    mask[:, :2] = True
    mask[C // 2:, 3, 1:3] = True
    torch.manual_seed(6)
    cached = model.complete(x, mask=mask, y=y)
    torch.manual_seed(6)
    uncached = model.complete(x, mask=mask, y=y, use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("token_size, tokens", [(1, 36), (4, 9), (5, 8)])
def test_blocks_attend_over_one_token_per_token_size_values(token_size, tokens):
    """The attention's sequence is ceil(T / token_size) long (the last token shorter when the size
    does not divide T), in training and in a cached sampling run, which is where the cost goes."""
    torch.manual_seed(0)
    model = tiny_transformer((1, 6, 6), token_size=token_size, local_window=3)
    lengths = []
    model.network.blocks[0].register_forward_hook(lambda module, args, output: lengths.append(output.shape[1]))
    model(torch.rand(2, 1, 6, 6))
    assert lengths == [tokens]
    lengths.clear()
    model.eval().sample(2)
    assert len(lengths) == tokens and set(lengths) == {1}  # one new token per step, each once


@pytest.mark.parametrize("token_size", [1, 3])
@pytest.mark.parametrize("local_window", [0, 3])
def test_cached_logits_equal_full_forward(local_window, token_size):
    torch.manual_seed(0)
    network = tiny_transformer((1, 4, 4), num_levels=3, local_window=local_window,
                               token_size=token_size).network.eval()
    x = torch.randint(3, (2, 16)).float() / 2  # (B, T)
    full = network(x)  # (B, T, K)
    cache = network.new_cache()
    steps = [network(x[:, :5], cache=cache)]  # a 5-value prefix at once
    steps += [network(x[:, : t + 1], cache=cache) for t in range(5, 16)]  # then one at a time
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="nothing new"):
        network(x, cache=cache)


@pytest.mark.parametrize("classes", [None, 3], ids=["unconditional", "conditional"])
@pytest.mark.parametrize("dilations", [[1], [1, 2]], ids=["undilated", "dilated"])
@pytest.mark.parametrize("channels", [1, 3], ids=["gray", "rgb"])
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
def test_pixelcnn_cache_logits_equal_full_forward(gated, channels, dilations, classes):
    """Each value's logits from the cached activations equal the whole network's on the image,
    whether every position is asked for in turn or some are skipped (given values)."""
    shape = (channels, 7, 6)
    torch.manual_seed(0)
    model = tiny_pixelcnn(shape, gated=gated, num_levels=4, dilations=dilations,
                          num_classes=classes).double().eval()
    images = torch.randint(4, (2, *shape)).double() / 3
    y = torch.tensor([0, 2]) if classes else None
    with torch.no_grad():
        full = model(images, y)  # (B, K, C, H, W)
        C, H, W = shape
        for asked in (range(C * H * W), range(5, C * H * W, 4)):
            cache = model.start_sampling(model.network, 2)
            for position in asked:
                row, column, channel = position // (W * C), (position // C) % W, position % C
                torch.testing.assert_close(model.next_logits(model.network, images, position, y, cache),
                                           full[:, :, channel, row, column], atol=1e-12, rtol=0)


@pytest.mark.parametrize("gated,channels,first_kernel_size,kernel_size,dilations",
                         [(True, 1, 7, 3, [1]), (True, 3, 5, 5, [1]), (False, 1, 7, 3, [1]),
                          (False, 3, 3, 5, [1]), (True, 1, 3, 3, [2, 3]), (False, 1, 3, 3, [1, 2])])
def test_pixelcnn_samples_from_its_receptive_field_rows_with_the_whole_image_logits(
        gated, channels, first_kernel_size, kernel_size, dilations):
    """Sampling runs the network on the rows of a value's receptive field only (network.rows_above
    above it): that field is exactly as tall as said, and its logits are the whole image's."""
    options = dict(gated=gated, num_levels=4, first_kernel_size=first_kernel_size,
                   kernel_size=kernel_size, dilations=dilations)
    # three layers; the gated net's first is undilated, every later one cycles through dilations
    later = [dilations[index % len(dilations)] for index in range(2 if gated else 3)]
    rows_above = first_kernel_size // 2 + sum(later) * (kernel_size // 2)
    shape = (channels, rows_above + 4, 5)
    torch.manual_seed(0)
    model = tiny_pixelcnn(shape, **options).eval()
    assert model.network.rows_above == rows_above
    C, H, W = shape
    # the receptive field's height, from the Jacobian: the farthest row above a value it depends on
    jacobian = raster_jacobian(model, shape)  # (value, input value)
    rows = torch.arange(C * H * W) // (W * C)
    depends = jacobian.abs() > 0
    reach = [int((rows[i] - rows[depends[i]]).max()) for i in range(len(rows)) if depends[i].any()]
    assert max(reach) == rows_above
    # in float64, so that the far rows' small contributions stand out of the rounding
    model, images = model.double(), torch.randint(4, (2, *shape)).double() / 3
    with torch.no_grad():
        full = model(images)  # (B, K, C, H, W)
        for position in range(C * H * W):
            row, column, channel = position // (W * C), (position // C) % W, position % C
            torch.testing.assert_close(model.next_logits(model.network, images, position, None, None),
                                       full[:, :, channel, row, column], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_complete_keeps_given_values(name):
    torch.manual_seed(0)
    model = BUILDERS[name]((1, 6, 6), num_levels=256).eval()
    x = torch.randint(256, (3, 1, 6, 6)).float() / 255
    completed = model.complete(x, num_given_rows=3)
    assert completed.shape == x.shape
    assert torch.equal(completed[:, :, :3], x[:, :, :3])
    assert not torch.equal(completed[:, :, 3:], x[:, :, 3:])
    mask = torch.rand(3, 1, 6, 6) < 0.5
    completed = model.complete(x, mask=mask)
    assert torch.equal(completed[mask], x[mask])
    assert not torch.equal(completed[~mask], x[~mask])
    everything = model.complete(x, num_given_rows=6)
    assert torch.equal(everything, x)
    with pytest.raises(ValueError, match="not both"):
        model.complete(x, num_given_rows=2, mask=mask)
    with pytest.raises(TypeError, match="bool"):
        model.complete(x, mask=mask.float())


def test_binarization_is_dynamic_and_eight_bit_is_exact():
    model = tiny_pixelcnn((1, 4, 4), num_levels=2)
    x = torch.full((2000, 1, 4, 4), 0.3)
    assert abs(model.quantize(x).float().mean().item() - 0.3) < 0.01
    binary = (torch.rand(3, 1, 4, 4) < 0.5).float()
    assert torch.equal(model.quantize(binary).float(), binary)
    eight_bit = tiny_pixelcnn((1, 4, 4), num_levels=256)
    levels = torch.randint(256, (3, 1, 4, 4))
    assert torch.equal(eight_bit.quantize(levels.float() / 255), levels)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_binarization_by_rounding_is_fixed_and_rounds_at_one_half(name):
    model = BUILDERS[name]((1, 4, 4), dynamic_binarization=False).eval()
    x = torch.rand(5, 1, 4, 4)
    levels = model.quantize(x)
    assert torch.equal(levels, (x > 0.5).long())
    assert torch.equal(model.quantize(x), levels)  # the same every time the image is seen
    # the likelihood of a grey image is that of its rounded image, the same on every call
    log_prob = model.log_prob(x)
    assert torch.equal(log_prob, model.log_prob(x))
    torch.testing.assert_close(log_prob, model.log_prob(levels.float()))
    dynamic = BUILDERS[name]((1, 4, 4))
    assert not torch.equal(dynamic.quantize(x), dynamic.quantize(x))
    assert model.hparams.dynamic_binarization is False  # saved: it defines the training data
    with pytest.raises(ValueError, match="num_levels=2 only"):
        BUILDERS[name]((1, 4, 4), num_levels=256, dynamic_binarization=False)


# ------------------------------------------------------------------------------ conditioning
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_class_conditioning(name):
    torch.manual_seed(0)
    model = BUILDERS[name]((1, 4, 4), num_classes=3).eval()
    x = (torch.rand(2, 1, 4, 4) < 0.5).float()
    first = model.log_prob(x, y=torch.tensor([0, 0]))
    second = model.log_prob(x, y=torch.tensor([2, 2]))
    assert not torch.allclose(first, second)
    # without labels: the marginal over the uniform label prior
    per_class = torch.stack([model.log_prob(x, y=torch.full((2,), label)) for label in range(3)])
    torch.testing.assert_close(model.log_prob(x), per_class.exp().mean(0).log())
    with pytest.raises(ValueError, match="shape"):
        model.log_prob(x, y=torch.tensor([0, 1, 2]))
    assert model.sample(2, y=torch.tensor([1, 2])).shape == (2, 1, 4, 4)
    assert model.sample(3).shape == (3, 1, 4, 4)  # labels drawn uniformly
    torch.manual_seed(3)
    one_label = model.sample(2, y=1)
    torch.manual_seed(3)
    assert torch.equal(one_label, model.sample(2, y=torch.tensor([1, 1])))
    with pytest.raises(ValueError, match="0..2"):
        model.sample(2, y=3)
    unconditional = BUILDERS[name]((1, 4, 4))
    with pytest.raises(ValueError, match="num_classes"):
        unconditional.log_prob(x, y=torch.tensor([0, 1]))


# ---------------------------------------------------------------------------------- training
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_loss_falls_when_overfitting_a_batch(name):
    torch.manual_seed(0)
    model = BUILDERS[name]((1, 6, 6))
    x = (torch.rand(8, 1, 6, 6) < 0.3).float()
    batch = (x, torch.zeros(8, dtype=torch.long))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        loss = model.loss(batch, 0, "train")[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize("name", ["pixelcnn_gated", "pixeltransformer_tokens_local"])
def test_weight_average_follows_each_step_and_samples_scores_and_predicts(name, tmp_path):
    """ema_decay keeps a moving average of the network's weights: replayed by hand after each
    optimizer step, saved in the checkpoint, and the model that sampling, log_prob and the
    val/test NLL use by default; use_ema=False (predict_use_ema false) reaches the trained weights."""
    torch.manual_seed(0)
    model = BUILDERS[name]((1, 6, 6), ema_decay=0.5, learning_rate=1e-2)
    images = (torch.rand(32, 1, 6, 6) < 0.3).float()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, torch.zeros(32, dtype=torch.long)),
                                         batch_size=8)
    trainer = fit_and_check_the_average(model, tmp_path, steps=4, decay=0.5, train_dataloaders=loader)

    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    assert any(key.startswith("ema.averaged.") for key in torch.load(path, weights_only=False)["state_dict"])
    model = type(model).load_from_checkpoint(path).eval()
    batch = (images[:8], torch.zeros(8, dtype=torch.long))
    averaged, trained = model.log_prob(images[:8]), model.log_prob(images[:8], use_ema=False)
    assert not torch.allclose(averaged, trained)
    torch.testing.assert_close(model.log_prob(images[:8], use_ema=True), averaged)
    torch.testing.assert_close(model.loss(batch, 0, "val")[0], -averaged.mean())
    torch.testing.assert_close(model.loss(batch, 0, "test")[0], -averaged.mean())
    torch.testing.assert_close(model.loss(batch, 0, "train")[0], -trained.mean())

    draws = {}
    for use_ema in (None, True, False):
        torch.manual_seed(3)
        draws[use_ema] = model.sample(16, use_ema=use_ema)
    assert torch.equal(draws[None], draws[True]) and not torch.equal(draws[True], draws[False])
    completions = {}
    for use_ema in (True, False):  # predict passes predict_use_ema on; completion takes it too
        model.predict_use_ema = use_ema
        torch.manual_seed(3)
        assert torch.equal(model.predict_samples(images[:16], None), draws[use_ema])
        torch.manual_seed(4)
        completions[use_ema] = model.complete(images[:16], num_given_rows=2, use_ema=use_ema)
    assert torch.equal(completions[True][:, :, :2], completions[False][:, :, :2])
    assert not torch.equal(completions[True], completions[False])


def test_weight_average_is_off_by_default_and_asking_for_it_without_one_fails():
    model = tiny_pixelcnn((1, 4, 4))
    assert model.ema is None
    with pytest.raises(ValueError, match="ema_decay"):
        model.sample(1, use_ema=True)
    with pytest.raises(ValueError, match="predict_use_ema=True needs a weight average: set ema_decay"):
        tiny_pixelcnn((1, 4, 4), predict_use_ema=True)
    with pytest.raises(ValueError, match="EMA decay"):
        tiny_transformer((1, 4, 4), ema_decay=1.0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_levels"):
        PixelCNN((1, 4, 4), num_levels=1)
    with pytest.raises(ValueError, match="images"):
        PixelTransformer((2,))
    with pytest.raises(ValueError, match="multiple of the image channels"):
        PixelCNN((3, 4, 4), hidden_channels=8)
    with pytest.raises(ValueError, match="odd"):
        PixelCNN((1, 4, 4), kernel_size=4)
    for local_window in (-1, 2):
        with pytest.raises(ValueError, match="local_window must be 0"):
            PixelTransformer((1, 4, 4), local_window=local_window)
    for token_size in (0, 2.5, True):
        with pytest.raises(ValueError, match="token_size must be a positive int"):
            PixelTransformer((1, 4, 4), token_size=token_size)
    for dilations in ([], [0], [1, 2.5]):
        with pytest.raises(ValueError, match="dilations must be a non-empty list of positive ints"):
            PixelCNN((1, 4, 4), dilations=dilations)
    with pytest.raises(ValueError, match="num_heads"):
        PixelTransformer((1, 4, 4), model_dim=10, num_heads=4)
    with pytest.raises(ValueError, match="predict_mode"):
        PixelCNN((1, 4, 4), predict_mode="completion")
    with pytest.raises(TypeError, match="keep_cache"):
        tiny_pixelcnn((1, 4, 4)).sample(1, keep_cache=True)  # not a sampling option
    with pytest.raises(ValueError, match="shape"):
        tiny_pixelcnn((1, 4, 4)).log_prob(torch.rand(2, 1, 5, 5))


# ------------------------------------------------------------------------------------- CLI
TINY_PIXELCNN = ["--model.init_args.hidden_channels", "4", "--model.init_args.num_layers", "1",
                 "--model.init_args.head_channels", "4", "--data.init_args.batch_size", "8",
                 "--data.init_args.num_predict_samples", "3", "--trainer.precision", "32-true",
                 "--sample_logger.every_n_epochs", "0"]
TINY_TRANSFORMER = ["--model.init_args.model_dim", "8", "--model.init_args.num_layers", "1",
                    "--model.init_args.num_heads", "2", "--model.init_args.warmup_steps", "0",
                    "--data.init_args.batch_size", "8", "--data.init_args.num_predict_samples", "3",
                    "--trainer.precision", "32-true", "--sample_logger.every_n_epochs", "0"]


def test_cli_pixelcnn_fit_then_predict_samples(run_dir, mnist_root):
    output = fit_and_predict("pixelcnn_mnist.yaml", run_dir, *TINY_PIXELCNN)
    samples = torch.load(output / "samples.pt")
    assert samples.shape == (3, 1, 28, 28) and samples.dtype == torch.uint8
    assert set(samples.unique().tolist()) <= {0, 255}  # binarized model: two levels
    assert (output / "grid.png").is_file() and (output / "000002.png").is_file()


def test_cli_pixeltransformer_8bit_fit_then_complete(run_dir, mnist_root):
    output = fit_and_predict("pixeltransformer_mnist_8bit.yaml", run_dir, *TINY_TRANSFORMER,
                             predict_extra=("--model.init_args.predict_mode", "complete",
                                            "--model.init_args.predict_given_rows", "14"))
    completed = torch.load(output / "samples.pt")  # (3, 1, 28, 28) uint8
    from datamodules import MNISTDataModule

    data = MNISTDataModule(data_dir=str(mnist_root), download=False)
    data.setup("test")
    test_images = data.test_set.images[:3, None]  # (3, 1, 28, 28) uint8
    assert torch.equal(completed[:, :, :14], test_images[:, :, :14])  # the given top half, exactly
    assert not torch.equal(completed[:, :, 14:], test_images[:, :, 14:])
