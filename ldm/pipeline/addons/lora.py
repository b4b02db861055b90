"""LoRA files merged into the weights (kohya's and diffusers' layouts; see `ldm.lora`): given as files with a weight
(`--lora FILE:W`), or named by the prompts' `<lora:name:te:unet>` tags (found in a folder)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ldm.checkpoints import lora_hash
from ldm.lora import LoraError, apply_lora, check_lora
from ldm.pipeline.addons.base import AddOn
from ldm.pipeline.errors import UsageError
from ldm.pipeline.extra_networks import LoraTag, find_lora, lora_tags
from ldm.pipeline.metadata import ExtraField

if TYPE_CHECKING:
    from ldm.pipeline.pipeline import Pipeline, Setup
    from ldm.pipeline.request import Request


def prompt_lora_tags(requests: Sequence[Request]) -> list[LoraTag]:
    """The LoRA tags every request's prompts name (the same set in each: they are merged into the weights once);
    UsageError when prompts of one run name different LoRAs or weights."""
    sets = {tuple(dict.fromkeys(tag for prompt in request.prompts for tag in lora_tags(prompt)))
            for request in requests}
    if len(sets) > 1:
        raise UsageError("the prompts of one run name different <lora:...> tags or weights, but a LoRA is merged into "
                         "the weights for the whole run: run prompts with different LoRAs separately")
    return list(sets.pop()) if sets else []


class Loras(AddOn):
    """LoRA files with their weights, merged in order before the fast paths fuse the projections they name: `specs`
    (file, weight) from flags, and the prompts' `tags` found in `folder`."""

    def __init__(self, specs: Sequence[tuple[str, float]] = (), tags: Sequence[LoraTag] = (),
                 folder: str | os.PathLike = "models/Lora"):
        self.specs = [(str(path), float(weight)) for path, weight in specs]
        for path, _ in self.specs:
            if not Path(path).is_file():
                raise UsageError(f"--lora {path}: not found (use FILE or FILE:WEIGHT, e.g. style.safetensors:0.8)")
        self.tags = list(tags)
        self.tag_files = [find_lora(tag.name, folder) for tag in self.tags]
        self.hashes: dict[str, str] = {}

    @property
    def text(self) -> str | None:
        """"name:weight, ..." of the --lora files, as the metadata records them."""
        return ", ".join(f"{Path(path).stem}:{weight:g}" for path, weight in self.specs) or None

    def merges(self) -> list[tuple[str, str, float, float]]:
        """(what the user wrote, file, UNet weight, text-encoder weight) of every LoRA to merge."""
        flags = [(f"--lora {path}", path, weight, weight) for path, weight in self.specs]
        tagged = [(f"<lora:{tag.name}>", str(path), tag.unet_weight, tag.text_encoder_weight)
                  for tag, path in zip(self.tags, self.tag_files)]
        return flags + tagged

    def check_tags(self, requests: Sequence[Request]) -> None:
        """UsageError unless the prompts of `requests` name exactly the LoRA tags this add-on merges."""
        if prompt_lora_tags(requests) != self.tags:
            raise UsageError("the prompts' <lora:...> tags are not the ones this pipeline merges: make the pipeline "
                             "with Loras(tags=prompt_lora_tags(requests))")

    def check(self, setup: Setup, requests: Sequence[Request]) -> None:
        if requests:
            self.check_tags(requests)
        for label, path, _, _ in self.merges():
            try:
                check_lora(setup.skeleton, path)
            except LoraError as error:
                raise UsageError(f"{label}: {error}") from None

    def change_weights(self, pipeline: Pipeline) -> None:
        for label, path, unet_weight, text_weight in self.merges():
            try:
                layers = apply_lora(pipeline.model, path, multiplier=unet_weight, text_encoder_multiplier=text_weight)
            except LoraError as error:
                raise UsageError(f"{label}: {error}") from None
            pipeline.info(f"LoRA {path}: {layers} layers, weight {unet_weight:g}"
                          + (f" (text encoder {text_weight:g})" if text_weight != unet_weight else ""))
        if pipeline.options.hash_files:
            names = [Path(path).stem for path, _ in self.specs] + [tag.name for tag in self.tags]
            files = [path for path, _ in self.specs] + [str(path) for path in self.tag_files]
            self.hashes = {name.translate(str.maketrans("", "", ":,")): lora_hash(path)
                           for name, path in zip(names, files)}

    def record(self, request: Request, index: int) -> dict[str, Any]:
        fields: dict[str, Any] = {"lora": self.text}
        if self.hashes:
            text = ", ".join(f"{name}: {value}" for name, value in self.hashes.items())
            fields["extras"] = [ExtraField("lora_hashes", text, "Lora hashes", text)]
        return fields
