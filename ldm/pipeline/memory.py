"""Will it fit? The weights' size per sub-model against the GPU's free memory before loading, and which memory flag
to use when a run does not fit."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from ldm.devices import accelerator_memory
from ldm.pipeline.errors import UsageError
from ldm.pipeline.request import Request

# Checkpoint key prefixes of the parts that `--offload model` moves one at a time (SDXL names its text encoders
# `conditioner`).
PARTS = {"unet": ("model.diffusion_model.",), "autoencoder": ("first_stage_model.",),
         "text encoder": ("cond_stage_model.", "conditioner.")}


def gib(size: float) -> str:
    """A size in bytes for people: "1.50 GiB", "12 MiB"."""
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.0f} MiB"


def weight_bytes_by_part(shapes: Mapping[str, tuple[int, ...]], dtype: torch.dtype) -> dict[str, int]:
    """Bytes each sub-model's weights take once loaded in `dtype` (EMA copies and other keys are not loaded)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    sizes = dict.fromkeys(PARTS, 0)
    for key, shape in shapes.items():
        for part, prefixes in PARTS.items():
            if key.startswith(prefixes):
                count = 1
                for dim in shape:
                    count *= dim
                sizes[part] += count * itemsize
    return sizes


def resident_weight_bytes(part_bytes: Mapping[str, int], offload: str | None, device: torch.device) -> int:
    """The weights that stay in `device`'s memory: all of them, the largest part with model offload, none to speak
    of with sequential offload (on the CPU every weight stays in RAM)."""
    if device.type == "cpu" or offload is None:
        return sum(part_bytes.values())
    return max(part_bytes.values()) if offload == "model" else 0


def check_weights_fit(part_bytes: Mapping[str, int], free: int, total: int, offload: str | None,
                      device: torch.device, dtype: torch.dtype) -> None:
    """UsageError naming the flag that helps when the weights the run keeps on `device` exceed its free memory.

    Without offload every part stays on the device; with `--offload model` the largest part must fit; sequential
    offload moves one layer at a time and is not checked. Activations come on top and are left to the run (an
    out-of-memory error there gets the same advice)."""
    precision = str(dtype).replace("torch.", "")
    where = f"{device} has {gib(free)} free of {gib(total)}"
    largest_name, largest = max(part_bytes.items(), key=lambda item: item[1])
    half_hint = " or --precision autocast (fp16)" if dtype == torch.float32 else ""
    if offload is None and sum(part_bytes.values()) > free:
        advice = "use --offload model" if largest <= free else "use --offload sequential"
        raise UsageError(f"the model's weights need {gib(sum(part_bytes.values()))} in {precision} but {where}: "
                         f"{advice}{half_hint}")
    if offload == "model" and largest > free:
        raise UsageError(f"with --offload model the {largest_name} ({gib(largest)} in {precision}) must fit on the "
                         f"GPU at once but {where}: use --offload sequential{half_hint}")


def out_of_memory_advice(options: Any, stage: str, device: torch.device, dtype: torch.dtype, size: str) -> str:
    """The one line for a single image that still does not fit: the memory flags not yet used, most useful first."""
    flags = []
    if stage == "decoding":
        flags += [] if options.vae_tiling else ["--vae_tiling"]
    else:
        flags += [] if options.attention_slicing else ["--attention_slicing"]
    if options.offload is None:
        flags.append("--offload model")
    if options.offload != "sequential":
        flags.append("--offload sequential")
    if dtype == torch.float32:
        flags.append("--bf16" if device.type == "cpu" else "--precision autocast (fp16)")
    tried = "" if flags else ", even with every memory flag"
    flags.append(f"a smaller --H/--W than {size}")
    others = "close other programs" if device.type == "cpu" else "free the GPU of other programs"
    return (f"out of memory on {device} while {stage} one {size} image{tried}: try {', '.join(flags[:-1])}"
            f"{' or ' if len(flags) > 1 else ''}{flags[-1]}; or {others}")


@dataclass(frozen=True)
class RequestMemory:
    """Lower bounds of the bytes a request's activations take at their peak (the tensors that must exist at once),
    per stage, beside the weights."""

    sampling: int
    decoding: int
    sampling_per_image: int
    decoding_per_image: int


