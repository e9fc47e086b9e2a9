"""SIPLPromptIR against an independent transcription of the authors' network, and its contract."""
from __future__ import annotations

import io

import pytest
import torch

import sipl_fast
from sipl_fast import SIPLPromptIR
from sipl_fast.model import PRESETS

from authors_oracle import AuthorsNet

# A configuration with every structural feature of the full one (several heads, unequal
# blocks per level, prompt widths, non-power-of-two channels) at CPU-test size.
SMALL = dict(dim=12, num_blocks=(1, 2, 1, 2), num_refinement_blocks=1, heads=(1, 2, 4, 4),
             prompt_dims=(8, 16, 20), train_patch=32)


def _randomised(model: SIPLPromptIR) -> SIPLPromptIR:
    """Non-trivial weights everywhere: random dictionaries (not zeros), temperatures, norms."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "dictionary" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif name.endswith("temperature"):
                p.copy_(0.5 + 2 * torch.rand(p.shape, generator=g))
            elif name.endswith("body.weight") or name.endswith("body.bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _pair(config=SMALL, dtype=torch.float32):
    model = _randomised(SIPLPromptIR(**config)).to(dtype)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in model.state_dict().items()}
    return model, params, AuthorsNet(params, model.config)


def test_default_configuration_matches_the_authors():
    model = SIPLPromptIR()
    assert sum(p.numel() for p in model.parameters()) == 40_028_562
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["privileged_dictionary1"] == (1, 96, 64, 64)
    assert shapes["privileged_dictionary2"] == (1, 192, 32, 32)
    assert shapes["privileged_dictionary3"] == (1, 384, 16, 16)
    assert shapes["p3_cross.attn.temperature"] == (1, 1, 1)       # heads[0], the authors' quirk
    assert shapes["cross_p3.attn.temperature"] == (4, 1, 1)
    assert shapes["noise_level3.attn.qkv.weight"] == (2112, 704, 1, 1)
    assert shapes["reduce_noise_level2.weight"] == (192, 320, 1, 1)
    assert shapes["noise_level1.ffn.project_in.weight"] == (2 * 425, 160, 1, 1)
    assert shapes["p1_cross.ffn.project_in.weight"] == (384, 96, 1, 1)
    assert shapes["prompt3.prompt_param"] == (1, 5, 320, 16, 16)
    assert shapes["reduce_chan_level3.weight"] == (192, 288, 1, 1)
    assert shapes["output.weight"] == (3, 96, 3, 3)
    # 47 transformer blocks x 11 + 6 fusion blocks x 15 + 3 prompts x 4 + 3 dictionaries
    # + 13 convs (embed, 3 down, 3 up, 2 reduce_chan, 3 reduce_noise, output)
    assert len(shapes) == 47 * 11 + 6 * 15 + 3 * 4 + 3 + 13
    assert "reduce_chan_level1.weight" not in shapes and "chnl_reduce1.weight" not in shapes
    assert SIPLPromptIR.from_preset("base").config == model.config


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_passes_and_gradients_equal_the_authors(backend):
    model, params, authors = _pair()
    x = torch.rand(2, 3, 24, 40)
    gt = torch.rand(2, 3, 24, 40)
    with sipl_fast.use_backend(backend):
        ours_pf = model.encode(gt)
        theirs_pf = authors.forward(gt, return_feature=True)
        for a, b in zip(ours_pf, theirs_pf):
            assert _relative_error(a, b) <= 2e-4
        plain = model(x)
        assert _relative_error(plain, authors.forward(x)) <= 2e-4
        pf = tuple(t.detach() for t in theirs_pf)
        ours = model(x, privileged_features=pf)
        theirs = authors.forward(x, privileged_features=pf)
    assert _relative_error(ours, theirs) <= 2e-4
    weights = torch.randn_like(ours)
    (ours * weights).sum().backward()
    (theirs * weights).sum().backward()
    ours_grads = dict(model.named_parameters())
    for name, p in params.items():
        assert p.grad is not None, name
        assert _relative_error(ours_grads[name].grad, p.grad) <= 2e-4, name


def test_refine_equals_the_authors_loop():
    model, params, authors = _pair()
    x = torch.rand(2, 3, 16, 24)
    with torch.no_grad():
        for steps in (1, 2, 3):
            ours = model.refine(x, steps=steps)
            theirs = authors.refine(x, steps)
            assert _relative_error(ours, theirs) <= 2e-4, steps
        assert torch.equal(model.refine(x, steps=0), model(x))


def test_biasfree_and_unequal_widths_configuration():
    config = dict(SMALL, layernorm_type="BiasFree", bias=True)
    model, params, authors = _pair(config)
    assert not any(k.endswith("body.bias") for k in params)
    x = torch.rand(1, 3, 16, 16)
    assert _relative_error(model(x), authors.forward(x)) <= 2e-4


def test_forward_rejects_bad_inputs_with_one_clear_message():
    model = SIPLPromptIR.from_preset("tiny")
    with pytest.raises(ValueError, match="multiples of 8"):
        model(torch.rand(1, 3, 20, 16))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.rand(3, 16, 16))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.rand(1, 4, 16, 16))
    with pytest.raises(TypeError, match="dtype"):
        model(torch.rand(1, 3, 16, 16, dtype=torch.float64))
    with pytest.raises(TypeError, match="floating"):
        model(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="at least one image"):
        model(torch.rand(0, 3, 16, 16))
    x = torch.rand(2, 3, 16, 16)
    pf = model.encode(x)
    with pytest.raises(ValueError, match="triple"):
        model(x, privileged_features=pf[:2])
    with pytest.raises(ValueError, match=r"privileged_features\[1\]"):
        model(x, privileged_features=(pf[0], pf[0], pf[2]))
    with pytest.raises(ValueError, match=r"privileged_features\[0\]"):
        model(x, privileged_features=(pf[0].repeat(3, 1, 1, 1), pf[1], pf[2]))


def test_encode_shapes_and_batch_one_dictionary_is_broadcast():
    model = SIPLPromptIR.from_preset("tiny")
    x = torch.rand(3, 3, 32, 48)
    e2, e3, latent = model.encode(x)
    dim = model.config["dim"]
    assert e2.shape == (3, 2 * dim, 16, 24) and e3.shape == (3, 4 * dim, 8, 12) and latent.shape == (3, 8 * dim, 4, 6)
    # Privileged features from another image size are absorbed by the attention.
    y = model(x, privileged_features=model.encode(torch.rand(3, 3, 16, 16)))
    assert y.shape == x.shape
    # The proxy keys of the plain pass are computed once at batch 1 and broadcast.
    with torch.no_grad():
        keys, values = model.proxy_fusions[1].keys()
    assert keys.shape[0] == 1 and values.shape[0] == 1


def test_random_proxy_only_in_training_mode():
    model = SIPLPromptIR.from_preset("tiny", use_random_proxy=True)
    model.privileged_dictionary1.data.normal_()
    x = torch.rand(2, 3, 16, 16)
    pf = model.encode(x)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x, privileged_features=pf), model(x, privileged_features=pf))
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(x, privileged_features=pf), model(x, privileged_features=pf))


def test_dictionary_cache_follows_weight_changes():
    model = SIPLPromptIR.from_preset("tiny").eval()
    cache = model.dictionary_cache
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad(), cache.scope():
        first = model(x)
        assert cache._entries, "a scope caches the dictionary side"
        assert torch.equal(model(x), first)
        model.privileged_dictionary1.add_(torch.randn_like(model.privileged_dictionary1))
        changed = model(x)
    assert not cache._entries, "a scope's entries end with it"
    assert not torch.equal(changed, first)
    cache.enabled = False
    with torch.no_grad(), cache.scope():
        assert torch.equal(model(x), changed)
        assert not cache._entries
    cache.enabled = True
    with torch.no_grad(), sipl_fast.use_backend("reference"), cache.scope():  # the authors' code caches nothing
        model(x)
        assert not cache._entries
    with torch.no_grad():
        model(x)
    assert not cache._entries, "nothing is cached outside a scope"


def test_state_dict_round_trip_and_strict_load():
    model = _randomised(SIPLPromptIR.from_preset("tiny"))
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    clone = SIPLPromptIR.from_config(model.config)
    clone.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(clone(x), model(x))


def test_presets_are_valid():
    for name in PRESETS:
        assert isinstance(SIPLPromptIR.from_preset(name), SIPLPromptIR)
    with pytest.raises(ValueError, match="unknown preset"):
        SIPLPromptIR.from_preset("huge")


def test_torch_compile_traces_the_whole_model_in_one_graph(monkeypatch):
    """fullgraph, without autograd (inference) and with it (a training pass): under
    torch.compile the blocks run whole maps (no unrolled strips) and the dictionary cache
    recomputes (a graph cannot key on data pointers); aot_eager runs the traced graph on the CPU."""
    from sipl_fast import modules
    monkeypatch.setitem(modules.STRIP_ELEMENTS, "cpu", 2000)  # eager would run in strips
    model = _randomised(SIPLPromptIR(**SMALL)).eval()
    x = torch.rand(1, 3, 24, 16)
    with torch.no_grad():
        expected = model(x)
        model.dictionary_cache.clear()
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-5)
    assert not model.dictionary_cache._entries
    privileged = [f.detach() for f in model.encode(x)]
    eager_grads = torch.autograd.grad(model(x, privileged_features=privileged).square().mean(),
                                      list(model.parameters()), allow_unused=True)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    compiled_grads = torch.autograd.grad(compiled(x, privileged_features=privileged).square().mean(),
                                         list(model.parameters()), allow_unused=True)
    for eager, traced in zip(eager_grads, compiled_grads):
        assert (eager is None) == (traced is None)
        if eager is not None:
            torch.testing.assert_close(traced, eager, rtol=1e-4, atol=1e-6)
