"""Money: catalogue prices as exact integers, and the one rounding rule. Pure.

The ledger keeps money as integer micro-USD, never floats. A catalogue
price is in USD per 1M tokens, which is exactly micro-USD per token; it is
kept here in pico-USD per token (10^-12 USD, so six more decimal places),
taken from the price's decimal text and rounded up.

The rounding rule, once per request: the hold is
`ceil((prompt_bound * input + max_output * output) / 10^6)` micro-USD, and
the charge is `ceil((uncached * input + cached * cached_input + output *
output) / 10^6)`, each rounded up as a whole, then capped at the hold by
the ledger. So a charge is never below the exact price and never more than
one micro-USD above it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import Any

PICO_PER_MICRO = 10**6
_DECIMAL_TEXT = re.compile(r"[0-9]+(\.[0-9]+)?|\.[0-9]+", re.ASCII)
USD_MICRO_MAX = 10**18  # a billion billion micro-USD: far above any cap, below SQLite's 2**63
USD_MAX = USD_MICRO_MAX // 10**6


@dataclass(frozen=True)
class Prices:
    """Pico-USD per token (= USD per 1M tokens x 10^6)."""

    input_pusd: int
    output_pusd: int
    cached_input_pusd: int

    @classmethod
    def from_cost(cls, cost: Any) -> "Prices":
        """From the catalogue's `Cost` (USD per 1M tokens); an absent cached price is the input price.
        Cached per Cost (frozen, hashable): the proxy asks once per request."""
        return _prices_of(cost)

    def hold_usd(self, prompt_tokens_bound: int, output_tokens_max: int) -> int:
        """The worst case: every prompt token at the dearer of the two input prices."""
        prompt_pusd = max(self.input_pusd, self.cached_input_pusd)
        return _micro_up(prompt_tokens_bound * prompt_pusd + output_tokens_max * self.output_pusd)

    def charge_usd(self, prompt_tokens: int, cached_tokens: int, output_tokens: int) -> int:
        """What `prompt_tokens` (of which `cached_tokens` were read from the upstream's cache) and the output cost."""
        cached = min(max(cached_tokens, 0), prompt_tokens)
        pico = (prompt_tokens - cached) * self.input_pusd + cached * self.cached_input_pusd + output_tokens * self.output_pusd
        return _micro_up(pico)


@lru_cache(maxsize=4096)
def _prices_of(cost: Any) -> Prices:
    cached = cost.cached_input if cost.cached_input is not None else cost.input
    return Prices(_pico(cost.input), _pico(cost.output), _pico(cached))


def _pico(usd_per_million: float) -> int:
    # repr() gives the shortest decimal that is this float: 0.15 is 0.15, not 0.1499999...
    return math.ceil(Decimal(repr(float(usd_per_million))) * PICO_PER_MICRO)


def _micro_up(pico: int) -> int:
    return min(-(-pico // PICO_PER_MICRO), USD_MICRO_MAX)


def usd_to_micro(value: Any, field: str = "usd") -> int:
    """A USD amount from an API, CLI or config value, exactly; more than six decimals is refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"'{field}' must be an amount in USD, got {value!r}")
    if isinstance(value, str) and not _DECIMAL_TEXT.fullmatch(value.strip()):
        raise ValueError(f"'{field}' must be a decimal amount in USD such as 12.50, got {value!r}")
    try:
        amount = Decimal(repr(value) if isinstance(value, float) else str(value).strip())
    except InvalidOperation:
        raise ValueError(f"'{field}' must be an amount in USD, got {value!r}") from None
    if not amount.is_finite() or amount < 0 or amount > USD_MAX:
        raise ValueError(f"'{field}' must be an amount in USD from 0 to {USD_MAX}, got {value!r}")
    micro = amount * 10**6
    if micro != micro.to_integral_value():
        raise ValueError(f"'{field}' has more than six decimal places (micro-USD): {value!r}")
    return int(micro)


def usd_text(micro: int) -> str:
    """`$1.25`, `$0.000123`: exact, with at least cents."""
    whole, frac = divmod(abs(micro), 10**6)
    digits = f"{frac:06d}".rstrip("0")
    sign = "-" if micro < 0 else ""
    return f"{sign}${whole}.{digits.ljust(2, '0')}"


def usd_number(micro: int) -> float:
    """For JSON views: USD as a number (the exact figure is the `_micro_usd` field beside it)."""
    return micro / 10**6
