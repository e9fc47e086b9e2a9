"""PromptIR, the plain baseline: against an independent transcription of the official network,
its official key set and size, and its refusal of everything that needs Proxy Fusion."""
from __future__ import annotations

import pytest
import torch

import sipl_fast
from sipl_fast import PromptIR, SIPLPromptIR
from sipl_fast.checkpoint import CheckpointError, load_model
from sipl_fast.model import NO_PROXY_FUSION

from authors_oracle import AuthorsNet
from test_model import SMALL, _randomised, _relative_error

UNUSED = ("chnl_reduce1", "chnl_reduce2", "chnl_reduce3",
          "reduce_noise_channel_1", "reduce_noise_channel_2", "reduce_noise_channel_3")


class OfficialPromptIR(AuthorsNet):
    """The official PromptIR(decoder=True) forward, on AuthorsNet's functional leaves: the
    encoder, then at each decoder level the prompt, noise_level block and reduce_noise_level
    conv, no proxies; the six 1x1 convolutions it defines are never read."""

    def prompted(self, level, x):
        """The official decoder's prompt step at ``level``: join the prompt, noise_level block, reduce."""
        x = torch.cat([x, self.prompt(f"prompt{level}", x)], 1)
        return self.conv(f"reduce_noise_level{level}", self.block(f"noise_level{level}", x, self.c["heads"][2]))

    def forward(self, inp):
        c = self.c
        nb, heads = c["num_blocks"], c["heads"]
        e1 = self.stack("encoder_level1", self.conv("patch_embed.proj", inp, padding=1), nb[0], heads[0])
        e2 = self.stack("encoder_level2", self.down("down1_2", e1), nb[1], heads[1])
        e3 = self.stack("encoder_level3", self.down("down2_3", e2), nb[2], heads[2])
        latent = self.prompted(3, self.stack("latent", self.down("down3_4", e3), nb[3], heads[3]))
        d3 = self.conv("reduce_chan_level3", torch.cat([self.up("up4_3", latent), e3], 1))
        d3 = self.prompted(2, self.stack("decoder_level3", d3, nb[2], heads[2]))
        d2 = self.conv("reduce_chan_level2", torch.cat([self.up("up3_2", d3), e2], 1))
        d2 = self.prompted(1, self.stack("decoder_level2", d2, nb[1], heads[1]))
        d1 = self.stack("decoder_level1", torch.cat([self.up("up2_1", d2), e1], 1), nb[0], heads[0])
        return self.conv("output", self.stack("refinement", d1, c["num_refinement_blocks"], heads[0]), padding=1) + inp


def test_default_configuration_is_the_official_network():
    with torch.device("meta"):
        model = PromptIR()
        sipl = SIPLPromptIR()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    # counted the official way (every state_dict value), and the trainable part
    assert sum(v.numel() for v in model.state_dict().values()) == 35_592_263
    assert sum(p.numel() for p in model.parameters()) == 35_376_967
    assert shapes["chnl_reduce1.weight"] == (64, 64, 1, 1)
    assert shapes["chnl_reduce2.weight"] == (128, 128, 1, 1)
    assert shapes["chnl_reduce3.weight"] == (256, 320, 1, 1)
    assert shapes["reduce_noise_channel_1.weight"] == (48, 112, 1, 1)
    assert shapes["reduce_noise_channel_2.weight"] == (96, 224, 1, 1)
    assert shapes["reduce_noise_channel_3.weight"] == (192, 448, 1, 1)
    assert shapes["noise_level3.attn.qkv.weight"] == (2112, 704, 1, 1)
    assert shapes["reduce_noise_level2.weight"] == (192, 320, 1, 1)
    assert shapes["reduce_chan_level3.weight"] == (192, 288, 1, 1)
    assert shapes["prompt1.prompt_param"] == (1, 5, 64, 64, 64)
    # the official keys: SIPL-PromptIR's without the Proxy Fusion parts, plus the six unused convs
    proxy = ("privileged_dictionary", "p1_cross", "p2_cross", "p3_cross", "cross_p1", "cross_p2", "cross_p3")
    expected = {k for k in sipl.state_dict() if not k.startswith(proxy)} | {f"{name}.weight" for name in UNUSED}
    assert set(shapes) == expected
    assert len(shapes) == 47 * 11 + 3 * 4 + 13 + 6
    # the unused convolutions are buffers: in the state_dict, never trainable
    names = dict(model.named_parameters())
    assert not any(k.startswith(UNUSED) for k in names)
    assert {k for k, _ in model.named_buffers()} == {f"{name}.weight" for name in UNUSED}
    assert PromptIR.from_preset("base").config == PromptIR().config


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_forward_and_gradients_equal_the_official_network(backend):
    model = _randomised(PromptIR(**SMALL))
    params = {k: v.detach().clone().requires_grad_(True) for k, v in model.state_dict().items()}
    official = OfficialPromptIR(params, model.config)
    x = torch.rand(2, 3, 24, 40)
    with sipl_fast.use_backend(backend):
        ours = model(x)
        theirs = official.forward(x)
    assert _relative_error(ours, theirs) <= 2e-4
    weights = torch.randn_like(ours)
    (ours * weights).sum().backward()
    (theirs * weights).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert _relative_error(p.grad, params[name].grad) <= 2e-4, name


def test_everything_that_needs_proxy_fusion_is_refused_with_one_message():
    model = PromptIR.from_preset("tiny").eval()
    x = torch.rand(1, 3, 16, 16)
    with pytest.raises(ValueError, match=NO_PROXY_FUSION):
        model.encode(x)
    with pytest.raises(ValueError, match=NO_PROXY_FUSION):
        model.refine(x, steps=2)
    with pytest.raises(ValueError, match=NO_PROXY_FUSION):
        model(x, privileged_features=(x, x, x))
    with torch.no_grad():
        assert torch.equal(model.refine(x, steps=0), model(x))
    assert not PromptIR.proxy_fusion and SIPLPromptIR.proxy_fusion


def test_official_lightning_checkpoint_loads_strictly(tmp_path):
    """The official checkpoints are Lightning files: the network's keys under ``net.``."""
    model = _randomised(PromptIR(**SMALL))
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in model.state_dict().items()}}, path)
    loaded, meta = load_model(path, config=model.config, arch="promptir")
    assert meta["arch"] == "promptir" and isinstance(loaded, PromptIR)
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
    with pytest.raises(CheckpointError, match="do not match"):   # read as the default SIPL-PromptIR
        load_model(path, config=model.config)
