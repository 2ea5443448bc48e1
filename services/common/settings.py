"""Service settings from the environment, parsed once into a frozen, typed model.

Secrets (the Alpaca keys, the database password) are SecretStr: their repr and str are masked,
and every secret value loaded is registered with the log redactor, so it cannot reach a log
line even when some library formats it into a message.

Live trading needs two keys, held by two different people in practice: the environment of the
task (`OPS_LIVE_TRADING`, set by whoever deploys) and the params document
(`live_trading_enabled`, set by whoever tunes the limits). Either one missing means paper.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal, NamedTuple
from urllib.parse import unquote, urlsplit

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.logs import register_secret
from services.common.params import DEFAULT_PARAMS_PATH, ParamsInForce, TradingParams

_TRUE = {"1", "true"}
_FALSE = {"", "0", "false", "no", "off"}
_CONNINFO_PASSWORD = re.compile(r"(?:^|\s)password\s*=\s*('(?:[^'\\]|\\.)*'|\S+)")


def database_password(url: str) -> str | None:
    """The password inside a postgres URL or a key=value conninfo string, if any."""
    if "://" in url:
        try:
            return urlsplit(url).password
        except ValueError:
            return None
    match = _CONNINFO_PASSWORD.search(url)
    if not match:
        return None
    value = match.group(1)
    return value[1:-1] if value.startswith("'") else value


def redact_database_url(url: str | None) -> str | None:
    """The URL with its password replaced by `***`: what a log line may show."""
    if url is None:
        return None
    password = database_password(url)
    return url.replace(password, "***") if password else url


class Settings(BaseSettings):
    """Everything a service reads from its environment. Unrelated variables are ignored."""

    model_config = SettingsConfigDict(frozen=True, extra="ignore", case_sensitive=False)

    database_url: SecretStr | None = Field(default=None, validation_alias="DATABASE_URL")
    account_id: str = Field(default="paper-main", min_length=1, validation_alias="ACCOUNT_ID")
    ops_params_ssm_name: str = Field(
        default="/ops-pipeline/trading-params", min_length=1, validation_alias="OPS_PARAMS_SSM_NAME"
    )
    ops_params_source: Literal["file", "ssm"] = Field(default="file", validation_alias="OPS_PARAMS_SOURCE")
    ops_params_file: Path = Field(default=DEFAULT_PARAMS_PATH, validation_alias="OPS_PARAMS_FILE")
    aws_region: str | None = Field(default=None, validation_alias=AliasChoices("AWS_REGION", "AWS_DEFAULT_REGION"))
    ops_live_trading: bool = Field(default=False, validation_alias="OPS_LIVE_TRADING")
    alpaca_api_key: SecretStr | None = Field(default=None, validation_alias="ALPACA_API_KEY")
    alpaca_secret_key: SecretStr | None = Field(default=None, validation_alias="ALPACA_SECRET_KEY")

    @field_validator("ops_params_source", mode="before")
    @classmethod
    def _source_lower(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("ops_live_trading", mode="before")
    @classmethod
    def _live_flag(cls, value: object) -> object:
        # Only an explicit "1"/"true" arms live trading; a typo ("ture", "yes please") is an
        # error at start-up rather than a silent choice either way.
        if isinstance(value, str):
            text = value.strip().lower()
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
            raise ValueError('OPS_LIVE_TRADING must be "1"/"true" (live allowed) or "0"/"false"/unset (paper)')
        return value

    @model_validator(mode="after")
    def _register_secrets(self) -> Settings:
        for secret in (self.alpaca_api_key, self.alpaca_secret_key):
            if secret is not None:
                register_secret(secret.get_secret_value())
        if self.database_url is not None:
            password = database_password(self.database_url.get_secret_value())
            if password:
                # Redact both spellings: the URL carries it percent-encoded, drivers may echo it decoded.
                register_secret(password)
                register_secret(unquote(password))
        return self

    @property
    def database_url_redacted(self) -> str | None:
        """DATABASE_URL with the password masked, for start-up logs."""
        return redact_database_url(self.database_url.get_secret_value() if self.database_url else None)

    def database_conninfo(self) -> str | None:
        """The real DATABASE_URL, for the driver only; None means the embedded server."""
        return self.database_url.get_secret_value() if self.database_url else None

    def describe(self) -> dict[str, object]:
        """The settings as a start-up log line may show them: secrets masked or reduced to presence."""
        return {
            "database_url": self.database_url_redacted,
            "account_id": self.account_id,
            "ops_params_source": self.ops_params_source,
            "ops_params_ssm_name": self.ops_params_ssm_name,
            "ops_params_file": str(self.ops_params_file),
            "aws_region": self.aws_region,
            "ops_live_trading": self.ops_live_trading,
            "alpaca_api_key_set": self.alpaca_api_key is not None,
            "alpaca_secret_key_set": self.alpaca_secret_key is not None,
        }


def load_settings() -> Settings:
    """Read the environment once; raises pydantic's ValidationError naming the bad variable."""
    return Settings()


class TradingMode(NamedTuple):
    mode: Literal["paper", "live"]
    reason: str


def trading_mode(settings: Settings, params: TradingParams | ParamsInForce) -> TradingMode:
    """Live only when both keys are turned: OPS_LIVE_TRADING and params.live_trading_enabled.

    The reason names the key that was missing (or both), so the start-up log answers
    "why is this running on paper?" without a second look.
    """
    document = params.params if isinstance(params, ParamsInForce) else params
    env_on = settings.ops_live_trading
    params_on = document.live_trading_enabled
    if env_on and params_on:
        return TradingMode("live", "LIVE: OPS_LIVE_TRADING is set and params.live_trading_enabled is true")
    missing = []
    if not env_on:
        missing.append("OPS_LIVE_TRADING is not set")
    if not params_on:
        missing.append("params.live_trading_enabled is false")
    return TradingMode("paper", "PAPER: " + " and ".join(missing))
