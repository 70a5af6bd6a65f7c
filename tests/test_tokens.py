"""JWT verification (broker/server/tokens.py) with real PyJWT tokens and
cryptography-generated RSA, EC and Ed25519 keys, and the claims rules of
broker/core/claims.py (with a brute-force reference for `workflows`).
The daemon with `auth.mode = "jwt"` is tested end to end in
tests/test_security.py."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import given
from hypothesis import strategies as st

from broker.core.claims import Grant
from broker.core.errors import Unauthenticated
from broker.server.tokens import Verifier, token_of

SECRET = b"a-test-secret-long-enough-for-hs512-which-wants-sixty-four-bytes"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
ED_KEY = ed25519.Ed25519PrivateKey.generate()


def pem(key: Any) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def claims(**over: Any) -> dict[str, Any]:
    base = {"sub": "ada", "tenant": "acme", "scope": "subscribe", "exp": int(time.time()) + 300}
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def reason(verifier: Verifier, token: str) -> str:
    with pytest.raises(Unauthenticated) as info:
        verifier.verify(token)
    message = info.value.message
    assert token not in message and SECRET.decode() not in message
    return message


def test_hmac_tokens_verify_and_every_refusal_says_why() -> None:
    v = Verifier(["HS256"], secret=SECRET, audience="broker", issuer="idp", leeway=5)
    good = jwt.encode(claims(aud="broker", iss="idp"), SECRET, algorithm="HS256")
    assert v.verify(good)["sub"] == "ada"
    assert "expired" in reason(v, jwt.encode(claims(aud="broker", iss="idp", exp=int(time.time()) - 60), SECRET))
    assert "no 'exp'" in reason(v, jwt.encode(claims(aud="broker", iss="idp", exp=None), SECRET))
    assert "not valid yet" in reason(v, jwt.encode(claims(aud="broker", iss="idp", nbf=int(time.time()) + 60), SECRET))
    assert "bad signature" in reason(
        v,
        jwt.encode(
            claims(aud="broker", iss="idp"), b"another-secret-long-enough-for-hs512-which-wants-sixty-four-byte"
        ),
    )
    assert "wrong audience" in reason(v, jwt.encode(claims(aud="other", iss="idp"), SECRET))
    assert "wrong issuer" in reason(v, jwt.encode(claims(aud="broker", iss="evil"), SECRET))
    assert "malformed" in reason(v, "not.a.token")
    assert "algorithm 'HS512' is not accepted" in reason(
        v, jwt.encode(claims(aud="broker", iss="idp"), SECRET, "HS512")
    )
    assert "longer than" in reason(v, "x" * 9000)
    # Within the leeway, an expired token still passes.
    assert v.verify(jwt.encode(claims(aud="broker", iss="idp", exp=int(time.time()) - 2), SECRET))


def test_alg_none_and_algorithm_confusion_are_refused() -> None:
    v = Verifier(["RS256", "HS256"], secret=SECRET, public_key=pem(RSA_KEY))

    # alg none: a token with no signature at all.
    def b64(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    unsigned = f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(claims())}."
    assert "algorithm 'none' is not accepted" in reason(v, unsigned)
    # HS256 signed with the RSA public key as its secret: checked against
    # the HMAC secret, never the public key.
    # (PyJWT itself refuses to sign with a PEM key as an HMAC secret, so
    # the forgery is made by hand.)
    header = b64({"alg": "HS256", "typ": "JWT"})
    body = b64(claims())
    sig = hmac.new(pem(RSA_KEY), f"{header}.{body}".encode(), hashlib.sha256).digest()
    forged = f"{header}.{body}.{base64.urlsafe_b64encode(sig).rstrip(b'=').decode()}"
    assert "bad signature" in reason(v, forged)
    assert v.verify(jwt.encode(claims(), RSA_KEY, algorithm="RS256"))["tenant"] == "acme"


@pytest.mark.parametrize(
    ("alg", "key"),
    [("RS256", RSA_KEY), ("PS256", RSA_KEY), ("ES256", EC_KEY), ("EdDSA", ED_KEY)],
)
def test_public_key_families(alg: str, key: Any) -> None:
    v = Verifier([alg], public_key=pem(key))
    assert v.verify(jwt.encode(claims(), key, algorithm=alg))["sub"] == "ada"
    other = {"RS256": EC_KEY, "PS256": EC_KEY, "ES256": RSA_KEY, "EdDSA": EC_KEY}[alg]
    wrong_alg = {"RS256": "ES256", "PS256": "ES256", "ES256": "RS256", "EdDSA": "ES256"}[alg]
    assert "not accepted" in reason(v, jwt.encode(claims(), other, algorithm=wrong_alg))


def test_jwks_picks_the_key_by_kid() -> None:
    rsa_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(RSA_KEY.public_key()))
    ec_jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(EC_KEY.public_key()))
    jwks = {"keys": [{**rsa_jwk, "kid": "r1", "alg": "RS256"}, {**ec_jwk, "kid": "e1", "alg": "ES256"}]}
    v = Verifier(["RS256", "ES256"], jwks=jwks)
    assert v.verify(jwt.encode(claims(), RSA_KEY, algorithm="RS256", headers={"kid": "r1"}))
    assert v.verify(jwt.encode(claims(), EC_KEY, algorithm="ES256", headers={"kid": "e1"}))
    assert "unknown 'kid'" in reason(v, jwt.encode(claims(), RSA_KEY, algorithm="RS256", headers={"kid": "zz"}))
    assert "no 'kid'" in reason(v, jwt.encode(claims(), RSA_KEY, algorithm="RS256"))
    # The kid of the EC key with an RSA signature: refused.
    assert "invalid token" in reason(v, jwt.encode(claims(), RSA_KEY, algorithm="RS256", headers={"kid": "e1"}))


def test_a_verifier_needs_the_keys_its_algorithms_use() -> None:
    with pytest.raises(ValueError, match="auth.secret"):
        Verifier(["HS256"])
    with pytest.raises(ValueError, match="public_key_file"):
        Verifier(["RS256"], secret=SECRET)
    with pytest.raises(ValueError, match="unknown algorithm"):
        Verifier(["none"], secret=SECRET)


def test_token_sources_in_order() -> None:
    assert token_of({"Authorization": "Bearer abc"}, {"access_token": "q"}, {"broker_token": "c"}) == "abc"
    assert token_of({"Authorization": "Basic xyz"}, {"access_token": "q"}, {"broker_token": "c"}) == "c"
    assert token_of({}, {"access_token": "q"}, {}) == "q"
    assert token_of({}, {}, {}) is None


# ------------------------------------------------------------------ claims


def test_claims_to_a_grant() -> None:
    g = Grant.from_claims({"sub": "ada", "tenant": "acme", "scope": "subscribe publish"})
    assert g.has("subscribe") and g.has("publish") and not g.has("admin")
    assert g.may_see("acme", "anything") and not g.may_see("other", "anything")
    admin = Grant.from_claims({"sub": "root", "tenant": "acme", "scope": "admin"})
    assert all(admin.has(s) for s in ("subscribe", "publish", "control", "admin"))
    for bad in (
        {"tenant": "acme"},
        {"sub": "ada"},
        {"sub": "ada", "tenant": "acme", "scope": ["subscribe"]},
        {"sub": "ada", "tenant": "acme", "scope": "subscribe root"},
        {"sub": "ada", "tenant": "acme", "workflows": "wf-1"},
        {"sub": "ada", "tenant": "acme", "workflows": [1]},
        {"sub": "", "tenant": "acme"},
    ):
        with pytest.raises(Unauthenticated):
            Grant.from_claims(bad)


def reference(patterns: list[str], wid: str) -> bool:
    return any(wid.startswith(p[:-1]) if p.endswith("*") else wid == p for p in patterns)


@given(
    patterns=st.lists(st.text("ab*", min_size=1, max_size=4), max_size=6),
    wid=st.text("ab", min_size=1, max_size=5),
    tenant=st.sampled_from(["acme", "other"]),
)
def test_workflows_claim_matches_a_brute_force_reference(patterns: list[str], wid: str, tenant: str) -> None:
    g = Grant.from_claims({"sub": "u", "tenant": "acme", "scope": "subscribe", "workflows": patterns})
    assert g.may_see(tenant, wid) == (tenant == "acme" and reference(patterns, wid))
