"""Textual-inversion embeddings: files read and checked when the add-on is made, their tokens given to every text
encoder the pipeline holds (the refiner's too), and named with their hashes in the metadata of the images whose
prompts use them."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Sequence

from ldm.checkpoints import embedding_hash
from ldm.pipeline.addons.base import AddOn
from ldm.pipeline.errors import UsageError
from ldm.pipeline.metadata import named_hashes
from ldm.textual_inversion import (EmbeddingError, check_textual_inversion, embeddings_used, load_textual_inversion,
                                   prompt_tokenizer, read_embeddings)

if TYPE_CHECKING:
    from ldm.pipeline.pipeline import Pipeline, Setup
    from ldm.pipeline.request import Request


class Embeddings(AddOn):
    """The embeddings of `paths` (files or folders); `tokenizer` reads their names as the loaded model will."""

    load_order = 1  # after the models other add-ons bring (a refiner's text encoders take them too)

    def __init__(self, paths: Sequence[str] | None):
        try:
            self.embeddings = read_embeddings(list(paths or []))
        except EmbeddingError as error:
            raise UsageError(f"--embeddings: {error}") from None
        self.tokenizer = prompt_tokenizer(self.embeddings)
        self.hashes: dict[str, str] | None = {}  # None: records carry no hashes

    @property
    def names(self) -> list[str]:
        return [embedding.name for embedding in self.embeddings]

    def check(self, setup: Setup, requests: Sequence[Request]) -> None:
        for embedding in self.embeddings:
            try:
                check_textual_inversion(setup.skeleton, embedding)
            except EmbeddingError as error:
                raise UsageError(f"--embeddings: {error}") from None

    def load(self, pipeline: Pipeline) -> None:
        for model in pipeline.models:
            for embedding in self.embeddings:
                try:
                    load_textual_inversion(model, embedding)
                except EmbeddingError as error:
                    raise UsageError(f"--embeddings: {error}") from None
        if self.embeddings:
            pipeline.info(f"Embeddings: {self.summary()}")
        if not pipeline.options.hash_files:
            self.hashes = None

    def summary(self) -> str:
        return ", ".join(f"{embedding.name} ({embedding.num_vectors})" for embedding in self.embeddings)

    def record_text(self, texts: Iterable[str]) -> str | None:
        """"name: hash, ..." of the embeddings `texts` use (AUTOMATIC1111's "TI hashes", 12 hex digits), or None."""
        used = embeddings_used(self.tokenizer, self.embeddings, texts)
        hashes = self.hashes if self.hashes is not None else {}
        for embedding in used:
            if embedding.name not in hashes:
                hashes[embedding.name] = embedding_hash(embedding.path)
        return ", ".join(f"{embedding.name}: {hashes[embedding.name]}" for embedding in used) or None

    def record(self, request: Request, index: int) -> dict[str, Any]:
        if self.hashes is None:
            return {}
        return {"embeddings": self.record_text((request.prompts[index], request.negative_prompts[index]))}

    def missing(self, recorded: str | None) -> list[str]:
        """Names in a recorded "name: hash, ..." text that this add-on does not load."""
        return [name for name in named_hashes(recorded) if name not in self.names]
