"""Tokens, principals and role checks, without a server."""

from __future__ import annotations

import datetime
import time
from pathlib import Path

import pytest

from services.runtime.auth import (
    Authenticator,
    Principal,
    Role,
    TokenVerifier,
    ensure_signing_key,
    generate_signing_key,
    is_principal_name,
    is_public_method,
    load_public_key,
    load_signing_key,
    mint_token,
    require_roles,
    reset_principal,
    roles_required,
    set_principal,
)
from services.runtime.errors import PermissionDenied, Unauthenticated
from tests.runtime.conftest import Keys


def verifier_for(keys: Keys) -> TokenVerifier:
    return TokenVerifier(load_public_key(keys.public_path))


def test_token_round_trip_carries_claims(keys: Keys) -> None:
    token = mint_token(keys.private_key, "olga", [Role.PROVIDER_OPERATOR], provider="northcloud")
    principal = verifier_for(keys).verify(token)
    assert principal.kind == "user"
    assert principal.subject == "olga"
    assert principal.roles == frozenset({Role.PROVIDER_OPERATOR})
    assert principal.provider == "northcloud"
    assert principal.token_id is not None


def test_service_role_makes_service_principal(keys: Keys) -> None:
    principal = verifier_for(keys).verify(mint_token(keys.private_key, "scheduler", ["service"]))
    assert principal.kind == "service"
    assert principal.roles == frozenset({Role.SERVICE})


def test_private_key_file_is_owner_only(tmp_path: Path) -> None:
    private_path, public_path = generate_signing_key(tmp_path)
    assert private_path.stat().st_mode & 0o777 == 0o600
    assert public_path.read_text().startswith("-----BEGIN PUBLIC KEY-----")


def test_ensure_signing_key_keeps_existing_pair(tmp_path: Path) -> None:
    first = ensure_signing_key(tmp_path)
    content = first[0].read_bytes()
    second = ensure_signing_key(tmp_path)
    assert second == first
    assert second[0].read_bytes() == content


def test_expired_token_is_unauthenticated(keys: Keys) -> None:
    long_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=2)
    token = mint_token(keys.private_key, "alice", [Role.PI], now=long_ago)
    with pytest.raises(Unauthenticated) as caught:
        verifier_for(keys).verify(token)
    assert "expired" in str(caught.value)


def test_token_from_other_key_is_unauthenticated(keys: Keys, tmp_path: Path) -> None:
    other_private, _ = generate_signing_key(tmp_path / "other")
    token = mint_token(load_signing_key(other_private), "mallory", [Role.PROGRAM_OFFICE])
    with pytest.raises(Unauthenticated) as caught:
        verifier_for(keys).verify(token)
    assert "invalid" in str(caught.value)


def test_tampered_token_is_unauthenticated(keys: Keys) -> None:
    header, payload, signature = mint_token(keys.private_key, "alice", [Role.PI]).split(".")
    tampered = ".".join(
        (header, payload, signature[:-4] + ("AAAA" if signature[-4:] != "AAAA" else "BBBB"))
    )
    with pytest.raises(Unauthenticated):
        verifier_for(keys).verify(tampered)


def test_unsigned_token_is_unauthenticated(keys: Keys) -> None:
    import jwt

    unsigned = jwt.encode(
        {"sub": "alice", "roles": ["pi"], "iss": "acsp", "aud": "acsp", "iat": 0, "exp": 2**40},
        key="",
        algorithm="none",
    )
    with pytest.raises(Unauthenticated):
        verifier_for(keys).verify(unsigned)


@pytest.mark.parametrize(
    ("roles", "claims", "phrase"),
    [
        ([], {}, "at least one role"),
        (["admin"], {}, "is not a valid Role"),
        ([Role.PROVIDER_OPERATOR], {}, "needs the provider"),
    ],
)
def test_mint_rejects_bad_claims(
    keys: Keys, roles: list[str], claims: dict[str, str], phrase: str
) -> None:
    with pytest.raises(ValueError) as caught:
        mint_token(keys.private_key, "alice", roles, **claims)  # type: ignore[arg-type]
    assert phrase in str(caught.value)


def test_bearer_takes_precedence_over_certificate(keys: Keys) -> None:
    authenticator = Authenticator(verifier_for(keys))
    token = mint_token(keys.private_key, "alice", [Role.RESEARCHER])
    peer = {"peer_spiffe_id": [b"spiffe://acsp/service/grant"]}
    principal = authenticator.authenticate([("authorization", f"Bearer {token}")], peer)
    assert principal.subject == "alice"


def test_service_certificate_identifies_service(keys: Keys) -> None:
    authenticator = Authenticator(None)
    peer = {"x509_subject_alternative_name": [b"localhost", b"spiffe://acsp/service/metering"]}
    principal = authenticator.authenticate([], peer)
    assert principal == Principal(
        kind="service", subject="metering", roles=frozenset({Role.SERVICE})
    )


