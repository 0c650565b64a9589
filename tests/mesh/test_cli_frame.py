"""The mesh file, token minting and the CLI frame, without starting a mesh."""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import os
import subprocess
from decimal import Decimal
from pathlib import Path

import grpc
import jwt
import pytest
from google.rpc import error_details_pb2, status_pb2

from acsp.cli import _common, main, mesh
from acsp.mesh._ports import free_port
from acsp.mesh.credentials import mint_token, prepare
from acsp.mesh.endpoints import MeshInfo, MeshNotFoundError, load_mesh
from acsp.mesh.stop import supervisor_running
from acsp.mesh.supervisor import LocalMesh, MeshConfig, MeshStartError


def _info(data_dir: Path) -> MeshInfo:
    return MeshInfo(
        data_dir=data_dir,
        endpoints={"grant": "127.0.0.1:1", "scheduler": "127.0.0.1:2", "metering": "127.0.0.1:3"},
        ca_cert=data_dir / "tls" / "ca.crt",
        token_key=data_dir / "token" / "signing.key",
        database_url="postgresql://postgres@127.0.0.1:5/acsp",
        nats_url="nats://127.0.0.1:6",
        supervisor_pid=os.getpid(),
        client_cert=data_dir / "tls" / "client.crt",
        client_key=data_dir / "tls" / "client.key",
        extra={"pids": {"grant": 11}},
    )


def test_mesh_file_round_trip(tmp_path: Path):
    written = _info(tmp_path)
    written.write()
    loaded = load_mesh(tmp_path)
    assert loaded == written
    assert supervisor_running(loaded)


def test_mesh_file_missing_names_the_fix(tmp_path: Path):
    with pytest.raises(MeshNotFoundError, match="acsp up"):
        load_mesh(tmp_path)


def test_mesh_file_of_other_version_is_rejected(tmp_path: Path):
    document = _info(tmp_path).to_json()
    document["format_version"] = 99
    (tmp_path / "mesh.json").write_text(json.dumps(document))
    with pytest.raises(ValueError, match="format_version"):
        load_mesh(tmp_path)


def test_unknown_endpoint_lists_known_ones(tmp_path: Path):
    with pytest.raises(KeyError, match="grant, metering, scheduler"):
        _info(tmp_path).endpoint("billing")


def test_minted_token_carries_claims(tmp_path: Path):
    credentials = prepare(tmp_path, services=["grant"])
    token = credentials.mint_token(role="pi", subject="alice", institution="uni-a", ttl_s=60)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["sub"] == "alice"
    assert claims["roles"] == ["pi"]
    assert claims["inst"] == "uni-a"
    assert claims["exp"] - claims["iat"] == 60


def test_prepare_keeps_existing_key(tmp_path: Path):
    first = prepare(tmp_path, services=["grant"])
    key_bytes = first.token_private_key.read_bytes()
    second = prepare(tmp_path, services=["grant", "scheduler"])
    assert second.token_private_key.read_bytes() == key_bytes
    assert second.identities["scheduler"].cert.is_file()


def test_unknown_role_is_rejected(tmp_path: Path):
    credentials = prepare(tmp_path, services=[])
    with pytest.raises(ValueError, match="unknown role 'admin'"):
        mint_token(credentials.token_private_key, role="admin", subject="x")


def test_provider_operator_needs_provider(tmp_path: Path):
    credentials = prepare(tmp_path, services=[])
    with pytest.raises(ValueError, match="provider"):
        mint_token(credentials.token_private_key, role="provider_operator", subject="op")


def test_token_command_prints_token(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    prepare(tmp_path, services=[])
    code = main.main(
        ["token", "--data-dir", str(tmp_path), "--role", "reviewer", "--subject", "bob"]
    )
    output = capsys.readouterr().out.strip()
    assert code == _common.EXIT_OK
    assert jwt.decode(output, options={"verify_signature": False})["roles"] == ["reviewer"]


def test_token_command_accepts_maximum_ttl(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    prepare(tmp_path, services=[])
    argv = ["token", "--data-dir", str(tmp_path), "--role", "pi", "--subject", "a"]
    code = main.main([*argv, "--ttl", str(mesh.MAX_TOKEN_TTL_S)])
    claims = jwt.decode(capsys.readouterr().out.strip(), options={"verify_signature": False})
    assert code == _common.EXIT_OK
    assert claims["exp"] - claims["iat"] == mesh.MAX_TOKEN_TTL_S


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (["--role", "pi", "--subject", " "], "--subject is empty"),
        (["--role", "provider-operator", "--subject", "op"], "--provider is missing"),
    ],
)
def test_token_command_names_missing_claim(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], options: list[str], named: str
):
    prepare(tmp_path, services=[])
    code = main.main(["token", "--data-dir", str(tmp_path), *options])
    captured = capsys.readouterr()
    assert code == _common.EXIT_USAGE
    assert named in captured.err
    assert captured.out == ""


