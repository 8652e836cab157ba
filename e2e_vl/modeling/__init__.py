"""VL-BERT: visual embedding, the model with the detector in the loop, heads and losses."""

from e2e_vl.modeling.vlbert import VLBert, build_vlbert, load_bert, load_tokenizer

__all__ = ["VLBert", "build_vlbert", "load_bert", "load_tokenizer"]
