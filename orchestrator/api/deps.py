"""Dependencies, as ``Annotated`` aliases that read the lifespan's services."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Request

from ..backends.base import Backend
from ..lanes import RunLanes
from ..metrics import Metrics
from ..sessions import SessionManager
from ..settings import Settings
from ..tenancy import Authenticator
from ..workspace import SessionFiles


@dataclass(frozen=True)
class Services:
    """Everything long-lived, created and closed by the app's lifespan."""

    settings: Settings
    backend: Backend
    manager: SessionManager
    lanes: RunLanes
    authenticator: Authenticator
    metrics: Metrics
    files: SessionFiles


# Dependencies are async on purpose: FastAPI runs a plain ``def`` dependency in a worker thread,
# a hand-off that costs more than these lookups on every request.
async def get_services(request: Request) -> Services:
    services: Services = request.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


async def get_tenant(services: ServicesDep, authorization: Annotated[str | None, Header()] = None) -> str:
    return services.authenticator.tenant_for(authorization)


TenantDep = Annotated[str, Depends(get_tenant)]
