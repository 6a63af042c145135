"""The webhook SSRF guard, its HTTP POST and the signature, in-process.

Every refusal is checked with a resolver that returns fixed addresses and a connect function that
fails the test if it is called: no connection is opened. The tests that do connect, connect only to
a receiver on 127.0.0.1, allow-listed.
"""

import datetime
import ipaddress
import socket
import ssl
import time
from pathlib import Path

import pytest

from dit_serve.webhook_guard import (
    MAX_ANSWER_BYTES,
    AllowList,
    WebhookTarget,
    WebhookURLRefused,
    address_refusal,
    check_url,
    post,
)
from dit_serve.webhook_signing import new_secret, secret_key, signature, signed_headers
from tests.webhook_receiver import Answer, receiving

NOTHING = AllowList()
LOCAL = AllowList.parse("127.0.0.1")


class Resolver:
    """Answers each lookup with the next of `answers`, and counts the lookups."""

    def __init__(self, *answers: list[str]):
        self.answers = list(answers)
        self.calls: list[tuple[str, int]] = []

    def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append((host, port))
        return self.answers[min(len(self.calls), len(self.answers)) - 1]


def no_lookup(host: str, port: int) -> list[str]:
    raise AssertionError(f"looked up {host}: an IP literal needs no lookup")


def no_connection(address: tuple[str, int], timeout: float) -> socket.socket:
    raise AssertionError(f"connected to {address}: a refused URL must never be connected to")


# Every address that must never receive a webhook unless allow-listed, by the rule that refuses it.
REFUSED_ADDRESSES = {
    "127.0.0.1": "loopback",
    "127.255.0.9": "loopback",
    "10.0.0.1": "private",
    "172.16.5.4": "private",
    "192.168.1.1": "private",
    "169.254.169.254": "link-local",  # AWS, GCP and Azure metadata
    "169.254.0.1": "link-local",
    "100.64.0.1": "not a public address",  # shared (CGNAT) space
    "0.0.0.0": "unspecified",
    "224.0.0.1": "multicast",
    "239.255.255.250": "multicast",
    "240.0.0.1": "private",  # reserved (class E); Python counts it private
    "255.255.255.255": "private",
    "192.0.2.10": "private",  # documentation range
    "::1": "loopback",
    "::": "unspecified",
    "fe80::1": "link-local",
    "fd00:ec2::254": "private",  # AWS' IPv6 metadata address
    "fc00::5": "private",
    "ff02::1": "multicast",
    "::ffff:127.0.0.1": "loopback",  # IPv4-mapped IPv6
    "::ffff:169.254.169.254": "link-local",
    "::ffff:10.1.2.3": "private",
    "64:ff9b::a9fe:a9fe": "link-local",  # NAT64 of 169.254.169.254
    "2002:7f00:1::1": "loopback",  # 6to4 of 127.0.0.1
    "2001:db8::1": "private",  # documentation range
}


@pytest.mark.parametrize("address", list(REFUSED_ADDRESSES))
def test_every_non_public_address_is_refused_by_its_rule(address: str) -> None:
    reason = address_refusal(ipaddress.ip_address(address))
    assert reason is not None and REFUSED_ADDRESSES[address] in reason, reason


