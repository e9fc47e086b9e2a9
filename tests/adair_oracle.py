"""An independent, functional transcription of the authors' AdaIR_ProxyFusion forward.

Test oracle only: it reads a state_dict (the authors' keys) and evaluates the network the way
the released code does: dictionaries repeated B times, a per-image loop building the
low-frequency mask in the fftshifted spectrum, torch.roll shifts, two inverse transforms,
attention matrices materialised. It imports nothing from sipl_fast; the blocks AdaIR shares
with PromptIR (Restormer blocks, the Proxy Fusion block) come from authors_oracle. Equality
with SIPLAdaIR on shared weights is the faithfulness test of the whole model.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from authors_oracle import AuthorsNet


class AuthorsAdaIR(AuthorsNet):
    """config: SIPLAdaIR's configuration keys; ``low_band_unit`` is the authors' ``n`` of
    FreModule.fft (128 in their code). ``bands`` records (module, image, h_, w_) of every
    mask built, so a test can check that its low bands were not all empty."""

    def __init__(self, state_dict: dict, config: dict):
        super().__init__(state_dict, config)
        self.bands = []

    # ---- AdaIR's blocks
    def channel_cross(self, name, x, y, heads):
        b, c, h, w = x.shape
        assert x.shape == y.shape
        q = self.conv(name + ".q_dwconv", self.conv(name + ".q", x), padding=1, groups=c)
        k, v = self.conv(name + ".kv_dwconv", self.conv(name + ".kv", y), padding=1, groups=2 * c).chunk(2, dim=1)
        q, k, v = (t.reshape(b, heads, c // heads, h * w) for t in (q, k, v))
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        attn = (q @ k.transpose(-2, -1) * self.p[name + ".temperature"]).softmax(dim=-1)
        return self.conv(name + ".project_out", (attn @ v).reshape(b, c, h, w))

    def spatial_gate(self, name, x):
        scale = torch.cat((torch.max(x, 1, keepdim=True)[0], torch.mean(x, 1, keepdim=True)), dim=1)
        return torch.sigmoid(self.conv(name + ".spatial", scale, padding=3))

    def channel_gate(self, name, x):
        def mlp(t):
            return self.conv(name + ".mlp.2", F.relu(self.conv(name + ".mlp.0", t)))
        return torch.sigmoid(mlp(F.adaptive_avg_pool2d(x, 1)) + mlp(F.adaptive_max_pool2d(x, 1)))

    def fft(self, name, x):
        n = self.c.get("low_band_unit", 128)
        x = self.conv(name + ".conv1", x, padding=1)
        mask = torch.zeros(x.shape).to(x.device)
        h, w = x.shape[-2:]
        threshold = F.adaptive_avg_pool2d(x, 1)
        threshold = self.conv(name + ".rate_conv.2", F.gelu(self.conv(name + ".rate_conv.0", threshold))).sigmoid()
        for i in range(mask.shape[0]):
            h_ = (h // n * threshold[i, 0, :, :]).int()
            w_ = (w // n * threshold[i, 1, :, :]).int()
            self.bands.append((name, i, int(h_), int(w_)))
            mask[i, :, h // 2 - h_:h // 2 + h_, w // 2 - w_:w // 2 + w_] = 1
        fft = torch.roll(torch.fft.fft2(x, norm="forward", dim=(-2, -1)), shifts=(int(h / 2), int(w / 2)), dims=(2, 3))

        def inverse(spectrum):
            spectrum = torch.roll(spectrum, shifts=(-int(h / 2), -int(w / 2)), dims=(2, 3))
            return torch.abs(torch.fft.ifft2(spectrum, norm="forward", dim=(-2, -1)))

        return inverse(fft * (1 - mask)), inverse(fft * mask)

    def fre(self, name, img, y):
        heads = self.c["heads"][2]
        x = F.interpolate(img, y.shape[-2:], mode="bilinear")
        high, low = self.fft(name, x)
        high = self.channel_cross(name + ".channel_cross_l", high, y, heads)
        low = self.channel_cross(name + ".channel_cross_h", low, y, heads)
        spatial_weight = self.spatial_gate(name + ".frequency_refine.SpatialGate", high)
        channel_weight = self.channel_gate(name + ".frequency_refine.ChannelGate", low)
        agg = self.conv(name + ".frequency_refine.proj", low * spatial_weight + high * channel_weight)
        out = self.channel_cross(name + ".channel_cross_agg", y, agg, heads)
        return out * self.p[name + ".para1"] + y * self.p[name + ".para2"]

    # ---- network
    def forward(self, inp, privileged_features=None, return_feature=False):
        """The authors' forward; their privileged path also needs ``privileged_weights``, which
        their training and test code always pass ([0.1] * 3) and the network never reads."""
        c = self.c
        nb, heads = c["num_blocks"], c["heads"]
        e1, e2, e3, latent = self.encoder(inp)
        if return_feature:
            return e2, e3, latent

        def proxy(k, absorb_heads):
            return self.proxy(k, absorb_heads, inp.shape[0], privileged_features)

        latent = self.pim("cross_p3", latent, proxy(3, heads[0]), heads[2])
        latent = self.fre("fre1", inp, latent)
        d3 = self.conv("reduce_chan_level3", torch.cat([self.up("up4_3", latent), e3], 1))
        d3 = self.stack("decoder_level3", d3, nb[2], heads[2])
        d3 = self.pim("cross_p2", d3, proxy(2, heads[1]), heads[1])
        d3 = self.fre("fre2", inp, d3)
        d2 = self.conv("reduce_chan_level2", torch.cat([self.up("up3_2", d3), e2], 1))
        d2 = self.stack("decoder_level2", d2, nb[1], heads[1])
        d2 = self.pim("cross_p1", d2, proxy(1, heads[0]), heads[0])
        d2 = self.fre("fre3", inp, d2)
        d1 = torch.cat([self.up("up2_1", d2), e1], 1)
        d1 = self.stack("decoder_level1", d1, nb[0], heads[0])
        d1 = self.stack("refinement", d1, c["num_refinement_blocks"], heads[0])
        return self.conv("output", d1, padding=1) + inp
