from .args import MoTModelArgs
from .model import MoTBlock, MoTTransformer
from .routing import build_routing, Routing

__all__ = ["MoTModelArgs", "MoTTransformer", "MoTBlock", "Routing", "build_routing"]
