"""The one gRPC server recipe of the runtime (BS and devices): handlers + health + token auth.

Kept apart from the BS so that a device worker imports only gRPC, torch and its shards' code.
"""

from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from wdmoe.runtime.security import TLSFiles, TokenAuth, add_port
from wdmoe.runtime.wire import MAX_MESSAGE_BYTES

GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


def start_server(
    handlers: Any, token: str, host: str, port: int, tls: TLSFiles | None, workers: int = 16
) -> tuple[Any, int]:
    """A gRPC server with ``handlers``, the health service (SERVING) and token auth; returns
    (server, bound port). Ports are exclusive (no SO_REUSEPORT: a second server on a port fails)."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers),
        interceptors=(TokenAuth(token),),
        options=[*GRPC_OPTIONS, ("grpc.so_reuseport", 0)],
    )
    server.add_generic_rpc_handlers((handlers,))
    status = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(status, server)
    bound = add_port(server, f"{host}:{port}", tls)
    server.start()
    status.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, bound
