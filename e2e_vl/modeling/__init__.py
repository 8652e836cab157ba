"""VL models: the architecture registry, the shared region encoder, heads, and Hugging Face loading."""

from e2e_vl.modeling import objectives  # noqa: F401  (registers the pre-training objectives' heads)
from e2e_vl.modeling.hf import load_bert, load_tokenizer
from e2e_vl.modeling.registry import MODELS, VLModel, build_model, register_model
from e2e_vl.modeling.vlbert import VLBert

__all__ = ["MODELS", "VLBert", "VLModel", "build_model", "load_bert", "load_tokenizer", "register_model"]
