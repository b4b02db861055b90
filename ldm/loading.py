"""One strict loader: checkpoint + config -> `LatentDiffusion` on the target device and dtype.

Unwrap the file, pick EMA weights if asked, drop an explicit allow-list of harmless keys, then refuse anything
missing, unexpected or mis-shaped with a message a user can act on. Parameters are never randomly initialised: the
model is built with its parameters on the meta device and the checkpoint's tensors are assigned in their place.
"""
from __future__ import annotations

import functools
import os
import re
import time
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ldm.checkpoint_layout import (LOW_SCALE, UNET, LoadError, detect_family, normalise_text_layout,
                                   params_from_shapes)
from ldm.checkpoints import CheckpointError, PageReleaser, model_hash, read_shapes, read_tensors
from ldm.diffusers_folder import (FolderError, folder_hash, folder_overrides, folder_state_dict, is_diffusers_folder,
                                  read_folder)
from ldm.weight_parts import UNET_PART, VAE_PART, PartError, merge_part, part_weights
from ldm.util import check_numbers, find_interpolation, instantiate_from_config, to_plain

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "stable-diffusion"
CONFIGS = {"v1": "v1-inference.yaml", "v2": "v2-inference.yaml", "v2-v": "v2-inference-v.yaml",
           "xl-base": "sd_xl_base.yaml", "xl-refiner": "sd_xl_refiner.yaml",
           "v1-inpainting": "v1-inpainting-inference.yaml", "v2-inpainting": "v2-inpainting-inference.yaml",
           "x4-upscaler": "x4-upscaling.yaml"}
# Released SDXL-layout architectures, tried in turn: the first whose model has exactly the checkpoint's keys and shapes
# is the checkpoint's config. Other SDXL-layout files (fine-tunes of other widths, other distillations) get the first
# one with the structure and every width read from their keys (`params_from_shapes`).
SDXL_CONFIGS = {"xl-base": ("sd_xl_base.yaml", "ssd-1b.yaml", "segmind-vega.yaml"),
                "xl-refiner": ("sd_xl_refiner.yaml",)}
ADVICE = {
    "v1": "this is an SD 1.x checkpoint: use configs/stable-diffusion/v1-inference.yaml",
    "v2": "this is an SD 2.x checkpoint: use configs/stable-diffusion/v2-inference.yaml "
          "(v2-inference-v.yaml for the 768 v-prediction models)",
    "xl-base": "this is an SDXL base (or turbo) checkpoint: use configs/stable-diffusion/sd_xl_base.yaml",
    "xl-refiner": "this is an SDXL refiner checkpoint: use configs/stable-diffusion/sd_xl_refiner.yaml",
    "v1-inpainting": "this is an SD 1.x inpainting checkpoint: use configs/stable-diffusion/"
                     "v1-inpainting-inference.yaml",
    "v2-inpainting": "this is an SD 2.x inpainting checkpoint: use configs/stable-diffusion/"
                     "v2-inpainting-inference.yaml",
    "x4-upscaler": "this is the SD 2 x4 upscaler: use configs/stable-diffusion/x4-upscaling.yaml",
}
EMA = "model_ema."
# Keys that released checkpoints carry and that inference does not use.
HARMLESS_KEYS = re.compile(
    # older transformers' buffer, in SD 1.x and SDXL text encoders
    r"^((cond_stage_model|conditioner\.embedders\.\d+)\.transformer\.text_model\.embeddings\.position_ids"
    # the same buffer of SDXL's OpenCLIP encoder in files written by diffusers' conversion script (Segmind's 2023
    # SSD-1B and Vega files among them)
    r"|conditioner\.embedders\.\d+\.model\.(text_model\.)?embeddings\.position_ids"
    r"|denoiser\.sigmas"  # SDXL's noise levels, recomputed from the config
    r"|model_ema\..*"  # EMA shadow weights when EMA is not asked for
    r"|first_stage_model\.loss\..*|loss\..*"  # the autoencoder's training loss (LPIPS, discriminator)
    r"|logvar|lvlb_weights|cond_ids)$")
# Schedule buffers: loaded when present (as CompVis does), computed from the config when absent.
SCHEDULE_KEYS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2"})


def is_schedule_key(key: str) -> bool:
    """A schedule buffer of the model or of the x4 upscaler's noise augmentation (computed from the config)."""
    return key in SCHEDULE_KEYS or (key.startswith(LOW_SCALE) and key[len(LOW_SCALE):] in SCHEDULE_KEYS)


