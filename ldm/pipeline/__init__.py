"""Generation as a library: a `Request` (one batch's settings), a `Pipeline` (a model loaded once, with add-ons)
and the `Result` of each call. The scripts under `scripts/` turn flags into these and write the files.

    from ldm.pipeline import Pipeline, Request

    pipeline = Pipeline.from_checkpoint("models/ldm/stable-diffusion-v1/model.ckpt", device="cuda")
    result = pipeline(Request("a painting of a fox", seed=7, batch_size=2, steps=30, sampler="dpmpp_2m_karras"))
    for index, image in enumerate(result.images):
        image.save(f"fox-{index}.png")
"""
from ldm.pipeline.addons.base import AddOn, SampleCall
from ldm.pipeline.addons.controlnet import ControlNet
from ldm.pipeline.addons.embeddings import Embeddings
from ldm.pipeline.addons.hires import HiresFix
from ldm.pipeline.addons.init_image import InitImage, Inpaint
from ldm.pipeline.addons.lora import Loras, prompt_lora_tags
from ldm.pipeline.addons.refiner import Refiner
from ldm.pipeline.addons.upscale import Upscale
from ldm.pipeline.errors import GenerationError, UsageError
from ldm.pipeline.pipeline import Options, Pipeline, Result, Setup
from ldm.pipeline.request import Request

__all__ = ["AddOn", "ControlNet", "Embeddings", "GenerationError", "HiresFix", "InitImage", "Inpaint", "Loras",
           "Options", "Pipeline", "Refiner", "Request", "Result", "SampleCall", "Setup", "Upscale", "UsageError",
           "prompt_lora_tags"]
