"""Bearer API keys and the tenants they map to."""

from __future__ import annotations

import hashlib
import hmac

from .errors import Unauthorized
from .settings import Settings


class Authenticator:
    """Maps an ``Authorization`` header to a tenant.

    production: only configured keys, each naming its tenant. dev (the workstation default): any
    non-empty key is accepted and *is* its own tenant, so the SDKs work out of the box (they
    always send a key) while two keys still never see each other's sessions.
    """

    def __init__(self, settings: Settings) -> None:
        self._dev = settings.mode == "dev"
        self._keys = settings.key_map()

    def tenant_for(self, authorization: str | None) -> str:
        """The caller's tenant.

        Raises:
            Unauthorized: no bearer key, or one that is not configured.
        """
        scheme, _, key = (authorization or "").partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise Unauthorized("Missing API key: send 'Authorization: Bearer <key>'")
        for known, tenant in self._keys.items():
            if hmac.compare_digest(known.encode(), key.encode()):
                return tenant
        if self._dev:
            return "k" + hashlib.sha256(key.encode()).hexdigest()[:20]
        raise Unauthorized("Invalid API key")
