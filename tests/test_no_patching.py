"""Nothing in torch or in a layer's class is changed to load a model or to speed it up: the meta-device build is a
scoped torch function mode, kernels are layers put in their parents' places, and modules consult attributes."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from checkpoint_factory import TEST_CONFIGS
from ldm.loading import instantiate_on_meta
from ldm.util import instantiate_from_config

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- building on the meta device -------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", sorted(path.name for path in TEST_CONFIGS.glob("tiny-*.yaml")))
def test_meta_build_keeps_every_buffer_of_a_real_build(config):
    """Against a plain (allocated, randomly initialised) build of the same config: the same keys, every parameter
    on the meta device, every buffer (schedules, noise levels; persistent or not) real and bit-identical."""
    model_config = OmegaConf.load(str(TEST_CONFIGS / config)).model
    real = instantiate_from_config(model_config)
    meta = instantiate_on_meta(model_config)
    assert meta.state_dict().keys() == real.state_dict().keys()
    assert all(parameter.is_meta for parameter in meta.parameters())
    assert [name for name, _ in meta.named_parameters()] == [name for name, _ in real.named_parameters()]
    real_buffers, meta_buffers = dict(real.named_buffers()), dict(meta.named_buffers())
    assert meta_buffers.keys() == real_buffers.keys() and meta_buffers
    for name, buffer in meta_buffers.items():
        assert buffer.dtype == real_buffers[name].dtype and torch.equal(buffer, real_buffers[name]), name


def test_meta_build_of_released_configs_imports_no_compiler_and_patches_nothing():
    """Full-size SD 1.x, 2.x and SDXL configs build in a fresh process without importing torch._dynamo (the meta
    kernel of normal_ would, at a cost of seconds) and leave torch's functions as they were."""
    script = textwrap.dedent("""
        import sys, time
        import torch
        from torch import nn
        from ldm.loading import instantiate_on_meta, load_config
        originals = [nn.Module.register_parameter, nn.init.normal_, nn.init.kaiming_uniform_, torch.empty]
        start = time.perf_counter()
        for name in ("v1-inference.yaml", "v2-inference.yaml", "sd_xl_base.yaml"):
            model = instantiate_on_meta(load_config(f"configs/stable-diffusion/{name}").model)
            assert all(parameter.is_meta for parameter in model.parameters()), name
            assert not any(buffer.is_meta for buffer in model.buffers()), name
        assert [nn.Module.register_parameter, nn.init.normal_, nn.init.kaiming_uniform_, torch.empty] == originals
        print("torch._dynamo" in sys.modules, round(time.perf_counter() - start, 2))
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    dynamo_imported, _ = result.stdout.split()
    assert dynamo_imported == "False"


def test_meta_build_is_local_to_its_thread():
    """The mode is thread-local, like torch.device("meta"): another thread building meanwhile builds real layers."""
    import threading

    from ldm.loading import parameters_on_meta

    built = {}

    def build_elsewhere() -> None:
        built["layer"] = nn.Linear(3, 2)

    with parameters_on_meta():
        other = threading.Thread(target=build_elsewhere)
        other.start()
        other.join()
        here = nn.Linear(3, 2)
    assert here.weight.is_meta and not built["layer"].weight.is_meta
    assert torch.isfinite(built["layer"].weight).all()


# --- oneDNN kernels are layers of their own type in their parents' places --------------------------------------------
@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this PyTorch has no oneDNN")
def test_onednn_kernels_replace_layers_holding_the_same_parameters():
    from ldm import optimize
    from ldm.optimize.kernels import OneDNNLinear, PackedConv2d

    torch.manual_seed(0)
    shared = nn.Linear(4, 4)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Sequential(shared, shared), nn.Linear(4, 2))
    hooked = model[2]
    hooked.register_forward_hook(lambda module, args, output: output)
    parameters = dict(model.named_parameters())
    before = [(module, type(module)) for module in model.modules()]
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        expected = model[1](model[0](x).permute(0, 2, 3, 1))
        assert optimize.use_onednn_kernels(model) == 2  # the convolution and the shared linear layer
        actual = model[1](model[0](x).permute(0, 2, 3, 1))
    assert isinstance(model[0], PackedConv2d) and type(model[1][0]) is OneDNNLinear and model[1][0] is model[1][1]
    assert model[2] is hooked and type(hooked) is nn.Linear  # its hook belongs to that object: it stays
    assert all(type(module) is constructed for module, constructed in before)
    assert all(model.get_parameter(name) is parameter for name, parameter in parameters.items())
    assert dict(model.named_parameters()).keys() == parameters.keys()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert optimize.use_default_kernels(model) == 2
    assert [type(module) for module in model.modules()] == [nn.Sequential, nn.Conv2d, nn.Sequential, nn.Linear,
                                                            nn.Linear]
    assert all(model.get_parameter(name) is parameter for name, parameter in parameters.items())
