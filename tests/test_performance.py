"""Speed and memory options (ldm.optimize) and the lean loader.

Every fast path is checked against the plain fp32 path of the same weights (itself parity-tested against diffusers
in test_unet.py / test_autoencoder.py), every memory mode against the plain computation, and the memory-mapped
safetensors reader against the safetensors library. Timings are not tested here: scripts/benchmark.py measures them.
"""
from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from checkpoint_factory import TEST_CONFIGS
from decoder_statistics import exact_statistics
from ldm import optimize
from ldm.checkpoints import CheckpointError, PageReleaser, read_checkpoint, read_shapes
from ldm.loading import load_model, parameters_on_meta
from ldm.modules.attention import CrossAttention, attention, linear, stacked_weight
from ldm.models.autoencoder import AutoencoderKL
from ldm.modules.diffusionmodules.model import AttnBlock
from ldm.optimize.kernels import OneDNNLinear, PackedConv2d
from ldm.optimize.vae import VaeTiling, decode_tiled, receptive_radius
from smooth_inputs import smooth_latent

V1, V2 = TEST_CONFIGS / "tiny-v1.yaml", TEST_CONFIGS / "tiny-v2.yaml"
LINUX = sys.platform.startswith("linux")
needs_onednn = pytest.mark.skipif(not optimize.onednn_available(), reason="this PyTorch has no oneDNN")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def sample_inputs(seed: int = 0, size: int = 8) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(2, 4, size, size + 4, generator=generator), t=torch.tensor([17, 903]),
                z=torch.randn(2, 4, size, size + 4, generator=generator),
                image=torch.rand(1, 3, 8 * size, 8 * size, generator=generator) * 2 - 1)


@torch.no_grad()
def outputs(model: nn.Module, inputs: dict) -> dict[str, torch.Tensor]:
    cond = model.get_learned_conditioning(["a red cube", "a photograph of an astronaut riding a horse"])
    return dict(cond=cond, eps=model.apply_model(inputs["x"], inputs["t"], cond),
                image=model.decode_first_stage(inputs["z"]), moments=model.encode_first_stage(inputs["image"]).mean)


def assert_outputs_close(actual: dict, expected: dict, rtol: float, atol: float) -> None:
    for name in expected:
        assert actual[name].dtype == expected[name].dtype or name == "cond", name
        difference = (actual[name].float() - expected[name].float()).abs().max().item()
        assert torch.allclose(actual[name].float(), expected[name].float(), rtol=rtol, atol=atol), (name, difference)


# --- the loader ----------------------------------------------------------------------------------------------------
def write_raw_safetensors(path: Path, entries: list[tuple[str, str, list[int], bytes]]) -> None:
    """A safetensors file laid out exactly as given (no alignment padding), to test unaligned offsets."""
    header, offset = {}, 0
    for name, dtype, shape, data in entries:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"".join(entry[3] for entry in entries))


def test_safetensors_reader_matches_the_library(tmp_path):
    from safetensors.torch import load_file, save_file
    generator = torch.Generator().manual_seed(0)
    tensors = {"f32": torch.randn(3, 5, generator=generator), "f16": torch.randn(7, generator=generator).half(),
               "bf16": torch.randn(2, 3, generator=generator).bfloat16(), "i64": torch.arange(5),
               "flags": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4)}
    save_file(tensors, str(tmp_path / "mixed.safetensors"))
    # one fp16 element first puts the float32 tensor at an odd byte offset
    write_raw_safetensors(tmp_path / "unaligned.safetensors", [
        ("a", "F16", [1], torch.tensor([1.5]).half().numpy().tobytes()),
        ("b", "F32", [2, 2], torch.tensor([[1.0, -2.0], [3.0, 4.5]]).numpy().tobytes())])
    for name in ("mixed", "unaligned"):
        path = tmp_path / f"{name}.safetensors"
        ours, _ = read_checkpoint(path)
        reference = load_file(str(path))
        assert ours.keys() == reference.keys()
        for key in reference:
            assert ours[key].dtype == reference[key].dtype and torch.equal(ours[key], reference[key]), key
        assert read_shapes(path) == {key: tuple(value.shape) for key, value in reference.items()}


def test_truncated_safetensors_is_refused(tmp_path):
    from safetensors.torch import save_file
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(1000)}, str(path))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="is the file complete"):
        read_checkpoint(path)