class DerivedConfig(type(Path())):
    """A released config file and values read from a checkpoint's keys that replace its own (`overrides`: dotted
    paths as `OmegaConf.update` takes them); `load_config` applies them. It names the file it starts from."""

    overrides: dict[str, Any]


def derived_config(path: Path, overrides: Mapping[str, Any]) -> DerivedConfig:
    """`path` with `overrides` (see `DerivedConfig`)."""
    derived = DerivedConfig(path)
    derived.overrides = dict(overrides)
    return derived


def _loadable_shapes(shapes: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """The shapes a model and a checkpoint must agree on: without harmless keys and schedule buffers."""
    return {key: tuple(shape) for key, shape in shapes.items() if not HARMLESS_KEYS.match(key)
            and not is_schedule_key(key)}


@functools.lru_cache(maxsize=None)
def _released_shapes(name: str) -> dict[str, tuple[int, ...]]:
    model = instantiate_on_meta(load_config(CONFIG_DIR / name).model)
    return _loadable_shapes({key: tuple(value.shape) for key, value in model.state_dict().items()})


def sdxl_config(family: str, shapes: Mapping[str, tuple[int, ...]]) -> Path:
    """The released config (`SDXL_CONFIGS`) whose model has exactly the checkpoint's keys and shapes; otherwise the
    family's first, with the structure and widths read from the keys (`params_from_shapes`)."""
    shapes = normalise_text_layout(shapes)
    wanted = _loadable_shapes(shapes)
    names = SDXL_CONFIGS[family]
    for name in names:
        if (CONFIG_DIR / name).is_file() and _released_shapes(name) == wanted:
            return CONFIG_DIR / name
    base = CONFIG_DIR / names[0]
    if not base.is_file():
        raise LoadError(f"the released config {base} is missing: pass --config")
    return derived_config(base, params_from_shapes(shapes, family))


def looks_like_v_prediction(ckpt_path: str | os.PathLike) -> bool:
    """SD 2.x 768 models predict v; the released files say "768" in their names (768-v-ema, v2-1_768-ema-pruned)."""
    return "768" in Path(ckpt_path).name


def resolve_config(ckpt: str | os.PathLike, config: str | os.PathLike | None = None,
                   v_prediction: bool | None = None, shapes: Mapping[str, tuple[int, ...]] | None = None,
                   unet: str | os.PathLike | None = None) -> Path:
    """The config to use: the given one, else `<checkpoint name>.yaml` beside the file, else the released config that
    fits the checkpoint's keys (for SDXL-layout files, one read from the keys when none fits: see `sdxl_config`).
    `unet`: a --unet file, whose keys replace the checkpoint's UNet ones (when `shapes` are not given)."""
    if shapes is None and unet is not None and config is None:
        try:
            shapes = _shapes_with_unet(read_weights(ckpt, shapes_only=True), unet)
        except CheckpointError as error:
            raise LoadError(str(error)) from None
    if config is not None:
        path = config if isinstance(config, Path) else Path(config)
        if not path.is_file():
            raise LoadError(f"config {config} does not exist (released configs are in {CONFIG_DIR})")
        return path
    if is_diffusers_folder(ckpt):
        return folder_config(ckpt, v_prediction, shapes)
    beside = Path(ckpt).with_suffix(".yaml")
    if beside.is_file():  # a config next to the checkpoint, under its name, is the checkpoint's own (as in other tools)
        return beside
    try:
        shapes = shapes if shapes is not None else read_shapes(ckpt)
        family = detect_family(shapes)
    except CheckpointError as error:
        raise LoadError(str(error)) from None
    if family in SDXL_CONFIGS:
        return sdxl_config(family, shapes)
    if family == "v2" and (v_prediction if v_prediction is not None else looks_like_v_prediction(ckpt)):
        family = "v2-v"
    path = CONFIG_DIR / CONFIGS[family]
    if not path.is_file():
        raise LoadError(f"the released config {path} is missing: pass --config")
    guidance = shapes.get(UNET + "time_cond_proj.weight")
    if guidance is not None:  # an SD 1.x / 2.x latent consistency model with a guidance embedding
        return derived_config(path, {"model.params.unet_config.params.time_cond_proj_dim": guidance[1]})
    return path


def folder_config(folder_path: str | os.PathLike, v_prediction: bool | None = None,
                  shapes: Mapping[str, tuple[int, ...]] | None = None) -> DerivedConfig:
    """The config of a diffusers folder: its family's released config with the folder's own values (see
    `ldm.diffusers_folder.folder_overrides`). `v_prediction`, when given, overrides the scheduler's prediction type
    for SD 2.x."""
    try:
        folder = read_folder(folder_path)
        shapes = shapes if shapes is not None else checkpoint_shapes(folder_path)
        family = folder.family
        v = folder.v_prediction if v_prediction is None else v_prediction
        if family == "v2" and v:
            family = "v2-v"  # (SD 2 inpainting is eps; a v one takes its parameterization from the overrides)
        structure = params_from_shapes(normalise_text_layout(shapes), folder.family)  # widths from the weights
        overrides = {**structure, **folder_overrides(folder, structure)}  # then what only the folder's configs say
    except FolderError as error:
        raise LoadError(str(error)) from None
    if v_prediction is not None and family.startswith("v"):
        overrides["model.params.parameterization"] = "v" if v_prediction else "eps"
    return derived_config(CONFIG_DIR / CONFIGS[family], overrides)


def checkpoint_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """The shapes of a checkpoint's tensors under the released keys, from its layout only: a file's, or a diffusers
    folder's translated."""
    if is_diffusers_folder(path):
        return {key: tuple(value.shape) for key, value in read_weights(path, shapes_only=True).items()}
    return read_shapes(path)


def checkpoint_hash(path: str | os.PathLike) -> str:
    """The 10-hex "Model hash" of a checkpoint file or a diffusers folder."""
    if is_diffusers_folder(path):
        try:
            return folder_hash(read_folder(path))
        except FolderError as error:
            raise LoadError(str(error)) from None
    return model_hash(path)


def load_config(path: str | os.PathLike, trusted: bool = False) -> Any:
    """The yaml at `path` (OmegaConf), with a `model` to build. Unless `trusted`, OmegaConf interpolations (`${...}`)
    are refused before any is resolved: released configs have none, and a chain of them expands exponentially."""
    from omegaconf import DictConfig, OmegaConf
    try:
        config = OmegaConf.load(str(path))
    except Exception as error:  # yaml and omegaconf raise many types; all mean the same to the user
        raise LoadError(f"cannot read config {path}: {str(error).splitlines()[0]}") from None
    where = None if trusted else find_interpolation(config)
    if where is not None:
        raise LoadError(f"config {path} uses an OmegaConf interpolation (${{...}}) at {where}, which released configs "
                        f"do not: write the value itself, or pass --trust_config if you trust the file")
    for key, value in getattr(path, "overrides", {}).items():  # a DerivedConfig: values read from a checkpoint
        OmegaConf.update(config, key, value, merge=False)
    model = config.get("model") if isinstance(config, DictConfig) else None
    if not isinstance(model, DictConfig) or "target" not in model:
        raise LoadError(f"config {path} has no model.target: expected a latent diffusion yaml like {CONFIGS['v1']}")
    if not isinstance(model.get("params") or {}, (DictConfig, dict)):
        raise LoadError(f"config {path}: model.params is a {type(model.params).__name__}, not a mapping of parameters")
    return config


# Constructors that make tensors without data (uninitialised, constant or random): layers make their parameters with
# these and then initialise them in place. Tensors made from data (torch.tensor of a schedule, arange, linspace) are
# not among them: those are the buffers a model computes in its constructor.
_DATA_FREE_CONSTRUCTORS = frozenset({torch.empty, torch.empty_strided, torch.empty_permuted, torch.zeros, torch.ones,
                                     torch.full, torch.rand, torch.randn, torch.randint})
# In-place initialisers, as torch functions (the nn.init ones that dispatch) and tensor methods. On meta tensors they
# have nothing to do, and some (normal_) import torch._dynamo on first use for their meta kernel, which alone costs
# seconds.
_INITIALISERS = frozenset({
    nn.init.uniform_, nn.init.normal_, nn.init.constant_, nn.init.kaiming_uniform_, torch.Tensor.uniform_,
    torch.Tensor.normal_, torch.Tensor.fill_, torch.Tensor.zero_, torch.Tensor.random_, torch.Tensor.bernoulli_,
    torch.Tensor.exponential_, torch.Tensor.log_normal_, torch.Tensor.cauchy_, torch.Tensor.geometric_})


class MetaParameters(TorchFunctionMode):
    """While active (in this thread only, like `torch.device("meta")`), modules are built with their parameters on
    the meta device and their computed buffers real.

    Data-free constructors make meta tensors unless a device is named, and initialisers leave meta tensors alone:
    nothing is allocated or randomly initialised. Tensors made from data stay on their device, so schedules computed
    in constructors hold their values. A parameter made from data (a scalar `logit_scale`) stays real here;
    `instantiate_on_meta` moves those to the meta device as well.
    """

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _DATA_FREE_CONSTRUCTORS:
            if kwargs.get("device") is None:
                kwargs["device"] = "meta"
        elif func in _INITIALISERS:
            tensor = args[0] if args else kwargs.get("tensor")
            if isinstance(tensor, torch.Tensor) and tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


def parameters_on_meta() -> MetaParameters:
    """`with parameters_on_meta(): model = ...` builds `model` with its parameters on the meta device (no
    allocation, no random init) and its computed buffers real; see `MetaParameters`."""
    return MetaParameters()


def instantiate_on_meta(config: Any, trusted: bool = False) -> nn.Module:
    """`instantiate_from_config(config, trusted=trusted)` with every parameter on the meta device and every computed
    buffer real. Unless `trusted`, the config's integers are bounded first (`ldm.util.check_numbers`): computed
    buffers such as noise schedules are real, and sized by the config."""
    if not trusted:
        check_numbers(to_plain(config))
    with parameters_on_meta():
        model = instantiate_from_config(config, trusted=trusted)
    for name, parameter in [*model.named_parameters()]:
        if not parameter.is_meta:  # made from data: its value comes from the checkpoint like the others'
            owner, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(owner), attribute,
                    nn.Parameter(parameter.to("meta"), requires_grad=parameter.requires_grad))
    return model


