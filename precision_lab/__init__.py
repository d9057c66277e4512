"""precision_lab: a numerical-precision and stability lab for sparse mixture-of-experts (ST-MoE) models.

The format core is public at the top level: `get_format(name) -> Format` and
`quantize(x, fmt, *, rounding=..., overflow=..., subnormals=..., key=...)` (defined in `precision_lab.rounding`).
"""

from precision_lab.errors import UserError
from precision_lab.formats import FORMATS, Format, get_format, register_format
from precision_lab.policy import PrecisionPolicy, get_policy
from precision_lab.rounding import quantize

__version__ = "0.1.0"

__all__ = ["Format", "FORMATS", "get_format", "register_format", "quantize", "PrecisionPolicy", "get_policy",
           "UserError", "__version__"]
