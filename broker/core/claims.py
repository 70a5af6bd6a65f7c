"""A verified token's claims → what its holder may do (DESIGN.md §7).

The signature, `exp`, `nbf`, `iat`, `aud` and `iss` are checked by the
verifier (server/tokens.py, PyJWT); this module reads the claims that
remain and decides, once, for every transport and endpoint:

- `Grant.from_claims()`: `sub` (the user), `tenant`, `scope` (space-
  separated `subscribe`, `publish`, `control`, `admin`; `admin` implies
  the others), optional `workflows` (ids, or `prefix*` patterns). A claim
  of the wrong shape is Unauthenticated: the token is refused whole, never
  read as "no restriction".
- `Grant.has(scope)`, `Grant.may_see(tenant, workflow_id)`.

Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import Unauthenticated

SCOPES = ("subscribe", "publish", "control", "admin")
MAX_PATTERNS = 1000  # entries of a `workflows` claim
MAX_NAME = 256  # characters of `sub`, `tenant`, a pattern (the envelope's id limit)


@dataclass(frozen=True, slots=True)
class Grant:
    user: str
    tenant: str
    scopes: frozenset[str]
    # None: every workflow of the tenant; else exact ids and id prefixes.
    ids: frozenset[str] | None = None
    prefixes: tuple[str, ...] = ()

    @classmethod
    def from_claims(cls, claims: Mapping[str, Any]) -> Grant:
        user = _name(claims, "sub")
        tenant = _name(claims, "tenant")
        raw_scope = claims.get("scope", "")
        if not isinstance(raw_scope, str):
            raise Unauthenticated("invalid token: 'scope' must be a space-separated string")
        scopes = frozenset(raw_scope.split())
        unknown = scopes - set(SCOPES)
        if unknown:
            raise Unauthenticated(f"invalid token: unknown scope {sorted(unknown)[0][:40]!r}")
        if "admin" in scopes:
            scopes = frozenset(SCOPES)
        if "workflows" not in claims:
            return cls(user, tenant, scopes)
        patterns = claims["workflows"]
        if not isinstance(patterns, list) or len(patterns) > MAX_PATTERNS:
            raise Unauthenticated(f"invalid token: 'workflows' must be a list of at most {MAX_PATTERNS} ids")
        ids: set[str] = set()
        prefixes: list[str] = []
        for pattern in patterns:
            if not isinstance(pattern, str) or not 1 <= len(pattern) <= MAX_NAME:
                raise Unauthenticated("invalid token: each 'workflows' entry must be a workflow id or 'prefix*'")
            if pattern.endswith("*"):
                prefixes.append(pattern[:-1])
            else:
                ids.add(pattern)
        return cls(user, tenant, scopes, frozenset(ids), tuple(sorted(set(prefixes))))

    def has(self, scope: str) -> bool:
        return scope in self.scopes

    def may_see(self, tenant: str, workflow_id: str) -> bool:
        """Whether a workflow of `tenant` with this id is visible at all."""
        if tenant != self.tenant:
            return False
        if self.ids is None:
            return True
        return workflow_id in self.ids or workflow_id.startswith(self.prefixes)


def _name(claims: Mapping[str, Any], key: str) -> str:
    value = claims.get(key)
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_NAME:
        raise Unauthenticated(f"invalid token: '{key}' must be a string of 1-{MAX_NAME} characters")
    return value
