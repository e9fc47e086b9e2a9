"""SIPLAdaIR against an independent transcription of the authors' AdaIR_ProxyFusion, and its contract."""
from __future__ import annotations

import copy
import hashlib
import io

import pytest
import torch

import sipl_fast
from sipl_fast.adair import SIPLAdaIR

from adair_oracle import AuthorsAdaIR
from test_model import _relative_error

# Every structural feature of the full configuration at CPU-test size: several heads, unequal
# blocks per level, non-power-of-two widths. low_band_unit=2 makes the low-frequency bands of
# the 1/4 and 1/2 resolution maps non-empty at test image sizes (the authors' 128 leaves them
# empty on maps under 256 pixels a side); the default is tested too.
SMALL = dict(dim=12, num_blocks=(1, 2, 1, 1), num_refinement_blocks=1, heads=(1, 2, 4, 4), train_patch=32,
             low_band_unit=2)
# Small enough for the Triton interpreter.
MICRO = dict(dim=8, num_blocks=(1, 1, 1, 1), num_refinement_blocks=1, heads=(1, 2, 2, 4), train_patch=16,
             low_band_unit=2)
# Parameters the authors' forward never reads (frozen there, as here).
UNUSED = ("conv.weight", "score_gen.weight", "score_gen.bias")


def _randomised(model: SIPLAdaIR) -> SIPLAdaIR:
    """Non-trivial weights everywhere: random dictionaries, temperatures, and every parameter
    initialised to a constant (norms, the frequency modules' para1 = 0 and para2 = 1)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "dictionary" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif name.endswith("temperature"):
                p.copy_(0.5 + 2 * torch.rand(p.shape, generator=g))
            elif bool((p == p.flatten()[0]).all()):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model


class _Recording(dict):
    """A state_dict that records which keys were read."""

    def __init__(self, *args):
        super().__init__(*args)
        self.read = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        if key in self:
            return self[key]
        return default


def _pair(config=SMALL):
    model = _randomised(SIPLAdaIR(**config))
    params = _Recording({k: v.detach().clone().requires_grad_(True) for k, v in model.state_dict().items()})
    return model, params, AuthorsAdaIR(params, model.config)


def test_default_configuration_matches_the_authors():
    with torch.device("meta"):  # shapes only: building 33 M parameters on the CPU is slow
        model = SIPLAdaIR()
    assert sum(p.numel() for p in model.parameters()) == 33_436_419
    assert sum(p.numel() for p in model.parameters() if not p.requires_grad) == 43_098
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    # sha256 of the sorted "key shape" lines of the authors' AdaIR_ProxyFusion(decoder=True).
    lines = "\n".join(f"{k} {shapes[k]}" for k in sorted(shapes))
    assert hashlib.sha256(lines.encode()).hexdigest() == \
        "1b1c5d3d8001afb13e31090514359ca9f59fc902a772dacf8a8fe434df39aa01"
    assert len(shapes) == 680
    assert shapes["privileged_dictionary1"] == (1, 96, 64, 64)
    assert shapes["privileged_dictionary3"] == (1, 384, 16, 16)
    assert shapes["p3_cross.attn.temperature"] == (1, 1, 1)       # heads[0], the authors' quirk
    assert shapes["cross_p3.attn.temperature"] == (4, 1, 1)
    assert shapes["fre1.channel_cross_l.kv.weight"] == (768, 384, 1, 1)
    assert shapes["fre3.frequency_refine.ChannelGate.mlp.0.weight"] == (6, 96, 1, 1)
    assert shapes["fre2.rate_conv.2.weight"] == (2, 24, 1, 1)
    assert shapes["reduce_chan_level3.weight"] == (192, 384, 1, 1)
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {f"fre{i}.{leaf}" for i in (1, 2, 3)
                      for leaf in (*UNUSED, "rate_conv.0.weight", "rate_conv.2.weight")}
    assert SIPLAdaIR.from_preset("base").config == model.config


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_passes_and_gradients_equal_the_authors(backend):
    model, params, authors = _pair()
    x = torch.rand(2, 3, 16, 32)
    gt = torch.rand(2, 3, 16, 32)
    with sipl_fast.use_backend(backend):
        theirs_pf = authors.forward(gt, return_feature=True)
        for a, b in zip(model.encode(gt), theirs_pf):
            assert _relative_error(a, b) <= 2e-4
        assert _relative_error(model(x), authors.forward(x)) <= 2e-4
        pf = tuple(t.detach() for t in theirs_pf)
        ours = model(x, privileged_features=pf)
        theirs = authors.forward(x, privileged_features=pf)
    assert _relative_error(ours, theirs) <= 2e-4
    assert any(h and w for name, _, h, w in authors.bands if name == "fre3")  # a non-empty low band
    assert params.read == set(params) - {f"fre{i}.{leaf}" for i in (1, 2, 3) for leaf in UNUSED}
    weights = torch.randn_like(ours)
    (ours * weights).sum().backward()
    (theirs * weights).sum().backward()
    ours_params = dict(model.named_parameters())
    trainable = {name for name, p in ours_params.items() if p.requires_grad}
    assert {name for name, p in params.items() if p.grad is not None} == trainable
    for name in trainable:
        assert _relative_error(ours_params[name].grad, params[name].grad) <= 2e-4, name


def test_authors_band_unit_and_biasfree_configuration():
    """low_band_unit=128 (the authors'): every band is empty at this size, no transform runs."""
    config = dict(SMALL, layernorm_type="BiasFree", bias=True, low_band_unit=128)
    model, params, authors = _pair(config)
    assert not any(k.endswith("body.bias") for k in params)
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        pf = model.encode(torch.rand(1, 3, 16, 16))
        assert _relative_error(model(x), authors.forward(x)) <= 2e-4
        assert _relative_error(model(x, privileged_features=pf), authors.forward(x, privileged_features=pf)) <= 2e-4
    assert not any(h and w for _, _, h, w in authors.bands)


def test_frequency_bands_equal_the_authors_split():
    """On maps of different sizes (odd sides too); half precision runs its transforms in float32."""
    model, _, authors = _pair()
    module = model.fre3
    with torch.no_grad():
        for shape in ((2, 3, 12, 20), (3, 3, 9, 7)):
            image = torch.rand(shape)
            expected = authors.fft("fre3", image)
            got = module.frequency_bands(module.conv1(image))
            for a, b in zip(got, expected):
                assert _relative_error(a, b) <= 1e-5
        assert any(h and w for _, _, h, w in authors.bands)
        features = module.conv1(torch.rand(2, 3, 12, 20))
        half_module = copy.deepcopy(module).bfloat16()
        for half, exact in zip(half_module.frequency_bands(features.bfloat16()), module.frequency_bands(features)):
            assert half.dtype == torch.bfloat16 and _relative_error(half.float(), exact) <= 2e-2


def test_refine_equals_the_authors_loop():
    model, _, authors = _pair()
    model.eval()
    x = torch.rand(1, 3, 16, 24)
    with torch.no_grad():
        current = x
        for steps in (1, 2, 3):  # the authors' loop, one step at a time
            current = authors.refine(current, 1)
            assert _relative_error(model.refine(x, steps=steps), current) <= 2e-4, steps
        assert torch.equal(model.refine(x, steps=0), model(x))


def test_triton_backend_equals_reference():
    """The whole network on the triton backend (the interpreter on the CPU): the privileged
    pass, which runs every block, and every parameter gradient."""
    model = _randomised(SIPLAdaIR(**MICRO))
    x = torch.rand(1, 3, 16, 16)
    pf = tuple(t.detach() for t in model.encode(torch.rand(1, 3, 16, 16)))
    results = {}
    for backend in ("reference", "triton"):
        with sipl_fast.use_backend(backend):
            out = model(x, privileged_features=pf)
            (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        results[backend] = out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
    (expected, expected_grads), (got, got_grads) = results["reference"], results["triton"]
    assert _relative_error(got, expected) <= 1e-4
    assert got_grads.keys() == expected_grads.keys()
    for name, g in expected_grads.items():
        assert _relative_error(got_grads[name], g) <= 1e-3, name


def test_forward_rejects_bad_inputs_with_one_clear_message():
    model = SIPLAdaIR(**MICRO)
    with pytest.raises(ValueError, match="multiples of 8"):
        model(torch.rand(1, 3, 20, 16))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.rand(1, 4, 16, 16))
    with pytest.raises(TypeError, match="dtype"):
        model(torch.rand(1, 3, 16, 16, dtype=torch.float64))
    with pytest.raises(TypeError, match="floating"):
        model(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="at least one image"):
        model(torch.rand(0, 3, 16, 16))
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        pf = model.encode(x)
        with pytest.raises(ValueError, match="triple"):
            model(x, privileged_features=pf[:2])
        with pytest.raises(ValueError, match=r"privileged_features\[1\]"):
            model(x, privileged_features=(pf[0], pf[0], pf[2]))
        with pytest.raises(ValueError, match=r"privileged_features\[0\]"):
            model(x, privileged_features=(pf[0].repeat(3, 1, 1, 1), pf[1], pf[2]))
    with pytest.raises(ValueError, match="dim must be at least 8"):
        SIPLAdaIR(dim=4)
    with pytest.raises(ValueError, match="do not split into 3 heads"):
        SIPLAdaIR(**dict(MICRO, heads=(1, 2, 3, 4)))
    with pytest.raises(ValueError, match="low_band_unit"):
        SIPLAdaIR(**dict(MICRO, low_band_unit=1))
    with pytest.raises(ValueError, match="unknown preset"):
        SIPLAdaIR.from_preset("huge")
    assert SIPLAdaIR.from_preset("tiny").config["dim"] == 16


def test_encode_shapes_broadcast_dictionaries_and_random_proxy():
    model = SIPLAdaIR(**dict(MICRO, use_random_proxy=True))
    model.privileged_dictionary1.data.normal_()
    x = torch.rand(2, 3, 16, 24)
    with torch.no_grad():
        e2, e3, latent = pf = model.encode(x)
        assert e2.shape == (2, 16, 8, 12) and e3.shape == (2, 32, 4, 6) and latent.shape == (2, 64, 2, 3)
        # Privileged features of another image size are absorbed by the attention.
        assert model(x, privileged_features=model.encode(torch.rand(2, 3, 8, 8))).shape == x.shape
        keys, values = model.proxy_fusions[1].keys()  # the plain pass's keys: batch 1, broadcast
        assert keys.shape[0] == 1 and values.shape[0] == 1
        model.eval()
        assert torch.equal(model(x, privileged_features=pf), model(x, privileged_features=pf))
        model.train()
        assert not torch.equal(model(x, privileged_features=pf), model(x, privileged_features=pf))


def test_state_dict_round_trip_and_copies():
    model = _randomised(SIPLAdaIR(**MICRO)).eval()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    clone = SIPLAdaIR.from_config(model.config).eval()
    clone.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        expected = model(x, privileged_features=model.encode(x))
        assert torch.equal(clone(x, privileged_features=clone.encode(x)), expected)
        # A copy's Proxy Fusion sites read the copy's weights.
        twin = copy.deepcopy(model)
        assert all(site.owner is twin for site in twin.proxy_fusions.values())
        twin.privileged_dictionary2.add_(1.0)
        assert torch.equal(model(x, privileged_features=model.encode(x)), expected)
        assert not torch.equal(twin(x, privileged_features=twin.encode(x)), expected)
