"""A missing or bad setting, said by its environment variable: `ALPACA_API_KEY is required but not
set`, not pydantic's `api_key: Field required`; a missing AWS region or credentials in one line.

Values are never echoed: the variable might hold a secret.
"""

from __future__ import annotations

from typing import Any

from pydantic import AliasChoices, ValidationError

AWS_REGION_HINT = "set AWS_REGION (or AWS_DEFAULT_REGION), or pass --region"
AWS_CREDENTIALS_HINT = ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or run where an "
                        "IAM role provides them")


def _settings_models() -> dict[str, Any]:
    from services.adapters.alpaca.settings import AlpacaSettings
    from services.common.settings import Settings

    return {"Settings": Settings, "AlpacaSettings": AlpacaSettings}


def env_name(model: Any, field: str) -> str:
    """The environment variable a settings field is read from."""
    info = model.model_fields.get(field)
    alias = info.validation_alias if info is not None else None
    if isinstance(alias, str):
        return alias
    if isinstance(alias, AliasChoices):
        return " or ".join(str(c) for c in alias.choices)
    return (model.model_config.get("env_prefix") or "").upper() + field.upper()


def settings_error_lines(error: ValidationError) -> list[str] | None:
    """One line per bad variable, or None when the error is not about a settings model."""
    model = _settings_models().get(error.title)
    if model is None:
        return None
    lines = []
    for item in error.errors(include_input=False, include_url=False):
        loc = [str(part) for part in item.get("loc", ())]
        message = str(item.get("msg", "")).removeprefix("Value error, ")
        if not loc:
            prefix = (model.model_config.get("env_prefix") or "").upper()
            lines.append(f"{prefix or 'environment'}* settings are inconsistent: {message}")
            continue
        name = loc[0] if loc[0].isupper() else env_name(model, loc[0])
        if item.get("type") == "missing":
            lines.append(f"{name} is required but not set")
        else:
            lines.append(f"{name} is invalid: {message}")
    return lines


def aws_error_line(error: BaseException) -> str | None:
    """The one line for a missing AWS region or credentials; None for any other error."""
    from botocore.exceptions import (
        CredentialRetrievalError,
        NoCredentialsError,
        NoRegionError,
        PartialCredentialsError,
    )

    if isinstance(error, NoRegionError):
        return f"error: no AWS region: {AWS_REGION_HINT}"
    if isinstance(error, (NoCredentialsError, PartialCredentialsError, CredentialRetrievalError)):
        return f"error: no AWS credentials ({error}): {AWS_CREDENTIALS_HINT}"
    return None
