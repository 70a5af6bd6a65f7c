"""Who is asking: the one place a request becomes a `Principal`.

With `auth.mode = "none"` (the only mode the config accepts so far)
everyone is `ANONYMOUS`: no user or tenant identity, so only
`limits.global` applies (DESIGN.md §6). JWT (§7) will read the token here
(`tokens.token_of`: header, cookie or `access_token` query), verify it
(`tokens.Verifier`, PyJWT) and turn its claims into a `core.claims.Grant`
(user, tenant, scopes, `workflows`); the limits, and every handler,
already take the principal from this function. "jwt" stays refused until
tenant isolation covers every path (multi-workflow streams included).
"""

from __future__ import annotations

from collections.abc import Mapping

from werkzeug.datastructures import Headers

from ..config import Config
from ..core.limits import ANONYMOUS, Principal


def principal_of(config: Config, headers: Headers | Mapping[str, str], args: Mapping[str, str]) -> Principal:
    if config.auth.mode == "none":
        return ANONYMOUS
    raise AssertionError(f"auth.mode {config.auth.mode!r} is not built")  # config refuses it
