"""Where a webhook may be sent (the SSRF guard), and the one HTTP POST that sends it.

A webhook URL is a client's way to make the service send a request; unguarded, it reaches whatever
the API host can reach: Redis, the cloud's metadata service at 169.254.169.254, an admin port on
localhost. The rules, checked at submission and again at every attempt:

- `https` only, except for hosts allow-listed by the operator (`DIT_WEBHOOK_ALLOW`), which may use
  `http`. No credentials in the URL.
- The host is resolved, and every address must be public: loopback, private, link-local (the cloud
  metadata services), multicast, reserved, unspecified and shared (CGNAT) addresses are refused, in
  IPv4 and IPv6, including IPv4 addresses embedded in IPv6 (IPv4-mapped `::ffff:a.b.c.d`, NAT64,
  6to4). An allow-listed name, or an address inside an allow-listed network, is exempt.
- The POST connects to the address that was checked, never re-resolving the name, so a second DNS
  answer (DNS rebinding) cannot move it; for `https` the TLS handshake still sends the name (SNI) and
  checks the certificate against it.
- Redirects are not followed (a 3xx is a failed attempt), the whole exchange has a 5 s deadline, and
  at most 1 KiB of the answer is read.

The resolver and the connect function are parameters, so tests check every refusal without opening
a connection.
"""

import contextlib
import http.client
import ipaddress
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], list[str]]  # (host, port) -> its addresses, as strings
Connector = Callable[[tuple[str, int], float], socket.socket]  # (address, port), timeout -> connected

TIMEOUT_S = 5.0  # the whole exchange: connect, TLS, request, the answer's head and its first KiB
MAX_ANSWER_BYTES = 1024
MAX_URL_CHARS = 2048
DEFAULT_PORTS = {"https": 443, "http": 80}
NAT64_PREFIX = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052: the last 32 bits are an IPv4 address
USER_AGENT = "dit-serve-webhooks"


class WebhookURLRefused(ValueError):
    """A webhook URL the guard will not send to; the message says why."""


@dataclass(frozen=True)
class AllowList:
    """Hosts (exact names, case-insensitive) and networks (IPs or CIDRs) exempt from the address rules."""

    names: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, text: str) -> "AllowList":
        """From `DIT_WEBHOOK_ALLOW`: comma-separated names, IPs and CIDRs; ValueError on a bad entry."""
        names: set[str] = set()
        networks: list[IPNetwork] = []
        for entry in (part.strip().lower() for part in text.split(",")):
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                if "/" in entry or ":" in entry or not all(c.isalnum() or c in ".-_" for c in entry):
                    raise ValueError(
                        f"DIT_WEBHOOK_ALLOW: {entry!r} is neither a host name, an IP nor a CIDR"
                    ) from None
                names.add(entry.rstrip("."))
        return cls(frozenset(names), tuple(networks))

    def lists_name(self, host: str) -> bool:
        return host.rstrip(".") in self.names

    def covers(self, address: IPAddress) -> bool:
        return any(address.version == network.version and address in network for network in self.networks)


@dataclass(frozen=True)
class WebhookTarget:
    """A checked URL: where to connect (`address`, already checked) and what to ask for."""

    scheme: str
    host: str  # the name (or IP) of the URL: the Host header, TLS SNI and the certificate's name
    port: int
    path: str  # path and query
    address: str  # the checked address to connect to


@dataclass(frozen=True)
class DeliveryResult:
    """What one POST got: an HTTP status, or an error when no answer came."""

    status: int | None = None
    error: str | None = None
    answer: bytes = field(default=b"", repr=False)  # at most MAX_ANSWER_BYTES of the body

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


def system_resolver(host: str, port: int) -> list[str]:
    """The host's addresses from the system's resolver (getaddrinfo), in its order."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def address_refusal(address: IPAddress) -> str | None:
    """What kind of address `address` is when it may not receive webhooks ("a loopback address"), or
    None when it is public."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:  # ::ffff:a.b.c.d is a.b.c.d, as the socket layer sends it
            reason = address_refusal(address.ipv4_mapped)
            return f"{reason} (IPv4-mapped)" if reason else None
        embedded = address.sixtofour
        if embedded is None and address in NAT64_PREFIX:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None and (reason := address_refusal(embedded)):
            return f"{reason} (embedded in IPv6)"
    checks = (
        (address.is_unspecified, "an unspecified address"),
        (address.is_loopback, "a loopback address"),
        (address.is_link_local, "a link-local address (where cloud metadata services answer)"),
        (address.is_multicast, "a multicast address"),
        (address.is_private, "a private address"),
        (address.is_reserved, "a reserved address"),
        (not address.is_global, "not a public address"),
    )
    return next((reason for refused, reason in checks if refused), None)


