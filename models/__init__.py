"""The GPT family: named configs, one model file, Hugging Face import and export."""

from models.config import PUBLISHED_N_PARAMS, REGISTRY, ModelConfig, UnknownModelError
from models.gpt import GPT, Documents, loss_fn

__all__ = [
    "GPT",
    "Documents",
    "PUBLISHED_N_PARAMS",
    "REGISTRY",
    "ModelConfig",
    "UnknownModelError",
    "load_hf",
    "loss_fn",
    "save_hf",
]


def load_hf(directory):  # noqa: ANN001, ANN201 - thin lazy re-export, documented in models.hf
    from models.hf import load_hf as _load_hf

    return _load_hf(directory)


def save_hf(model, directory):  # noqa: ANN001, ANN201
    from models.hf import save_hf as _save_hf

    return _save_hf(model, directory)
