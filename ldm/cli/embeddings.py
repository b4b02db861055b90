"""--embeddings: textual-inversion files read and checked before the model loads, loaded into it (and the refiner)
after, and named with their hashes in the metadata of the images whose prompts use them."""
from __future__ import annotations

from typing import Iterable, Sequence

from torch import nn

from ldm.cli.arguments import UsageError


class RunEmbeddings:
    """The run's embeddings; `tokenizer` reads their names as the loaded model will (for the long-prompt notes)."""

    def __init__(self, values: Sequence[str] | None):
        from ldm.textual_inversion import EmbeddingError, prompt_tokenizer, read_embeddings

        try:
            self.embeddings = read_embeddings(values or [])
        except EmbeddingError as error:
            raise UsageError(f"--embeddings: {error}") from None
        self.tokenizer = prompt_tokenizer(self.embeddings)
        self.hashes: dict[str, str] = {}

    def check(self, model: nn.Module) -> None:
        """UsageError unless every embedding fits `model` (which may hold its parameters on the meta device)."""
        from ldm.textual_inversion import EmbeddingError, check_textual_inversion

        for embedding in self.embeddings:
            try:
                check_textual_inversion(model, embedding)
            except EmbeddingError as error:
                raise UsageError(f"--embeddings: {error}") from None

    def load_into(self, model: nn.Module) -> None:
        from ldm.textual_inversion import EmbeddingError, load_textual_inversion

        for embedding in self.embeddings:
            try:
                load_textual_inversion(model, embedding)
            except EmbeddingError as error:
                raise UsageError(f"--embeddings: {error}") from None

    def summary(self) -> str:
        return ", ".join(f"{embedding.name} ({embedding.num_vectors})" for embedding in self.embeddings)

    def record_text(self, texts: Iterable[str]) -> str | None:
        """"name: hash, ..." of the embeddings `texts` use (the "TI hashes" other tools write), or None."""
        from ldm.checkpoints import model_hash
        from ldm.textual_inversion import embeddings_used

        used = embeddings_used(self.tokenizer, self.embeddings, texts)
        for embedding in used:
            if embedding.name not in self.hashes:
                self.hashes[embedding.name] = model_hash(embedding.path)
        return ", ".join(f"{embedding.name}: {self.hashes[embedding.name]}" for embedding in used) or None

    def missing(self, recorded: str | None) -> list[str]:
        """Names in a recorded "name: hash, ..." text that this run does not load."""
        loaded = {embedding.name for embedding in self.embeddings}
        names = [part.rpartition(":")[0].strip() for part in (recorded or "").split(",") if part.strip()]
        return [name for name in names if name not in loaded]