@pytest.mark.parametrize("address", ["93.184.215.14", "8.8.8.8", "2606:4700::1111", "::ffff:93.184.215.14"])
def test_public_addresses_pass(address: str) -> None:
    assert address_refusal(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize("address", list(REFUSED_ADDRESSES))
def test_a_name_resolving_to_a_refused_address_is_refused_without_connecting(address: str) -> None:
    resolver = Resolver([address])
    with pytest.raises(WebhookURLRefused, match="hooks.example.com resolves to") as refused:
        check_url("https://hooks.example.com/in", NOTHING, resolver)
    assert resolver.calls == [("hooks.example.com", 443)]
    assert address not in str(refused.value)  # what the server's DNS answers is not told to the client


@pytest.mark.parametrize(
    "url",
    [
        "https://127.0.0.1/",
        "https://[::1]:8443/",
        "https://169.254.169.254/latest/meta-data/",
        "https://[::ffff:169.254.169.254]/",
        "https://[fe80::1%25eth0]/",
        "https://0.0.0.0/",
        "https://10.0.0.1/",
        "https://2130706433/",  # 127.0.0.1 as one number: resolvers take it as an address
        "https://0x7f.1/",  # 127.0.0.1 in hex and short form
        "https://017700000001/",  # 127.0.0.1 in octal
        "https://[ff02::1]/",
    ],
)
def test_ip_literals_are_checked_without_any_lookup(url: str) -> None:
    with pytest.raises(WebhookURLRefused, match="may not receive webhooks"):
        check_url(url, NOTHING, no_lookup)


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://hooks.example.com/", "must use https"),
        ("http://93.184.215.14/", "must use https"),
        ("ftp://hooks.example.com/", "https:// URL"),
        ("file:///etc/passwd", "https:// URL"),
        ("gopher://127.0.0.1:6379/", "https:// URL"),
        ("hooks.example.com/in", "https:// URL"),
        ("https:///no-host", "https:// URL"),
        ("https://user:pw@hooks.example.com/", "credentials"),
        ("https://hooks.example.com:99999/", "not a valid URL"),
        ("https://hooks.example.com/a b", "control characters"),
        ("https://hooks.example.com/\r\nX-Injected: 1", "control characters"),
        ("https://[not-an-ip]/", "not a valid"),
        ("https://hooks.example.com/" + "a" * 2100, "2048 characters"),
    ],
)
def test_urls_outside_the_rules_are_refused_before_any_lookup(url: str, why: str) -> None:
    with pytest.raises(WebhookURLRefused, match=why):
        check_url(url, NOTHING, no_lookup)