def test_token_command_without_key_exits_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    code = main.main(["token", "--data-dir", str(tmp_path), "--role", "pi", "--subject", "a"])
    assert code == _common.EXIT_NO_MESH
    assert "acsp up" in capsys.readouterr().err


def test_status_without_mesh_exits_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    code = main.main(["status", "--data-dir", str(tmp_path)])
    assert code == _common.EXIT_NO_MESH
    assert "no running mesh found" in capsys.readouterr().err


def test_status_of_killed_mesh_exits_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    credentials = prepare(tmp_path, services=[])
    ended = subprocess.Popen(["true"])
    ended.wait()
    info = MeshInfo(
        data_dir=tmp_path.resolve(),
        endpoints={"grant": f"127.0.0.1:{free_port()}"},
        ca_cert=credentials.client_identity.ca,
        token_key=credentials.token_private_key,
        database_url="postgresql://127.0.0.1:1/acsp",
        nats_url="nats://127.0.0.1:1",
        supervisor_pid=ended.pid,
        extra={"pids": {"fleet": ended.pid}},
    )
    info.write()

    code = main.main(["status", "--data-dir", str(tmp_path), "--timeout", "2"])

    assert code == _common.EXIT_NO_MESH
    assert "is not running" in capsys.readouterr().err


def test_no_command_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]):
    assert main.main([]) == _common.EXIT_USAGE
    assert "usage: acsp" in capsys.readouterr().err


def test_parser_has_mesh_commands():
    parser = main.build_parser()
    for command in ("up", "status", "token"):
        assert (
            parser.parse_args(
                [command] if command != "token" else ["token", "--role", "pi", "--subject", "a"]
            ).func
            is not None
        )


def test_records_print_as_csv_with_exact_decimals():
    stream = io.StringIO()
    records = [{"grant": "g-1", "available": "12.000000000000000000000001"}]
    _common.print_records(records, ["grant", "available"], output_format="csv", stream=stream)
    assert stream.getvalue().splitlines() == ["grant,available", "g-1,12.000000000000000000000001"]


def test_records_print_as_table():
    stream = io.StringIO()
    _common.print_records([{"a": 1, "b": None}], ["a", "b"], stream=stream)
    assert "a" in stream.getvalue()
    assert "1" in stream.getvalue()


EXACT_AMOUNT = Decimal("0.000123456789012345678901")


def test_table_rounds_amounts():
    stream = io.StringIO()
    records = [{"grant": "g-1", "charged": EXACT_AMOUNT}, {"grant": "g-2", "charged": Decimal(12)}]
    _common.print_records(records, ["grant", "charged"], stream=stream)
    cells = [line.replace("│", " ").split() for line in stream.getvalue().splitlines()]
    assert ["g-1", "0.000123"] in cells
    assert ["g-2", "12"] in cells
    assert "0.000123456" not in stream.getvalue()


@pytest.mark.parametrize(
    ("amount", "shown"),
    [
        ("0.000123456789012345678901", "0.000123"),
        ("12.000000000000000000000001", "12"),
        ("2.5", "2.5"),
        ("0.0000015", "0.000002"),
        ("-3.75", "-3.75"),
        ("0", "0"),
        ("0E-24", "0"),
        ("-0", "0"),
        ("0.0000001", "<0.000001"),
        ("-0.0000001", ">-0.000001"),
        ("1E+30", "1" + "0" * 30),
    ],
)
def test_table_amount_rounding(amount: str, shown: str):
    assert _common.table_amount(Decimal(amount)) == shown


def test_csv_and_json_keep_exact_amounts():
    records = [{"grant": "g-1", "charged": EXACT_AMOUNT, "small": Decimal("1E-8")}]
    columns = ["grant", "charged", "small"]
    csv_out = io.StringIO()
    _common.print_records(records, columns, output_format="csv", stream=csv_out)
    assert csv_out.getvalue().splitlines()[1] == "g-1,0.000123456789012345678901,0.00000001"
    json_out = io.StringIO()
    _common.print_records(records, columns, output_format="json", stream=json_out)
    document = json.loads(json_out.getvalue())
    assert document["charged"] == "0.000123456789012345678901"
    assert document["small"] == "0.00000001"


def test_json_keeps_value_types():
    record = {"job": "j-1", "attempt": 2, "ready": True, "share": 0.25, "hold": None}
    stream = io.StringIO()
    _common.print_records([record], list(record), output_format="json", stream=stream)
    document = json.loads(stream.getvalue())
    assert document["job"] == "j-1"
    assert document["attempt"] == 2
    assert document["ready"] is True
    assert document["share"] == 0.25
    assert document["hold"] is None


