"""transformers' side of the text-encoder comparisons: CLIP text configs of our sizes, converted weights without the
`text_model.` wrapper, and Hugging Face tokenizer files made from our vocabulary."""
from __future__ import annotations

import torch

from ldm.modules.encoders.clip_tokenizer import write_hf_vocabulary  # noqa: F401 - the tests' name for it


def hf_text_config(width: int, layers: int, heads: int, activation: str, projection_dim: int = 512):
    import transformers  # optional: modules that compare against it skip without it

    return transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=77, hidden_act=activation, layer_norm_eps=1e-5,
        projection_dim=projection_dim, attn_implementation="eager")


def for_transformers(model: torch.nn.Module, converted: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5's CLIPTextModel has no `text_model.` wrapper; diffusers strips the prefix the same way."""
    if hasattr(model, "text_model"):
        return converted
    return {key.removeprefix("text_model."): value for key, value in converted.items()}


