import pytest
import torch
import torch.nn.functional as F

from lclm_rag.errors import ConfigError
from lclm_rag.projector import Projector


def test_projector_is_rmsnorm_linear_gelu_linear():
    torch.manual_seed(0)
    proj = Projector(8, 12, 16)
    assert sorted(proj.state_dict()) == ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight", "latent_scale", "latent_shift", "norm.weight"]
    assert not proj.calibrated  # identity standardisation: LCLM's formula exactly
    x = torch.randn(5, 8)
    sd = proj.state_dict()
    expected = F.linear(F.gelu(F.linear(F.rms_norm(x, (8,), sd["norm.weight"], eps=1e-6), sd["fc1.weight"], sd["fc1.bias"])), sd["fc2.weight"], sd["fc2.bias"])
    torch.testing.assert_close(proj(x), expected)
    with pytest.raises(ConfigError, match="width 7 but the projector expects 8"):
        proj(torch.randn(2, 7))
    with pytest.raises(ConfigError, match="in_features"):
        Projector(0, 4)


def test_calibration_standardises_each_channel():
    torch.manual_seed(0)
    proj = Projector(6, 4)
    # one huge near-constant channel, as LLaMA-style hidden states have ("massive activations")
    latents = torch.randn(200, 6) * torch.tensor([0.5, 0.5, 0.5, 0.5, 0.5, 0.01]) + torch.tensor([0, 0, 0, 0, 0, 40.0])
    before = F.cosine_similarity(latents[:100], latents[100:]).mean()
    proj.calibrate(latents)
    assert proj.calibrated
    standardised = (latents - proj.latent_shift) / proj.latent_scale
    torch.testing.assert_close(standardised.mean(0), torch.zeros(6), atol=1e-4, rtol=0)
    torch.testing.assert_close(standardised.std(0), torch.ones(6), atol=1e-4, rtol=0)
    after = F.cosine_similarity(standardised[:100], standardised[100:]).mean()
    assert before > 0.99 and abs(after) < 0.2  # latents were all alike; now they differ
    sd = proj.state_dict()
    expected = F.linear(F.gelu(F.linear(F.rms_norm(standardised, (6,), sd["norm.weight"], eps=1e-6), sd["fc1.weight"], sd["fc1.bias"])),
                        sd["fc2.weight"], sd["fc2.bias"])
    torch.testing.assert_close(proj(latents), expected)
    with pytest.raises(ConfigError, match="calibration needs at least 2 latents of width 6"):
        proj.calibrate(torch.randn(1, 6))
