"""An independent, functional transcription of the authors' PromptIR_ProxyFusion forward.

Test oracle only: it reads a state_dict (the authors' keys) and evaluates the network the way
the released code does (dictionaries repeated B times, q/k normalised into new tensors,
attention matrices materialised, the prompt bank repeated per image, LayerNorm2d math),
without importing anything from sipl_fast. Equality with SIPLPromptIR on shared weights is
the faithfulness test of the whole model.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class AuthorsNet:
    def __init__(self, state_dict: dict, config: dict):
        self.p = state_dict
        self.c = config

    # ---- leaves
    def conv(self, name, x, padding=0, groups=1):
        return F.conv2d(x, self.p[name + ".weight"], self.p.get(name + ".bias"), padding=padding, groups=groups)

    def norm(self, name, x):
        w = self.p[name + ".body.weight"]
        b = self.p.get(name + ".body.bias")
        if b is None:  # BiasFree, token-major as the authors
            bsz, c, h, wd = x.shape
            t = x.permute(0, 2, 3, 1).reshape(bsz, h * wd, c)
            t = t / torch.sqrt(t.var(-1, keepdim=True, unbiased=False) + 1e-5) * w
            return t.reshape(bsz, h, wd, c).permute(0, 3, 1, 2)
        mu = x.mean(1, keepdim=True)
        var = (x - mu).pow(2).mean(1, keepdim=True)
        return w.view(1, -1, 1, 1) * ((x - mu) / (var + 1e-5).sqrt()) + b.view(1, -1, 1, 1)

    def ffn(self, name, x, dual):
        x = self.conv(name + ".project_in", x)
        hidden2 = x.shape[1]
        x1, x2 = self.conv(name + ".dwconv", x, padding=1, groups=hidden2).chunk(2, dim=1)
        x = F.gelu(x2) * x1 + F.gelu(x1) * x2 if dual else F.gelu(x1) * x2
        return self.conv(name + ".project_out", x)

    def mdta(self, name, x, heads):
        b, c, h, w = x.shape
        qkv = self.conv(name + ".qkv_dwconv", self.conv(name + ".qkv", x), padding=1, groups=3 * c)
        q, k, v = (t.reshape(b, heads, c // heads, h * w) for t in qkv.chunk(3, dim=1))
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        attn = ((q @ k.transpose(-2, -1)) * self.p[name + ".temperature"]).softmax(dim=-1)
        return self.conv(name + ".project_out", (attn @ v).reshape(b, c, h, w))

    def block(self, name, x, heads):
        x = x + self.mdta(name + ".attn", self.norm(name + ".norm1", x), heads)
        return x + self.ffn(name + ".ffn", self.norm(name + ".norm2", x), dual=False)

    def stack(self, name, x, depth, heads):
        for i in range(depth):
            x = self.block(f"{name}.{i}", x, heads)
        return x

    def xattn(self, name, x_q, x_kv, heads):
        b, c, hq, wq = x_q.shape
        q = self.conv(name + ".q_dwconv", self.conv(name + ".q", x_q), padding=1, groups=c)
        kv = self.conv(name + ".kv_dwconv", self.conv(name + ".kv", x_kv), padding=1, groups=2 * c)
        k, v = kv.chunk(2, dim=1)

        def tokens(t):
            bb, cc, hh, ww = t.shape
            return t.reshape(bb, heads, cc // heads, hh * ww).transpose(-1, -2)

        q, k, v = tokens(q), tokens(k), tokens(v)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        attn = ((q @ k.transpose(-2, -1)) * self.p[name + ".temperature"]).softmax(dim=-1)
        out = (attn @ v).transpose(-1, -2).reshape(b, c, hq, wq)
        return self.conv(name + ".project_out", out)

    def pim(self, name, x_q, x_kv, heads):  # equal widths only (as in SIPL)
        x_q, x_kv = self.norm(name + ".norm11", x_q), self.norm(name + ".norm12", x_kv)
        x = x_q + self.xattn(name + ".attn", x_q, x_kv, heads)
        return x + self.ffn(name + ".ffn", self.norm(name + ".norm2", x), dual=True)

    def prompt(self, name, x):
        b, c, h, w = x.shape
        emb = x.mean(dim=(-2, -1))
        weights = F.softmax(F.linear(emb, self.p[name + ".linear_layer.weight"],
                                     self.p[name + ".linear_layer.bias"]), dim=1)
        bank = self.p[name + ".prompt_param"]
        prompt = weights[:, :, None, None, None] * bank.unsqueeze(0).repeat(b, 1, 1, 1, 1, 1).squeeze(1)
        prompt = F.interpolate(prompt.sum(dim=1), (h, w), mode="bilinear")
        return self.conv(name + ".conv3x3", prompt, padding=1)

    def down(self, name, x):
        return F.pixel_unshuffle(self.conv(name + ".body.0", x, padding=1), 2)

    def up(self, name, x):
        return F.pixel_shuffle(self.conv(name + ".body.0", x, padding=1), 2)

    # ---- network
    def encoder(self, inp):
        """The Restormer encoder both released networks share: (e1, e2, e3, latent)."""
        nb, heads = self.c["num_blocks"], self.c["heads"]
        e1 = self.stack("encoder_level1", self.conv("patch_embed.proj", inp, padding=1), nb[0], heads[0])
        e2 = self.stack("encoder_level2", self.down("down1_2", e1), nb[1], heads[1])
        e3 = self.stack("encoder_level3", self.down("down2_3", e2), nb[2], heads[2])
        return e1, e2, e3, self.stack("latent", self.down("down3_4", e3), nb[3], heads[3])

    def proxy(self, k, absorb_heads, batch, privileged_features):
        """Level k's proxy as released: the dictionary repeated per image, absorbing the
        privileged feature when there is one."""
        d = self.p[f"privileged_dictionary{k}"].repeat(batch, 1, 1, 1)
        if privileged_features is None:
            return d
        return self.pim(f"p{k}_cross", d, privileged_features[k - 1], absorb_heads)

    def forward(self, inp, privileged_features=None, return_feature=False):
        c = self.c
        nb, heads = c["num_blocks"], c["heads"]
        e1, e2, e3, latent = self.encoder(inp)
        if return_feature:
            return e2, e3, latent

        def proxy(k, absorb_heads):
            return self.proxy(k, absorb_heads, inp.shape[0], privileged_features)

        latent = self.pim("cross_p3", latent, proxy(3, heads[0]), heads[2])
        latent = torch.cat([latent, self.prompt("prompt3", latent)], 1)
        latent = self.conv("reduce_noise_level3", self.block("noise_level3", latent, heads[2]))
        d3 = self.conv("reduce_chan_level3", torch.cat([self.up("up4_3", latent), e3], 1))
        d3 = self.stack("decoder_level3", d3, nb[2], heads[2])
        d3 = self.pim("cross_p2", d3, proxy(2, heads[1]), heads[1])
        d3 = torch.cat([d3, self.prompt("prompt2", d3)], 1)
        d3 = self.conv("reduce_noise_level2", self.block("noise_level2", d3, heads[2]))
        d2 = self.conv("reduce_chan_level2", torch.cat([self.up("up3_2", d3), e2], 1))
        d2 = self.stack("decoder_level2", d2, nb[1], heads[1])
        d2 = self.pim("cross_p1", d2, proxy(1, heads[0]), heads[0])
        d2 = torch.cat([d2, self.prompt("prompt1", d2)], 1)
        d2 = self.conv("reduce_noise_level1", self.block("noise_level1", d2, heads[2]))
        d1 = torch.cat([self.up("up2_1", d2), e1], 1)
        d1 = self.stack("decoder_level1", d1, nb[0], heads[0])
        d1 = self.stack("refinement", d1, c["num_refinement_blocks"], heads[0])
        return self.conv("output", d1, padding=1) + inp

    def refine(self, img, steps):
        """The authors' test loop: plain pass, PI from its encoder, PI pass; output feeds the next step."""
        x = img
        for _ in range(steps):
            initial = self.forward(x)
            pf = self.forward(initial, return_feature=True)
            x = self.forward(x, privileged_features=pf)
        return x
