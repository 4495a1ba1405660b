"""The standard probes a load balancer and an operator's tools speak: `grpc.health.v1` on
both listeners, and server reflection on the admin listener.

Each listener has its own health service. Its overall status ("") and the status of each
service it carries (DeviceService and SecAggService on the device listener, AdminService on
the admin listener) are NOT_SERVING until the coordinator has opened its store and loaded its
tasks (`serving`), SERVING from then on, and NOT_SERVING for good from the moment a drain
starts (`draining`).

Health and reflection are open services: they answer without an operator credential and
outside the request guard (server/operator_access.py, server/request_guard.py). A probe must
work without a secret, and they reveal nothing a caller could not learn otherwise: whether
the coordinator serves, and the admin API's schema, which is public in protos/. Every call of
the admin API itself still needs a credential.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

HEALTH_SERVICE: str = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
REFLECTION_SERVICE: str = reflection.SERVICE_NAME
OPEN_SERVICES = frozenset({HEALTH_SERVICE, REFLECTION_SERVICE})

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def is_open_method(method: str) -> bool:
    """Whether a method ("/package.Service/Method") belongs to an open service."""
    return method.split("/")[1] in OPEN_SERVICES if method.count("/") == 2 else False


class ListenerHealth:
    """The health service of one listener and the services it reports on."""

    def __init__(self, server: grpc.aio.Server, services: Sequence[str]) -> None:
        self._servicer = health_aio.HealthServicer()
        self._services = ("", *services)  # "": the listener as a whole
        health_pb2_grpc.add_HealthServicer_to_server(self._servicer, server)

    async def not_yet_serving(self) -> None:
        for service in self._services:
            await self._servicer.set(service, _NOT_SERVING)

    async def serving(self) -> None:
        for service in self._services:
            await self._servicer.set(service, _SERVING)

    async def draining(self) -> None:
        """NOT_SERVING for every service, for good: later `serving` calls change nothing."""
        await self._servicer.enter_graceful_shutdown()


def enable_reflection(server: grpc.aio.Server, services: Sequence[str]) -> None:
    """Lets standard tools (grpcurl, grpc_cli) list and call `services` on this listener
    without the .proto files."""
    reflection.enable_server_reflection([*services, HEALTH_SERVICE, REFLECTION_SERVICE], server)
