"""Numeric parity at the released sizes: this project's SDXL-layout UNets against diffusers' UNet2DConditionModel.

    python scripts/parity_full_size.py                              # ssd-1b, vega and sdxl, 32x32 latents, fp32
    python scripts/parity_full_size.py --models ssd-1b --latent 64

Each model is built at full size from its config (configs/stable-diffusion/ssd-1b.yaml, segmind-vega.yaml,
sd_xl_base.yaml) with seeded random weights scaled to keep activations in range (scripts/benchmark.py
`random_parameter`), converted to diffusers' names by diffusers' own single-file converter and loaded into diffusers'
UNet built with the released architecture's arguments. Both evaluate the same random inputs (a guided batch of 2,
two timesteps, SDXL's size conditioning) in float32 on the CPU; the relative error of ours (plain, then with the
default fast paths) against diffusers' output is printed, and the exit status is 1 if one exceeds --tolerance.
The two UNets share their weights' storage (the converter renames tensors without copying; diffusers' UNet adopts
them), so SDXL needs its 10 GiB of weights once. Each model runs in its own process, one after the other.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchmark
import torch

# diffusers' UNet2DConditionModel arguments of the released SDXL-layout UNets: SDXL's, and what each distilled model
# changes (transformer layers per down block; per up-block layer, listed from the lowest resolution; middle block)
SDXL_UNET = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": (5, 10, 20), "cross_attention_dim": 2048, "use_linear_projection": True,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816,
}
DIFFUSERS_UNETS = {
    "sdxl": {"transformer_layers_per_block": [1, 2, 10], "mid_block_type": "UNetMidBlock2DCrossAttn"},
    "ssd-1b": {"transformer_layers_per_block": [1, 2, 4], "mid_block_type": "UNetMidBlock2D",
               "reverse_transformer_layers_per_block": [[4, 4, 10], [2, 1, 1], [1, 1, 1]]},
    "vega": {"transformer_layers_per_block": [1, 1, 2], "mid_block_type": "UNetMidBlock2D",
             "reverse_transformer_layers_per_block": [[2, 2, 2], [1, 1, 1], [1, 1, 1]]},
}
POOLED_WIDTH = 1280  # OpenCLIP ViT-bigG's pooled text embedding; the other 1536 of the vector are six size embeddings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(DIFFUSERS_UNETS), default=["ssd-1b", "vega", "sdxl"])
    parser.add_argument("--latent", type=int, default=32, help="latent height and width (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and inputs (default: %(default)s)")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest relative error (L2) accepted (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.latent % 4 or args.latent < 4:
        parser.error(f"--latent must be a positive multiple of 4 (the UNet halves it twice), got {args.latent}")
    return args


def diffusers_unet(name: str, ours: torch.nn.Module):
    """diffusers' UNet of architecture `name` holding `ours`'s weights (the same tensors, renamed by diffusers'
    converter), and the number of bytes it shares with `ours`."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders import single_file_utils

    config = {**SDXL_UNET, **DIFFUSERS_UNETS[name]}
    checkpoint = {f"model.diffusion_model.{key}": value for key, value in ours.state_dict().items()}
    converted = single_file_utils.convert_ldm_unet_checkpoint(checkpoint, config)
    with torch.device("meta"):  # no random init of 10 GiB that the next line replaces
        reference = UNet2DConditionModel(**config)
    reference.load_state_dict(converted, strict=True, assign=True)
    unloaded = [key for key, tensor in [*reference.named_parameters(), *reference.named_buffers()] if tensor.is_meta]
    if unloaded:
        raise SystemExit(f"diffusers' UNet left tensors unloaded: {unloaded[:3]}")
    ours_storage = {parameter.untyped_storage().data_ptr() for parameter in ours.parameters()}
    shared = sum(parameter.numel() * parameter.element_size() for parameter in reference.parameters()
                 if parameter.untyped_storage().data_ptr() in ours_storage)
    return reference.eval(), shared


def block_output_stds(unet: torch.nn.Module) -> tuple[list[float], list]:
    """Record the standard deviation of every input, middle and output block's output while `unet` runs."""
    stds: list[float] = []
    blocks = [*unet.input_blocks, unet.middle_block, *unet.output_blocks]
    handles = [block.register_forward_hook(lambda _, __, output: stds.append(output.float().std().item()))
               for block in blocks]
    return stds, handles