def mapped_file_ranges(path: Path) -> list[tuple[int, int]]:
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and Path(fields[5]) == path.resolve():
            start, end = fields[0].split("-")
            ranges.append((int(start, 16), int(end, 16)))
    return ranges


@pytest.mark.skipif(not LINUX, reason="reads /proc/self/maps")
@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_same_dtype_load_uses_the_file_mapping_without_copies(tiny_checkpoints, suffix):
    path = tiny_checkpoints["v1", suffix]
    model = load_model(path, V1)
    ranges = mapped_file_ranges(path)
    assert ranges, "the checkpoint is not memory-mapped"
    weights = [p for name, p in model.named_parameters() if name.startswith("model.diffusion_model.")]
    assert all(any(low <= p.data_ptr() < high for low, high in ranges) for p in weights)


@pytest.mark.skipif(not LINUX, reason="reads /proc/self/smaps")
def test_released_pages_leave_memory_and_read_back_from_the_file(tmp_path):
    from safetensors.torch import save_file
    path = tmp_path / "big.safetensors"
    expected = torch.randn(256, 1024, generator=torch.Generator().manual_seed(1))  # 1 MiB: 256 pages
    save_file({"w": expected}, str(path))
    mapped = read_checkpoint(path)[0]["w"]

    def resident_kib() -> int:
        blocks = Path("/proc/self/smaps").read_text().split("\n")
        total, inside = 0, False
        for line in blocks:
            if "-" in line.split(" ", 1)[0] and len(line.split()) >= 5:
                inside = line.rstrip().endswith(str(path.resolve()))
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1])
        return total

    assert torch.equal(mapped, expected) and resident_kib() >= 1000
    PageReleaser().release(mapped)
    assert resident_kib() < 100
    assert torch.equal(mapped, expected)  # the pages come back from the file
    mapped[:128] += 1  # written pages become private copies: releasing must keep them
    PageReleaser().release(mapped)
    assert torch.equal(mapped[:128], expected[:128] + 1) and torch.equal(mapped[128:], expected[128:])


def test_meta_build_skips_initialisers_without_patching():
    register, normal = nn.Module.register_parameter, torch.nn.init.normal_
    with parameters_on_meta():
        assert nn.Module.register_parameter is register and torch.nn.init.normal_ is normal
        embedding = nn.Embedding(10, 4)  # its normal_ init is skipped on the meta weight
        schedule = torch.tensor([0.5, 0.25])  # made from data: a computed buffer, real
        real = torch.empty(3, device="cpu")
        torch.nn.init.normal_(real)  # real tensors are still initialised
    assert embedding.weight.is_meta and schedule.tolist() == [0.5, 0.25] and torch.isfinite(real).all()


# --- fast paths ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fast_and_plain(tiny_checkpoints):
    """{family: (plain model, model with every CPU fast path)}, loaded from the same file."""
    pairs = {}
    for family, config in (("v1", V1), ("v2", V2)):
        path = tiny_checkpoints[family, ".safetensors"]
        plain, fast = load_model(path, config), load_model(path, config)
        applied = optimize.apply_fast_paths(fast, "cpu", layout=True)
        assert "fused attention projections" in applied and "channels-last activations" in applied
        pairs[family] = plain, fast
    return pairs


@pytest.mark.parametrize("family", ["v1", "v2"])
def test_fast_paths_match_the_plain_fp32_path(fast_and_plain, family):
    plain, fast = fast_and_plain[family]
    inputs = sample_inputs()
    assert_outputs_close(outputs(fast, inputs), outputs(plain, inputs), rtol=1e-4, atol=1e-5)
    assert all(torch.equal(value, plain.state_dict()[key]) for key, value in fast.state_dict().items())
    assert fast.state_dict().keys() == plain.state_dict().keys()


def test_fast_paths_really_run(fast_and_plain):
    _, fast = fast_and_plain["v1"]
    attentions = [m for m in fast.modules() if isinstance(m, CrossAttention)]
    assert attentions and all(stacked_weight(m.to_k.weight, m.to_v.weight) is not None for m in attentions)
    vae_attention = next(m for m in fast.modules() if isinstance(m, AttnBlock))
    assert stacked_weight(vae_attention.q.weight, vae_attention.k.weight, vae_attention.v.weight) is not None
    if optimize.onednn_available():
        assert any(isinstance(m, PackedConv2d) for m in fast.modules())
        assert any(isinstance(m, OneDNNLinear) for m in fast.modules())


