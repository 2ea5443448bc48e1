"""Connection settings of the Alpaca adapter, read once from the environment (ALPACA_*).

Paper is the default: live trading needs `ALPACA_PAPER=false` here AND the live switch in the
trading params (checked by the dispatcher). The key and secret are SecretStr so that neither a
repr, a log line nor a traceback of these settings can show them.
"""

from __future__ import annotations

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.adapters.postgres.request_budget import check_limits


def _normalise_url_override(value: str | None) -> str | None:
    """alpaca-py appends `/v2` (or `/v1beta1`) itself: the override is scheme://host[:port] only."""
    if value is None:
        return None
    value = value.strip().rstrip("/")
    if not value:
        return None
    if not value.startswith(("http://", "https://")):
        raise ValueError("url override must start with http:// or https://")
    if value.endswith(("/v2", "/v1beta1")):
        raise ValueError("url override must not include the API version (/v2, /v1beta1)")
    return value


class AlpacaSettings(BaseSettings):
    """How to reach Alpaca, and how patiently.

    timeout_seconds bounds every HTTP call (the SDK has no timeout of its own: a hung server
    would hang the dispatcher). Reads are retried up to `read_attempts` times with exponential
    backoff; an order submit is resent with the same client_order_id until `submit_retry_seconds`
    have passed (see `AlpacaBroker.submit_order`). A Retry-After is honoured up to
    `retry_after_max_seconds`.
    """

    model_config = SettingsConfigDict(
        env_prefix="ALPACA_", frozen=True, extra="forbid", populate_by_name=True
    )

    api_key: SecretStr
    secret_key: SecretStr
    paper: bool = True
    trading_url: str | None = Field(default=None, description="url_override of the trading API")
    data_url: str | None = Field(default=None, description="url_override of the market data API")
    timeout_seconds: float = Field(default=10.0, gt=0, le=120)
    read_attempts: int = Field(default=3, ge=1, le=10)
    retry_backoff_seconds: float = Field(default=0.5, ge=0, le=30)
    retry_backoff_max_seconds: float = Field(default=8.0, ge=0, le=120)
    # 200 requests/minute per account is Alpaca's trading API limit; a burst of 20 on top of
    # 180/min keeps any 60 s window at or under 200. Reads leave the last 10 tokens to orders.
    trading_requests_per_minute: float = Field(default=180, gt=0, le=200)
    trading_burst: int = Field(default=20, ge=1, le=200)
    read_reserve_tokens: int = Field(default=10, ge=0, le=199)
    submit_retry_seconds: float = Field(default=10.0, gt=0, le=60)
    retry_after_max_seconds: float = Field(default=5.0, ge=0, le=60)
    option_contracts_page_size: int = Field(default=1000, ge=1, le=10_000)
    options_feed: str | None = Field(default=None, description="opra / indicative; None = SDK default")
    stock_feed: str | None = Field(default="iex", description="iex / sip; iex works on free plans")

    @model_validator(mode="after")
    def _check_budget(self) -> AlpacaSettings:
        check_limits(self.trading_requests_per_minute, self.trading_burst, self.read_reserve_tokens)
        return self

    @field_validator("trading_url", "data_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        return _normalise_url_override(value)

    @field_validator("api_key", "secret_key")
    @classmethod
    def _not_blank(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value().strip():
            raise ValueError("must not be blank")
        return value