def test_client_certificate_alone_is_unauthenticated(keys: Keys) -> None:
    peer = {"peer_spiffe_id": [b"spiffe://acsp/client/laptop"]}
    with pytest.raises(Unauthenticated) as caught:
        Authenticator(verifier_for(keys)).authenticate([], peer)
    assert "missing credentials" in str(caught.value)


def test_token_without_verifier_names_variable(keys: Keys) -> None:
    token = mint_token(keys.private_key, "alice", [Role.PI])
    with pytest.raises(Unauthenticated) as caught:
        Authenticator(None).authenticate([("authorization", f"Bearer {token}")], {})
    assert "ACSP_TOKEN_PUBLIC_KEY" in str(caught.value)


def test_require_roles_checks_current_principal() -> None:
    principal = Principal(kind="user", subject="rita", roles=frozenset({Role.REVIEWER}))
    token = set_principal(principal)
    try:
        assert require_roles(Role.REVIEWER, Role.PROGRAM_OFFICE) is principal
        with pytest.raises(PermissionDenied) as caught:
            require_roles(Role.PI)
    finally:
        reset_principal(token)
    assert "user 'rita' has reviewer; this call needs one of pi" == str(caught.value)


def test_require_roles_outside_call_is_unauthenticated() -> None:
    with pytest.raises(Unauthenticated):
        require_roles(Role.PI)


def test_roles_required_decorator_checks_before_running() -> None:
    ran: list[str] = []

    @roles_required(Role.PROGRAM_OFFICE)
    def award(grant_id: str) -> str:
        ran.append(grant_id)
        return grant_id

    token = set_principal(Principal(kind="user", subject="p", roles=frozenset({Role.PI})))
    try:
        with pytest.raises(PermissionDenied):
            award("g-1")
    finally:
        reset_principal(token)
    assert ran == []


@pytest.mark.parametrize(
    ("method", "public"),
    [
        ("/grpc.health.v1.Health/Check", True),
        ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", True),
        ("/acsp.v1.GrantService/AwardGrant", False),
        ("/grpc.health.v1.HealthX/Check", False),
    ],
)
def test_public_methods(method: str, public: bool) -> None:
    assert is_public_method(method) is public


def test_verified_token_is_cached_until_expiry(keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    verifier = verifier_for(keys)
    decoded: list[str] = []
    original = verifier._decode

    def counting_decode(token: str) -> dict[str, object]:
        decoded.append(token)
        return original(token)

    monkeypatch.setattr(verifier, "_decode", counting_decode)
    token = mint_token(keys.private_key, "alice", [Role.PI], ttl=datetime.timedelta(minutes=5))
    first = verifier.verify(token)
    second = verifier.verify(token)
    assert second is first
    assert len(decoded) == 1
    # Past expiry and leeway, the cached entry is dropped and the token is checked again.
    later = time.time() + 10 * 60
    monkeypatch.setattr("services.runtime.auth.time.time", lambda: later)
    verifier.verify(token)
    assert len(decoded) == 2


def test_token_cache_is_bounded(keys: Keys) -> None:
    verifier = TokenVerifier(load_public_key(keys.public_path), cache_size=3)
    tokens = [mint_token(keys.private_key, f"user-{n}", [Role.RESEARCHER]) for n in range(5)]
    for token in tokens:
        verifier.verify(token)
    assert list(verifier._verified) == tokens[2:]


@pytest.mark.parametrize("subject", ["", "bad name", ".alice", "alice/bob", "a" * 129, "ålice"])
def test_mint_rejects_bad_subjects(keys: Keys, subject: str) -> None:
    with pytest.raises(ValueError) as caught:
        mint_token(keys.private_key, subject, [Role.PI])
    assert "subject" in str(caught.value)


@pytest.mark.parametrize(
    "subject", ["alice", "alice@uni.example", "b.o_b-2", "Carol+lab", "a" * 128]
)
def test_principal_names_accepted(keys: Keys, subject: str) -> None:
    assert is_principal_name(subject)
    token = mint_token(keys.private_key, subject, [Role.PI])
    assert verifier_for(keys).verify(token).subject == subject


def test_verify_accepts_subject_minted_before_rule(keys: Keys) -> None:
    # Tokens minted before the rule for principal names existed, such as a subject with a
    # space, stay valid until they expire: the rule applies where names are minted or stored.
    import jwt

    now = int(time.time())
    claims = {"sub": "Ada Lovelace", "roles": ["pi"], "iss": "acsp", "aud": "acsp"}
    token = jwt.encode({**claims, "iat": now, "exp": now + 60}, keys.private_key, "EdDSA")
    assert verifier_for(keys).verify(token).subject == "Ada Lovelace"
