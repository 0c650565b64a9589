"""Typed, frozen settings read once from ``ACSP_*`` environment variables.

Every service reads :class:`Settings` (or its own subclass) once at start::

    settings = Settings.from_env()

A service adds typed fields of its own by subclassing with :func:`setting` fields; each needs
a default because the shared fields have one::

    @dataclass(frozen=True)
    class GrantSettings(Settings):
        hold_ttl_s: float = setting(
            "ACSP_GRANT_HOLD_TTL_S", 900.0, "seconds an unconfirmed hold lives", minimum=1.0
        )

Each field is parsed from its type annotation (str, int, float, bool, Decimal, Path,
``Literal[...]``, :class:`ListenAddress` and optional variants of them). An unset or empty
variable keeps the default. A bad value raises :class:`SettingsError`, whose ``str()`` is the one
line to show: the variable, the reason and the fix. :func:`services.runtime.server.run_service`
prints that line and exits with status 2 instead of a traceback.
"""

from __future__ import annotations

import math
import os
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal, Self
from urllib.parse import urlsplit, urlunsplit

from services.runtime.errors import StartupError


class SettingsError(StartupError):
    """A setting is missing, malformed or unusable; ``str()`` is one line naming the fix."""

    def __init__(self, variable: str, reason: str, fix: str) -> None:
        super().__init__(variable, reason, fix)
        self.variable = variable


