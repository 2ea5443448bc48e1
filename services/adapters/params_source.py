"""Providers of the params in force: the reviewed file, or SSM with validation and hot reload.

A decision asks `provider.current()` for the document to use; that call is cheap and, when the
reload interval has elapsed, checks the source for a new version. A new document is parsed and
validated by the one model in services.common.params. A document that fails is refused as a
whole: the last good document stays in force, an ERROR names every invalid field, and status()
carries the error until a good version arrives. (The system this replaces fell back silently to
permissive defaults on an unparsable value, and traded stock on an options-only account.)

At start-up, with no good document in SSM (unreachable, parameter missing, invalid), the
provider uses the last good SSM document persisted in Postgres (every accepted SSM document is
saved there with its version and hash): the operators' limits, which may be tighter than the
file's. Only when no SSM document was ever good does it use the reviewed defaults from
config/trading_params.json. Either way it says so: a WARNING, a PARAMS_FALLBACK alert,
`using_fallback: True` in status(), and the params_in_force row `status` reads. It keeps trying
SSM on every reload interval.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from services.adapters import alerts
from services.common.clock import Clock, SystemClock
from services.common.params import (
    DEFAULT_PARAMS_PATH,
    ParamsError,
    ParamsInForce,
    load_params_file,
    parse_params,
)

log = logging.getLogger(__name__)

SSM_CONNECT_TIMEOUT_SECONDS = 3
SSM_READ_TIMEOUT_SECONDS = 5


class ParamsProvider(Protocol):
    def current(self) -> ParamsInForce:
        """The document in force; cheap; reloads when the interval has elapsed."""
        ...

    def status(self) -> dict:
        """source, version, hash, loaded_at, last_error, last_error_at, using_fallback."""
        ...


class SourceUnavailable(Exception):
    """The params source could not be read (network, permissions, missing parameter).

    Usually resolves itself; the last good document stays in force meanwhile.
    """


class _Fetched:
    __slots__ = ("key", "version", "text", "origin")

    def __init__(self, key: str, version: str, text: str, origin: str):
        self.key = key  # what identifies this content at the source (SSM version, file digest)
        self.version = version
        self.text = text
        self.origin = origin


class _ReloadingProvider:
    """The reload state machine shared by the file and SSM providers.

    Subclasses implement `_fetch()` and name their `source`. One reload runs at a time; a
    caller arriving while another thread reloads gets the document in force without waiting.
    """

    source: str

    def __init__(self, reload_seconds: float | None, clock: Clock | None):
        self._reload_seconds = reload_seconds
        self._clock = clock or SystemClock()
        self._lock = threading.Lock()
        self._in_force: ParamsInForce | None = None
        self._good_key: str | None = None
        self._refused_key: str | None = None
        self._refused_version: str | None = None
        self._refused_errors: tuple[str, ...] = ()
        self._refused_message: str | None = None
        self._loaded_at: datetime | None = None
        self._last_attempt: datetime | None = None
        self._last_error: str | None = None
        self._last_error_at: datetime | None = None
        self._using_fallback = False
        self._note: str | None = None

    # -- the source ---------------------------------------------------------------------------

    def _fetch(self) -> _Fetched:
        raise NotImplementedError

    # -- public -------------------------------------------------------------------------------

    def current(self) -> ParamsInForce:
        now = self._clock.now()
        if self._due(now) and self._lock.acquire(blocking=False):
            try:
                if self._due(now):
                    self._attempt(now)
            finally:
                self._lock.release()
        assert self._in_force is not None
        return self._in_force

    def refresh(self) -> ParamsInForce:
        """Check the source now, whatever the interval (operator command, tests)."""
        with self._lock:
            self._attempt(self._clock.now())
        assert self._in_force is not None
        return self._in_force

    def status(self) -> dict[str, Any]:
        in_force = self._in_force
        return {
            "source": in_force.source if in_force else None,
            "version": in_force.version if in_force else None,
            "hash": in_force.content_hash if in_force else None,
            "loaded_at": _iso(self._loaded_at),
            "last_attempt_at": _iso(self._last_attempt),
            "last_error": self._last_error,
            "last_error_at": _iso(self._last_error_at),
            "refused_version": self._refused_version,
            "refused_errors": list(self._refused_errors),
            "using_fallback": self._using_fallback,
            "note": self._note,
            "configured_source": self.source,
            "reload_seconds": self._interval(),
        }

    # -- internals ----------------------------------------------------------------------------

    def _interval(self) -> float | None:
        if self._reload_seconds is not None:
            return self._reload_seconds
        return None

    def _due(self, now: datetime) -> bool:
        interval = self._interval()
        if interval is None:
            return False
        if self._last_attempt is None:
            return True
        return now - self._last_attempt >= timedelta(seconds=interval)

    def _record_error(self, now: datetime, message: str) -> bool:
        """Remember the error; True when it differs from the last one (worth a log line)."""
        changed = message != self._last_error
        self._last_error = message
        self._last_error_at = now
        return changed

    def _attempt(self, now: datetime) -> None:
        self._last_attempt = now
        try:
            fetched = self._fetch()
        except SourceUnavailable as e:
            message = f"PARAMS_SOURCE_UNAVAILABLE: {e}"
            if self._record_error(now, message):
                log.warning(
                    "params source %s unavailable; keeping %s version %s in force: %s",
                    self.source, self._in_force.source, self._in_force.version, e,
                    extra={"params_source": self.source, "error": str(e)},
                )
            return
        if fetched.key == self._good_key:
            if self._last_error is not None:
                log.info("params source %s reachable again; %s version %s unchanged",
                         self.source, self.source, fetched.version)
                self._last_error = None
                self._last_error_at = None
            return
        if fetched.key == self._refused_key:
            # Already refused and logged once; the refusal stays the error to report.
            if self._last_error != self._refused_message:
                self._record_error(now, self._refused_message or "")
            return
        try:
            params = parse_params(fetched.text, origin=fetched.origin)
        except ParamsError as e:
            self._refuse(fetched, e, now)
            log.error(
                "params %s refused; keeping %s version %s in force:\n  %s",
                fetched.origin, self._in_force.source, self._in_force.version, "\n  ".join(e.errors),
                extra={"params_source": self.source, "refused_version": fetched.version, "errors": e.errors},
            )
            return
        previous = self._in_force
        self._install(ParamsInForce(params, self.source, fetched.version, params.content_hash()), fetched.key, now)
        self._using_fallback = False
        self._note = None
        self._persist(fetched, now)
        self._last_error = None
        self._last_error_at = None
        self._refused_key = None
        self._refused_version = None
        self._refused_errors = ()
        self._refused_message = None
        log.info(
            "params reloaded: %s version %s hash %s (was %s version %s)",
            self.source, fetched.version, self._in_force.content_hash[:12],
            previous.source, previous.version,
            extra={"params_source": self.source, "params_version": fetched.version,
                   "params_hash": self._in_force.content_hash},
        )

    def _refuse(self, fetched: _Fetched, error: ParamsError, now: datetime) -> None:
        alerts.emit(alerts.Event.PARAMS_REFUSED, self.source, version=fetched.version, errors=list(error.errors))
        self._refused_key = fetched.key
        self._refused_version = fetched.version
        self._refused_errors = tuple(error.errors)
        self._refused_message = f"PARAMS_INVALID: {fetched.origin} refused: " + "; ".join(error.errors)
        self._record_error(now, self._refused_message)

    def _persist(self, fetched: _Fetched, now: datetime) -> None:
        """Keep a newly accepted document beyond this process (the SSM provider does)."""

    def _install(self, in_force: ParamsInForce, key: str | None, now: datetime) -> None:
        self._in_force = in_force
        self._good_key = key
        self._loaded_at = now


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _digest(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


class FileParamsProvider(_ReloadingProvider):
    """The reviewed document in a file. `reload_seconds=None` reads it once at start-up.

    An invalid file at start-up raises ParamsError: there is nothing safe to fall back to.
    """

    def __init__(self, path: Path | str = DEFAULT_PARAMS_PATH, reload_seconds: float | None = None,
                 clock: Clock | None = None):
        super().__init__(reload_seconds, clock)
        self.path = Path(path)
        self.source = f"file:{self.path}"
        fetched = self._read()
        params = parse_params(fetched.text, origin=fetched.origin)
        now = self._clock.now()
        self._last_attempt = now
        self._install(ParamsInForce(params, self.source, "file", params.content_hash()), fetched.key, now)
        log.info(
            "params in force: %s hash %s", self.source, params.content_hash()[:12],
            extra={"params_source": self.source, "params_version": "file", "params_hash": params.content_hash()},
        )

    def _read(self) -> _Fetched:
        try:
            text = self.path.read_text()
        except OSError as e:
            raise SourceUnavailable(f"{self.path}: {e.strerror or e}") from e
        return _Fetched(_digest(text), "file", text, str(self.path))

    def _fetch(self) -> _Fetched:
        return self._read()


class SsmParamsProvider(_ReloadingProvider):
    """The operators' document in SSM Parameter Store, reloaded every `reload_seconds`.

    `reload_seconds=None` follows the document in force (`execution.params_reload_seconds`).
    """

    def __init__(self, name: str, *, ssm_client: Any = None, region: str | None = None,
                 fallback_path: Path | str = DEFAULT_PARAMS_PATH, reload_seconds: float | None = 30,
                 clock: Clock | None = None, store: Any = None):
        super().__init__(reload_seconds, clock)
        self.name = name
        self.source = f"ssm:{name}"
        self.fallback_path = Path(fallback_path)
        self._store = store  # PostgresParamsStore: last good documents and the params in force
        self._client = ssm_client if ssm_client is not None else make_ssm_client(region)
        self._start()

    def _interval(self) -> float | None:
        if self._reload_seconds is not None:
            return self._reload_seconds
        if self._in_force is not None:
            return self._in_force.params.execution.params_reload_seconds
        return None

    def _start(self) -> None:
        now = self._clock.now()
        self._last_attempt = now
        problem: str
        try:
            fetched = self._fetch()
        except SourceUnavailable as e:
            problem = f"PARAMS_SOURCE_UNAVAILABLE: {e}"
        else:
            try:
                params = parse_params(fetched.text, origin=fetched.origin)
            except ParamsError as e:
                self._refuse(fetched, e, now)
                problem = self._refused_message or ""
                log.error(
                    "params %s refused at start-up:\n  %s", fetched.origin, "\n  ".join(e.errors),
                    extra={"params_source": self.source, "refused_version": fetched.version, "errors": e.errors},
                )
            else:
                in_force = ParamsInForce(params, self.source, fetched.version, params.content_hash())
                self._install(in_force, fetched.key, now)
                log.info(
                    "params in force: %s version %s hash %s", self.source, fetched.version,
                    in_force.content_hash[:12],
                    extra={"params_source": self.source, "params_version": fetched.version,
                           "params_hash": in_force.content_hash},
                )
                self._persist(fetched, now)
                return
        # No good document in SSM: the last good one from Postgres, else the reviewed defaults,
        # loudly. If the file is invalid too, ParamsError propagates and the service does not start.
        last_good = self._last_good()
        if last_good is not None:
            fallback, stored_at = last_good
            self._note = (f"no good document in {self.source} at start-up; using its last good version "
                          f"{fallback.version} (hash {fallback.content_hash[:12]}, read {stored_at.isoformat()}) "
                          f"from Postgres")
        else:
            fallback = load_params_file(self.fallback_path)
            self._note = (f"no good document in {self.source} at start-up and none ever stored; "
                          f"using the reviewed defaults from {self.fallback_path}")
        # Installed without a key: the first good read from SSM replaces it, even the same version.
        self._install(fallback, None, now)
        self._using_fallback = True
        self._record_error(now, problem)
        log.warning(
            "params: %s; %s", self._note, problem,
            extra={"params_source": fallback.source, "params_version": fallback.version,
                   "params_hash": fallback.content_hash, "error": problem},
        )
        alerts.emit(alerts.Event.PARAMS_FALLBACK, self.source, in_force=fallback.source, version=fallback.version,
                    hash=fallback.content_hash, problem=problem)
        self._record_in_force(now)

    # -- the last good document in Postgres ---------------------------------------------------
    # The store is a convenience on top of SSM: when it fails, the provider carries on as before.

    def _persist(self, fetched: _Fetched, now: datetime) -> None:
        """Keep an accepted SSM document as the last good one, and record what is in force."""
        if self._store is None:
            return
        try:
            self._store.save_good(self.name, fetched.version, self._in_force.content_hash, fetched.text, now)
        except Exception as e:  # the database may be down too; the document in force is unaffected
            log.warning("params: last good document not saved", extra={"params_source": self.source, "error": str(e)})
        self._record_in_force(now)

    def _record_in_force(self, now: datetime) -> None:
        if self._store is None:
            return
        in_force = self._in_force
        try:
            self._store.record_in_force(self.source, in_force.source, in_force.version, in_force.content_hash,
                                        self._using_fallback, self._note, now)
        except Exception as e:
            log.warning("params: in-force record not written", extra={"params_source": self.source, "error": str(e)})

    def _last_good(self) -> tuple[ParamsInForce, datetime] | None:
        """The newest stored document that still validates under today's model, with when it was read."""
        if self._store is None:
            return None
        try:
            good = self._store.last_good(self.name)
        except Exception as e:
            log.warning("params: last good document unavailable", extra={"params_source": self.source, "error": str(e)})
            return None
        if good is None:
            return None
        origin = f"last good {self.source} version {good.version}"
        try:
            params = parse_params(good.document, origin=origin)
        except ParamsError as e:
            log.error("params: %s no longer validates; not used:\n  %s", origin, "\n  ".join(e.errors))
            return None
        if params.content_hash() != good.content_hash:
            log.error("params: %s does not match its stored hash; not used", origin)
            return None
        return ParamsInForce(params, f"ssm-last-good:{self.name}", good.version, good.content_hash), good.stored_at

    def _fetch(self) -> _Fetched:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            response = self._client.get_parameter(Name=self.name, WithDecryption=True)
        except ClientError as e:
            error = e.response.get("Error", {})
            raise SourceUnavailable(f"{self.source}: {error.get('Code', 'ClientError')}: {error.get('Message', e)}") from e
        except BotoCoreError as e:
            raise SourceUnavailable(f"{self.source}: {e}") from e
        parameter = response["Parameter"]
        version = str(parameter["Version"])
        # Version and content together: a deleted and re-created parameter restarts at 1.
        key = f"{version}:{_digest(parameter['Value'])}"
        return _Fetched(key, version, parameter["Value"], f"{self.source} version {version}")


