"""TLS, mutual TLS and token authentication of the runtime's gRPC links and the ssl contexts of its
data plane (wdmoe.runtime.security; the data plane's own tests are in test_dataplane.py)."""

import socket
import ssl
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from wdmoe.errors import ConfigError
from wdmoe.runtime.security import (
    TLSFiles,
    TokenAuth,
    add_port,
    bearer,
    client_ssl_context,
    make_test_pki,
    open_channel,
    server_ssl_context,
)

TOKEN = "s3cret-token"
TIMEOUT_S = 5.0
ECHO = "/test.Echo/Echo"
COUNT = "/test.Echo/Count"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_test_pki(tmp_path_factory.mktemp("pki"))


def echo_handler() -> Any:
    def echo(request: bytes, context: Any) -> bytes:
        return b"echo:" + request

    def count(request: bytes, context: Any) -> Iterator[bytes]:
        for i in range(int(request)):
            yield str(i).encode()

    return grpc.method_handlers_generic_handler(
        "test.Echo",
        {
            "Echo": grpc.unary_unary_rpc_method_handler(echo),
            "Count": grpc.unary_stream_rpc_method_handler(count),
        },
    )


@pytest.fixture
def start() -> Iterator[Any]:
    """start(tls, token) → the address of a running echo + health server; all are stopped afterwards."""
    servers: list[grpc.Server] = []

    def run(tls: TLSFiles | None = None, token: str | None = None) -> str:
        interceptors = [] if token is None else [TokenAuth(token)]
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), interceptors=interceptors)
        servers.append(server)
        server.add_generic_rpc_handlers((echo_handler(),))
        servicer = health.HealthServicer()
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        port = add_port(server, "127.0.0.1:0", tls)
        server.start()
        return f"127.0.0.1:{port}"

    yield run
    for server in servers:
        server.stop(None).wait()


def call_echo(address: str, tls: TLSFiles | None = None, metadata: Any = None) -> bytes:
    with open_channel(address, tls) as channel:
        result: bytes = channel.unary_unary(ECHO)(b"hi", timeout=TIMEOUT_S, metadata=metadata)
        return result


def call_count(address: str, metadata: Any = None) -> list[bytes]:
    with open_channel(address, None) as channel:
        return list(channel.unary_stream(COUNT)(b"3", timeout=TIMEOUT_S, metadata=metadata))


