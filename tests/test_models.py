"""The model zoo against the paper: Table 1, identity initialisation, output sizes."""

from __future__ import annotations

import pytest
import torch

from dilseg.export.context import LAYERS, context_basic, context_large, receptive_fields
from dilseg.export.dilation import FRONTEND_MARGIN, dilation8_basic, dilation8_frontend
from dilseg.export.zoo import MODELS, UnknownModelError, create_model

C = 11


def test_table1_receptive_fields() -> None:
    assert receptive_fields() == [3, 5, 9, 17, 33, 65, 67, 67]


@pytest.mark.parametrize("factory, widths", [
    (context_basic, [C] * 8),
    (context_large, [2 * C, 2 * C, 4 * C, 8 * C, 16 * C, 32 * C, 32 * C, C]),
])
def test_table1_layers(factory, widths) -> None:
    module = factory(C)
    assert module.widths == widths
    kernels = [conv.kernel_size for conv in module.convs]
    dilations = [conv.dilation for conv in module.convs]
    assert kernels == [(3, 3)] * 7 + [(1, 1)]
    assert dilations == [(d, d) for d in (1, 1, 2, 4, 8, 16, 1, 1)]
    assert [relu for _, _, relu in LAYERS] == [True] * 7 + [False]
    # Padding keeps resolution: the module maps C maps of any size to C maps of that size.
    x = torch.rand(1, C, 23, 37)
    assert module(x).shape == x.shape


def test_basic_module_is_identity_on_nonnegative_input() -> None:
    module = context_basic(C)
    x = torch.rand(2, C, 40, 52) * 5
    torch.testing.assert_close(module(x), x, atol=1e-6, rtol=0)
    # ...and only there: the ReLUs clip negative scores.
    neg = -torch.rand(1, C, 8, 8) - 0.1
    assert torch.all(module(neg) == 0)


def test_basic_module_params_are_64_c_squared() -> None:
    weights = sum(conv.weight.numel() for conv in context_basic(C).convs)
    assert weights == 7 * 9 * C * C + C * C == 64 * C * C


def test_large_module_maps_a_class_map_through() -> None:
    torch.manual_seed(0)
    module = context_large(C)
    cls = torch.randint(0, C, (1, 30, 44))
    x = torch.nn.functional.one_hot(cls, C).permute(0, 3, 1, 2).float() * 3.0
    y = module(x)
    assert torch.equal(y.argmax(1), cls)
    torch.testing.assert_close(y, x, atol=0.05, rtol=0)  # noise is small against the C/c_out taps


@pytest.mark.parametrize("name", ["edge_s", "edge_m", "edge_l"])
def test_edge_models_return_input_sized_scores(name) -> None:
    model = create_model(name, C).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 64, 96)).shape == (1, C, 64, 96)
        assert model(torch.rand(2, 3, 40, 56)).shape == (2, C, 40, 56)


def test_edge_model_upsamples_with_resize_not_transposed_conv() -> None:
    model = create_model("edge_m", C)
    assert not any(isinstance(m, torch.nn.ConvTranspose2d) for m in model.modules())


def test_dilation8_frontend_reproduces_the_original_66x66_map() -> None:
    # Shapes only (meta tensors): the full-size VGG-16 pass would cost ~1.3 TFLOP.
    with torch.device("meta"):
        frontend = dilation8_frontend(C)
        out = frontend(torch.empty(1, 3, 900, 900))
    assert tuple(out.shape) == (1, C, 66, 66)
    convs = [m for m in frontend.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(conv.padding == (0, 0) for conv in convs)  # the original unpadded form
    assert [c.dilation[0] for c in convs[10:13]] == [2, 2, 2]  # conv5_x
    fc6, fc7, final = convs[13:]
    assert (fc6.kernel_size, fc6.dilation, fc6.out_channels) == ((7, 7), (4, 4), 4096)
    assert (fc7.kernel_size, fc7.out_channels, final.out_channels) == ((1, 1), 4096, C)
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in frontend.modules()) == 3  # pool4/5 removed


@pytest.mark.parametrize("size", [(360, 480), (512, 512)])
def test_dilation8_output_stride_is_8_with_the_186_margin(size) -> None:
    h, w = size
    with torch.device("meta"):
        out = dilation8_frontend(C)(torch.empty(1, 3, h + 2 * FRONTEND_MARGIN, w + 2 * FRONTEND_MARGIN))
    assert tuple(out.shape[-2:]) == (h // 8, w // 8)


def test_dilation8_full_model_returns_input_size() -> None:
    torch.manual_seed(0)
    model = dilation8_basic(C).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 48, 64))  # smaller than the margin: padded in steps
    assert out.shape == (1, C, 48, 64)
    assert torch.isfinite(out).all()


def test_edge_model_trains_a_step() -> None:
    torch.manual_seed(0)
    model = create_model("edge_s", C).train()
    x = torch.rand(2, 3, 64, 96)
    y = torch.randint(0, C, (2, 64, 96))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_unknown_model_names_the_choices() -> None:
    with pytest.raises(UnknownModelError, match="edge_m"):
        create_model("resnet9000")
    assert {"edge_s", "edge_m", "edge_l", "dilation8_basic", "dilation8_large"} <= set(MODELS)