def test_format_help_states_rounding(capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit):
        main.build_parser().parse_args(["usage", "rates", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "A table rounds amounts to 6 decimal places" in text
    assert "JSON writes exact decimal amounts as strings" in text
    assert "json (JSON lines, one object per line)" in text


def test_bools_print_as_yes_no_in_tables():
    records = [{"job": "j-1", "ready": True}, {"job": "j-2", "ready": False}]
    table = io.StringIO()
    csv_out = io.StringIO()
    _common.print_records(records, ["job", "ready"], stream=table)
    _common.print_records(records, ["job", "ready"], output_format="csv", stream=csv_out)
    rows = [line.split() for line in table.getvalue().splitlines()]
    assert ["j-1", "│", "yes"] in rows
    assert ["j-2", "│", "no"] in rows
    assert csv_out.getvalue() == "job,ready\nj-1,true\nj-2,false\n"


class _FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def test_rpc_error_prints_code_and_message():
    error = _FakeRpcError(grpc.StatusCode.NOT_FOUND, "grant g-9 not found")
    assert _common.describe_rpc_error(error) == "NOT_FOUND: grant g-9 not found"
    assert _common.exit_code_for_rpc_error(error) == _common.EXIT_FAILURE


class _FakeMissing(_FakeRpcError):
    """A NOT_FOUND error whose status details name the missing object's kind."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(grpc.StatusCode.NOT_FOUND, message)
        status = status_pb2.Status(code=grpc.StatusCode.NOT_FOUND.value[0], message=message)
        status.details.add().Pack(error_details_pb2.ResourceInfo(resource_type=kind))
        self._trailers = ((_common.STATUS_DETAILS_KEY, status.SerializeToString()),)

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        return self._trailers


def test_not_found_error_says_what_to_run():
    project = _FakeMissing("project", "project 'nosuch-lab' not found")
    unknown_kind = _FakeMissing("hold", "hold 'h-1' not found")

    assert _common.describe_rpc_error(project) == (
        "NOT_FOUND: project 'nosuch-lab' not found; check the project id (ids are "
        "case-sensitive) and ask its PI to add you, because a project you are not a member "
        "of is not found either, or create the project with acsp grants project"
    )
    assert _common.describe_rpc_error(unknown_kind) == "NOT_FOUND: hold 'h-1' not found"


def test_unavailable_maps_to_no_mesh_exit():
    error = _FakeRpcError(grpc.StatusCode.UNAVAILABLE, "connection refused")
    assert _common.exit_code_for_rpc_error(error) == _common.EXIT_NO_MESH


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED])
def test_unreachable_service_error_says_where_to_look(code: grpc.StatusCode):
    message = _common.describe_rpc_error(_FakeRpcError(code, "failed to connect"))
    first_line, hint = message.split("\n")
    assert first_line == f"{code.name}: failed to connect"
    assert "run acsp status" in hint
    assert "logs" in hint
    assert "data dir" in hint


def test_command_rpc_error_prints_without_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    build_parser = main.build_parser

    def failing(args: object) -> int:
        raise _FakeRpcError(grpc.StatusCode.PERMISSION_DENIED, "needs program_office")

    def build_failing_parser() -> argparse.ArgumentParser:
        parser = build_parser()
        parser.set_defaults(func=failing)
        return parser

    monkeypatch.setattr(main, "build_parser", build_failing_parser)
    code = main.main([])
    err = capsys.readouterr().err
    assert code == _common.EXIT_FAILURE
    assert err == "error: PERMISSION_DENIED: needs program_office\n"


async def test_busy_data_dir_refused_without_stop(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    # A mesh file whose supervisor runs, as another `acsp up` on this data dir leaves it.
    info = dataclasses.replace(_info(tmp_path), supervisor_pid=os.getppid())
    info.write()
    caplog.set_level(logging.INFO, logger="acsp.mesh")
    with pytest.raises(MeshStartError, match="another mesh"):
        await LocalMesh(MeshConfig(tmp_path, agents=0)).start()
    assert "stopped" not in caplog.text
    assert load_mesh(tmp_path) == info


def _options_without_help(parser: argparse.ArgumentParser, path: str) -> list[str]:
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, command in action.choices.items():
                missing += _options_without_help(command, f"{path} {name}")
        elif action.option_strings and action.help is None:
            missing.append(f"{path} {action.option_strings[-1]}")
    return missing


def test_every_option_has_help():
    assert _options_without_help(main.build_parser(), "acsp") == []