def test_bf16_fast_path_matches_fp32_within_bf16_rounding(tiny_checkpoints, fast_and_plain):
    plain, _ = fast_and_plain["v1"]
    fast = load_model(tiny_checkpoints["v1", ".safetensors"], V1, dtype=torch.bfloat16)
    optimize.apply_fast_paths(fast, "cpu")
    inputs = sample_inputs()
    actual, expected = outputs(fast, inputs), outputs(plain, inputs)
    assert fast.dtype == torch.bfloat16 and actual["image"].dtype == torch.bfloat16
    for name in ("eps", "image"):  # bf16 keeps 8 bits of mantissa: 0.4% per rounding, a few % through the network
        error = (actual[name].float() - expected[name]).abs().max() / expected[name].abs().max()
        assert error < 0.05, (name, error)


def test_fused_projections_fall_back_when_weights_are_moved_apart():
    torch.manual_seed(0)
    module = CrossAttention(32, heads=2, dim_head=16).eval()
    x = torch.randn(2, 6, 32)
    expected = module(x)
    assert stacked_weight(module.to_q.weight, module.to_k.weight, module.to_v.weight) is None
    optimize.fuse_projections(module)
    assert stacked_weight(module.to_q.weight, module.to_k.weight, module.to_v.weight) is not None
    torch.testing.assert_close(module(x), expected)
    module.double()  # converts each parameter on its own: the views are separate again
    assert stacked_weight(module.to_q.weight, module.to_k.weight, module.to_v.weight) is None
    torch.testing.assert_close(module(x.double()).float(), expected)


@needs_onednn
@pytest.mark.parametrize("kernel, stride, padding, groups", [(3, 1, 1, 1), (3, 2, 0, 1), (1, 1, 0, 1), (3, 1, 1, 2)])
def test_packed_convolution_matches_conv2d(kernel, stride, padding, groups):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, kernel, stride=stride, padding=padding, groups=groups).eval()
    reference = nn.Conv2d(8, 16, kernel, stride=stride, padding=padding, groups=groups).eval()
    reference.load_state_dict(conv.state_dict())
    holder = nn.Sequential(conv)
    optimize.use_onednn_kernels(holder)  # the layer is replaced in its parent by one holding the same Parameters
    assert isinstance(holder[0], PackedConv2d) and holder[0].weight is conv.weight and holder[0].bias is conv.bias
    conv = holder[0]
    with torch.no_grad():
        for shape in ((2, 8, 9, 12), (1, 8, 5, 5)):  # a shape other than the one packed for works too
            x = torch.randn(shape)
            for layout in (torch.contiguous_format, torch.channels_last):
                torch.testing.assert_close(conv(x.contiguous(memory_format=layout)), reference(x),
                                           rtol=1e-5, atol=1e-5)
        conv.weight.mul_(2)  # a changed weight is seen at once: the stale packed copy is not used
        reference.weight.mul_(2)
        torch.testing.assert_close(conv(x), reference(x), rtol=1e-5, atol=1e-5)
    assert conv.state_dict().keys() == reference.state_dict().keys()
    optimize.use_default_kernels(holder)
    assert type(holder[0]) is nn.Conv2d and holder[0].weight is conv.weight


@needs_onednn
def test_onednn_linear_matches_f_linear():
    generator = torch.Generator().manual_seed(0)
    x, weight, bias = (torch.randn(*shape, generator=generator) for shape in ((2, 5, 24), (12, 24), (12,)))
    torch.testing.assert_close(linear(x, weight, bias), F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(linear(x, weight), F.linear(x, weight), rtol=1e-5, atol=1e-5)
    x.requires_grad_(True)
    linear(x, weight, bias).sum().backward()  # with autograd it is plain F.linear
    torch.testing.assert_close(x.grad, weight.sum(0).expand_as(x))


# --- attention slicing -----------------------------------------------------------------------------------------------
def test_attention_slices_give_the_same_result():
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 37, 8, generator=generator) for _ in range(3))
    torch.testing.assert_close(attention(q, k, v, slice_size=10), attention(q, k, v), rtol=1e-6, atol=1e-6)


def test_attention_slicing_on_a_model(fast_and_plain):
    plain, _ = fast_and_plain["v1"]
    inputs = sample_inputs()
    expected = outputs(plain, inputs)
    assert optimize.enable_attention_slicing(plain, 5) > 0
    try:
        assert_outputs_close(outputs(plain, inputs), expected, rtol=1e-5, atol=1e-5)
    finally:
        optimize.disable_attention_slicing(plain)
    with pytest.raises(ValueError, match="positive number"):
        optimize.enable_attention_slicing(plain, 0)


