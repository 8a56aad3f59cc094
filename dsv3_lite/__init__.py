"""dsv3_lite: DeepSeek-V3, built one innovation at a time."""
from dsv3_lite.config import ModelArgs

__version__ = "0.1.0"
__all__ = ["ModelArgs", "Client", "__version__"]


def __getattr__(name: str):
    # dsv3_lite.Client loads the model code only when first used
    if name == "Client":
        from dsv3_lite.client import Client
        return Client
    raise AttributeError(f"module 'dsv3_lite' has no attribute {name!r}")
