"""How each image was made: the PNG "parameters" text other tools read, and a `.yaml` sidecar with the same data.

The text follows the widely read format:
    <prompt>
    Negative prompt: <negative prompt>
    Steps: 50, Sampler: DDIM, CFG scale: 7.5, Seed: 1234, Size: 512x512, Model hash: abcdef1234, Model: sd-v1-4, Eta: 0
Size is width x height. Both forms read back into an `ImageRecord`, which the CLI can run again to get the same pixels.
"""
from __future__ import annotations

import io
import json
import math
import re
from dataclasses import dataclass, fields
from typing import Any, Mapping

import numpy as np
import yaml
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ldm.models.diffusion.samplers import sampler_display_name
from ldm.models.diffusion.schedule_types import a1111_sampler, infotext_schedule_type

PARAMETERS_KEY = "parameters"
VERSION = "latent-diffusion"  # the "Version" this tool writes (AUTOMATIC1111 writes "v1.10.0", Forge "f2.0.1...")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"
EXIF_IFD, USER_COMMENT = 0x8769, 0x9286  # EXIF tags: the Exif sub-IFD, its UserComment
MAX_SIDECAR_BYTES = 16 << 20  # a sidecar of one image is a few hundred bytes
NEGATIVE_PREFIX = "Negative prompt: "

# Keys sidecars carry that say which model made the image: kept for a warning, not settings.
INFO_KEYS = ("model", "model_hash", "vae", "unet", "lora", "embeddings", "file", "strength", "init_image",
             "init_image_hash", "refiner", "refiner_switch", "prompt_weighting", "mask", "mask_hash", "controlnet",
             "controlnet_hash", "control_image", "control_image_hash", "control_scale", "noise_level",
             # AUTOMATIC1111's run options and fields (infotexts and our sidecars)
             "scheduler", "clip_skip", "ensd", "rng", "subseed", "subseed_strength", "seed_resize_from_w",
             "seed_resize_from_h", "hr_scale", "hr_second_pass_steps", "hr_upscaler", "hr_resize_x", "hr_resize_y",
             "denoising_strength", "lora_hashes", "emphasis", "version", "vae_hash", "ignored_fields",
             "seed_resize_from", "img2img_steps", "clip_skip_sdxl")

INFO_NUMBERS = ("strength", "refiner_switch", "control_scale", "noise_level", "clip_skip", "ensd", "subseed",
                "subseed_strength", "seed_resize_from_w", "seed_resize_from_h", "hr_scale", "hr_second_pass_steps",
                "hr_resize_x", "hr_resize_y", "denoising_strength")  # the other INFO_KEYS are text
INFO_FLAGS = ("prompt_weighting", "clip_skip_sdxl")


class PromptFileError(ValueError):
    """A prompt file that cannot be used; the message names the file (and line) and what is wrong."""



