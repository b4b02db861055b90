"""Nothing in torch or in a layer's class is changed to load a model or to speed it up: the meta-device build is a
scoped torch function mode, kernels are layers put in their parents' places, and modules consult attributes."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from checkpoint_factory import TEST_CONFIGS
from ldm import optimize
from ldm.loading import instantiate_on_meta, load_model, parameters_on_meta
from ldm.optimize.kernels import OneDNNLinear, PackedConv2d
from ldm.util import instantiate_from_config
from replaying_capture import ReplayingCapture

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


# --- every speed and memory option at once ---------------------------------------------------------------------------
PATCHABLE = (nn.Module, nn.Conv2d, nn.Linear, nn.GroupNorm, nn.LayerNorm, nn.Embedding, torch.Tensor)


def torch_state() -> dict:
    """What a global patch would change: nn.init's and F's functions, and the attributes of torch's layer classes."""
    return {"init": dict(vars(nn.init)), "functional": dict(vars(F)),
            **{cls.__name__: dict(vars(cls)) for cls in PATCHABLE}}


def assert_nothing_patched(before: dict, constructed: list[tuple[nn.Module, type]], model: nn.Module) -> None:
    after = torch_state()
    for name, attributes in before.items():
        changed = sorted(key for key in attributes.keys() | after[name].keys()
                         if attributes.get(key, None) is not after[name].get(key, None))
        assert not changed, f"{name} changed: {changed}"
    assert nn.Module.register_parameter is before["Module"]["register_parameter"]
    assert nn.Conv2d.forward is before["Conv2d"]["forward"] and nn.Linear.forward is before["Linear"]["forward"]
    assert nn.GroupNorm.forward is before["GroupNorm"]["forward"]
    assert all(type(module) is constructed_as for module, constructed_as in constructed), "a layer's class changed"
    for module in [*model.modules(), *(module for module, _ in constructed)]:
        assert "forward" not in vars(module), f"{type(module).__name__} has an instance-level forward"
        assert "__call__" not in vars(module)


@torch.no_grad()
def exercise(model: nn.Module) -> torch.Tensor:
    """Every path the options change: text encoder, UNet (replayed), decoder (tiled, sliced), encoder."""
    generator = torch.Generator().manual_seed(0)
    cond = model.get_learned_conditioning(["a red cube", "a horse"])
    eps = model.apply_model(torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([3, 700]), cond)
    image = model.decode_first_stage(torch.randn(2, 4, 12, 20, generator=generator))
    moments = model.encode_first_stage(torch.rand(1, 3, 64, 64, generator=generator) * 2 - 1).mean
    return torch.cat([eps.flatten(), image.flatten(), moments.flatten()])


def test_every_option_leaves_torch_and_the_layers_classes_alone(tiny_checkpoint, tiny_config):
    """Fast paths, attention slicing, VAE tiling and slicing, replayed graphs, and model or sequential offload, all
    on one model and run: torch's functions and classes, and each layer's class, are as they were, and no module
    carries a forward of its own; the outputs are those of the plain model (tiled decoding aside, checked apart)."""
    before = torch_state()
    plain = load_model(tiny_checkpoint, tiny_config)
    model = load_model(tiny_checkpoint, tiny_config)
    constructed = [(module, type(module)) for module in model.modules()]
    applied = optimize.apply_fast_paths(model, "cpu", layout=True)
    assert "fused attention projections" in applied and "channels-last activations" in applied
    assert not optimize.onednn_available() or any(isinstance(m, (PackedConv2d, OneDNNLinear)) for m in model.modules())
    assert optimize.enable_attention_slicing(model, 16) > 0
    assert optimize.enable_vae_slicing(model) == 1
    capture = ReplayingCapture()
    assert optimize.enable_graphs(model, capture=capture) == 1
    expected = exercise(plain)
    torch.testing.assert_close(exercise(model), expected, rtol=1e-4, atol=1e-4)
    assert capture.captures == 1
    assert_nothing_patched(before, constructed, model)
    assert optimize.enable_vae_tiling(model, tile=8, overlap=2) == 1
    for offload in (optimize.enable_model_offload, optimize.enable_sequential_offload):
        offload(model, "cpu")
        exercise(model)
        assert_nothing_patched(before, constructed, model)
        optimize.disable_offload(model)
    optimize.disable_graphs(model)
    optimize.disable_vae_tiling(model)
    torch.testing.assert_close(exercise(model), expected, rtol=1e-4, atol=1e-4)
    assert_nothing_patched(before, constructed, model)
