"""Config-driven construction, as in CompVis: yaml -> `instantiate_from_config` -> modules.

A config is data. Unless the caller trusts it, it builds only classes defined in this project's packages (`ldm`,
`sgm`, `cldm`) and the few outside classes released configs name (`ALLOWED_TARGETS`); any other name is refused
before its module is imported, since importing runs code. A trusted build (`trusted=True`) imports what the config
names, as CompVis does.
"""
from __future__ import annotations

import importlib
import logging
from typing import Any, Iterator, Mapping

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

PROJECT_PACKAGES = ("ldm", "sgm", "cldm")
# The classes outside this project that the released configs name: CompVis' placeholder for the autoencoder's
# training loss (`lossconfig`) and generative-models' for an unused stage.
ALLOWED_TARGETS = frozenset({"torch.nn.Identity"})
# Config entries that name a class to build: `target` everywhere, and sgm DiffusionEngine's UNet wrapper.
NAME_KEYS = ("target", "network_wrapper")
# The largest integer an untrusted model config may hold where a build reads it: released configs stay under 3,000
# (channels, widths, 1000 timesteps); a schedule or a size far beyond it only fills memory. (Training data configs,
# the user's own, are not bounded: a data set may well hold a million items.)
MAX_CONFIG_INT = 1 << 16


class UntrustedConfigError(ValueError):
    """What an untrusted config may not do: name a class outside this project, or a number beyond MAX_CONFIG_INT."""


class UntrustedTargetError(UntrustedConfigError):
    """A config names something outside this project's classes and `ALLOWED_TARGETS`, and was not trusted."""


def is_project_name(name: str) -> bool:
    """Whether dotted path `name` lies inside one of `PROJECT_PACKAGES` (by name alone: nothing is imported)."""
    package, dot, rest = name.partition(".")
    return package in PROJECT_PACKAGES and bool(dot and rest)


def is_project_class(obj: Any) -> bool:
    """Whether `obj` is a class defined in this project (not one a project module imported from elsewhere)."""
    return isinstance(obj, type) and str(getattr(obj, "__module__", "")).partition(".")[0] in PROJECT_PACKAGES


def _untrusted(name: str, why: str) -> UntrustedTargetError:
    allowed = ", ".join(f"{package}." for package in PROJECT_PACKAGES)
    return UntrustedTargetError(
        f"config target {name!r} {why}: a config is data and builds only this project's classes ({allowed}) and "
        f"{', '.join(sorted(ALLOWED_TARGETS))}; build it only if you trust the file (--trust_config)")


def check_target_name(name: Any) -> None:
    """UntrustedTargetError unless `name` is a dotted path inside this project or in `ALLOWED_TARGETS`; ValueError
    when it is no dotted path at all. Looks at the name only: nothing is imported."""
    if not isinstance(name, str) or not name.rpartition(".")[0]:
        raise ValueError(f"config target {name!r} is not a dotted path like 'ldm.models.autoencoder.AutoencoderKL'")
    if name not in ALLOWED_TARGETS and not is_project_name(name):
        raise _untrusted(name, "is outside this project")


def get_obj_from_str(string: Any, trusted: bool = False) -> Any:
    """Import `package.module.Name` and return `Name`. Unless `trusted`, only a class defined in this project or one
    of `ALLOWED_TARGETS`, and no module outside them is imported. A class or function given instead of a name (a
    config resolved by a trusted build, or made in code) is returned as it is."""
    if callable(string):
        return string
    if not trusted:
        check_target_name(string)
    module, _, name = str(string).rpartition(".")
    if not module:
        raise ValueError(f"config target {string!r} is not a dotted path like 'ldm.models.autoencoder.AutoencoderKL'")
    try:
        obj = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"config target {string!r} cannot be imported: {error}") from None
    if not trusted and string not in ALLOWED_TARGETS and not is_project_class(obj):
        what = f"{obj.__module__}.{obj.__qualname__}" if isinstance(obj, type) else f"a {type(obj).__name__}"
        raise _untrusted(string, f"is {what}, not a class defined in this project")
    return obj


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


