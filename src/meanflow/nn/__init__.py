"""Networks obeying ``model(z, r, t, y=None) -> u``; none of them imports an objective."""

from .embeddings import TIME_INPUTS, TimeEmbedding
from .mlp import MLP

__all__ = ["MLP", "TimeEmbedding", "TIME_INPUTS"]