# --- VAE slicing and tiling ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_vae():
    """A two-level (x2) autoencoder with random weights: cheap to decode at sizes that need several tiles."""
    torch.manual_seed(0)
    vae = AutoencoderKL(dict(double_z=True, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=32,
                             ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], dropout=0.0), embed_dim=4).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in vae.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if parameter.dim() > 1:
                parameter.copy_(noise / parameter[0].numel() ** 0.5)
            else:
                parameter.copy_(1 + 0.2 * noise if "norm" in name and name.endswith("weight") else 0.1 * noise)
    return vae


def test_vae_slicing_decodes_the_same_images(tiny_vae):
    z = smooth_latent(8, 12, batch=3)
    with torch.no_grad():
        expected = tiny_vae.decode(z)
        optimize.enable_vae_slicing(tiny_vae)
        try:
            actual = tiny_vae.decode(z)
        finally:
            optimize.enable_vae_slicing(tiny_vae, False)
    # equal up to the float rounding of kernels that block a batch of 1 differently from a batch of 3
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-4)


def test_vae_tiles_join_without_seams(tiny_vae):
    """With the exact GroupNorm statistics, the tiled decode is the untiled one: the halos cover the receptive
    field and the blended overlaps agree, so no tile edge can show."""
    z = smooth_latent(28, 36)  # 3 x 4 tiles
    tiling = VaeTiling(tile=12, overlap=2)
    with torch.no_grad():
        expected = tiny_vae.decode(z)
        tiled = decode_tiled(tiny_vae.decoder, tiny_vae.post_quant_conv(z), tiling, exact_statistics(tiny_vae, z))
        without_halo = decode_tiled(tiny_vae.decoder, tiny_vae.post_quant_conv(z), VaeTiling(12, 2, halo=0),
                                    exact_statistics(tiny_vae, z))
    assert receptive_radius(tiny_vae.decoder) == 7  # 4 convs at x1, 4 at x2 (= 2 latent pixels), 2 more at x2
    torch.testing.assert_close(tiled, expected, rtol=1e-4, atol=1e-4)
    assert (without_halo - expected).abs().max() > 0.1  # the halo is what makes them agree


def test_vae_tiling_is_close_to_the_untiled_decode(tiny_vae):
    z = smooth_latent(40, 56)
    with torch.no_grad():
        expected = tiny_vae.decode(z)
        assert optimize.enable_vae_tiling(tiny_vae, tile=16, overlap=4) == 1
        try:
            tiled = tiny_vae.decode(z)
            small = tiny_vae.decode(z[..., :16, :16])  # fits in one tile: decoded as usual
        finally:
            optimize.disable_vae_tiling(tiny_vae)
        untiled_small = tiny_vae.decode(z[..., :16, :16])
    assert torch.equal(small, untiled_small)
    # the only difference is the GroupNorm statistics, gathered from per-tile-normalised activations: an image-wide
    # deviation, the same for every tile (measured on random weights, which amplify it: mean 0.5-1.9%, max 5-27%
    # of the output range over 6 seeds; 0.5% and 5% for these)
    error = (tiled - expected).abs()
    scale = expected.abs().max()
    assert error.mean() < 0.01 * scale and error.max() < 0.1 * scale


def test_vae_tiling_bounds_the_largest_activation(tiny_vae):
    """Above the latent resolution, where the decoder's activations are largest (for SD's autoencoder 16 times the
    latent-resolution ones), activations are tile-sized whatever the image size."""
    decoder = tiny_vae.decoder

    def largest_activation(z: torch.Tensor) -> int:
        sizes = []
        upsampling_path = [*decoder.up.modules(), decoder.norm_out, decoder.conv_out]
        hooks = [m.register_forward_hook(lambda m, args, out: sizes.append(out.numel())) for m in upsampling_path]
        with torch.no_grad():
            tiny_vae.decode(z)
        for hook in hooks:
            hook.remove()
        return max(sizes)

    untiled = largest_activation(smooth_latent(64, 64))
    optimize.enable_vae_tiling(tiny_vae, tile=12, overlap=2)
    try:
        tiled, tiled_larger = largest_activation(smooth_latent(64, 64)), largest_activation(smooth_latent(96, 96))
    finally:
        optimize.disable_vae_tiling(tiny_vae)
    assert tiled == tiled_larger  # independent of the image size
    assert tiled < untiled / 4


