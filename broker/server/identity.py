"""Who is asking: the one place a request becomes a `Principal`.

With `auth.mode = "none"` everyone is `ANONYMOUS`: no user or tenant
identity (only `limits.global` applies, DESIGN.md §6) and nothing is
restricted. With `auth.mode = "jwt"` (§7) every request needs a token
(`tokens.token_of`: the `Authorization: Bearer` header, the `broker_token`
cookie or `?access_token=`), verified by `tokens.Verifier` (PyJWT); its
claims become a `core.claims.Grant` (user, tenant, scopes, `workflows`).
A request without a valid token is refused (`Unauthenticated`, 401 / WS
4001) and never served as anonymous. What a principal may then read is
decided in the core (core/subscribe.py `authorize`), on every path.
"""

from __future__ import annotations

from collections.abc import Mapping

from werkzeug.datastructures import Headers
from werkzeug.http import parse_cookie

from ..config import AuthConfig
from ..core.claims import Grant
from ..core.errors import Unauthenticated
from ..core.limits import ANONYMOUS, Principal
from .tokens import Verifier, load_verifier, token_of

MAX_EXP = 1e12  # seconds since the epoch: a larger `exp` is no date (and overflows a float past 1e308)


class Identity:
    """The auth config's verifier, and the requests it turns into principals."""

    def __init__(self, auth: AuthConfig) -> None:
        self.mode = auth.mode
        self.required = auth.mode == "jwt"
        self.verifier: Verifier | None = load_verifier(auth)  # ConfigError if a key is unusable

    def token_of(self, headers: Headers | Mapping[str, str], args: Mapping[str, str]) -> str | None:
        """The request's token, if it carries one (header, cookie, query)."""
        cookies = parse_cookie(headers.get("Cookie", ""))
        return token_of(headers, args, cookies)

    def principal_of(self, headers: Headers | Mapping[str, str], args: Mapping[str, str]) -> Principal:
        """The request's principal; Unauthenticated without a valid token."""
        if not self.required:
            return ANONYMOUS
        token = self.token_of(headers, args)
        if token is None:
            raise Unauthenticated("a token is required: Authorization: Bearer, the broker_token cookie or access_token")
        return self.principal_of_token(token)

    def principal_of_token(self, token: str) -> Principal:
        """The principal of a token (a WebSocket `auth` op, or a request's)."""
        if self.verifier is None:
            return ANONYMOUS
        claims = self.verifier.verify(token)
        exp = claims.get("exp")  # required and checked by the verifier: a number in the future
        if not isinstance(exp, (int, float)) or not 0 < exp < MAX_EXP:
            raise Unauthenticated("invalid token: 'exp' out of range")
        # Open until the verifier would refuse it: `exp` plus the leeway.
        return Principal.of(Grant.from_claims(claims), float(exp) + self.verifier.leeway)