def test_a_name_that_does_not_resolve_is_refused() -> None:
    def fails(host: str, port: int) -> list[str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    with pytest.raises(WebhookURLRefused, match="does not resolve"):
        check_url("https://nowhere.example/", NOTHING, fails)


def test_dns_rebinding_cannot_move_the_connection_to_a_second_answer() -> None:
    """A resolver answering a public address first and a private one after: the POST connects to the
    address that was checked, and never asks again."""
    resolver = Resolver(["93.184.215.14"], ["127.0.0.1"])
    connected: list[tuple[str, int]] = []

    def record(address: tuple[str, int], timeout: float) -> socket.socket:
        connected.append(address)
        raise ConnectionRefusedError(111, "Connection refused")  # recorded; nothing was opened

    target = check_url("https://rebind.example/hook", NOTHING, resolver)
    result = post(target, b"{}", {}, connect=record)
    assert connected == [("93.184.215.14", 443)]
    assert resolver.calls == [("rebind.example", 443)]
    assert not result.ok and result.error == "connection failed: Connection refused"


def test_of_mixed_answers_only_a_public_address_is_used() -> None:
    target = check_url("https://mixed.example/", NOTHING, Resolver(["10.0.0.7", "93.184.215.14", "::1"]))
    assert target.address == "93.184.215.14"


def test_the_allow_list_exempts_names_and_networks_and_lets_them_use_http() -> None:
    allow = AllowList.parse("hooks.internal, 10.20.0.0/16,127.0.0.1")
    assert check_url("http://hooks.internal:8080/x?y=1", allow, Resolver(["10.9.9.9"])) == WebhookTarget(
        "http", "hooks.internal", 8080, "/x?y=1", "10.9.9.9"
    )
    assert check_url("http://127.0.0.1:9000/", allow, no_lookup).address == "127.0.0.1"
    assert check_url("https://svc.example/", allow, Resolver(["10.20.3.4"])).address == "10.20.3.4"
    with pytest.raises(WebhookURLRefused, match="must use https"):  # an address match does not allow http
        check_url("http://svc.example/", allow, no_lookup)
    with pytest.raises(WebhookURLRefused, match="may not receive"):  # outside the listed network
        check_url("https://svc.example/", allow, Resolver(["10.21.0.1"]))
    with pytest.raises(WebhookURLRefused, match="must use https"):
        check_url("http://127.0.0.2/", allow, no_lookup)
    with pytest.raises(ValueError, match="neither"):
        AllowList.parse("10.0.0.0/33")
    with pytest.raises(ValueError, match="neither"):
        AllowList.parse("https://x/")


def test_a_redirect_is_not_followed_and_counts_as_a_failed_attempt() -> None:
    with (
        receiving() as elsewhere,
        receiving(lambda _n: Answer(302, headers={"Location": elsewhere.url()})) as hook,
    ):
        result = post(check_url(hook.url(), LOCAL, no_lookup), b"{}", {})
        assert result.status == 302 and not result.ok
        time.sleep(0.2)
        assert len(hook.requests()) == 1 and elsewhere.requests() == []


def test_at_most_1_kib_of_the_answer_is_read() -> None:
    with receiving(lambda _n: Answer(200, body=b"x" * (8 * 1024 * 1024))) as hook:
        started = time.monotonic()
        result = post(check_url(hook.url(), LOCAL, no_lookup), b"{}", {})
    assert result.ok and len(result.answer) == MAX_ANSWER_BYTES
    assert time.monotonic() - started < 2


def test_the_whole_exchange_has_a_deadline() -> None:
    with receiving(lambda _n: Answer(200, delay_s=3)) as hook:
        started = time.monotonic()
        result = post(check_url(hook.url(), LOCAL, no_lookup), b"{}", {}, timeout_s=0.5)
        assert result.error == "no answer within 0.5 s"
        assert time.monotonic() - started < 1.5


def test_the_post_carries_the_body_the_headers_and_the_urls_host() -> None:
    with receiving() as hook:
        result = post(
            check_url(hook.url("/in?a=1"), LOCAL, no_lookup), b'{"a":1}', {"webhook-id": "j:completed"}
        )
    (got,) = hook.requests()
    assert result.ok and got.path == "/in?a=1" and got.body == b'{"a":1}'
    assert got.headers["webhook-id"] == "j:completed" and got.headers["content-type"] == "application/json"
    assert got.headers["host"] == f"127.0.0.1:{hook.port}"


def _certificate(tmp_path: Path, name: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a certificate for `name` from a fresh CA, and a client context trusting it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    day = datetime.timedelta(days=1)

    def certificate(subject: x509.Name, public_key: ec.EllipticCurvePublicKey) -> x509.CertificateBuilder:
        return x509.CertificateBuilder(
            issuer_name=ca_name,
            subject_name=subject,
            public_key=public_key,
            serial_number=x509.random_serial_number(),
            not_valid_before=now - day,
            not_valid_after=now + day,
        )

    ca = (
        certificate(ca_name, ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    leaf = (
        certificate(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]), key.public_key())
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "leaf.pem").write_bytes(
        leaf.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(tmp_path / "leaf.pem")
    return server, ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))


def test_https_connects_to_the_checked_address_with_sni_and_the_certificate_of_the_name(
    tmp_path: Path,
) -> None:
    server, client = _certificate(tmp_path, "hooks.test")
    names: list[str | None] = []
    server.sni_callback = lambda _sock, name, _ctx: names.append(name)  # type: ignore[assignment,misc,func-returns-value]
    resolver = Resolver(["127.0.0.1"])
    with receiving(tls=server) as hook:
        target = check_url(
            hook.url(scheme="https", host="hooks.test"), AllowList.parse("hooks.test"), resolver
        )
        result = post(target, b"{}", {}, tls=client)
        assert result.ok, result
        assert names == ["hooks.test"] and hook.requests()[0].headers["host"] == f"hooks.test:{hook.port}"
        # the same server reached under another name: its certificate is not that name's
        other = check_url(
            hook.url(scheme="https", host="other.test"), AllowList.parse("other.test"), resolver
        )
        refused = post(other, b"{}", {}, tls=client)
        assert refused.status is None and "TLS certificate refused" in (refused.error or "")
        assert len(hook.requests()) == 1


def test_the_signature_matches_the_standard_webhooks_test_vector() -> None:
    # The specification's published example (also used by the svix and standardwebhooks libraries).
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"test": 2432232314}'
    expected = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    assert signature(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body) == expected
    headers = signed_headers(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body)
    assert headers == {
        "webhook-id": "msg_p5jXN8AQM9LWM0D4loKWxJek",
        "webhook-timestamp": "1614265330",
        "webhook-signature": expected,
    }


def test_secrets_are_whsec_base64_of_32_bytes_and_bad_ones_are_refused() -> None:
    fresh = new_secret()
    assert fresh.startswith("whsec_") and len(secret_key(fresh)) == 32 and fresh != new_secret()
    for bad in ("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_not base64!", "whsec_c2hvcnQ="):
        with pytest.raises(ValueError, match="webhook secret"):
            secret_key(bad)