def make_ssm_client(region: str | None = None, endpoint_url: str | None = None) -> Any:
    """A boto3 SSM client with short timeouts, so an unreachable SSM delays start-up by seconds.

    boto3 itself honours AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_SSM (e.g. a moto server).
    """
    import boto3
    from botocore.config import Config

    config = Config(
        connect_timeout=SSM_CONNECT_TIMEOUT_SECONDS,
        read_timeout=SSM_READ_TIMEOUT_SECONDS,
        retries={"max_attempts": 2, "mode": "standard"},
    )
    return boto3.client("ssm", region_name=region, endpoint_url=endpoint_url, config=config)


def provider_from_settings(settings: Any, conninfo: str | None = None) -> ParamsProvider:
    """The provider the settings ask for: OPS_PARAMS_SOURCE=ssm or the reviewed file.

    The SSM provider reloads at the interval the document in force sets
    (execution.params_reload_seconds). With `conninfo` it keeps its last good document in that
    database and falls back to it at start-up.
    """
    if settings.ops_params_source == "ssm":
        store = None
        if conninfo is not None:
            from services.adapters.postgres.params_store import PostgresParamsStore

            store = PostgresParamsStore(conninfo)
        return SsmParamsProvider(
            settings.ops_params_ssm_name,
            region=settings.aws_region,
            fallback_path=settings.ops_params_file,
            reload_seconds=None,
            store=store,
        )
    return FileParamsProvider(settings.ops_params_file)