def test_vae_tiling_settings_are_checked():
    with pytest.raises(ValueError, match="overlap < tile/2"):
        VaeTiling(tile=16, overlap=8)
    with pytest.raises(ValueError, match="tile >= 8"):
        VaeTiling(tile=4, overlap=0)


# --- offload ---------------------------------------------------------------------------------------------------------
@pytest.fixture
def offload_pair(tiny_checkpoints):
    path = tiny_checkpoints["v1", ".ckpt"]
    return load_model(path, V1), load_model(path, V1)


def test_model_offload_keeps_one_sub_model_on_the_device(offload_pair):
    plain, offloaded = offload_pair
    inputs = sample_inputs()
    expected = outputs(plain, inputs)
    offload = optimize.enable_model_offload(offloaded, "cpu", record=True)
    assert_outputs_close(outputs(offloaded, inputs), expected, rtol=0, atol=0)
    assert offload.events == [("text encoder", "device"), ("text encoder", "home"), ("unet", "device"),
                              ("unet", "home"), ("autoencoder", "device")]  # encode reuses the autoencoder
    with pytest.raises(ValueError, match="already offloaded"):
        optimize.enable_sequential_offload(offloaded, "cpu")
    optimize.disable_offload(offloaded)
    assert "forward" not in vars(offloaded.model.diffusion_model)
    assert_outputs_close(outputs(offloaded, inputs), expected, rtol=0, atol=0)


def test_sequential_offload_streams_one_layer_at_a_time(offload_pair):
    plain, offloaded = offload_pair
    inputs = sample_inputs()
    expected = outputs(plain, inputs)
    offload = optimize.enable_sequential_offload(offloaded, "cpu", record=True)
    assert_outputs_close(outputs(offloaded, inputs), expected, rtol=0, atol=0)
    on_device, most = set(), 0
    for name, where in offload.events:
        if where == "device":
            on_device.add(name)
        else:
            on_device.discard(name)
        if name != "text encoder":
            most = max(most, len(on_device - {"text encoder"}))
    assert most == 1
    streamed = {name for name, _ in offload.events if name.startswith("unet.")}
    assert "unet.input_blocks.1.1" in streamed  # a spatial transformer moves as one piece
    assert not any(name.startswith("unet.input_blocks.1.1.") for name in streamed)
    assert {"unet.time_embed.0", "autoencoder.decoder.conv_in"} <= {name for name, _ in offload.events}
    optimize.disable_offload(offloaded)
    assert all(not hook for m in offloaded.modules() for hook in (m._forward_pre_hooks, m._forward_hooks))


# --- compilation -----------------------------------------------------------------------------------------------------
def test_compile_model_keeps_keys_and_outputs(tiny_checkpoints):
    model = load_model(tiny_checkpoints["v1", ".safetensors"], V1)
    keys = list(model.state_dict())
    inputs = sample_inputs()
    with torch.no_grad():
        cond = model.get_learned_conditioning(["a red cube", "a horse"])
        expected = model.apply_model(inputs["x"], inputs["t"], cond)
        optimize.apply_fast_paths(model, "cpu")
        assert optimize.compile_model(model, backend="eager") == ["model.diffusion_model", "first_stage_model.decoder"]
        actual = model.apply_model(inputs["x"], inputs["t"], cond)
    assert list(model.state_dict()) == keys
    assert not any(isinstance(m, (PackedConv2d, OneDNNLinear)) for m in model.modules())
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="graph replay needs a GPU")
def test_graph_replay_matches_eager(tiny_checkpoints):
    device = torch.device("cuda")
    model = load_model(tiny_checkpoints["v1", ".safetensors"], V1, device=device)
    inputs = {k: v.to(device) for k, v in sample_inputs().items()}
    with torch.no_grad():
        cond = model.get_learned_conditioning(["a red cube", "a horse"])
        expected = model.apply_model(inputs["x"], inputs["t"], cond)
        assert optimize.enable_graphs(model) == 1
        for _ in range(2):  # capture, then replay
            torch.testing.assert_close(model.apply_model(inputs["x"], inputs["t"], cond), expected,
                                       rtol=1e-4, atol=1e-5)
    optimize.disable_graphs(model)


