"""dsv3_lite: DeepSeek-V3, built one innovation at a time."""
from dsv3_lite.config import ModelArgs

__version__ = "0.1.0"
__all__ = ["ModelArgs", "__version__"]