@dataclass(frozen=True)
class ListenAddress:
    """A ``host:port`` to bind. Port 0 lets the kernel pick a free port."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> ListenAddress:
        """Parse ``host:port`` or ``[v6-host]:port``; raise ValueError with the reason."""
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"{text!r} is not host:port")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not port_text.isdigit():
            raise ValueError(f"port {port_text!r} is not a number")
        port = int(port_text)
        if port > 65535:
            raise ValueError(f"port {port} is above 65535")
        return cls(host, port)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def setting(
    env: str,
    default: Any,
    help: str,
    *,
    minimum: float | None = None,
    existing_file: bool = False,
    parse: Callable[[str], Any] | None = None,
) -> Any:
    """Declare a settings field read from the environment variable ``env``.

    ``minimum`` bounds numbers, ``existing_file`` requires a readable file, and ``parse``
    replaces the parser chosen from the annotation (it raises ValueError on bad input).
    """
    metadata = {
        "env": env,
        "help": help,
        "minimum": minimum,
        "existing_file": existing_file,
        "parse": parse,
    }
    return field(default=default, metadata=metadata)


def _parse_database_url(text: str) -> str:
    scheme = urlsplit(text).scheme
    if scheme not in ("postgresql", "postgres"):
        raise ValueError(f"scheme {scheme!r} is not postgresql")
    return text


def _parse_nats_urls(text: str) -> str:
    for url in text.split(","):
        parts = urlsplit(url.strip())
        if parts.scheme not in ("nats", "tls", "ws", "wss"):
            raise ValueError(f"{url!r} does not start with nats://, tls://, ws:// or wss://")
        if not parts.hostname:
            raise ValueError(f"{url!r} has no host")
        try:
            parts.port  # noqa: B018 - reading it checks the port
        except ValueError:
            raise ValueError(f"{url!r} has a port that is not a number from 0 to 65535") from None
    return text


def _parse_otlp_endpoint(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("expected http://host:port or https://host:port")
    return text


OtelExporter = Literal["none", "console", "otlp", "prometheus"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
LogFormat = Literal["text", "json"]


@dataclass(frozen=True)
class Settings:
    """Settings every acsp service shares; subclass to add a service's own fields."""

    database_url: str | None = setting(
        "ACSP_DATABASE_URL",
        None,
        "PostgreSQL URL, e.g. postgresql://acsp@127.0.0.1:5432/acsp",
        parse=_parse_database_url,
    )
    nats_url: str | None = setting(
        "ACSP_NATS_URL",
        None,
        "comma-separated NATS URLs, e.g. nats://127.0.0.1:4222",
        parse=_parse_nats_urls,
    )
    nats_user: str | None = setting("ACSP_NATS_USER", None, "NATS user name")
    nats_password: str | None = setting("ACSP_NATS_PASSWORD", None, "NATS password")
    nats_creds: Path | None = setting(
        "ACSP_NATS_CREDS", None, "NATS credentials file (JWT and NKey seed)", existing_file=True
    )
    nats_tls_ca: Path | None = setting(
        "ACSP_NATS_TLS_CA",
        None,
        "PEM file of the CA that signs the NATS server certificate; defaults to ACSP_TLS_CA",
        existing_file=True,
    )
    nats_tls_cert: Path | None = setting(
        "ACSP_NATS_TLS_CERT",
        None,
        "PEM client certificate to present to NATS, for servers that verify clients",
        existing_file=True,
    )
    nats_tls_key: Path | None = setting(
        "ACSP_NATS_TLS_KEY", None, "PEM private key of ACSP_NATS_TLS_CERT", existing_file=True
    )
    grpc_listen: ListenAddress = setting(
        "ACSP_GRPC_LISTEN",
        ListenAddress("127.0.0.1", 0),
        "host:port the gRPC server binds; port 0 picks a free port",
    )
    health_listen: ListenAddress | None = setting(
        "ACSP_HEALTH_LISTEN",
        None,
        "host:port of a second, plaintext port that serves only grpc.health.v1 Check, for "
        "probes that cannot present a client certificate; port 0 picks a free port",
    )
    data_dir: Path = setting(
        "ACSP_DATA_DIR", Path("~/.acsp").expanduser(), "folder for keys, certificates and state"
    )
    tls_ca: Path | None = setting(
        "ACSP_TLS_CA",
        None,
        "PEM file of the CA that signs service certificates",
        existing_file=True,
    )
    tls_cert: Path | None = setting(
        "ACSP_TLS_CERT", None, "PEM certificate of this service", existing_file=True
    )
    tls_key: Path | None = setting(
        "ACSP_TLS_KEY", None, "PEM private key of this service", existing_file=True
    )
    token_public_key: Path | None = setting(
        "ACSP_TOKEN_PUBLIC_KEY",
        None,
        "PEM Ed25519 public key that verifies bearer tokens",
        existing_file=True,
    )
    otel_exporter: OtelExporter = setting(
        "ACSP_OTEL_EXPORTER", "none", "where traces and metrics go: none, console, otlp, prometheus"
    )
    otlp_endpoint: str = setting(
        "ACSP_OTLP_ENDPOINT",
        "http://127.0.0.1:4317",
        "OTLP gRPC collector endpoint, e.g. http://collector:4317",
        parse=_parse_otlp_endpoint,
    )
    prometheus_port: int | None = setting(
        "ACSP_PROMETHEUS_PORT", None, "port of the /metrics endpoint", minimum=0
    )
    log_level: LogLevel = setting("ACSP_LOG_LEVEL", "INFO", "DEBUG, INFO, WARNING or ERROR")
    log_format: LogFormat = setting(
        "ACSP_LOG_FORMAT", "text", "log line format: text (key=value) or json"
    )
    shutdown_grace_s: float = setting(
        "ACSP_SHUTDOWN_GRACE_S",
        10.0,
        "seconds in-flight calls get to finish at shutdown",
        minimum=0,
    )
    default_deadline_s: float = setting(
        "ACSP_DEFAULT_DEADLINE_S",
        30.0,
        "seconds a unary call may run when the caller set no deadline",
        minimum=0.001,
    )
    db_pool_min: int = setting("ACSP_DB_POOL_MIN", 1, "connections kept open", minimum=0)
    db_pool_max: int = setting("ACSP_DB_POOL_MAX", 10, "maximum pool connections", minimum=1)
    db_acquire_timeout_s: float = setting(
        "ACSP_DB_ACQUIRE_TIMEOUT_S",
        5.0,
        "seconds to wait for a pooled connection",
        minimum=0.001,
    )
    grpc_max_concurrent_rpcs: int = setting(
        "ACSP_GRPC_MAX_CONCURRENT_RPCS",
        1000,
        "calls served at once; more are rejected with RESOURCE_EXHAUSTED",
        minimum=1,
    )
    ready_file: Path | None = setting(
        "ACSP_READY_FILE", None, "file to write the bound gRPC address to once serving"
    )
    health_ready_file: Path | None = setting(
        "ACSP_HEALTH_READY_FILE",
        None,
        "file to write the bound ACSP_HEALTH_LISTEN address to once serving",
    )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Self:
        """Read every field from ``environ`` (default ``os.environ``) and validate them."""
        env = os.environ if environ is None else environ
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for spec in fields(cls):
            variable = spec.metadata.get("env")
            if variable is None:
                continue
            raw = env.get(variable, "").strip()
            if raw:
                values[spec.name] = _parse_field(spec.metadata, hints[spec.name], raw)
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Check rules that span fields; subclasses extend it and call ``super().validate()``."""
        tls = {
            "ACSP_TLS_CA": self.tls_ca,
            "ACSP_TLS_CERT": self.tls_cert,
            "ACSP_TLS_KEY": self.tls_key,
        }
        given = [name for name, value in tls.items() if value is not None]
        if given and len(given) != len(tls):
            missing = next(name for name, value in tls.items() if value is None)
            fix = "set all of ACSP_TLS_CA, ACSP_TLS_CERT and ACSP_TLS_KEY, or none of them"
            if given == ["ACSP_TLS_CA"]:
                fix += ", and set ACSP_NATS_TLS_CA to trust a CA for the NATS connection alone"
            raise SettingsError(missing, f"missing while {', '.join(given)} is set", fix)
        if self.db_pool_min > self.db_pool_max:
            raise SettingsError(
                "ACSP_DB_POOL_MIN",
                f"{self.db_pool_min} is above ACSP_DB_POOL_MAX={self.db_pool_max}",
                "set ACSP_DB_POOL_MIN at or below ACSP_DB_POOL_MAX",
            )
        if self.otel_exporter == "prometheus" and self.prometheus_port is None:
            raise SettingsError(
                "ACSP_PROMETHEUS_PORT",
                "missing while ACSP_OTEL_EXPORTER=prometheus",
                "set the port that serves /metrics, e.g. 9464",
            )
        if (self.nats_user is None) != (self.nats_password is None):
            present, absent = (
                ("ACSP_NATS_USER", "ACSP_NATS_PASSWORD")
                if self.nats_password is None
                else ("ACSP_NATS_PASSWORD", "ACSP_NATS_USER")
            )
            raise SettingsError(
                absent, f"missing while {present} is set", "set both or neither of them"
            )
        if self.nats_creds is not None and self.nats_user is not None:
            raise SettingsError(
                "ACSP_NATS_CREDS",
                "set together with ACSP_NATS_USER",
                "use either a credentials file or a user and password",
            )
        if (self.nats_tls_cert is None) != (self.nats_tls_key is None):
            present, absent = (
                ("ACSP_NATS_TLS_CERT", "ACSP_NATS_TLS_KEY")
                if self.nats_tls_key is None
                else ("ACSP_NATS_TLS_KEY", "ACSP_NATS_TLS_CERT")
            )
            raise SettingsError(
                absent, f"missing while {present} is set", "set both or neither of them"
            )
        if self.nats_tls_required and self.nats_url is not None:
            plain = [url for url in self.nats_urls if urlsplit(url).scheme == "ws"]
            if plain:
                raise SettingsError(
                    "ACSP_NATS_URL",
                    f"{redact_url(plain[0])} is plaintext WebSocket while ACSP_NATS_TLS_* is set",
                    "use wss:// for TLS over WebSocket, or tls:// or nats:// for TCP",
                )
        if self.health_ready_file is not None and self.health_listen is None:
            raise SettingsError(
                "ACSP_HEALTH_LISTEN",
                "missing while ACSP_HEALTH_READY_FILE is set",
                "set the host:port of the health port, e.g. 0.0.0.0:8086, or unset the file",
            )

    @property
    def tls_enabled(self) -> bool:
        """Whether the gRPC server and channels use mutual TLS."""
        return self.tls_cert is not None

    @property
    def nats_urls(self) -> list[str]:
        """The URLs of ``ACSP_NATS_URL``, stripped; empty when it is unset."""
        if self.nats_url is None:
            return []
        return [part.strip() for part in self.nats_url.split(",")]

    @property
    def nats_tls_required(self) -> bool:
        """Whether the NATS connection must use TLS: a tls:// or wss:// URL, or ACSP_NATS_TLS_*."""
        secure_url = any(urlsplit(url).scheme in ("tls", "wss") for url in self.nats_urls)
        return secure_url or self.nats_tls_ca is not None or self.nats_tls_cert is not None

    def require(self, name: str) -> Any:
        """Return field ``name``, raising SettingsError naming its variable if it is unset."""
        value = getattr(self, name)
        if value is None:
            spec = next(spec for spec in fields(self) if spec.name == name)
            raise SettingsError(
                spec.metadata["env"], "missing", f"set it to the {spec.metadata['help']}"
            )
        return value