def select_ema(state_dict: dict[str, torch.Tensor], use_ema: bool) -> dict[str, torch.Tensor]:
    """With `use_ema`, replace the UNet weights by their `model_ema.*` copies (LitEma names: dots removed)."""
    if not use_ema:
        return state_dict
    ema = {key[len(EMA):]: value for key, value in state_dict.items() if key.startswith(EMA)}
    if not any(key.startswith("diffusion_model") for key in ema):
        raise LoadError("EMA weights were asked for but this checkpoint has none (it may already be an EMA-only "
                        "file): load it without --ema / use_ema")
    selected = dict(state_dict)
    for key in state_dict:
        if key.startswith("model."):
            shadow = key[len("model."):].replace(".", "")
            if shadow not in ema:
                raise LoadError(f"the checkpoint's EMA weights lack {key}: load it without --ema / use_ema")
            selected[key] = ema[shadow]
    return selected


def read_weights(path: str | os.PathLike, shapes_only: bool = False) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors (a diffusers folder's under the released keys); with `shapes_only`, meta tensors of
    their shapes and dtypes (only the files' layout is read)."""
    if is_diffusers_folder(path):
        try:
            return normalise_text_layout(folder_state_dict(read_folder(path), shapes_only))
        except FolderError as error:
            raise LoadError(str(error)) from None
    return read_tensors(path, shapes_only)


def _examples(keys: list[str], limit: int = 3) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def check_keys(model: nn.Module, state_dict: Mapping[str, torch.Tensor], config_name: str,
               advice: str | None = None, *, expected: Mapping[str, torch.Tensor] | None = None
               ) -> dict[str, torch.Tensor]:
    """The state dict to assign, after the allow-list; a LoadError naming the differences otherwise, ending with
    `advice` (default: the config that the checkpoint's keys point to). `expected`: `model.state_dict()`, when the
    caller has it already."""
    expected = model.state_dict() if expected is None else expected
    kept = {key: value for key, value in state_dict.items() if not HARMLESS_KEYS.match(key) or key in expected}
    missing = sorted(key for key in expected if key not in kept and not is_schedule_key(key))
    unexpected = sorted(key for key in kept if key not in expected)
    mis_shaped = sorted(key for key in kept if key in expected and kept[key].shape != expected[key].shape)
    # integer or bool tensors where the model holds floating-point ones: a crafted or broken file
    mistyped = sorted(key for key in kept if key in expected and key not in mis_shaped
                      and kept[key].is_floating_point() != expected[key].is_floating_point())
    if not (missing or unexpected or mis_shaped or mistyped):
        return kept
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing ({_examples(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected ({_examples(unexpected)})")
    if mis_shaped:
        shown = [f"{key} {list(kept[key].shape)} vs {list(expected[key].shape)}" for key in mis_shaped[:2]]
        problems.append(f"{len(mis_shaped)} of another shape ({'; '.join(shown)})")
    if mistyped:
        shown = [f"{key} {kept[key].dtype} vs {expected[key].dtype}" for key in mistyped[:2]]
        problems.append(f"{len(mistyped)} of another kind of number ({'; '.join(shown)})")
    if advice is None and not (missing or unexpected or mis_shaped):
        advice = "the file is damaged or crafted: use a checkpoint from a source you trust"
    if advice is None:
        advice = "check that --config matches the checkpoint"
        try:
            family = detect_family({key: tuple(value.shape) for key, value in state_dict.items()})
            advice = ADVICE.get(family, advice)
        except LoadError as error:
            advice = str(error)
    raise LoadError(f"the checkpoint does not fit {config_name}: " + ", ".join(problems) + f"; {advice}")


def assign_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], device: torch.device,
                   dtype: torch.dtype, *, expected: Mapping[str, torch.Tensor] | None = None) -> None:
    """Put the checkpoint's tensors in place of the meta parameters, converted straight to device and dtype.

    Tensors already in the right dtype on the CPU are used as they are (views of the memory-mapped file, read on
    first use); converted ones give their mapped pages back as they go, so a converting load peaks near the size
    of the result rather than file plus result. `expected`: `model.state_dict()`, when the caller has it already.
    """
    expected = model.state_dict() if expected is None else expected
    releaser = PageReleaser()
    converted = {}
    for key, reference in expected.items():
        value = state_dict.get(key, reference)
        if is_schedule_key(key):  # float32 whatever the weights' precision: samplers do their algebra in them
            target_dtype = torch.float32
        else:
            target_dtype = dtype if value.is_floating_point() else value.dtype
        converted[key] = value.to(device=device, dtype=target_dtype)
        if converted[key] is not value:
            releaser.release(value)
    model.load_state_dict(converted, strict=True, assign=True)
    tensors = [*model.named_parameters(), *model.named_buffers()]
    leftovers = [name for name, tensor in tensors if tensor.is_meta]
    if leftovers:
        raise RuntimeError(f"internal error: tensors left on the meta device (neither in the checkpoint nor computed "
                           f"by the model's constructor): {_examples(leftovers)}")
    if any(not _is_on(tensor, device) for _, tensor in tensors):
        model.to(device)  # buffers that are not in the state dict (noise levels computed from the config)


def _is_on(tensor: torch.Tensor, device: torch.device) -> bool:
    """Whether `tensor` is on `device` (a device without an index: on one of that type, as the weights moved there)."""
    return tensor.device.type == device.type and device.index in (None, tensor.device.index)


def load_model(ckpt: str | os.PathLike, config: str | os.PathLike | Mapping | None = None, *,
               device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, use_ema: bool | None = None,
               v_prediction: bool | None = None, vae: str | os.PathLike | None = None,
               unet: str | os.PathLike | None = None, timings: dict[str, float] | None = None,
               trust_config: bool = False) -> nn.Module:
    """Read `ckpt`, build the model its config describes, load strictly, and return it in eval mode on `device`.

    `use_ema`: take the `model_ema.*` weights (default: the config's `use_ema`). `v_prediction`: for a v2 checkpoint
    without `config`, choose the v-prediction config (default: by the file name, "768" means v). `vae`: a separate
    autoencoder whose weights replace the checkpoint's, `unet` a separate UNet (SDXL-Lightning's and Hyper-SD's
    UNet-only files), each a file in the released or diffusers' names or a diffusers folder
    (`ldm.weight_parts`). `timings` receives "read", "build" and "move" seconds.
    `config` may also be a config already loaded with OmegaConf (as the CompVis scripts hold it). `trust_config`:
    build whatever classes the config names and resolve its interpolations; otherwise a config builds only this
    project's classes (see `ldm.util.instantiate_from_config`).
    """
    device = torch.device(device)
    start = time.perf_counter()
    model_config, config_name, state_dict = _prepare(ckpt, config, use_ema, v_prediction, vae, unet,
                                                     trust_config=trust_config)
    read_done = time.perf_counter()
    model = _build(model_config, config_name, trust_config)
    build_done = time.perf_counter()
    expected = model.state_dict()
    assign_weights(model, check_keys(model, state_dict, config_name, expected=expected), device, dtype,
                   expected=expected)
    model.eval().requires_grad_(False)
    if timings is not None:
        timings.update(read=read_done - start, build=build_done - read_done, move=time.perf_counter() - build_done)
    return model


def check_loadable(ckpt: str | os.PathLike, config: str | os.PathLike | Mapping | None = None, *,
                   use_ema: bool | None = None, v_prediction: bool | None = None,
                   vae: str | os.PathLike | None = None, unet: str | os.PathLike | None = None,
                   trust_config: bool = False) -> nn.Module:
    """A LoadError for whatever `load_model` with these arguments would refuse, found from the files' layouts without
    reading a weight. Returns the model with its parameters on the meta device, to check what else must fit it
    (LoRA files, embeddings) before loading."""
    model_config, config_name, state_dict = _prepare(ckpt, config, use_ema, v_prediction, vae, unet,
                                                     shapes_only=True, trust_config=trust_config)
    model = _build(model_config, config_name, trust_config)
    check_keys(model, state_dict, config_name)
    return model


def _prepare(ckpt: str | os.PathLike, config: str | os.PathLike | Mapping | None, use_ema: bool | None,
             v_prediction: bool | None, vae: str | os.PathLike | None, unet: str | os.PathLike | None,
             shapes_only: bool = False, trust_config: bool = False) -> tuple[Any, str, dict[str, torch.Tensor]]:
    """(model config, its name for messages, the tensors to load: EMA weights chosen, --vae and --unet merged)."""
    try:
        state_dict = read_weights(ckpt, shapes_only)
    except CheckpointError as error:
        raise LoadError(str(error)) from None
    state_dict = normalise_text_layout(state_dict)
    if isinstance(config, Mapping) or hasattr(config, "keys"):
        config_name, model_config = "the given config", config["model"]
    else:
        config_path = resolve_config(ckpt, config, v_prediction, shapes=_shapes_with_unet(state_dict, unet))
        config_name, model_config = f"config {config_path.name}", load_config(config_path, trust_config).model
    want_ema = bool(model_config.get("params", {}).get("use_ema", False)) if use_ema is None else use_ema
    state_dict = select_ema(state_dict, want_ema)
    try:
        for path, part in ((vae, VAE_PART), (unet, UNET_PART)):
            if path is not None:
                state_dict = merge_part(state_dict, path, part, shapes_only)
    except PartError as error:
        raise LoadError(str(error)) from None
    return model_config, config_name, state_dict


def _shapes_with_unet(state_dict: Mapping[str, torch.Tensor], unet: str | os.PathLike | None
                      ) -> dict[str, tuple[int, ...]]:
    """The shapes a config is chosen by: the checkpoint's, its UNet's replaced by the --unet file's (which decides
    the UNet's structure, an LCM's guidance embedding included)."""
    shapes = {key: tuple(value.shape) for key, value in state_dict.items()}
    if unet is None:
        return shapes
    try:
        replacement = part_weights(unet, UNET_PART, shapes_only=True)
    except PartError as error:
        raise LoadError(str(error)) from None
    kept = {key: shape for key, shape in shapes.items() if not key.startswith(UNET_PART.prefix)}
    return {**kept, **{key: tuple(value.shape) for key, value in replacement.items()}}


def _build(model_config: Any, config_name: str, trusted: bool = False) -> nn.Module:
    """The model `model_config` describes, parameters on the meta device; LoadError when the config cannot build
    one (a target outside this project unless `trusted`, one that does not import, parameters its class does not
    take or cannot use)."""
    try:
        return instantiate_on_meta(model_config, trusted)
    except Exception as error:  # noqa: BLE001 - a config is user input: a negative or 10**400 channel count fails
        # deep in a constructor (RuntimeError, OverflowError, AssertionError, ...); all mean the config is wrong
        reason = str(error.args[0] if error.args else error).strip()  # str(KeyError) adds quotes
        reason = reason.splitlines()[0][:300] if reason else type(error).__name__
        raise LoadError(f"{config_name} cannot build its model ({reason}): check its target and params, or leave "
                        f"--config out to use the released config that fits the checkpoint") from None


def load_model_from_config(config: Any, ckpt: str | os.PathLike, verbose: bool = False,
                           device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    """The CompVis scripts' helper (`config` loaded with OmegaConf), but strict and without random initialisation."""
    return load_model(ckpt, config, device=device, dtype=dtype)
