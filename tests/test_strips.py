"""Strip-wise inference of the blocks (sipl_fast.modules): exact, in place only where allowed."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from sipl_fast import modules
from sipl_fast.modules import (BlockStack, ChannelMix, ChannelNorm, GatedFFN, TransformerBlock,
                               TransposedAttention, add_in_strips, in_strips, strip_bounds)
from sipl_fast.ops.torch_impl import gram as _split_gram


@pytest.fixture
def small_strips(monkeypatch):
    """A strip budget of a few rows for the test images (the default only strips large images)."""
    monkeypatch.setitem(modules.STRIP_ELEMENTS, "cpu", 3000)


def _randomised(module: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if p.dim() == 1 else 0.0))
    return module.double()


@pytest.mark.parametrize("height,rows", [(13, 1), (13, 4), (7, 7), (9, 20)])
def test_strip_bounds_cover_each_row_once_with_halos(height, rows):
    covered = []
    for lo, hi, top, bottom in strip_bounds(height, rows):
        assert lo == max(top - 1, 0) and hi == min(bottom + 1, height) and 0 < bottom - top <= rows
        covered += range(top, bottom)
    assert covered == list(range(height))


@pytest.mark.parametrize("per_image", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("inplace", [False, True])
def test_add_in_strips_is_exact_and_overwrites_only_when_told(small_strips, inplace, channels_last, per_image):
    conv = _randomised(torch.nn.Conv2d(5, 7, 3, padding=1))
    x = torch.randn(2, 5, 23, 11, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    matrix = torch.randn(2 if per_image else 1, 5, 7, dtype=torch.float64)
    mix = ChannelMix(matrix if per_image else matrix[0, :, :, None, None], torch.randn(5, dtype=torch.float64))
    expected = x + torch.einsum("boi,bihw->bohw", matrix.expand(2, 5, 7), conv(x)) + mix.bias.view(1, -1, 1, 1)
    original = x.clone()
    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        assert modules.strip_rows(x, 40) < x.shape[-2]  # really in strips
        patch.setattr(torch, "einsum", None)  # whole rows are one strided matrix: GEMMs only
        result = add_in_strips(conv, mix, x, live_channels=40, inplace=inplace)
    torch.testing.assert_close(result, expected, rtol=1e-12, atol=1e-12)
    assert (result.data_ptr() == x.data_ptr()) == inplace
    assert result.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if not inplace:
        assert torch.equal(x, original)
    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        patch.setitem(modules.STRIP_ELEMENTS, "cpu", 1 << 40)  # one piece
        torch.testing.assert_close(add_in_strips(conv, mix, original.clone(), 40, inplace), expected,
                                   rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(add_in_strips(conv, mix, original, 40, inplace), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("channels_last", [False, True])
def test_channel_mix_adds_into_views_that_are_not_one_matrix(channels_last):
    """A column crop of a map is no single strided matrix: the mix is added all the same,
    into the crop only; a 16-bit map with a float32 matrix adds in the map's dtype."""
    torch.manual_seed(0)
    out = torch.randn(1, 4, 6, 9, dtype=torch.float64)
    if channels_last:
        out = out.contiguous(memory_format=torch.channels_last)
    x = torch.randn(1, 3, 6, 4, dtype=torch.float64)
    matrix = torch.randn(4, 3, dtype=torch.float64)
    expected = out.clone()
    expected[..., 2:6] += torch.einsum("oi,bihw->bohw", matrix, x)
    ChannelMix(matrix[:, :, None, None], None).add_into(out[..., 2:6], x)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    half = out.to(torch.bfloat16)
    ChannelMix(matrix[None].float(), None).add_into(half, torch.randn(1, 3, 6, 9).to(torch.bfloat16))
    assert half.dtype == torch.bfloat16


@pytest.mark.parametrize("pixels", [7, 64, 100])
def test_split_gram_equals_one_product(pixels):
    q, k = torch.randn(2, 3, 5, pixels, dtype=torch.float64), torch.randn(2, 3, 5, pixels, dtype=torch.float64)
    torch.testing.assert_close(_split_gram(q, k, piece=16), q @ k.transpose(-2, -1), rtol=1e-12, atol=1e-12)


