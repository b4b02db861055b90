"""Textual-inversion embeddings: words whose token vectors were learned, written in prompts by their names.

Loading one into a model gives each of its text encoders the vectors: the tokenizer reads each whole-word occurrence
of the name as placeholder ids, one per vector, and the token embedding looks those ids up among its added vectors
(`ldm.modules.encoders.clip_text.TokenEmbedding`). Prompts that do not use the name encode exactly as before, and
the vectors count towards the 75 tokens a prompt may have.

Files (read by `ldm.checkpoints`, pickles weights-only):
- A1111 `.pt`: {"string_to_param": {"*": [N, D]}, "name": ...}
- A1111 `.safetensors`: {"emb_params": [N, D]}
- diffusers `learned_embeds.bin` / `.safetensors`: {token: [D] or [N, D]}, and any file holding one tensor
- SDXL: {"clip_l": [N, 768], "clip_g": [N, 1280]}, one set per text encoder (the refiner takes clip_g)
The name is the file's stem; a diffusers `learned_embeds.*` file is named by the token it holds.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from ldm.checkpoints import CheckpointError, read_object
from ldm.modules.encoders.clip_text import CLIPTextModel, TokenEmbedding
from ldm.modules.encoders.clip_tokenizer import CLIPTokenizer, clean_text

EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors")
DIFFUSERS_FILE_STEM = "learned_embeds"
# which released text encoder a width belongs to, to say what a file of the wrong width is for
FAMILY_BY_WIDTH = {768: "SD 1.x (CLIP ViT-L)", 1024: "SD 2.x (OpenCLIP ViT-H)", 1280: "SDXL's clip_g (OpenCLIP bigG)"}
SDXL_KEYS = ("clip_l", "clip_g")
SINGLE = ""  # the key of a file's vectors when it holds one set for any one-encoder model
MAX_VECTORS = 75  # a prompt holds 75 tokens, so no more vectors can be used
MAX_WIDTH = 4096  # wider than any text encoder's tokens (SDXL's bigG: 1280)


class EmbeddingError(ValueError):
    """An embedding file that cannot be used (with this model); the message names the file and what to do."""


@dataclass(frozen=True)
class TextualInversion:
    name: str
    vectors: dict[str, torch.Tensor]  # SINGLE, or "clip_l" / "clip_g" (SDXL) -> [N, width]
    path: Path | None = None

    @property
    def num_vectors(self) -> int:
        return max(vectors.shape[0] for vectors in self.vectors.values())

    def describe(self) -> str:
        return f"embedding {self.path}" if self.path is not None else f"embedding {self.name!r}"


@dataclass(frozen=True)
class PromptEncoder:
    """One text encoder as embeddings see it: SDXL files name it `label` ("clip_l": OpenAI CLIP, "clip_g": OpenCLIP)."""
    label: str
    tokenizer: CLIPTokenizer
    token_embedding: TokenEmbedding


def family_of(width: int) -> str:
    return FAMILY_BY_WIDTH.get(width, "no released Stable Diffusion model")


def as_matrix(value: Any, where: str) -> torch.Tensor:
    """A [D] or [N, D] tensor of finite floating-point numbers as float32 [N, D]."""
    if not torch.is_tensor(value) or value.ndim not in (1, 2) or value.numel() == 0:
        shape = list(value.shape) if torch.is_tensor(value) else type(value).__name__
        raise EmbeddingError(f"{where} is {shape}, not a [vectors, width] tensor")
    if not value.is_floating_point():
        raise EmbeddingError(f"{where} holds {value.dtype} numbers, not floating-point vectors: the file is damaged "
                             "or not an embedding")
    count, width = (1, value.shape[0]) if value.ndim == 1 else tuple(value.shape)
    if count > MAX_VECTORS or width > MAX_WIDTH:  # before converting: a pickled tensor may expand a tiny storage
        raise EmbeddingError(f"{where} is {list(value.shape)}: an embedding has at most {MAX_VECTORS} vectors (a "
                             f"prompt holds {MAX_VECTORS} tokens) no wider than {MAX_WIDTH}")
    matrix = value.detach().float().reshape(count, width)  # [N, D]
    if not torch.isfinite(matrix).all():
        raise EmbeddingError(f"{where} holds NaN or infinite values: the file is damaged")
    return matrix


def vectors_in(obj: Any, where: str) -> dict[str, torch.Tensor]:
    """The vectors of a loaded embedding file, by the text encoder they are for (SINGLE: any one)."""
    if not isinstance(obj, dict):
        raise EmbeddingError(f"{where} holds a {type(obj).__name__}, not an embedding's dict of tensors")
    if "string_to_param" in obj:  # A1111 .pt
        params = obj["string_to_param"]
        params = params.get("*", next(iter(params.values()), None)) if isinstance(params, dict) else params
        return {SINGLE: as_matrix(params, f"{where}: string_to_param")}
    present = [key for key in SDXL_KEYS if key in obj]
    if present:
        return {key: as_matrix(obj[key], f"{where}: {key}") for key in present}
    if "emb_params" in obj:  # A1111 .safetensors
        return {SINGLE: as_matrix(obj["emb_params"], f"{where}: emb_params")}
    tensors = [key for key, value in obj.items() if torch.is_tensor(value)]
    if len(tensors) == 1:  # diffusers: {token: vectors}
        return {SINGLE: as_matrix(obj[tensors[0]], f"{where}: {tensors[0]}")}
    raise EmbeddingError(f"{where} is not a textual-inversion embedding: it has {sorted(map(str, obj))[:5]}, not "
                         f"string_to_param, emb_params, clip_l/clip_g or a single tensor")


def read_textual_inversion(path: str | os.PathLike, name: str | None = None) -> TextualInversion:
    """The embedding in file `path`, named `name` (default: the file's stem, or a diffusers file's token)."""
    path = Path(path)
    try:
        obj = read_object(path)
    except CheckpointError as error:
        raise EmbeddingError(f"embedding {path}: {error}") from None
    vectors = vectors_in(obj, f"embedding {path}")
    if name is None:
        name = path.stem
        if path.stem == DIFFUSERS_FILE_STEM and len(obj) == 1:
            name = str(next(iter(obj)))
    if not clean_text(name, unescape_html=False):
        raise EmbeddingError(f"embedding {path}: the name {name!r} has no characters a prompt could use; rename it")
    return TextualInversion(name, vectors, path)


def embedding_files(path: str | os.PathLike) -> list[Path]:
    """`path` itself, or the embedding files (.pt, .bin, .safetensors) in folder `path` and below, sorted."""
    if not str(path).strip():  # Path("") is the current folder, which is not what anyone means
        raise EmbeddingError("an empty path was given: pass an embedding file or a folder of them")
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise EmbeddingError(f"embedding file or folder {path} does not exist")
    files = sorted(file for file in path.rglob("*") if file.is_file() and file.suffix.lower() in EMBEDDING_SUFFIXES)
    if not files:
        raise EmbeddingError(f"folder {path} holds no embedding files ({', '.join(EMBEDDING_SUFFIXES)})")
    return files


def read_embeddings(paths: Iterable[str | os.PathLike]) -> list[TextualInversion]:
    """Every embedding in the given files and folders; two that a prompt cannot tell apart are an error."""
    embeddings: dict[str, TextualInversion] = {}
    for path in paths:
        for file in embedding_files(path):
            embedding = read_textual_inversion(file)
            word = clean_text(embedding.name, unescape_html=False)
            if word in embeddings:
                raise EmbeddingError(f"{embeddings[word].path} and {file} are both named {word!r} in prompts: "
                                     f"rename or leave out one of them")
            embeddings[word] = embedding
    return list(embeddings.values())


def prompt_encoders(model: nn.Module) -> list[PromptEncoder]:
    """The text encoders of a LatentDiffusion or SDXL DiffusionEngine, in conditioning order."""
    conditioning = getattr(model, "cond_stage_model", None)
    if not isinstance(conditioning, nn.Module):
        return []
    encoders = []
    for module in conditioning.modules():
        tokenizer = getattr(module, "tokenizer", None)
        tables = [table for table in module.modules() if isinstance(table, TokenEmbedding)]
        if isinstance(tokenizer, CLIPTokenizer) and len(tables) == 1:
            label = "clip_l" if any(isinstance(part, CLIPTextModel) for part in module.modules()) else "clip_g"
            encoders.append(PromptEncoder(label, tokenizer, tables[0]))
    return encoders


def vectors_for(embedding: TextualInversion, encoder: PromptEncoder, num_encoders: int) -> torch.Tensor:
    """The vectors of `embedding` that `encoder` (one of `num_encoders`) takes, checked against its width."""
    width = encoder.token_embedding.embedding_dim
    if SINGLE in embedding.vectors:
        vectors, what = embedding.vectors[SINGLE], "its vectors are"
        if num_encoders > 1:
            raise EmbeddingError(f"{embedding.describe()} has one set of vectors, {vectors.shape[1]} wide, for "
                                 f"{family_of(vectors.shape[1])}; a model with {num_encoders} text encoders (SDXL) "
                                 f"needs a file with {' and '.join(SDXL_KEYS)} vectors")
    elif encoder.label in embedding.vectors:
        vectors, what = embedding.vectors[encoder.label], f"its {encoder.label} vectors are"
    else:
        raise EmbeddingError(f"{embedding.describe()} has {'/'.join(embedding.vectors)} vectors but none for this "
                             f"model's {encoder.label} text encoder: it is made for another model")
    if vectors.shape[1] != width:
        raise EmbeddingError(f"{embedding.describe()}: {what} {vectors.shape[1]} wide, for "
                             f"{family_of(vectors.shape[1])}; this model's text encoder is {width} wide "
                             f"({family_of(width)}): use an embedding made for this model")
    return vectors


def load_textual_inversion(model: nn.Module, embedding: TextualInversion | str | os.PathLike,
                           name: str | None = None) -> TextualInversion:
    """Make `model` (LatentDiffusion, SDXL DiffusionEngine) read `embedding` (or the file it names, called `name`)
    in prompts. Every text encoder must take it, or nothing changes and EmbeddingError says why. Loading a name
    again replaces its vectors."""
    if not isinstance(embedding, TextualInversion):
        embedding = read_textual_inversion(embedding, name)
    chosen = check_textual_inversion(model, embedding)
    for encoder, vectors in zip(prompt_encoders(model), chosen):
        encoder.tokenizer.add_placeholder(embedding.name, encoder.token_embedding.add_vectors(vectors))
    return embedding


def check_textual_inversion(model: nn.Module, embedding: TextualInversion) -> list[torch.Tensor]:
    """The vectors each text encoder of `model` takes from `embedding`, in conditioning order; EmbeddingError when
    one cannot. Only widths are looked at, so `model` may hold its parameters on the meta device."""
    encoders = prompt_encoders(model)
    if not encoders:
        raise EmbeddingError(f"{embedding.describe()}: the model has no CLIP text encoder to take it")
    return [vectors_for(embedding, encoder, len(encoders)) for encoder in encoders]


def prompt_tokenizer(embeddings: Sequence[TextualInversion]) -> CLIPTokenizer:
    """An SD 1.x tokenizer that reads the embeddings' names as a model that loaded them does, without a model: to
    count a prompt's tokens and to find the embeddings it uses."""
    tokenizer, next_id = CLIPTokenizer(), -1
    for embedding in embeddings:
        tokenizer.add_placeholder(embedding.name, range(next_id, next_id - embedding.num_vectors, -1))
        next_id -= embedding.num_vectors
    return tokenizer


def embeddings_used(tokenizer: CLIPTokenizer, embeddings: Sequence[TextualInversion],
                    texts: Iterable[str]) -> list[TextualInversion]:
    """Those of `embeddings` (known to `tokenizer`) that any of `texts` names."""
    used = {word for text in texts for word in tokenizer.placeholders_in(text)}
    return [embedding for embedding in embeddings
            if clean_text(embedding.name, tokenizer.unescape_html) in used]
