"""Speed and memory options for a loaded model, as functions the command line and scripts call.

Speed (outputs equal to the plain path up to float rounding): `apply_fast_paths` (the per-device defaults), or one
by one `fuse_projections`, `channels_last`, `use_onednn_kernels`; `compile_model` (torch.compile) and
`enable_graphs` (replayed GPU graphs), both with a warm-up on the first call.
Memory: `enable_attention_slicing`, `enable_vae_tiling`, `enable_vae_slicing`, `enable_model_offload`,
`enable_sequential_offload`.
"""
from ldm.optimize.compile import compile_model, disable_graphs, enable_graphs
from ldm.optimize.kernels import (apply_fast_paths, channels_last, fuse_projections, onednn_available,
                                  use_default_kernels, use_onednn_kernels)
from ldm.optimize.offload import disable_offload, enable_model_offload, enable_sequential_offload
from ldm.optimize.slicing import disable_attention_slicing, enable_attention_slicing
from ldm.optimize.vae import disable_vae_tiling, enable_vae_slicing, enable_vae_tiling

__all__ = [
    "apply_fast_paths", "fuse_projections", "channels_last", "use_onednn_kernels", "use_default_kernels",
    "onednn_available", "compile_model", "enable_graphs", "disable_graphs", "enable_attention_slicing",
    "disable_attention_slicing", "enable_vae_tiling", "disable_vae_tiling", "enable_vae_slicing",
    "enable_model_offload", "enable_sequential_offload", "disable_offload",
]
