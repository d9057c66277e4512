"""precision_lab: a numerical-precision and stability lab for sparse mixture-of-experts (ST-MoE) models."""

from precision_lab.errors import UserError
from precision_lab.formats import FORMATS, Format, get_format, register_format

__version__ = "0.1.0"

__all__ = ["Format", "FORMATS", "get_format", "register_format", "UserError", "__version__"]
