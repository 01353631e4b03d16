"""Securing the runtime's links: TLS (optionally mutual) and a shared bearer token.

Both are opt-in and independent. TLS protects the link (and, when mutual, admits only clients
holding a certificate from the cluster's CA); the token is checked by a server interceptor on
every call except the standard health service, so load balancers and probes need no secret.

    tls = TLSFiles.from_options(cert, key, ca)          # None when no file is given: plaintext
    server = grpc.server(pool, interceptors=[TokenAuth(token)])
    port = add_port(server, "0.0.0.0:50051", tls)
    channel = open_channel("device-3:50051", client_tls)
    stub(request, timeout=5.0, metadata=bearer(token))

The data plane (:mod:`wdmoe.runtime.dataplane`) uses the same PEM files through ``ssl``
(``server_ssl_context``, ``client_ssl_context``) and proves the token by challenge–response.
``make_test_pki`` writes a throwaway CA and certificates for tests and first trials.
"""

import datetime
import hmac
import ipaddress
import os
import ssl
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from wdmoe.errors import ConfigError

HEALTH_METHODS = ("/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch")
AUTH_KEY = "authorization"
_PEM_BEGIN = b"-----BEGIN "


def _read_pem(option: str, path: Path) -> bytes:
    """The bytes of a PEM file; a ConfigError naming ``option`` and the path when it is not one."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"TLS {option} file {str(path)!r} does not exist") from None
    except OSError as err:
        raise ConfigError(f"TLS {option} file {str(path)!r} cannot be read: {err.strerror or err}") from None
    if _PEM_BEGIN not in data:
        raise ConfigError(
            f"TLS {option} file {str(path)!r} is not PEM (no '-----BEGIN' line); "
            "convert it, e.g. `openssl x509 -inform der -in FILE -out FILE.pem`"
        )
    return data


@dataclass(frozen=True)
class TLSFiles:
    """PEM files of one side: its certificate chain and key, and the CA that signs the peers it accepts.

    Server: ``ca`` given → mutual TLS (clients must present a certificate signed by ``ca``).
    Client: ``ca`` verifies the server (None: the system roots); ``cert``/``key`` (optional) for
    mutual TLS; ``server_name`` overrides the name expected in the server's certificate.
    """

    cert: Path | None
    key: Path | None
    ca: Path | None
    server_name: str | None = None

    @classmethod
    def from_options(
        cls,
        cert: str | Path | None,
        key: str | Path | None,
        ca: str | Path | None,
        server_name: str | None = None,
    ) -> "TLSFiles | None":
        """Checked files from command-line or config values; None when no file is given (plaintext)."""
        if cert is None and key is None and ca is None:
            if server_name:
                raise ConfigError("TLS server_name is given without any TLS file; add cert/key/ca")
            return None
        if (cert is None) != (key is None):
            given, missing = ("cert", "key") if key is None else ("key", "cert")
            raise ConfigError(f"TLS {given} is given without TLS {missing}; give both or neither")
        paths = {
            name: None if p is None else Path(p) for name, p in (("cert", cert), ("key", key), ("ca", ca))
        }
        for name, path in paths.items():
            if path is not None:
                _read_pem(name, path)
        return cls(paths["cert"], paths["key"], paths["ca"], server_name or None)

    def read(self, option: str) -> bytes | None:
        """The PEM bytes of ``option`` ('cert', 'key' or 'ca'), None when not given."""
        path: Path | None = getattr(self, option)
        return None if path is None else _read_pem(option, path)


def server_credentials(tls: TLSFiles) -> grpc.ServerCredentials:
    """Server TLS from ``tls``; clients must present a certificate signed by ``tls.ca`` when it is set."""
    cert, key, ca = tls.read("cert"), tls.read("key"), tls.read("ca")
    if cert is None or key is None:
        raise ConfigError("a TLS server needs both TLS cert and TLS key (its certificate chain and key)")
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
    )


def channel_credentials(tls: TLSFiles) -> grpc.ChannelCredentials:
    """Client TLS from ``tls``: verify the server with ``ca``, present ``cert``/``key`` when given."""
    return grpc.ssl_channel_credentials(
        root_certificates=tls.read("ca"), private_key=tls.read("key"), certificate_chain=tls.read("cert")
    )


def server_ssl_context(tls: TLSFiles) -> ssl.SSLContext:
    """The data plane's server TLS from the files :func:`server_credentials` takes: the device's
    certificate and key; ``tls.ca`` set → clients must present a certificate it signed (mutual)."""
    cert, key, ca = tls.read("cert"), tls.read("key"), tls.read("ca")  # ConfigError naming a bad file
    if cert is None or key is None:
        raise ConfigError("a TLS server needs both TLS cert and TLS key (its certificate chain and key)")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(tls.cert), str(tls.key))
    if ca is not None:
        context.load_verify_locations(cadata=ca.decode("ascii", "replace"))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_ssl_context(tls: TLSFiles) -> ssl.SSLContext:
    """The data plane's client TLS from the files :func:`channel_credentials` takes: verify the
    server with ``tls.ca`` (None: the system roots), present ``cert``/``key`` when given. The name
    checked is ``tls.server_name`` or the host dialled (the caller passes it as server_hostname)."""
    cert, key, ca = tls.read("cert"), tls.read("key"), tls.read("ca")
    roots = None if ca is None else ca.decode("ascii", "replace")  # None: the system's
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=roots)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None and key is not None:
        context.load_cert_chain(str(tls.cert), str(tls.key))
    return context


def add_port(server: grpc.Server, address: str, tls: TLSFiles | None) -> int:
    """Bind ``address`` ("host:port", port 0: any free one), with TLS when given; returns the bound port.

    gRPC servers set SO_REUSEPORT by default, so a second *gRPC* server binds a port another one
    holds without error; create the server with option ("grpc.so_reuseport", 0) to be told instead.
    """
    kind = "plaintext" if tls is None else "TLS"
    try:
        if tls is None:
            port: int = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, server_credentials(tls))
    except RuntimeError as err:  # recent grpcio raises; older returned 0
        raise OSError(f"cannot listen ({kind}) on {address}: in use or not a local address? ({err})") from err
    if port == 0:
        raise OSError(f"cannot listen ({kind}) on {address}: in use or not a local address?")
    return port


def open_channel(
    address: str, tls: TLSFiles | None, options: Sequence[tuple[str, Any]] = (), aio: bool = False
) -> Any:
    """A channel to ``address``: plaintext when ``tls`` is None, else TLS (mutual when it has cert/key).
    ``aio``: a grpc.aio channel (create it on the event loop that will use it)."""
    api = grpc.aio if aio else grpc
    if tls is None:
        return api.insecure_channel(address, options=list(options))
    opts = list(options)
    if tls.server_name:
        opts.append(("grpc.ssl_target_name_override", tls.server_name))
    return api.secure_channel(address, channel_credentials(tls), options=opts)


def bearer(token: str) -> tuple[tuple[str, str]]:
    """The call metadata that authenticates with ``token``."""
    return ((AUTH_KEY, f"Bearer {token}"),)


class TokenAuth(grpc.ServerInterceptor):
    """Answers UNAUTHENTICATED to every call without metadata 'authorization: Bearer <token>'.

    Methods in ``exempt`` (default: the standard health service) pass without a token. The
    comparison is constant-time, so the token cannot be guessed byte by byte from response times.
    """

    MESSAGE = (
        "missing or wrong token: send call metadata 'authorization: Bearer <token>' with the shared token"
    )

    def __init__(self, token: str, exempt: Iterable[str] = HEALTH_METHODS) -> None:
        if not token:
            raise ConfigError("the token must be non-empty (clients send 'authorization: Bearer <token>')")
        self._expected = f"Bearer {token}".encode()
        self.exempt = frozenset(exempt)

    def authorized(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> bool:
        """Whether the first 'authorization' entry of ``metadata`` carries the token."""
        sent = next((value for key, value in metadata or () if key == AUTH_KEY), "")
        value = sent if isinstance(sent, bytes) else sent.encode()
        return hmac.compare_digest(value, self._expected)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method: str = handler_call_details.method
        metadata = handler_call_details.invocation_metadata
        if method in self.exempt or self.authorized(metadata):
            return continuation(handler_call_details)
        return _refusal(continuation(handler_call_details), grpc.StatusCode.UNAUTHENTICATED, self.MESSAGE)


class AioTokenAuth(grpc.aio.ServerInterceptor):
    """:class:`TokenAuth` for a grpc.aio server (the same check, the same refusal)."""

    def __init__(self, token: str, exempt: Iterable[str] = HEALTH_METHODS) -> None:
        self.sync = TokenAuth(token, exempt)

    async def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        method: str = handler_call_details.method
        handler = await continuation(handler_call_details)
        if method in self.sync.exempt or self.sync.authorized(handler_call_details.invocation_metadata):
            return handler
        return _refusal(handler, grpc.StatusCode.UNAUTHENTICATED, TokenAuth.MESSAGE, aio=True)


def _refusal(
    handler: grpc.RpcMethodHandler | None, code: grpc.StatusCode, message: str, aio: bool = False
) -> grpc.RpcMethodHandler:
    """A handler of the same streaming kind as ``handler`` that aborts with ``code`` before reading
    (a coroutine for a grpc.aio server)."""

    def abort_sync(_request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, message)  # raises

    async def abort_aio(_request: Any, context: Any) -> Any:
        await context.abort(code, message)  # raises

    abort = abort_aio if aio else abort_sync

    # No deserializer: the refused request is never parsed, so a garbled body still gets ``code``.
    request_streaming = handler is not None and handler.request_streaming
    response_streaming = handler is not None and handler.response_streaming
    if request_streaming and response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)


def make_test_pki(folder: Path, hosts: Sequence[str] = ("127.0.0.1", "localhost")) -> dict[str, Path]:
    """A throwaway CA plus server and client certificates (EC P-256, valid 1 day), PEM files in ``folder``.

    Keys of the result: 'ca', 'server_cert', 'server_key', 'client_cert', 'client_key', 'node_cert',
    'node_key' (a runtime node — the BS or a device — is a server and a client at once: both
    usages), and 'other_ca', 'other_client_cert', 'other_client_key' (a second, untrusted CA and a
    client it signs). Server and node certificates name ``hosts`` (IP addresses as such, others as
    DNS names).
    For tests and trials only: real clusters should use their own CA.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    def write(name: str, key: ec.EllipticCurvePrivateKey, cert: Any) -> tuple[Path, Path]:
        pem_key = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        cert_path = _write(folder / f"{name}.pem", cert.public_bytes(serialization.Encoding.PEM), 0o644)
        return cert_path, _write(folder / f"{name}.key", pem_key, 0o600)

    ca = _issue("wdmoe test CA", None, None, ca=True)
    other_ca = _issue("wdmoe untrusted test CA", None, None, ca=True)
    server = _issue("wdmoe test server", ca, ExtendedKeyUsageOID.SERVER_AUTH, hosts)
    client = _issue("wdmoe test client", ca, ExtendedKeyUsageOID.CLIENT_AUTH)
    node = _issue(
        "wdmoe test node", ca, [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH], hosts
    )
    other_client = _issue("wdmoe untrusted client", other_ca, ExtendedKeyUsageOID.CLIENT_AUTH)
    files = {"ca": write("ca", *ca)[0], "other_ca": write("other_ca", *other_ca)[0]}
    for name, pair in (
        ("server", server),
        ("client", client),
        ("node", node),
        ("other_client", other_client),
    ):
        files[f"{name}_cert"], files[f"{name}_key"] = write(name, *pair)
    return files


def _write(path: Path, data: bytes, mode: int) -> Path:
    """Write ``data`` to a file created with permissions ``mode`` (keys must not be world-readable)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)  # an existing file keeps its old mode through os.open
    return path


def _issue(
    common_name: str, issuer: tuple[Any, Any] | None, usage: Any, hosts: Sequence[str] = (), ca: bool = False
) -> tuple[Any, Any]:
    """A new P-256 key and its certificate, signed by ``issuer`` (key, cert) or by itself when None."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    signer_key, signer_cert = issuer if issuer is not None else (key, None)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject if signer_cert is None else signer_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # tolerate a little clock skew
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer_key.public_key()), critical=False
        )
    )
    if ca:
        usage_ext = x509.KeyUsage(
            digital_signature=False,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=True,
            crl_sign=True,
            encipher_only=False,
            decipher_only=False,
        )
        builder = builder.add_extension(usage_ext, critical=True)
    else:
        usages = usage if isinstance(usage, list) else [usage]
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    if hosts:
        names = [_san(host) for host in hosts]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return key, builder.sign(signer_key, hashes.SHA256())


def _san(host: str) -> Any:
    """A subjectAltName entry: IPAddress when ``host`` parses as an IP address, DNSName otherwise."""
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)
