"""JWT verification (DESIGN.md §7) with PyJWT: the one place a token is
checked. server/identity.py calls it for every request when
`auth.mode = "jwt"` (core/claims.py decides what a verified token's holder
may see); `load_verifier` builds it from the config's keys at start.

Keys, one per algorithm family: an HMAC secret (HS256/384/512), a PEM
public key (RS*, PS*, ES*, EdDSA), or a JWKS document whose `kid` picks the
key. Only the configured algorithms are accepted, and a token's `alg`
chooses the family before anything else: `alg: none` is refused, and an
RSA public key is never tried as an HMAC secret (algorithm confusion).
`exp` is required; `nbf` and `iat` are honoured with `leeway` seconds of
clock skew; `aud` and `iss` are checked when configured. Every refusal is
an `Unauthenticated` whose message says why (`expired`, `bad signature`,
`wrong audience`, …) and never holds the token or a key.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jwt
import orjson
from werkzeug.datastructures import Headers

from ..config import AuthConfig, ConfigError
from ..core.errors import Unauthenticated

HMAC = frozenset({"HS256", "HS384", "HS512"})
PUBLIC = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"})
MAX_TOKEN = 8192  # characters: a token larger than this is refused unread
COOKIE = "broker_token"


class Verifier:
    def __init__(
        self,
        algorithms: Sequence[str],
        *,
        secret: bytes | None = None,
        public_key: str | bytes | None = None,
        jwks: Mapping[str, Any] | None = None,
        audience: str = "",
        issuer: str = "",
        leeway: float = 30.0,
    ) -> None:
        unknown = [a for a in algorithms if a not in HMAC | PUBLIC]
        if unknown:
            raise ValueError(f"'auth.algorithms': unknown algorithm {unknown[0]!r}")
        self.algorithms = frozenset(algorithms)
        if self.algorithms & HMAC and not secret:
            raise ValueError("'auth.algorithms' lists an HS* algorithm but no auth.secret / auth.secret_file is set")
        if self.algorithms & PUBLIC and public_key is None and jwks is None:
            raise ValueError("'auth.algorithms' lists a public-key algorithm but no auth.public_key_file / jwks_file")
        self.secret = secret
        self.public_key = _load_public(public_key)
        self.jwks = jwt.PyJWKSet.from_dict(dict(jwks)) if jwks is not None else None
        self.audience = audience or None
        self.issuer = issuer or None
        self.leeway = leeway

    def verify(self, token: str) -> dict[str, Any]:
        """The token's claims, or Unauthenticated with the reason."""
        if len(token) > MAX_TOKEN:
            raise Unauthenticated(f"invalid token: longer than {MAX_TOKEN} characters")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError:
            raise Unauthenticated("invalid token: malformed") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            shown = alg[:20] if isinstance(alg, str) else type(alg).__name__
            raise Unauthenticated(f"invalid token: algorithm {shown!r} is not accepted")
        key = self._key(alg, header)
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key,
                algorithms=[alg],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options={"require": ["exp"], "verify_aud": self.audience is not None},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("invalid token: expired") from None
        except jwt.ImmatureSignatureError:
            raise Unauthenticated("invalid token: not valid yet") from None
        except jwt.InvalidSignatureError:
            raise Unauthenticated("invalid token: bad signature") from None
        except jwt.InvalidAudienceError:
            raise Unauthenticated("invalid token: wrong audience") from None
        except jwt.InvalidIssuerError:
            raise Unauthenticated("invalid token: wrong issuer") from None
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthenticated(f"invalid token: no '{exc.claim}' claim") from None
        except jwt.InvalidKeyError:
            raise Unauthenticated("invalid token: the key does not fit its algorithm") from None
        except jwt.InvalidTokenError as exc:  # the rest: malformed claims and the like
            raise Unauthenticated(f"invalid token: {type(exc).__name__}") from None
        return claims

    def _key(self, alg: str, header: Mapping[str, Any]) -> Any:
        if alg in HMAC:
            return self.secret
        if self.jwks is not None:
            kid = header.get("kid")
            if not isinstance(kid, str):
                if self.public_key is not None:
                    return self.public_key
                raise Unauthenticated("invalid token: no 'kid' to choose a key")
            for k in self.jwks.keys:
                if k.key_id == kid:
                    return k
            raise Unauthenticated("invalid token: unknown 'kid'")
        return self.public_key


def _load_public(pem: str | bytes | None) -> Any:
    if pem is None:
        return None
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    data = pem.encode() if isinstance(pem, str) else pem
    try:
        return load_pem_public_key(data)
    except ValueError:
        raise ValueError("'auth.public_key_file': not a PEM public key") from None


def token_of(headers: Headers | Mapping[str, str], args: Mapping[str, str], cookies: Mapping[str, str]) -> str | None:
    """The request's token: `Authorization: Bearer`, the `broker_token`
    cookie, or `?access_token=` (EventSource cannot set headers), in that
    order; None if there is none."""
    auth = headers.get("Authorization")
    if auth is not None:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    cookie = cookies.get(COOKIE)
    if cookie:
        return cookie
    query = args.get("access_token")
    return query or None


def _read(key: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"config key 'auth.{key}': cannot read {path}: {exc.strerror}") from None


def load_verifier(auth: AuthConfig) -> Verifier | None:
    """The verifier of `auth` (None when auth.mode is "none"), its key files
    read now; ConfigError naming the key if one is missing or unusable."""
    if auth.mode != "jwt":
        return None
    secret: bytes | None = auth.secret.encode() if auth.secret else None
    if auth.secret_file:
        secret = _read("secret_file", auth.secret_file).rstrip(b"\r\n")
        if not secret:
            raise ConfigError(f"config key 'auth.secret_file': {auth.secret_file} is empty")
    public_key = _read("public_key_file", auth.public_key_file) if auth.public_key_file else None
    jwks: dict[str, Any] | None = None
    if auth.jwks_file:
        try:
            jwks = orjson.loads(_read("jwks_file", auth.jwks_file))
        except orjson.JSONDecodeError:
            raise ConfigError(f"config key 'auth.jwks_file': {auth.jwks_file} is not JSON") from None
        if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list):
            raise ConfigError(f"config key 'auth.jwks_file': {auth.jwks_file} is not a JWKS document")
    try:
        return Verifier(
            auth.algorithms,
            secret=secret,
            public_key=public_key,
            jwks=jwks,
            audience=auth.audience,
            issuer=auth.issuer,
            leeway=auth.leeway,
        )
    except ValueError as exc:
        raise ConfigError(f"config key {exc}") from None
    except jwt.PyJWKError as exc:
        raise ConfigError(f"config key 'auth.jwks_file': {exc}") from None
