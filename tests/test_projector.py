import pytest
import torch
import torch.nn.functional as F

from lclm_rag.errors import ConfigError
from lclm_rag.projector import Projector


def test_projector_is_rmsnorm_linear_gelu_linear():
    torch.manual_seed(0)
    proj = Projector(8, 12, 16)
    assert sorted(proj.state_dict()) == ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight", "norm.weight"]
    x = torch.randn(5, 8)
    sd = proj.state_dict()
    expected = F.linear(F.gelu(F.linear(F.rms_norm(x, (8,), sd["norm.weight"], eps=1e-6), sd["fc1.weight"], sd["fc1.bias"])), sd["fc2.weight"], sd["fc2.bias"])
    torch.testing.assert_close(proj(x), expected)
    with pytest.raises(ConfigError, match="width 7 but the projector expects 8"):
        proj(torch.randn(2, 7))
    with pytest.raises(ConfigError, match="in_features"):
        Projector(0, 4)