def available_memory(device: torch.device) -> tuple[int, str] | None:
    """(bytes, what) a run on `device` may still use: a CUDA device's free memory, the system's available RAM for
    the CPU (Linux's MemAvailable); None where it cannot be told (Apple's unified memory, other systems)."""
    cuda = accelerator_memory(device)
    if cuda is not None:
        return cuda[0], f"{device} has {gib(cuda[0])} free"
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    return available, f"the machine has {gib(available)} of RAM available"
    except (OSError, ValueError):
        return None
    return None


def request_memory(config: Any, request: Request, options: Any, itemsize: int) -> RequestMemory:
    """Activation lower bounds for `request` on the model `config` describes: the UNet's skip connections and working
    tensors for every image of the guided batch, and the autoencoder's full-resolution decoder tensors (per tile
    with VAE tiling, one image at a time with VAE slicing or tiling)."""
    params = config.model.params
    unet = (params.unet_config if "unet_config" in params else params.network_config).params
    decoder = params.first_stage_config.params.ddconfig
    f = 2 ** (len(decoder.ch_mult) - 1)
    height, width = request.size
    latent_pixels = (height // f) * (width // f)
    widths = [int(unet.model_channels) * int(mult) for mult in unet.channel_mult]
    blocks = unet.num_res_blocks if isinstance(unet.num_res_blocks, int) else max(unet.num_res_blocks)
    levels = [channels * latent_pixels // 4 ** level for level, channels in enumerate(widths)]
    # a transformer block's GEGLU feed-forward holds 8x its width beside its input and output
    working = (8 + 2 if unet.get("use_spatial_transformer", True) else 3) * max(levels)
    unet_per_image = ((int(blocks) + 1) * sum(levels) + working) * itemsize
    guided = 2 if request.scale != 1.0 else 1
    decoded_pixels = height * width
    if options.vae_tiling:
        decoded_pixels = min(decoded_pixels, (options.vae_tile * f) ** 2)
    decode_per_image = 3 * int(decoder.ch) * int(decoder.ch_mult[0]) * decoded_pixels * itemsize
    at_once = 1 if options.vae_slicing or options.vae_tiling else request.batch_size
    return RequestMemory(unet_per_image * guided * request.batch_size, decode_per_image * at_once,
                         unet_per_image * guided, decode_per_image)


def check_request_memory(config: Any, requests: Sequence[Request], options: Any, device: torch.device,
                         dtype: torch.dtype, weights: int) -> None:
    """UsageError naming the flag that makes it fit when a request's weights and activations (lower bounds) exceed
    what `device` has available; silent where that cannot be told or the config is of another shape."""
    available = available_memory(device)
    if available is None:
        return
    free, where = available
    itemsize = torch.empty((), dtype=dtype).element_size()
    for request in requests:
        try:
            needed = request_memory(config, request, options, itemsize)
        except (AttributeError, KeyError, TypeError, ValueError):
            return
        if weights + max(needed.sampling, needed.decoding) > free:
            raise UsageError(_memory_refusal(request, needed, options, weights, free, where))


def _memory_refusal(request: Request, needed: RequestMemory, options: Any, weights: int, free: int,
                    where: str) -> str:
    height, width = request.size
    advice = []
    if weights + needed.decoding > free:
        one_at_a_time = not (options.vae_slicing or options.vae_tiling) and request.batch_size > 1
        if one_at_a_time and weights + needed.decoding_per_image <= free:
            advice.append("--vae_slicing")
        elif not options.vae_tiling:
            advice.append("--vae_tiling")
    if weights + needed.sampling > free:
        fits = (free - weights) // needed.sampling_per_image if free > weights else 0
        if 1 <= fits < request.batch_size:
            advice.append(f"--n_samples {fits}")
    one_image_too_large = (weights + needed.sampling_per_image > free
                           or (options.vae_tiling and weights + needed.decoding_per_image > free))
    if one_image_too_large or not advice:
        advice.append(f"a smaller --H/--W than {width}x{height}")
    stage = "sampling" if needed.sampling >= needed.decoding else "decoding"
    return (f"{width}x{height} images in a batch of {request.batch_size} need at least "
            f"{gib(weights + max(needed.sampling, needed.decoding))} ({stage}, weights included) but {where}: use "
            f"{' and '.join(advice)}")