# --- the benchmark's two pipelines do the same work --------------------------------------------------------------
def load_benchmark_script():
    """scripts/benchmark.py as the module `benchmark`, importable by name: its workers run in spawned processes,
    which import their function's module again."""
    import importlib
    scripts = str(Path(__file__).resolve().parents[1] / "scripts")
    if scripts not in sys.path:
        sys.path.append(scripts)
    return importlib.import_module("benchmark")


def test_benchmark_pipelines_make_the_same_image(tiny_checkpoints):
    """What scripts/benchmark.py times: this project (fast paths on) and diffusers' StableDiffusionPipeline on the
    same weights, noise, DDIM steps and guidance must produce the same image."""
    pytest.importorskip("diffusers")
    benchmark = load_benchmark_script()
    path, device = str(tiny_checkpoints["v1", ".safetensors"]), torch.device("cpu")
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = benchmark.OurPipeline(path, str(V1), device, torch.float32, "fast", 0)  # x_T is seed 0's noise
    reference = benchmark.DiffusersPipeline(path, str(V1), device, torch.float32, "default", 0)
    assert "oneDNN kernels" in ours.applied or not optimize.onednn_available()
    image, _ = ours("a red cube on a table", x_T, steps=4, scale=7.5)
    expected, _ = reference("a red cube on a table", x_T, steps=4, scale=7.5)
    assert image.shape == expected.shape == (1, 3, 64, 64)
    # ours is the saved 8-bit image (255 * x truncated, as CompVis saves it): one level of 255 at most apart
    torch.testing.assert_close(image, (expected * 255).floor() / 255, rtol=0, atol=1 / 255 + 1e-6)


def test_benchmark_refuses_cuda_graphs_off_cuda(capsys):
    benchmark = load_benchmark_script()
    with pytest.raises(SystemExit) as exit_info:
        benchmark.parse_args(["--cuda-graphs", "--device", "cpu"])
    assert exit_info.value.code == 2
    assert "--cuda-graphs needs a CUDA device (--device cuda), got --device cpu" in capsys.readouterr().err
    assert benchmark.parse_args(["--cuda-graphs", "--device", "cuda:0"]).cuda_graphs


def test_benchmark_compares_model_architectures(tmp_path, capsys):
    """--compare-models: each UNet built with random weights in its own process, timed, and reported against the
    first (the report's structure is checked, not its timings)."""
    from ldm.loading import instantiate_on_meta

    benchmark = load_benchmark_script()
    configs = [str(TEST_CONFIGS / "tiny-xl.yaml"), str(TEST_CONFIGS / "tiny-ssd1b.yaml")]
    report_path = tmp_path / "report.json"
    assert benchmark.main(["--compare-models", *configs, "--size", "64", "--runs", "2", "--warmup", "0",
                           "--threads", "1", "--json", str(report_path)]) == 0
    models = json.loads(report_path.read_text())["models"]
    assert list(models) == configs
    for config, row in models.items():
        unet = instantiate_on_meta(benchmark.unet_config(config))
        assert row["parameters"] == sum(parameter.numel() for parameter in unet.parameters())
        assert row["weight_gib"] * 2**30 == 4 * row["parameters"]  # fp32, no buffers
        assert len(row["runs"]) == 2 and row["s_per_step"] > 0 and row["gflop_per_step"] > 0
        assert 0.05 < row["output_std"] < 20  # the random weights keep activations in range
    first, second = models.values()
    assert first["speedup_vs_first"] == first["parameters_vs_first"] == 1.0
    assert second["speedup_vs_first"] == pytest.approx(first["s_per_step"] / second["s_per_step"])
    assert second["parameters_vs_first"] == pytest.approx(second["parameters"] / first["parameters"])
    assert second["flops_vs_first"] > 1  # tiny-ssd1b has deeper transformers than tiny-xl
    assert f"the speed of {configs[0]}" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--compare-models", "sdxl", "sdxl-turbo"], "--compare-models takes sdxl, ssd-1b, vega"),
    (["--compare-models", "sdxl", "--compile"], "drop --compile"),
])
def test_benchmark_refuses_unknown_models_and_pipeline_flags(capsys, argv, message):
    benchmark = load_benchmark_script()
    with pytest.raises(SystemExit) as exit_info:
        benchmark.parse_args(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert benchmark.parse_args(["--compare-models", "sdxl", "ssd-1b", "vega"]).compare_models == ["sdxl", "ssd-1b",
                                                                                                  "vega"]