def rpc_error(call: Any, *args: Any, **kwargs: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value


# --- files ---------------------------------------------------------------------------------------


def test_make_test_pki_writes_pem_files(pki: dict[str, Path]) -> None:
    expected = {"ca", "server_cert", "server_key", "client_cert", "client_key", "node_cert", "node_key"}
    expected |= {"other_ca", "other_client_cert", "other_client_key"}
    assert set(pki) == expected
    for name, path in pki.items():
        text = path.read_text()
        kind = "PRIVATE KEY" if name.endswith("_key") else "CERTIFICATE"
        assert text.startswith(f"-----BEGIN {kind}-----"), (name, text[:40])
    assert pki["server_key"].stat().st_mode & 0o077 == 0  # keys are private to the owner
    assert TLSFiles.from_options(pki["server_cert"], pki["server_key"], pki["ca"]) == TLSFiles(
        pki["server_cert"], pki["server_key"], pki["ca"]
    )


def test_server_certificate_names_ip_and_dns_hosts(pki: dict[str, Path]) -> None:
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(pki["server_cert"].read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]


def test_from_options_none_when_nothing_given() -> None:
    assert TLSFiles.from_options(None, None, None) is None


def test_from_options_cert_without_key(pki: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="cert is given without TLS key"):
        TLSFiles.from_options(pki["client_cert"], None, pki["ca"])


def test_from_options_missing_file(pki: dict[str, Path], tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(ConfigError, match=r"TLS ca file .*nope\.pem.* does not exist"):
        TLSFiles.from_options(pki["client_cert"], pki["client_key"], missing)


def test_from_options_not_pem(pki: dict[str, Path], tmp_path: Path) -> None:
    der = tmp_path / "key.der"
    der.write_bytes(b"\x30\x82\x01\x0a\x02\x82\x01\x01")
    with pytest.raises(ConfigError, match=r"TLS key file .*key\.der.* is not PEM"):
        TLSFiles.from_options(pki["client_cert"], der, None)


def test_empty_token_is_refused() -> None:
    with pytest.raises(ConfigError, match="non-empty"):
        TokenAuth("")


# --- token ---------------------------------------------------------------------------------------


def test_right_token_passes(start: Any) -> None:
    address = start(token=TOKEN)
    assert call_echo(address, metadata=bearer(TOKEN)) == b"echo:hi"
    assert call_count(address, metadata=bearer(TOKEN)) == [b"0", b"1", b"2"]


@pytest.mark.parametrize("metadata", [None, bearer("wrong"), (("authorization", TOKEN),)])
def test_missing_or_wrong_token_is_unauthenticated(start: Any, metadata: Any) -> None:
    address = start(token=TOKEN)
    for call in (call_echo, call_count):
        err = rpc_error(call, address, metadata=metadata)
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED, call
        assert "authorization: Bearer <token>" in str(err.details())


def test_health_check_needs_no_token(start: Any) -> None:
    address = start(token=TOKEN)
    with open_channel(address, None) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


# --- TLS -----------------------------------------------------------------------------------------


def server_tls(pki: dict[str, Path], mutual: bool = True) -> TLSFiles:
    return TLSFiles(pki["server_cert"], pki["server_key"], pki["ca"] if mutual else None)


def test_server_tls_without_client_certificate(start: Any, pki: dict[str, Path]) -> None:
    address = start(server_tls(pki, mutual=False))
    assert call_echo(address, TLSFiles(None, None, pki["ca"])) == b"echo:hi"
    # the name in the certificate is checked: 127.0.0.1 is in it, "wrong.example" is not
    err = rpc_error(call_echo, address, TLSFiles(None, None, pki["ca"], server_name="wrong.example"))
    assert err.code() != grpc.StatusCode.OK
    assert call_echo(address, TLSFiles(None, None, pki["ca"], server_name="localhost")) == b"echo:hi"


def test_mutual_tls_accepts_client_of_same_ca(start: Any, pki: dict[str, Path]) -> None:
    address = start(server_tls(pki), token=TOKEN)
    client = TLSFiles(pki["client_cert"], pki["client_key"], pki["ca"])
    assert call_echo(address, client, metadata=bearer(TOKEN)) == b"echo:hi"
    # TLS does not replace the token: both are checked
    assert rpc_error(call_echo, address, client).code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("who", ["no certificate", "other CA", "plaintext"])
def test_mutual_tls_refuses(start: Any, pki: dict[str, Path], who: str) -> None:
    address = start(server_tls(pki))
    client = {
        "no certificate": TLSFiles(None, None, pki["ca"]),
        "other CA": TLSFiles(pki["other_client_cert"], pki["other_client_key"], pki["ca"]),
        "plaintext": None,
    }[who]
    err = rpc_error(call_echo, address, client)
    assert err.code() not in (grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED), err


# --- ports ---------------------------------------------------------------------------------------


def test_add_port_in_use_names_the_address() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        address = f"127.0.0.1:{sock.getsockname()[1]}"
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
        try:
            with pytest.raises(OSError, match=address):
                add_port(server, address, None)
        finally:
            server.stop(None).wait()


def test_add_port_taken_by_another_grpc_server() -> None:
    # gRPC sets SO_REUSEPORT by default; without it, a port another gRPC server holds is refused
    first = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    second = grpc.server(futures.ThreadPoolExecutor(max_workers=1), options=[("grpc.so_reuseport", 0)])
    try:
        address = f"127.0.0.1:{add_port(first, '127.0.0.1:0', None)}"
        first.start()
        with pytest.raises(OSError, match=f"cannot listen .*on {address}"):
            add_port(second, address, None)
    finally:
        first.stop(None).wait()
        second.stop(None).wait()


def test_server_tls_needs_cert_and_key(pki: dict[str, Path]) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    try:
        with pytest.raises(ConfigError, match="cert and TLS key"):
            add_port(server, "127.0.0.1:0", TLSFiles(None, None, pki["ca"]))
    finally:
        server.stop(None).wait()


# --- the data plane's ssl contexts, from the same files --------------------------------------------


def test_data_plane_contexts_require_client_certificates_exactly_when_a_ca_is_given(
    pki: dict[str, Path],
) -> None:
    assert server_ssl_context(server_tls(pki)).verify_mode == ssl.CERT_REQUIRED  # mutual, as gRPC
    assert server_ssl_context(server_tls(pki, mutual=False)).verify_mode == ssl.CERT_NONE
    client = client_ssl_context(TLSFiles(pki["client_cert"], pki["client_key"], pki["ca"]))
    assert client.verify_mode == ssl.CERT_REQUIRED and client.check_hostname
    assert client.minimum_version >= ssl.TLSVersion.TLSv1_2


def test_data_plane_contexts_name_a_missing_or_bad_file(pki: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cert and TLS key"):
        server_ssl_context(TLSFiles(None, None, pki["ca"]))
    with pytest.raises(ConfigError, match=r"TLS ca file .*nope\.pem.* does not exist"):
        client_ssl_context(TLSFiles(None, None, tmp_path / "nope.pem"))
    der = tmp_path / "cert.der"
    der.write_bytes(b"\x30\x82\x01\x0a")
    with pytest.raises(ConfigError, match=r"TLS cert file .*cert\.der.* is not PEM"):
        server_ssl_context(TLSFiles(der, pki["server_key"], None))


def test_data_plane_mutual_tls_handshake_and_refusals(pki: dict[str, Path]) -> None:
    """A TLS echo over asyncio streams with the data plane's contexts: the client of the same CA is
    served; one without a certificate, or of another CA, is refused."""
    import asyncio

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(await reader.readexactly(2))
            await writer.drain()
        except (OSError, EOFError):
            pass
        finally:
            writer.close()

    async def talk(port: int, tls: TLSFiles) -> bytes:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_ssl_context(tls), server_hostname="127.0.0.1"
        )
        writer.write(b"hi")
        try:
            return await asyncio.wait_for(reader.read(), TIMEOUT_S)
        finally:
            writer.close()

    async def run() -> dict[str, Any]:
        server = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=server_ssl_context(server_tls(pki)))
        port = server.sockets[0].getsockname()[1]
        out: dict[str, Any] = {}
        clients = {
            "same CA": TLSFiles(pki["client_cert"], pki["client_key"], pki["ca"]),
            "no certificate": TLSFiles(None, None, pki["ca"]),
            "other CA": TLSFiles(pki["other_client_cert"], pki["other_client_key"], pki["ca"]),
        }
        for who, tls in clients.items():
            try:
                out[who] = await talk(port, tls)
            except (OSError, EOFError) as err:  # ssl.SSLError is an OSError
                out[who] = err
        server.close()
        return out

    out = asyncio.run(run())
    assert out["same CA"] == b"hi"
    assert all(
        not isinstance(out[who], bytes) or out[who] == b"" for who in ("no certificate", "other CA")
    ), out