def checked_info(mapping: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The INFO_KEYS entries of `mapping` that are not None, type-checked: numbers, true/false flags, and text (a
    number where text belongs, as yaml reads a model named 1234, becomes that text); PromptFileError otherwise."""
    info = {}
    for key in INFO_KEYS:
        value = mapping.get(key)
        if value is None:
            continue
        if key in INFO_FLAGS:
            valid, wanted = isinstance(value, bool), "true or false"
        elif key in INFO_NUMBERS:
            valid = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            wanted = "a finite number"
        else:
            valid, wanted = isinstance(value, (str, int, float)) and not isinstance(value, bool), "text"
            value = str(value) if valid else value
        if not valid:
            raise PromptFileError(f"{source}: {key} must be {wanted}, got {value!r}")
        info[key] = value
    return info


@dataclass(frozen=True)
class ExtraField:
    """A setting an add-on records beside the base ones: its sidecar key and value (not in the sidecar when `key` is
    empty), and its "parameters" label and text (not printed when `text` is empty)."""

    key: str
    value: Any
    label: str = ""
    text: str = ""


@dataclass
class ImageRecord:
    """Everything that decides an image's pixels (with the model), plus the model's identity; `extras` are what the
    add-ons (init image, mask, ControlNet, refiner, ...) record, in their order."""

    prompt: str
    negative_prompt: str
    steps: int
    sampler: str
    scale: float
    seed: int
    H: int
    W: int
    eta: float | None  # None: the sampler's own default (deterministic samplers take none)
    model: str = ""
    model_hash: str = ""
    vae: str | None = None
    unet: str | None = None  # the file that replaced the checkpoint's UNet (--unet)
    lora: str | None = None  # "name:weight, ..." of the LoRA files merged into the model
    embeddings: str | None = None  # "name: hash, ..." of the textual-inversion embeddings the prompts use
    prompt_weighting: bool = False  # prompts read with A1111's weights and chunks (--prompt_weighting)
    extras: tuple[ExtraField, ...] = ()

    def to_mapping(self) -> dict[str, Any]:
        mapping = {field.name: getattr(self, field.name) for field in fields(self) if field.name != "extras"}
        if not self.prompt_weighting:  # plain reading (CompVis'): sidecars stay as they were before the flag
            del mapping["prompt_weighting"]
        if self.embeddings is None:  # likewise without --embeddings
            del mapping["embeddings"]
        if self.unet is None:  # and without --unet
            del mapping["unet"]
        mapping.update((extra.key, extra.value) for extra in self.extras if extra.key)
        return mapping

    def extra_parameters(self) -> list[tuple[str, str]]:
        """(label, text) pairs the add-ons add at the end of the "parameters" text (img2img: its strength)."""
        return [(extra.label, extra.text) for extra in self.extras if extra.text]


def request_fields(request: Any, index: int) -> list[ExtraField]:
    """What a request's options beyond the base settings add to the record of its image `index`, with
    AUTOMATIC1111's names: the variation seed and strength, "Seed resize from", "ENSD" where its sampler draws
    noise, "Clip skip", "RNG" unless the source is its default (gpu)."""
    extras = []
    if request.subseed_strength > 0:
        subseed = request.subseeds[index]
        extras += [ExtraField("subseed", subseed, "Variation seed", str(subseed)),
                   ExtraField("subseed_strength", request.subseed_strength, "Variation seed strength",
                              _number(request.subseed_strength))]
    if request.seed_resize_from:
        width, height = request.seed_resize_from
        extras.append(ExtraField("seed_resize_from", f"{width}x{height}", "Seed resize from", f"{width}x{height}"))
    if request.ensd and records_ensd(request.sampler, request.ensd, request.eta):
        extras.append(ExtraField("ensd", request.ensd, "ENSD", str(request.ensd)))
    if request.scheduler is not None:
        label = infotext_schedule_type(sampler_display_name(request.sampler), request.scheduler)
        extras.append(ExtraField("scheduler", request.scheduler, "Schedule type", label))
    if request.clip_skip > 1:
        extras.append(ExtraField("clip_skip", request.clip_skip, "Clip skip", str(request.clip_skip)))
    if request.clip_skip_sdxl:  # A1111's option, which it does not write: this tool records it to make the image again
        extras.append(ExtraField("clip_skip_sdxl", True, "Clip skip SDXL", "true"))
    if request.rng != "gpu":
        extras.append(ExtraField("rng" if request.rng != "cpu" else "", request.rng, "RNG", request.rng.upper()))
    return extras


def records_ensd(sampler: str, ensd: int, eta: float | None) -> bool:
    """Whether AUTOMATIC1111 would write "ENSD" for `sampler` (samplers it does not have: whenever `ensd` is set)."""
    try:
        return a1111_sampler(sampler_display_name(sampler)).records_ensd(ensd, eta)
    except ValueError:
        return ensd != 0


def _number(value: float) -> str:
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def _quote(value: str) -> str:
    """Values holding the separators are JSON-quoted, as the readers of this format expect."""
    return json.dumps(value, ensure_ascii=False) if any(c in value for c in ',:"\n') else value


def squeezed(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def parameters_text(record: ImageRecord) -> str:
    """The "parameters" text of `record`."""
    lines = [record.prompt]
    if record.negative_prompt:
        lines.append(NEGATIVE_PREFIX + record.negative_prompt)
    pairs = [("Steps", str(record.steps)), ("Sampler", sampler_display_name(record.sampler)),
             ("CFG scale", _number(record.scale)), ("Seed", str(record.seed)), ("Size", f"{record.W}x{record.H}")]
    if record.model_hash:
        pairs.append(("Model hash", record.model_hash))
    if record.model:
        pairs.append(("Model", record.model))
    if record.vae:
        pairs.append(("VAE", record.vae))
    if record.unet:
        pairs.append(("UNet", record.unet))
    if record.lora:
        pairs.append(("Lora", record.lora))
    if record.embeddings:
        pairs.append(("TI hashes", record.embeddings))
    if record.eta is not None:  # AUTOMATIC1111 calls DDIM's eta "Eta DDIM"
        pairs.append(("Eta DDIM" if squeezed(record.sampler) == "ddim" else "Eta", _number(record.eta)))
    if record.prompt_weighting:
        pairs += [("Prompt weighting", "true"), ("Emphasis", "Original")]
    pairs.extend(record.extra_parameters())
    pairs.append(("Version", VERSION))
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in pairs))
    return "\n".join(lines)


_PAIR = re.compile(r'\s*([\w][\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


# AUTOMATIC1111's infotext fields this tool applies, beside its own (label -> sidecar key, conversion)
A1111_FIELDS: dict[str, tuple[str, Any]] = {
    "Schedule type": ("scheduler", str), "Clip skip": ("clip_skip", int), "ENSD": ("ensd", int),
    "RNG": ("rng", lambda value: value.strip().lower()), "Variation seed": ("subseed", int),
    "Variation seed strength": ("subseed_strength", float), "Hires upscale": ("hr_scale", float),
    "Hires steps": ("hr_second_pass_steps", int), "Hires upscaler": ("hr_upscaler", str),
    "Eta DDIM": ("eta_ddim", float), "Lora hashes": ("lora_hashes", str), "Emphasis": ("emphasis", str),
    "Version": ("version", str), "VAE hash": ("vae_hash", str),
    "Img2img steps": ("img2img_steps", lambda value: value.strip().lower()),  # this tool's, for --img2img_steps
    "Clip skip SDXL": ("clip_skip_sdxl", lambda value: value.strip().lower() == "true"),  # this tool's
}
SIZE_FIELDS = {"Size": ("W", "H"), "Seed resize from": ("seed_resize_from_w", "seed_resize_from_h"),
               "Hires resize": ("hr_resize_x", "hr_resize_y")}
KNOWN_UNUSED = ("Init image hash",)  # recorded by img2img runs, compared by the scripts


def parse_parameters_text(text: str) -> dict[str, Any]:
    """The fields of a "parameters" text, named as in the sidecar (prompt, negative_prompt, steps, sampler, ...)."""
    lines = text.split("\n")
    pairs: dict[str, str] = {}
    if lines and len(_PAIR.findall(lines[-1])) >= 3:
        for key, value in _PAIR.findall(lines.pop()):
            try:
                pairs[key.strip()] = json.loads(value) if value.startswith('"') else value.strip()
            except ValueError:
                raise ValueError(f"the value of {key.strip()}, {value}, is not a complete quoted text") from None
    negative_at = next((i for i, line in enumerate(lines) if line.startswith(NEGATIVE_PREFIX)), len(lines))
    result: dict[str, Any] = {"prompt": "\n".join(lines[:negative_at]),
                              "negative_prompt": "\n".join(lines[negative_at:])[len(NEGATIVE_PREFIX):]}
    converters = {"Steps": ("steps", int), "Sampler": ("sampler", str), "CFG scale": ("scale", float),
                  "Seed": ("seed", int), "Model hash": ("model_hash", str), "Model": ("model", str),
                  "VAE": ("vae", str), "UNet": ("unet", str), "Lora": ("lora", str),
                  "TI hashes": ("embeddings", str), "Eta": ("eta", float),
                  "Denoising strength": ("strength", float), "Init image": ("init_image", str),
                  "Init image hash": ("init_image_hash", str), "Mask": ("mask", str), "Mask hash": ("mask_hash", str),
                  "Refiner": ("refiner", str),
                  "Refiner switch at": ("refiner_switch", float),
                  "ControlNet": ("controlnet", str), "ControlNet hash": ("controlnet_hash", str),
                  "Control image": ("control_image", str), "Control image hash": ("control_image_hash", str),
                  "Control scale": ("control_scale", float), "Noise level": ("noise_level", int),
                  "Prompt weighting": ("prompt_weighting", lambda value: value == "true"),
                  **A1111_FIELDS}
    for key, (name, convert) in converters.items():
        if key in pairs:
            try:
                result[name] = convert(pairs[key])
            except ValueError:
                raise ValueError(f"{key} {pairs[key]!r} is not {'a number' if convert in (int, float) else 'valid'}") \
                    from None
    for key, names in SIZE_FIELDS.items():
        if key in pairs:
            width, _, height = pairs[key].partition("x")
            if not (width.isdigit() and height.isdigit()):
                raise ValueError(f"{key} {pairs[key]!r} is not WIDTHxHEIGHT")
            result[names[0]], result[names[1]] = int(width), int(height)
    if result.get("version") == VERSION:
        del result["version"]  # this tool's own text: nothing to keep
    if "Eta DDIM" in pairs and str(result.get("sampler", "")).upper().startswith("DDIM"):
        result["eta"] = result.pop("eta_ddim")
    ignored = [key for key in pairs if key not in converters and key not in SIZE_FIELDS and key not in KNOWN_UNUSED]
    if ignored:
        result["ignored_fields"] = ", ".join(ignored)
    return result


def encode_png(pixels: np.ndarray, parameters: str | None) -> bytes:
    """PNG bytes of uint8 `pixels` [H, W, 3], with the "parameters" text chunk unless `parameters` is None."""
    info = None
    if parameters is not None:
        info = PngInfo()
        info.add_text(PARAMETERS_KEY, parameters)  # tEXt, or iTXt when the text is not Latin-1
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def read_png_parameters(path: str) -> str | None:
    with Image.open(path) as image:
        return image.info.get(PARAMETERS_KEY)


def read_exif_parameters(path: str) -> str | None:
    """The "parameters" text AUTOMATIC1111 stores in a JPEG's or WebP's EXIF UserComment (piexif's layout: an 8-byte
    character-code header, then UTF-16 big-endian for "UNICODE", ASCII otherwise); None without one."""
    try:
        with Image.open(path) as image:
            comment = image.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT)
    except (OSError, Image.DecompressionBombError) as error:
        raise ValueError(f"cannot read {path}: {str(error).split(', could be')[0]}") from None
    if isinstance(comment, str):
        return comment or None
    if not isinstance(comment, bytes) or len(comment) <= 8:
        return None
    code, body = comment[:8], comment[8:]
    if code.startswith(b"UNICODE"):
        return body.decode("utf-16-be" if not body.startswith(b"\xff\xfe") else "utf-16", errors="replace")
    return body.decode("utf-8", errors="replace").rstrip("\0")


def sidecar_text(data: Mapping[str, Any]) -> str:
    return yaml.safe_dump(dict(data), sort_keys=False, allow_unicode=True, width=10**6)


def read_metadata_file(path: str) -> dict[str, Any]:
    """Fields from a sidecar `.yaml` or from a PNG's "parameters" chunk; ValueError with a message otherwise."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(len(PNG_SIGNATURE))
            if data != PNG_SIGNATURE:  # a sidecar; a checkpoint given by mistake is not read whole
                data += handle.read(MAX_SIDECAR_BYTES)
    except OSError as error:
        raise ValueError(f"cannot read metadata from {path}: {error.strerror or error}") from None
    if data == PNG_SIGNATURE:
        try:
            text = read_png_parameters(path)
        except (OSError, Image.DecompressionBombError) as error:  # the bomb's text goes on about attacks
            raise ValueError(f"cannot read {path}: {str(error).split(', could be')[0]}") from None
        if text is None:
            raise ValueError(f"{path} has no \"parameters\" text chunk (was it saved with --no_metadata?)")
        try:
            record = parse_parameters_text(text)
        except ValueError as error:
            raise ValueError(f"{path}: its \"parameters\" text cannot be read: {error}") from None
    elif path.lower().endswith(".png"):
        raise ValueError(f"{path} is not a PNG image (its first bytes are not a PNG's): pass a PNG this tool saved, "
                         f"or its .yaml sidecar")
    elif data.startswith(JPEG_SIGNATURE) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
        text = read_exif_parameters(path)
        if text is None:
            raise ValueError(f"{path} holds no parameters text in its EXIF UserComment (AUTOMATIC1111 writes one "
                             f"there in JPEG and WebP images)")
        try:
            record = parse_parameters_text(text)
        except ValueError as error:
            raise ValueError(f"{path}: its parameters text cannot be read: {error}") from None
    elif looks_like_infotext(data):  # a text file holding a "parameters" text (copied from a web page)
        try:
            record = parse_parameters_text(data.decode("utf-8-sig").strip())
        except ValueError as error:
            raise ValueError(f"{path}: its parameters text cannot be read: {error}") from None
    else:
        try:
            record = yaml.safe_load(data.decode("utf-8-sig"))
        except UnicodeDecodeError:
            raise ValueError(f"{path} is neither a .yaml sidecar, a parameters text, nor a PNG, JPEG or WebP image "
                             f"holding one: pass the image itself or its .yaml sidecar") from None
        except yaml.YAMLError as error:
            raise ValueError(f"{path} is not valid yaml: {str(error).splitlines()[0]}") from None
        if not isinstance(record, dict) or "prompt" not in record:
            raise ValueError(f"{path} is not an image sidecar: expected a yaml mapping with a 'prompt' key")
    return {**record, **checked_info(record, path)}


def named_hashes(text: str | None) -> dict[str, str]:
    """{name: hash} of a recorded "name: hash, name: hash" text ("Lora hashes", "TI hashes")."""
    pairs = (part.strip().rpartition(":") for part in (text or "").split(",") if part.strip())
    return {name.strip(): value.strip() for name, _, value in pairs if name.strip()}


def looks_like_infotext(data: bytes) -> bool:
    """Whether `data` is a "parameters" text: UTF-8 whose last line holds Steps, Sampler and Seed pairs."""
    try:
        last = data.decode("utf-8-sig").strip().rsplit("\n", 1)[-1]
    except UnicodeDecodeError:
        return False
    keys = {key.strip() for key, _ in _PAIR.findall(last)}
    return {"Steps", "Seed"} <= keys


def made_by(record: Mapping[str, Any]) -> str:
    """The script that made a recorded image: a noise level means upscale.py, a mask inpaint.py, a strength
    img2img.py, else txt2img.py."""
    if "noise_level" in record:
        return "upscale.py"
    hires = any(key in record for key in ("hr_scale", "hr_resize_x", "hr_upscaler", "denoising_strength"))
    return "inpaint.py" if record.get("mask") else "img2img.py" if "strength" in record and not hires else \
        "txt2img.py"


def check_made_by(record: Mapping[str, Any], source: str, prog: str) -> None:
    """ValueError naming the right script when `source`'s image was made by another one than `prog`."""
    script = made_by(record)
    if script != prog:
        raise ValueError(f"{source} was made by {script}: make it again with scripts/{script} --metadata_from {source}")
