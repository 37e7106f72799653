"""Foundation-model loading (local files only), small CLIPs from config, kept-token hooks."""
from .loader import FoundationModel, ModelNotFound, load_foundation_model
from .world_clip import ClipArch, build_clip, tiny_arch

__all__ = ["ClipArch", "FoundationModel", "ModelNotFound", "build_clip", "load_foundation_model", "tiny_arch"]
