"""Config-driven construction, as in CompVis: yaml -> `instantiate_from_config` -> modules."""
from __future__ import annotations

import importlib
import logging
from typing import Any, Mapping

logger = logging.getLogger(__name__)

# Keys that the released yaml files carry for training or for code paths this inference package does not have.
# They are accepted and dropped here, the one place that knows about them, so every class keeps a signature
# made only of what it really uses.
IGNORED_CONFIG_KEYS = frozenset({
    # Lightning / training bookkeeping
    "monitor", "scheduler_config", "lossconfig", "base_learning_rate", "log_every_t", "first_stage_key",
    "cond_stage_key", "cond_stage_trainable", "num_timesteps_cond", "image_key", "ckpt_path", "ignore_keys",
    "load_only_unet", "loss_type", "l_simple_weight", "original_elbo_weight", "learn_logvar", "logvar_init",
    "v_posterior", "use_positional_encodings", "scale_by_std", "concat_mode", "cond_stage_forward",
    "make_it_fit", "reset_ema", "reset_num_ema_updates", "unet_trainable", "colorize_nlabels",
    # fine-tuning a text-to-image model into an inpainting one (Stability's LatentFinetuneDiffusion)
    "finetune_keys", "keep_finetune_dims", "c_concat_log_start", "c_concat_log_end",
    # memory-saving recomputation during training; precision is chosen at load time instead of by the yaml
    "use_checkpoint", "use_fp16", "use_bf16", "freeze",
    # hub names and device strings: this package never downloads and chooses the device when loading
    "device",
    # generative-models (SDXL) training and logging settings
    "optimizer_config", "loss_fn_config", "ema_decay_rate", "input_key", "log_keys", "no_cond_log",
    # generative-models run-time options that txt2img chooses per run (--precision, --compile, --vae_slicing)
    "disable_first_stage_autocast", "compile_model", "en_and_decode_n_samples_a_time",
    # ControlNet (cldm) training: the dataset key of the hint images
    "control_key",
})


def get_obj_from_str(string: str) -> Any:
    """Import `package.module.Name` and return `Name`."""
    module, _, name = string.rpartition(".")
    if not module:
        raise ValueError(f"config target {string!r} is not a dotted path like 'ldm.models.autoencoder.AutoencoderKL'")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"config target {string!r} cannot be imported: {error}") from error


def strip_ignored_keys(params: Mapping[str, Any]) -> dict[str, Any]:
    """Return `params` without the training-only keys of `IGNORED_CONFIG_KEYS`."""
    kept = {key: value for key, value in params.items() if key not in IGNORED_CONFIG_KEYS}
    dropped = sorted(set(params) - set(kept))
    if dropped:
        logger.debug("ignoring training-only config keys: %s", ", ".join(dropped))
    return kept


def to_plain(config: Any) -> Any:
    """OmegaConf nodes to plain dicts and lists; plain values pass through."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # omegaconf is a dependency, but plain dicts work without it
        return config
    if isinstance(config, (DictConfig, ListConfig)):
        return OmegaConf.to_container(config, resolve=True)
    return config


def instantiate_from_config(config: Mapping[str, Any], **extra: Any) -> Any:
    """Build `config["target"]` with `config["params"]`, as CompVis does; training-only keys are dropped."""
    config = to_plain(config)
    if "target" not in config:
        if config in ("__is_first_stage__", "__is_unconditional__"):
            return None
        raise KeyError(f"expected key 'target' to instantiate, got keys {sorted(config)}")
    params = strip_ignored_keys(dict(config.get("params") or {}))
    return get_obj_from_str(config["target"])(**params, **extra)