def _literal(host: str) -> IPAddress | None:
    """The host as an IP address, when it is one, in any form a resolver would take as one."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:  # the legacy IPv4 forms getaddrinfo accepts too: 2130706433, 0x7f.1, 127.1
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


def check_url(url: str, allow: AllowList, resolver: Resolver = system_resolver) -> WebhookTarget:
    """Check `url` against the rules and resolve its host once; WebhookURLRefused says why not.

    Returns:
        the target, with the first permitted address to connect to.
    """
    if len(url) > MAX_URL_CHARS or any(ord(char) <= 0x20 or ord(char) == 0x7F for char in url):
        raise WebhookURLRefused(
            "webhook_url must be at most 2048 characters, without spaces or control characters"
        )
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise WebhookURLRefused(f"webhook_url is not a valid URL: {exc}") from exc
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    if scheme not in DEFAULT_PORTS or not host:
        raise WebhookURLRefused("webhook_url must be an https:// URL with a host")
    if parts.username is not None or parts.password is not None:
        raise WebhookURLRefused("webhook_url must not carry credentials (user:password@)")
    literal = _literal(host)
    listed = allow.lists_name(host) or (literal is not None and allow.covers(literal))
    if scheme == "http" and not listed:
        raise WebhookURLRefused(
            f"webhook_url must use https; http is only allowed for hosts in DIT_WEBHOOK_ALLOW, "
            f"and {host} is not"
        )
    port = port or DEFAULT_PORTS[scheme]
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if literal is not None:
        addresses = [literal]
    elif ":" in host:
        raise WebhookURLRefused(f"webhook_url host {host!r} is not a valid IP address")
    else:
        try:
            addresses = [ipaddress.ip_address(found.split("%")[0]) for found in resolver(host, port)]
        except (OSError, UnicodeError, ValueError) as exc:
            raise WebhookURLRefused(f"webhook_url host {host} does not resolve: {exc}") from exc
        if not addresses:
            raise WebhookURLRefused(f"webhook_url host {host} does not resolve")
    refusals = (
        [] if allow.lists_name(host) else [(a, address_refusal(a)) for a in addresses if not allow.covers(a)]
    )
    refused = {address for address, reason in refusals if reason}
    permitted = [address for address in addresses if address not in refused]
    if not permitted:
        reason = next(reason for _, reason in refusals if reason)
        # A name's addresses stay unsaid: a client must not learn what the server's DNS answers.
        what = f"{host} is {reason}" if literal is not None else f"{host} resolves to {reason}"
        raise WebhookURLRefused(
            f"webhook_url may not receive webhooks: {what} (the operator can allow it in DIT_WEBHOOK_ALLOW)"
        )
    return WebhookTarget(scheme, host, port, path, str(permitted[0]))


class _PinnedConnection(http.client.HTTPConnection):
    """An HTTP(S) connection to a checked address: Host, SNI and certificate name stay the URL's host."""

    def __init__(
        self, target: WebhookTarget, timeout_s: float, connect: Connector, tls: ssl.SSLContext | None
    ):
        super().__init__(target.host, target.port, timeout=timeout_s)
        self.target, self.open_socket, self.tls = target, connect, tls
        self.raw: socket.socket | None = None
        self.aborted = False

    def connect(self) -> None:
        self.raw = self.open_socket((self.target.address, self.target.port), self.timeout)  # type: ignore[arg-type]
        self.sock = self.tls.wrap_socket(self.raw, server_hostname=self.host) if self.tls else self.raw

    def abort(self) -> None:
        """End the exchange from another thread: a blocked read returns at once."""
        self.aborted = True
        if self.raw is not None:
            with contextlib.suppress(OSError):
                self.raw.shutdown(socket.SHUT_RDWR)


def post(
    target: WebhookTarget,
    body: bytes,
    headers: dict[str, str],
    *,
    timeout_s: float = TIMEOUT_S,
    connect: Connector = socket.create_connection,
    tls: ssl.SSLContext | None = None,
) -> DeliveryResult:
    """POST `body` to a checked target; never raises for what the network or the receiver does.

    Args:
        target: from check_url; the connection goes to `target.address`.
        headers: sent besides Content-Type, User-Agent and Connection: close.
        timeout_s: the deadline for the whole exchange.
        connect: opens the TCP connection (socket.create_connection); tests pass a fake.
        tls: the TLS context for https (default: the system's, verifying certificates).
    """
    if target.scheme == "https" and tls is None:
        tls = ssl.create_default_context()
    connection = _PinnedConnection(target, timeout_s, connect, tls if target.scheme == "https" else None)
    deadline = threading.Timer(timeout_s, connection.abort)
    deadline.daemon = True
    deadline.start()
    all_headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "Connection": "close",
        **headers,
    }
    try:
        connection.request("POST", target.path, body=body, headers=all_headers)
        answer = connection.getresponse()
        return DeliveryResult(status=answer.status, answer=answer.read(MAX_ANSWER_BYTES))  # no more is read
    except (OSError, http.client.HTTPException) as exc:
        return DeliveryResult(error=_describe(exc, connection.aborted, timeout_s))
    finally:
        deadline.cancel()
        connection.close()


def _describe(exc: Exception, aborted: bool, timeout_s: float) -> str:
    """A short account of a failed exchange, for the job's `last_error`."""
    if aborted or isinstance(exc, TimeoutError):
        return f"no answer within {timeout_s:g} s"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate refused: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS failed: {exc.reason or type(exc).__name__}"
    if isinstance(exc, http.client.HTTPException):
        return f"not an HTTP answer ({type(exc).__name__})"
    assert isinstance(exc, OSError)
    return f"connection failed: {exc.strerror or type(exc).__name__}"
