"""Safe, strict detector checkpoints: Detectron2 .pth/.pkl, bottom-up-attention .pth, safetensors."""
from detector.checkpoint.formats import (convert_bua, file_sha256, is_bua_layout, load_data_file,
                                         read_checkpoint)
from detector.checkpoint.loading import load_checkpoint, load_state_dict_checked, save_checkpoint
from detector.checkpoint.unpickler import CheckpointError, safe_unpickle

__all__ = ["CheckpointError", "convert_bua", "file_sha256", "is_bua_layout", "load_checkpoint",
           "load_data_file", "load_state_dict_checked", "read_checkpoint", "safe_unpickle", "save_checkpoint"]