def _used_values(config: Any) -> Iterator[tuple[str, Any, Any]]:
    """(dotted path, container, key) of every value in a plain config tree that a build may use: all but those under
    the training-only `params` keys that building drops. Iterative: a config may nest deeply."""
    stack: list[tuple[Any, str, bool]] = [(config, "", False)]
    while stack:
        node, where, is_params = stack.pop()
        items = node.items() if isinstance(node, Mapping) else enumerate(node) if isinstance(node, (list, tuple)) \
            else ()
        for key, value in items:
            if is_params and key in IGNORED_CONFIG_KEYS:
                continue
            path = f"{where}.{key}" if where else str(key)
            if isinstance(value, (Mapping, list, tuple)):
                stack.append((value, path, key == "params" and isinstance(node, Mapping) and "target" in node))
            else:
                yield path, node, key


def _built_names(config: Any) -> Iterator[tuple[Mapping, str]]:
    """(mapping, key) of every class name in a plain config tree that a build may use (`NAME_KEYS` entries)."""
    for _, node, key in _used_values(config):
        if isinstance(node, Mapping) and key in NAME_KEYS and node[key] is not None:
            yield node, key


def check_targets(config: Any) -> None:
    """UntrustedTargetError for the first class name in `config` (a plain tree) that an untrusted build refuses;
    names already resolved to classes pass. By name alone: nothing is imported."""
    for node, key in _built_names(config):
        if not callable(node[key]):
            check_target_name(node[key])


def check_numbers(config: Any) -> None:
    """UntrustedConfigError for the first integer in `config` (a plain tree) beyond +-MAX_CONFIG_INT: sizes and
    schedule lengths (`timesteps: 100000000` would fill memory with noise schedules while the model is built)."""
    for where, node, key in _used_values(config):
        value = node[key]
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_CONFIG_INT:
            digits = len(str(abs(value)))
            shown = str(value) if digits <= 12 else f"a {digits}-digit number"
            raise UntrustedConfigError(f"config value {where} is {shown}, beyond the {MAX_CONFIG_INT} any model "
                                       f"needs; build it only if you trust the file (--trust_config)")


def _plain_copy(config: Any) -> Any:
    if isinstance(config, Mapping):
        return {key: _plain_copy(value) for key, value in config.items()}
    if isinstance(config, (list, tuple)):
        return [_plain_copy(item) for item in config]
    return config


def _resolve_foreign(config: Any) -> Any:
    """A copy of plain `config` whose class names outside this project are the imported classes (a trusted build),
    so that the nested builds of project classes, which are not told about trust, take them as given."""
    config = _plain_copy(config)
    for node, key in _built_names(config):
        name = node[key]
        if isinstance(name, str) and name not in ALLOWED_TARGETS and not is_project_name(name):
            node[key] = get_obj_from_str(name, trusted=True)
    return config


def find_interpolation(config: Any) -> str | None:
    """The dotted key of the first OmegaConf interpolation (`${...}`) in a yaml config, or None; found without
    resolving any (a chain of them can expand exponentially)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(config, (DictConfig, ListConfig)):
        config = OmegaConf.to_container(config, resolve=False)
    stack: list[tuple[str, Any]] = [("", config)]
    while stack:
        where, node = stack.pop()
        items = node.items() if isinstance(node, Mapping) else enumerate(node) if isinstance(node, list) else ()
        for key, value in items:
            stack.append((f"{where}.{key}" if where else str(key), value))
        if isinstance(node, str) and "${" in node:
            return where or "(top level)"
    return None


def instantiate_from_config(config: Mapping[str, Any], *, trusted: bool = False, **extra: Any) -> Any:
    """Build `config["target"]` with `config["params"]`, as CompVis does; training-only keys are dropped.

    Unless `trusted`, every class name in the config is checked first (UntrustedTargetError, a ValueError, naming
    the first outside this project and `ALLOWED_TARGETS`), so nothing is imported or built for a config that names
    one. `trusted`: build whatever the config names, in nested configs too. Model loaders also bound the config's
    numbers (`check_numbers`)."""
    config = to_plain(config)
    if "target" not in config:
        if config in ("__is_first_stage__", "__is_unconditional__"):
            return None
        raise KeyError(f"expected key 'target' to instantiate, got keys {sorted(config)}")
    config = _resolve_foreign(config) if trusted else config
    check_targets(config)
    params = strip_ignored_keys(dict(config.get("params") or {}))
    return get_obj_from_str(config["target"], trusted=trusted)(**params, **extra)
