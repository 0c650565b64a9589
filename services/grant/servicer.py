"""The GrantService servicer: the RPC handlers of :mod:`rpc_programs` and :mod:`rpc_ledger`."""

from __future__ import annotations

from acsp.v1 import grant_pb2_grpc
from services.grant.app import GrantApp
from services.grant.rpc_ledger import LedgerHandlers
from services.grant.rpc_programs import ProgramHandlers


class GrantServicer(ProgramHandlers, LedgerHandlers, grant_pb2_grpc.GrantServiceServicer):
    """Handlers read the shared state from ``app``, which the start hook fills in."""

    def __init__(self, app: GrantApp) -> None:
        self.app = app
