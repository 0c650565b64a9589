"""The local mesh behind ``acsp up``: embedded PostgreSQL and NATS, the services, a fleet.

:class:`LocalMesh` runs it from asyncio code and :class:`BackgroundMesh` from blocking code;
:func:`load_mesh` finds a running one through the mesh file in its data directory.
"""

from acsp.mesh.background import BackgroundMesh
from acsp.mesh.endpoints import MeshInfo, MeshNotFoundError, default_data_dir, load_mesh
from acsp.mesh.supervisor import (
    ChildExit,
    LocalMesh,
    MeshConfig,
    MeshStartError,
    ProcessSpec,
    default_processes,
)

__all__ = [
    "BackgroundMesh",
    "ChildExit",
    "LocalMesh",
    "MeshConfig",
    "MeshInfo",
    "MeshNotFoundError",
    "MeshStartError",
    "ProcessSpec",
    "default_data_dir",
    "default_processes",
    "load_mesh",
]