def parity_worker(name: str, options: dict) -> dict:
    """Build `name` at full size in this (fresh) process, evaluate diffusers' UNet and ours on the same inputs."""
    from ldm import optimize

    if options["threads"]:
        torch.set_num_threads(options["threads"])
    config = benchmark.unet_config(benchmark.model_config_path(name))
    ours = benchmark.random_unet(config, options["seed"], torch.device("cpu"), torch.float32)
    reference, shared = diffusers_unet(name, ours)
    weights = sum(parameter.numel() * parameter.element_size() for parameter in ours.parameters())

    latent, generator = options["latent"], torch.Generator().manual_seed(options["seed"] + 1)
    x = torch.randn(2, 4, latent, latent, generator=generator)
    context = torch.randn(2, 77, SDXL_UNET["cross_attention_dim"], generator=generator)
    pooled = torch.randn(2, POOLED_WIDTH, generator=generator)
    time_ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [768, 1024, 16, 32, 1024, 1024]])  # size, crop, target
    timesteps = torch.tensor([999, 261])
    with torch.no_grad():
        expected = reference(x, timesteps, encoder_hidden_states=context,
                             added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        # diffusers' vector input: pooled text, then every size id's sinusoidal embedding (what our conditioner makes)
        y = torch.cat([pooled, reference.add_time_proj(time_ids.flatten()).reshape(2, -1)], dim=-1)
        del reference  # ours keeps the shared weights; the fast paths below re-lay some of them out
        stds, handles = block_output_stds(ours)
        plain = ours(x, timesteps, context, y)
        for handle in handles:
            handle.remove()
        other_text = ours(x, timesteps, context.flip(0), y)  # each half with the other half's text
        applied = optimize.apply_fast_paths(ours, torch.device("cpu"))
        fast = ours(x, timesteps, context, y)

    def relative(output: torch.Tensor) -> float:
        return ((output - expected).norm() / expected.norm()).item()

    return {"parameters": sum(parameter.numel() for parameter in ours.parameters()), "weight_bytes": weights,
            "shared_bytes": shared,
            "expected_std": expected.std().item(), "expected_finite": bool(expected.isfinite().all()),
            "largest_block_std": max(stds), "relative_plain": relative(plain), "relative_fast": relative(fast),
            "max_abs_plain": (plain - expected).abs().max().item(), "applied": applied,
            "relative_other_text": relative(other_text),
            "peak_rss": benchmark.max_rss_bytes()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(benchmark.machine())
    options = {"latent": args.latent, "seed": args.seed, "threads": args.threads}
    failed = []
    for name in args.models:
        result = benchmark.call_in_fresh_process(parity_worker, name, options)
        # the random weights must keep every activation in range for the comparison to mean anything
        if not (result["expected_finite"] and 0.05 < result["expected_std"] < 20):
            raise SystemExit(f"{name}: diffusers' output has std {result['expected_std']} (finite: "
                             f"{result['expected_finite']}); the random weights do not keep activations in range")
        if result["relative_other_text"] < 1e-2:  # the outputs must depend on more than the inputs both share
            raise SystemExit(f"{name}: swapping the text changes the output by {result['relative_other_text']:.1e} "
                             "only; the comparison would not show a difference in the attention layers")
        if result["shared_bytes"] != result["weight_bytes"]:
            print(f"  note: {name}: diffusers' UNet shares {result['shared_bytes'] / 2**30:.2f} of "
                  f"{result['weight_bytes'] / 2**30:.2f} GiB of weights with ours")
        print(f"{name}: {result['parameters'] / 1e9:.3f} B parameters ({result['weight_bytes'] / 2**30:.2f} GiB fp32, "
              f"{result['shared_bytes'] / 2**30:.2f} GiB shared with diffusers' UNet), peak RSS "
              f"{result['peak_rss'] / 2**30:.2f} GiB; output std {result['expected_std']:.3f}, largest block-output "
              f"std {result['largest_block_std']:.1f}; relative error {result['relative_plain']:.2e} plain, "
              f"{result['relative_fast']:.2e} with {', '.join(result['applied']) or 'no fast paths'}; max abs "
              f"{result['max_abs_plain']:.2e} (swapping the two texts changes the output by "
              f"{result['relative_other_text']:.2f})", flush=True)
        if max(result["relative_plain"], result["relative_fast"]) > args.tolerance:
            failed.append(name)
    if failed:
        print(f"relative error above {args.tolerance} for {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
