"""Checks that the mesh tests run against a mesh in either configuration."""

from __future__ import annotations

import grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from acsp._channel import Credentials
from acsp.mesh import MeshInfo

SERVICE_FULL_NAMES = {
    "grant": "acsp.v1.GrantService",
    "scheduler": "acsp.v1.SchedulerService",
    "metering": "acsp.v1.MeteringService",
}


def mesh_credentials(info: MeshInfo, token: str | None = None) -> Credentials:
    return Credentials.from_files(
        ca_cert=info.ca_cert, token=token, client_cert=info.client_cert, client_key=info.client_key
    )


async def reflected_services(info: MeshInfo, service: str) -> set[str]:
    """Return the service names that ``service``'s reflection endpoint lists."""
    credentials = mesh_credentials(info)
    channel_credentials = grpc.ssl_channel_credentials(
        credentials.ca_cert_pem, credentials.client_key_pem, credentials.client_cert_pem
    )
    async with grpc.aio.secure_channel(info.endpoint(service), channel_credentials) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        responses = stub.ServerReflectionInfo(iter([request]), timeout=5)
        response = await responses.read()
    return {entry.name for entry in response.list_services_response.service}