class _Products(TorchDispatchMode):
    """Records each matrix product dispatched: (op, first operand's shape,
    torch.backends.cuda.matmul.allow_tf32 at that moment)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in ("baddbmm_", "bmm", "mm", "einsum"):
            self.calls.append((name, tuple(args[0].shape), torch.backends.cuda.matmul.allow_tf32))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("device,dtype,expected", [("cpu", torch.float32, [(2, 5, 4096)]),
                                                  ("cuda", torch.float32, [(8, 5, 1024)]),
                                                  ("cuda", torch.bfloat16, [(2, 5, 4096)])])
def test_gram_splits_into_pieces_on_cuda_only(device, dtype, expected):
    """On CUDA a float32 product runs as a batch over GRAM_PIECE_CUDA-pixel pieces (more
    programs for the GPU); on the CPU as one product (faster with MKL), and 16-bit inputs as one
    product too (each piece would be rounded to 16 bits). Fake CUDA tensors: no GPU needed."""
    from sipl_fast.ops import torch_impl
    assert torch_impl.GRAM_PIECE_CUDA == 1024
    spy = _Products()
    with FakeTensorMode(), spy, torch.no_grad():
        q = torch.empty(1, 2, 5, 4096, device=device, dtype=dtype)
        assert _split_gram(q, q.clone()).shape == (1, 2, 5, 5)
    assert [shape for name, shape, _ in spy.calls if name == "bmm"] == expected


def test_in_strips_equals_the_whole_map(small_strips):
    ffn = _randomised(GatedFFN(6, 2.66, bias=True, dual=True))
    x = torch.randn(1, 6, 31, 9, dtype=torch.float64)
    expected = ffn._dense(x)
    with torch.no_grad():
        torch.testing.assert_close(in_strips(ffn._dense, x, 6, ffn.project_in.out_channels), expected)


@pytest.mark.parametrize("heads", [1, 2])
def test_streamed_transposed_attention_equals_the_dense_branch(small_strips, heads):
    """Two passes over strips (Gram statistics, then values) give x + MDTA(LN(x)) exactly;
    near-constant channels and a zero channel exercise F.normalize's eps."""
    attn = _randomised(TransposedAttention(8, heads, bias=True))
    norm = _randomised(ChannelNorm(8, "WithBias"))
    with torch.no_grad():
        attn.temperature.copy_(torch.tensor([3.0, 50.0][:heads]).reshape(-1, 1, 1))
    x = torch.randn(2, 8, 29, 10, dtype=torch.float64)
    x[:, 3] = 0.25 + 1e-7 * x[:, 3]
    expected = x + attn(norm(x))
    calls = []
    original = attn._projected_channels

    def counting(part, first, count):
        calls.append((part.shape[-2], first, count))
        return original(part, first, count)
    attn._projected_channels = counting
    with torch.no_grad():
        copy = x.clone()
        streamed = attn.add_to(copy, norm, inplace=False)
        assert torch.equal(copy, x)
        in_place = attn.add_to(copy, norm, inplace=True)
    assert in_place.data_ptr() == copy.data_ptr()
    assert {c[1:] for c in calls} == {(0, 16), (16, 8)} and max(c[0] for c in calls) < x.shape[-2]
    torch.testing.assert_close(streamed, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(in_place, expected, rtol=1e-10, atol=1e-10)


def test_block_stack_keeps_its_input_unless_told(small_strips):
    stack = _randomised(BlockStack(*[TransformerBlock(8, 2, 2.66, False, "WithBias") for _ in range(3)]))
    x = torch.randn(1, 8, 21, 12, dtype=torch.float64)
    expected = stack(x)  # autograd on: the plain formulation
    original = x.clone()
    with torch.no_grad():
        kept = stack(x)
        assert torch.equal(x, original)
        overwritten = stack(x, inplace=True)
    assert overwritten.data_ptr() == x.data_ptr()
    torch.testing.assert_close(kept, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(overwritten, expected, rtol=1e-10, atol=1e-10)


def test_reference_backend_keeps_the_authors_structure_without_autograd(small_strips, monkeypatch):
    """The benchmarks' baseline: no strips and no overwritten maps on the reference backend,
    which would change its speed and memory (the results are the same either way)."""
    import sipl_fast
    stack = _randomised(BlockStack(*[TransformerBlock(8, 2, 2.66, False, "WithBias") for _ in range(2)]))
    x = torch.randn(1, 8, 21, 12, dtype=torch.float64)
    original = x.clone()
    expected = stack(x)

    def streamed_path(*args, **kwargs):
        raise AssertionError("the reference backend took a streamed (strip-wise, in-place) path")

    for name in ("strip_bounds", "add_in_strips", "_residual"):
        monkeypatch.setattr(modules, name, streamed_path)
    with torch.no_grad():
        assert modules.streaming(x) and modules.strip_rows(x, 40) < x.shape[-2]
        with sipl_fast.use_backend("reference"):
            assert not modules.streaming(x) and modules.strip_rows(x, 40) is None
            result = stack(x, inplace=True)
    assert torch.equal(x, original) and result.data_ptr() != x.data_ptr()
    torch.testing.assert_close(result, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.gpu
def test_cuda_streamed_block_equals_the_dense_block(monkeypatch):
    monkeypatch.setitem(modules.STRIP_ELEMENTS, "cuda", 5 * 96 * 512 * 40)  # 40-row MDTA strips, ~15-row GDFN ones
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # TF32 convolutions differ by ~1e-4
    block = _randomised(TransformerBlock(96, 1, 2.66, False, "WithBias")).float().cuda()
    x = torch.randn(1, 96, 200, 512, device="cuda")
    expected = block(x).detach()  # autograd on: the kernels on the whole map
    with torch.no_grad():
        streamed = block(x.clone(), inplace=True)
    error = (streamed - expected).norm() / expected.norm()
    assert error <= 1e-5, error


@pytest.fixture
def set_matmul_tf32():
    """Sets torch.backends.cuda.matmul.allow_tf32 for the test (monkeypatch cannot: the flag is
    a module __getattr__, not an attribute) and restores it after."""
    previous = torch.backends.cuda.matmul.allow_tf32

    def set_flag(allowed: bool) -> None:
        torch.backends.cuda.matmul.allow_tf32 = allowed
    yield set_flag
    torch.backends.cuda.matmul.allow_tf32 = previous


@pytest.mark.parametrize("cudnn_tf32,matmul_tf32", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("device,dtype", [("cuda", torch.float32), ("cuda", torch.bfloat16), ("cpu", torch.float32)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_channel_mix_products_follow_the_convolution_tf32_setting(monkeypatch, set_matmul_tf32, device, dtype,
                                                                 channels_last, cudnn_tf32, matmul_tf32):
    """A ChannelMix stands in for a 1x1 convolution: its float32 CUDA products run while cuBLAS
    has the convolutions' TF32 setting (cudnn.allow_tf32), and the matmul flag is restored
    after; other dtypes and devices leave the flag alone. Fake CUDA tensors: no GPU needed."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", cudnn_tf32)
    set_matmul_tf32(matmul_tf32)
    spy = _Products()
    with FakeTensorMode(), spy:
        out = torch.zeros(2, 8, 6, 5, device=device, dtype=dtype)
        if channels_last:
            out = out.contiguous(memory_format=torch.channels_last)
        x = torch.ones(2, 4, 6, 5, device=device, dtype=dtype)
        ChannelMix(torch.ones(8, 4, 1, 1, device=device, dtype=dtype), None).add_into(out, x)
        ChannelMix(torch.ones(8, 4, 1, 1, device=device, dtype=dtype), None).add_into(out[..., 1:4], x[..., 1:4])
    expected = cudnn_tf32 if (device, dtype) == ("cuda", torch.float32) else matmul_tf32
    assert spy.calls and {allowed for _, _, allowed in spy.calls} == {expected}
    assert torch.backends.cuda.matmul.allow_tf32 == matmul_tf32


@pytest.fixture
def restore_precision_settings():
    """Puts torch's float32 precision settings back as they were (monkeypatch cannot: they are
    properties of torch.backends objects, not attributes)."""
    levels = (torch.backends, torch.backends.cudnn, torch.backends.cudnn.conv, torch.backends.cudnn.rnn)
    saved = [level.fp32_precision for level in levels]
    yield
    for level, precision in zip(levels, saved):
        level.fp32_precision = precision


@pytest.mark.parametrize("set_by", ["legacy flag", "precision API"])
@pytest.mark.parametrize("allowed", [True, False])
def test_the_convolutions_tf32_setting_is_read_in_every_state(restore_precision_settings, set_by, allowed):
    """Set with the legacy flag or with the precision API (after which the legacy flag raises on
    reading), the convolutions' TF32 setting reads back as set."""
    if set_by == "legacy flag":
        torch.backends.cudnn.allow_tf32 = allowed
    else:
        torch.backends.cudnn.conv.fp32_precision = "tf32" if allowed else "ieee"
        torch.backends.cudnn.rnn.fp32_precision = "ieee" if allowed else "tf32"
        with pytest.raises(RuntimeError):  # convolutions and RNNs apart: the state this reading exists for
            torch.backends.cudnn.allow_tf32  # noqa: B018
    assert modules.convolutions_use_tf32() == allowed


def test_matmul_tf32_is_restored_after_an_error(set_matmul_tf32):
    set_matmul_tf32(False)
    with pytest.raises(RuntimeError, match="inside"):
        with modules.matmul_tf32(True):
            assert torch.backends.cuda.matmul.allow_tf32
            raise RuntimeError("inside")
    assert not torch.backends.cuda.matmul.allow_tf32


@pytest.mark.gpu
@pytest.mark.parametrize("cudnn_tf32", [False, True])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_channel_mix_adds_into_a_strip_in_place(monkeypatch, channels_last, batch, cudnn_tf32):
    """cuBLAS takes the strip's strides as they are (or torch copies and writes back): only the
    strip's rows change, by the float64 product (to TF32's 2^-11 relative rounding of the
    operands, summed over 6 products, where convolutions may use TF32)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", cudnn_tf32)
    tolerance = 1e-2 if cudnn_tf32 else 1e-5
    torch.manual_seed(0)
    out = torch.randn(batch, 8, 20, 16, device="cuda")
    if channels_last:
        out = out.contiguous(memory_format=torch.channels_last)
    x = torch.randn(batch, 6, 7, 16, device="cuda")
    weight, per_image = torch.randn(8, 6, 1, 1, device="cuda"), torch.randn(batch, 8, 6, device="cuda")
    for mix, matrix in ((ChannelMix(weight, None), weight[:, :, 0, 0].expand(batch, 8, 6)),
                        (ChannelMix(per_image, None), per_image)):
        expected = out.double()
        expected[..., 5:12, :] += torch.einsum("boi,bihw->bohw", matrix.double(), x.double())
        mix.add_into(out[..., 5:12, :], x)
        torch.testing.assert_close(out.double(), expected, rtol=tolerance, atol=tolerance)
