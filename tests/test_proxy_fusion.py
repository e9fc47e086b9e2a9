"""ProxyFusion as a building block: a small Restormer U-Net with two sites trains, and each site
computes injection(F, absorption(D, PI)) with the authors' state_dict names on its network."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from sipl_fast.model import DictionaryCache
from sipl_fast.modules import Downsample, Upsample, conv1x1, conv3x3, transformer_stack
from sipl_fast.proxy_fusion import ProxyFusion


class TinyUNet(nn.Module):
    """Three levels (C, 2C at 1/2, 4C at 1/4), Proxy Fusion on the decoder at 1/4 and 1/2."""

    def __init__(self, dim: int = 8, patch: int = 16, use_random_proxy: bool = False):
        super().__init__()
        stack = dict(ffn_expansion_factor=2.0, bias=False, layernorm_type="WithBias")
        self.use_random_proxy = use_random_proxy
        self.embed = conv3x3(3, dim, bias=False)
        self.encoder1 = transformer_stack(1, dim, 1, **stack)
        self.down1 = Downsample(dim)
        self.encoder2 = transformer_stack(1, 2 * dim, 2, **stack)
        self.down2 = Downsample(2 * dim)
        self.encoder3 = transformer_stack(1, 4 * dim, 2, **stack)
        self.fusions = {k: ProxyFusion.attach(self, k, channels=dim * 2 ** k, dictionary_size=patch // 2 ** k,
                                              absorption_heads=1, injection_heads=2)
                        for k in (1, 2)}
        self.up2 = Upsample(4 * dim)
        self.reduce2 = conv1x1(4 * dim, 2 * dim, bias=False)
        self.decoder2 = transformer_stack(1, 2 * dim, 2, **stack)
        self.up1 = Upsample(2 * dim)
        self.decoder1 = transformer_stack(1, 2 * dim, 1, **stack)
        self.output = conv3x3(2 * dim, 3, bias=False)

    def encode(self, x):
        """The skips and the privileged features: (level1, level2, level3); PI_1 = level2, PI_2 = level3."""
        e1 = self.encoder1(self.embed(x))
        e2 = self.encoder2(self.down1(e1))
        return e1, e2, self.encoder3(self.down2(e2))

    def forward(self, x, privileged=None):
        e1, e2, e3 = self.encode(x)
        pi = (None, None) if privileged is None else privileged
        mix = self.use_random_proxy and self.training
        f = self.fusions[2](e3, pi[1], mix)
        f = self.decoder2(self.reduce2(torch.cat([self.up2(f), e2], dim=1)))
        f = self.fusions[1](f, pi[0], mix)
        f = self.decoder1(torch.cat([self.up1(f), e1], dim=1))
        return self.output(f) + x


def _privileged(model, image):
    with torch.no_grad():
        return model.encode(model(image))[1:]


def test_a_unet_with_proxy_fusion_trains():
    torch.manual_seed(0)
    model = TinyUNet()
    assert {"privileged_dictionary1", "p1_cross.attn.q.weight", "cross_p2.ffn.project_in.weight"} \
        <= set(model.state_dict())
    assert model.privileged_dictionary2.shape == (1, 32, 4, 4)
    gt = F.avg_pool2d(torch.rand(2, 3, 20, 20), 5, stride=1)  # smooth 16x16 images
    lq = gt + 0.1 * torch.randn_like(gt)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for step in range(6):
        # SIPL training: the privileged pass on the input, features from the plain pass on gt.
        loss = F.l1_loss(model(lq, _privileged(model, gt)), gt)
        optimizer.zero_grad()
        loss.backward()
        # Every parameter gets a gradient; at the zero dictionaries of the first step the
        # absorption blocks' query side is exactly 0 (their query is the constant 0).
        missing = [name for name, p in model.named_parameters() if p.grad is None or (step > 0 and not p.grad.any())]
        assert not missing, (step, missing)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    with torch.no_grad():
        assert not torch.allclose(model(lq), model(lq, _privileged(model, gt)))


def test_a_site_is_injection_of_the_absorbed_dictionary():
    torch.manual_seed(1)
    model = TinyUNet()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    site = model.fusions[1]
    feature = torch.randn(2, 16, 6, 10)
    privileged = torch.randn(2, 16, 4, 4)
    dictionary = model.privileged_dictionary1.expand(2, -1, -1, -1)
    with torch.no_grad():
        torch.testing.assert_close(site(feature), model.cross_p1(feature, dictionary))
        proxy = model.p1_cross(dictionary, privileged)
        torch.testing.assert_close(site.proxy(privileged), proxy)
        torch.testing.assert_close(site(feature, privileged), model.cross_p1(feature, proxy))
        # With a cache: inside a scope the dictionary side is computed once, with the same result.
        site.cache = DictionaryCache()
        with site.cache.scope():
            torch.testing.assert_close(site(feature), model.cross_p1(feature, dictionary))
            torch.testing.assert_close(site(feature, privileged), model.cross_p1(feature, proxy))
            assert len(site.cache._entries) == 2


def test_random_mix_draws_per_image_between_proxy_and_dictionary():
    torch.manual_seed(2)
    model = TinyUNet(use_random_proxy=True)
    model.privileged_dictionary1.data.normal_()
    site = model.fusions[1]
    privileged = torch.randn(3, 16, 4, 4)
    with torch.no_grad():
        proxy = site.proxy(privileged)
        mixed = site.proxy(privileged, random_mix=True)
        towards = model.privileged_dictionary1 - proxy
        w = ((mixed - proxy) * towards).sum((1, 2, 3), keepdim=True) / towards.square().sum((1, 2, 3), keepdim=True)
        torch.testing.assert_close(mixed, proxy + w * towards)
        assert ((0 < w) & (w < 1)).all() and len(set(w.flatten().tolist())) == 3
        x = torch.rand(3, 3, 16, 16)
        pf = _privileged(model, x)
        model.eval()
        assert torch.equal(model(x, pf), model(x, pf))
        model.train()
        assert not torch.equal(model(x, pf), model(x, pf))


def test_sites_follow_their_network_through_loads_and_copies():
    model = TinyUNet()
    x = torch.rand(1, 3, 16, 16)
    state = {k: v + 0.1 * torch.randn_like(v) for k, v in model.state_dict().items()}
    with torch.no_grad():
        twin = copy.deepcopy(model)
        assert twin.fusions[1].owner is twin and twin.fusions[1].dictionary is twin.privileged_dictionary1
        model.load_state_dict(state, strict=True, assign=True)  # new Parameter objects
        expected = model(x, _privileged(model, x))
        twin.load_state_dict(state, strict=True)
        assert torch.equal(twin(x, _privileged(twin, x)), expected)
