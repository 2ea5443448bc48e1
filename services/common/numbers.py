"""Numbers from the outside world: finite values or None, never NaN or infinity.

Market data, database numerics and seed-style configs hand out floats, strings, Decimals and
NaN. Decision code asks these two functions and treats None as missing (a denial), never as 0.
"""

from __future__ import annotations

import math
from decimal import Decimal, InvalidOperation
from typing import Any


def to_decimal(value: Any) -> Decimal | None:
    """A finite Decimal (a float through its shortest text), or None for missing, NaN, infinite or non-numeric."""
    if type(value) is Decimal:  # the common case, a database numeric: no conversion
        return value if value.is_finite() else None
    if value is None or isinstance(value, bool):
        return None
    try:
        d = value if isinstance(value, Decimal) else Decimal(str(value))
    except (InvalidOperation, ValueError, TypeError):
        return None
    return d if d.is_finite() else None


def finite_float(value: Any) -> float | None:
    """A finite float, or None for missing, NaN, infinite or non-numeric."""
    if value is None or isinstance(value, bool):
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None
