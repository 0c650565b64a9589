"""Settings parsing and validation, without any server."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import pytest

from services.runtime.settings import ListenAddress, Settings, SettingsError, redact_url, setting


def test_defaults_without_variables() -> None:
    settings = Settings.from_env({})
    assert settings.database_url is None
    assert settings.grpc_listen == ListenAddress("127.0.0.1", 0)
    assert settings.otel_exporter == "none"
    assert settings.tls_enabled is False
    assert settings.db_pool_max == 10


def test_values_are_parsed_by_type(tmp_path: Path) -> None:
    settings = Settings.from_env(
        {
            "ACSP_DATABASE_URL": "postgresql://acsp@db:5432/acsp",
            "ACSP_NATS_URL": "nats://a:4222,nats://b:4222",
            "ACSP_GRPC_LISTEN": "[::]:7001",
            "ACSP_DATA_DIR": str(tmp_path),
            "ACSP_OTEL_EXPORTER": "OTLP",
            "ACSP_LOG_LEVEL": "debug",
            "ACSP_SHUTDOWN_GRACE_S": "2.5",
            "ACSP_DB_POOL_MIN": "2",
            "ACSP_DB_POOL_MAX": "4",
        }
    )
    assert settings.grpc_listen == ListenAddress("::", 7001)
    assert str(settings.grpc_listen) == "[::]:7001"
    assert settings.data_dir == tmp_path
    assert settings.otel_exporter == "otlp"
    assert settings.log_level == "DEBUG"
    assert settings.shutdown_grace_s == 2.5
    assert (settings.db_pool_min, settings.db_pool_max) == (2, 4)


def test_empty_variable_keeps_default() -> None:
    assert Settings.from_env({"ACSP_DB_POOL_MAX": "  "}).db_pool_max == 10


@pytest.mark.parametrize(
    ("environ", "variable", "phrase"),
    [
        ({"ACSP_GRPC_LISTEN": "localhost"}, "ACSP_GRPC_LISTEN", "is not host:port"),
        ({"ACSP_GRPC_LISTEN": "0.0.0.0:http"}, "ACSP_GRPC_LISTEN", "is not a number"),
        ({"ACSP_GRPC_LISTEN": "0.0.0.0:70000"}, "ACSP_GRPC_LISTEN", "above 65535"),
        ({"ACSP_DATABASE_URL": "mysql://x/y"}, "ACSP_DATABASE_URL", "is not postgresql"),
        ({"ACSP_NATS_URL": "http://x:4222"}, "ACSP_NATS_URL", "does not start with nats://"),
        ({"ACSP_DB_POOL_MAX": "ten"}, "ACSP_DB_POOL_MAX", "invalid literal"),
        ({"ACSP_DB_POOL_MAX": "0"}, "ACSP_DB_POOL_MAX", "below the minimum 1"),
        ({"ACSP_SHUTDOWN_GRACE_S": "nan"}, "ACSP_SHUTDOWN_GRACE_S", "finite"),
        ({"ACSP_OTEL_EXPORTER": "jaeger"}, "ACSP_OTEL_EXPORTER", "expected one of none, console"),
        ({"ACSP_TLS_CA": "/nonexistent/ca.crt"}, "ACSP_TLS_CA", "does not exist"),
        ({"ACSP_DB_POOL_MIN": "5", "ACSP_DB_POOL_MAX": "2"}, "ACSP_DB_POOL_MIN", "is above"),
        ({"ACSP_OTEL_EXPORTER": "prometheus"}, "ACSP_PROMETHEUS_PORT", "missing"),
        ({"ACSP_NATS_USER": "grant"}, "ACSP_NATS_PASSWORD", "missing while ACSP_NATS_USER"),
        ({"ACSP_OTLP_ENDPOINT": "collector:4317"}, "ACSP_OTLP_ENDPOINT", "expected http://"),
        ({"ACSP_NATS_PASSWORD": "pw"}, "ACSP_NATS_USER", "missing while ACSP_NATS_PASSWORD"),
    ],
)
def test_bad_value_names_variable_reason_and_fix(
    environ: dict[str, str], variable: str, phrase: str
) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(environ)
    message = str(caught.value)
    assert caught.value.variable == variable
    assert message.startswith(f"{variable}: ")
    assert phrase in message
    assert "; fix: " in message
    assert "\n" not in message


def test_partial_tls_names_missing_variable(tmp_path: Path) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_text("x")
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"ACSP_TLS_CA": str(ca)})
    assert caught.value.variable == "ACSP_TLS_CERT"
    assert "ACSP_TLS_CA is set" in str(caught.value)


def test_password_never_appears_in_error() -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"ACSP_DATABASE_URL": "mysql://acsp:s3cret@db/acsp"})
    assert "s3cret" not in str(caught.value)
    assert "***" in str(caught.value)


def test_redact_url_hides_password_only() -> None:
    assert redact_url("postgresql://u:pw@h:5432/d") == "postgresql://u:***@h:5432/d"
    assert redact_url("postgresql://u@h/d") == "postgresql://u@h/d"


def test_require_names_variable_of_unset_field() -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({}).require("database_url")
    assert caught.value.variable == "ACSP_DATABASE_URL"


@dataclass(frozen=True)
class LedgerSettings(Settings):
    hold_ttl_s: float = setting("ACSP_TEST_HOLD_TTL_S", 900.0, "seconds a hold lives", minimum=1)
    batch: bool = setting("ACSP_TEST_BATCH", True, "whether to batch postings")
    quantum: Decimal = setting("ACSP_TEST_QUANTUM", Decimal("1e-24"), "smallest amount")

    def validate(self) -> None:
        super().validate()
        if not self.batch and self.hold_ttl_s > 3600:
            raise SettingsError("ACSP_TEST_HOLD_TTL_S", "too long without batching", "lower it")


def test_subclass_adds_typed_fields() -> None:
    settings = LedgerSettings.from_env(
        {"ACSP_TEST_HOLD_TTL_S": "60", "ACSP_TEST_BATCH": "no", "ACSP_TEST_QUANTUM": "0.001"}
    )
    assert settings.hold_ttl_s == 60.0
    assert settings.batch is False
    assert settings.quantum == Decimal("0.001")
    assert settings.db_pool_max == 10


@pytest.mark.parametrize("raw", ["NaN", "Infinity", "-inf", "sNaN"])
def test_decimal_field_rejects_non_finite(raw: str) -> None:
    with pytest.raises(SettingsError) as caught:
        LedgerSettings.from_env({"ACSP_TEST_QUANTUM": raw})
    assert caught.value.variable == "ACSP_TEST_QUANTUM"
    assert "finite" in str(caught.value)


def test_decimal_field_rejects_text() -> None:
    with pytest.raises(SettingsError) as caught:
        LedgerSettings.from_env({"ACSP_TEST_QUANTUM": "abc"})
    assert caught.value.variable == "ACSP_TEST_QUANTUM"
    assert "'abc' is invalid: expected a decimal number" in str(caught.value)
    assert "ConversionSyntax" not in str(caught.value)


def test_subclass_validation_runs() -> None:
    with pytest.raises(SettingsError) as caught:
        LedgerSettings.from_env({"ACSP_TEST_HOLD_TTL_S": "7200", "ACSP_TEST_BATCH": "false"})
    assert caught.value.variable == "ACSP_TEST_HOLD_TTL_S"


def test_settings_are_frozen() -> None:
    settings = Settings.from_env({})
    with pytest.raises(AttributeError):
        settings.db_pool_max = 3  # type: ignore[misc]