def redact_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***``, fit for logs and messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _parse_field(metadata: Mapping[str, Any], annotation: Any, raw: str) -> Any:
    variable = metadata["env"]
    shown = redact_url(raw) if "://" in raw else raw
    parser = metadata["parse"] or _parser_for(annotation)
    try:
        value = parser(raw)
    except (ValueError, InvalidOperation) as error:
        raise SettingsError(
            variable, f"{shown!r} is invalid: {error}", f"set it to the {metadata['help']}"
        ) from None
    minimum = metadata["minimum"]
    if minimum is not None and value < minimum:
        raise SettingsError(
            variable, f"{shown} is below the minimum {minimum}", f"set it to {minimum} or more"
        )
    if metadata["existing_file"]:
        path = Path(value)
        if not path.is_file():
            raise SettingsError(
                variable, f"file {path} does not exist", f"point it to the {metadata['help']}"
            )
        if not os.access(path, os.R_OK):
            raise SettingsError(
                variable, f"file {path} is not readable", "grant this process read access"
            )
    return value


def _parser_for(annotation: Any) -> Callable[[str], Any]:
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        (inner,) = [arg for arg in args if arg is not type(None)]
        return _parser_for(inner)
    if origin is Literal:
        return lambda raw: _parse_choice(raw, args)
    simple: dict[Any, Callable[[str], Any]] = {
        str: str,
        int: int,
        float: _parse_float,
        bool: _parse_bool,
        Decimal: _parse_decimal,
        Path: lambda raw: Path(raw).expanduser(),
        ListenAddress: ListenAddress.parse,
    }
    if annotation not in simple:
        raise TypeError(f"no parser for settings type {annotation!r}: pass parse=")
    return simple[annotation]


def _parse_choice(raw: str, choices: tuple[Any, ...]) -> Any:
    for choice in choices:
        if raw == choice or raw.upper() == str(choice).upper():
            return choice
    raise ValueError(f"expected one of {', '.join(map(str, choices))}")


def _parse_float(raw: str) -> float:
    value = float(raw)
    if not math.isfinite(value):
        raise ValueError("expected a finite number")
    return value


def _parse_decimal(raw: str) -> Decimal:
    try:
        value = Decimal(raw)
    except InvalidOperation:
        # Its own message names only the signal class, such as ConversionSyntax.
        raise ValueError("expected a decimal number such as 12.5") from None
    if not value.is_finite():
        raise ValueError("expected a finite number")
    return value


def _parse_bool(raw: str) -> bool:
    lowered = raw.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")
