"""A one-time check of a Kafka client's security set-up, so a refusal has a clear cause.

Every ``make_*`` of :mod:`workers.kafka_clients` first checks the security set-up once (:func:`check_security`): one
connection to the first reachable bootstrap server that does what a kafka-python client
would do first (TLS handshake, ApiVersions, SASL handshake and authentication, or a
Metadata request); SASL logins with PLAIN or SCRAM-SHA-256/512 (the whole SCRAM exchange,
the broker's proof included), over SASL_PLAINTEXT or SASL_SSL. kafka-python 3.0.12 itself
treats a refused login, a failed TLS handshake or a listener speaking another protocol as
a lost connection: its bootstrap reconnects with backoff until ``bootstrap_timeout_ms``
(30 s) and then raises ``KafkaTimeoutError('Unable to bootstrap ...')``, which names none
of these causes, and the broker sees a login attempt on every try. The check turns them into one
:class:`KafkaAuthError` / :class:`KafkaSecurityError` (``ConfigError``s: the CLI prints
one ``error:`` line and exits 2) after a single attempt.
"""
from __future__ import annotations

import socket
import time

import kafka.errors as Errors
from kafka.net.sasl import get_sasl_mechanism
from kafka.net.transport import KafkaSSLTransport
from kafka.protocol.metadata import ApiVersionsRequest, MetadataRequest
from kafka.protocol.parser import KafkaProtocol
from kafka.protocol.sasl import SaslAuthenticateRequest, SaslHandshakeRequest

from pipeline.errors import ConfigError
from schemas.settings import KafkaSettings

ENV = "INTERNEG_KAFKA__"
PROBE_TIMEOUT_S = 10.0  # per socket operation of the check, at most (request_timeout_ms if lower)
METADATA_API_KEY = 3
PASSWORD_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")  # kafka-python's sasl_plain_username/_password
EXPECTS = {  # what a listener that hangs up on this protocol probably wants instead
    "PLAINTEXT": "SASL or TLS",
    "SASL_PLAINTEXT": "TLS",
    "SSL": "no TLS, or a client certificate",
    "SASL_SSL": "no TLS, or a client certificate",
}


class KafkaSecurityError(ConfigError, ValueError):
    """The broker refused this client's security set-up (TLS, protocol or SASL)."""


class KafkaAuthError(KafkaSecurityError):
    """The broker rejected the SASL credentials."""


class _Unanswered(Exception):
    """The listener closed the connection, sent no Kafka answer, or none in time."""


def _servers(kafka: KafkaSettings) -> list[tuple[str, int]]:
    out = []
    for entry in kafka.bootstrap_servers.split(","):
        entry = entry.strip()
        if not entry:
            continue
        host, sep, port = entry.rpartition(":")
        if not sep or not port.isdigit():  # "host" alone, or a bare IPv6 address
            host, port = entry, "9092"
        out.append((host.strip("[]"), int(port)))
    return out


class _Probe:
    """One blocking connection speaking just enough of the protocol to see how it is refused."""

    def __init__(self, kafka: KafkaSettings, options: dict, host: str, port: int, timeout_s: float):
        self.kafka, self.options, self.host, self.port = kafka, options, host, port
        self.where = f"{host}:{port}"
        self.parser = KafkaProtocol(client_id=kafka.client_id)
        self.sock = socket.create_connection((host, port), timeout=timeout_s)  # OSError: unreachable

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def call(self, request):
        try:
            self.parser.send_request(request)
            self.sock.sendall(self.parser.send_bytes())
            while True:
                data = self.sock.recv(65536)
                if not data:
                    raise _Unanswered("closed the connection without answering")
                responses = self.parser.receive_bytes(data)
                if responses:
                    return responses[0][1]
        except TimeoutError as exc:
            raise _Unanswered("did not answer in time") from exc
        except ConnectionError as exc:
            raise _Unanswered(f"dropped the connection ({exc.__class__.__name__})") from exc
        except Errors.KafkaError as exc:  # bytes that are no Kafka response, e.g. a TLS alert
            raise _Unanswered(f"answered with something that is not Kafka's protocol ({exc})") from exc

    def run(self) -> None:
        kafka = self.kafka
        protocol = kafka.security_protocol
        if protocol in ("SSL", "SASL_SSL"):
            context = KafkaSSLTransport._build_ssl_context({**KafkaSSLTransport.DEFAULT_CONFIG, **{
                k: v for k, v in self.options.items() if k in KafkaSSLTransport.DEFAULT_CONFIG}})
            self.sock = context.wrap_socket(self.sock, server_hostname=self.host.rstrip("."))
        versions = self.call(ApiVersionsRequest(version=0))
        if versions.error_code:
            raise _Unanswered(f"refused ApiVersions ({Errors.for_code(versions.error_code).__name__})")
        if protocol in ("SASL_PLAINTEXT", "SASL_SSL"):
            self._authenticate()
        else:
            # A SASL listener answers ApiVersions but drops a client that asks for anything
            # else before authenticating: kafka-python's first request after it is Metadata.
            broker_max = {k.api_key: k.max_version for k in versions.api_keys}.get(METADATA_API_KEY, 1)
            self.call(MetadataRequest(version=max(1, min(broker_max, MetadataRequest.max_version)), topics=[]))

    def _authenticate(self) -> None:
        kafka = self.kafka
        mechanism_name = kafka.sasl_mechanism
        if not mechanism_name:
            raise KafkaSecurityError(f"security protocol {kafka.security_protocol} needs {ENV}SASL_MECHANISM (e.g. PLAIN or SCRAM-SHA-512)")
        if mechanism_name in PASSWORD_MECHANISMS and not (kafka.sasl_plain_username and kafka.sasl_plain_password):
            raise KafkaSecurityError(f"SASL mechanism {mechanism_name} needs {ENV}SASL_PLAIN_USERNAME and {ENV}SASL_PLAIN_PASSWORD")
        try:
            mechanism = get_sasl_mechanism(mechanism_name)(host=self.host, **self.options)
        except (Errors.KafkaConfigurationError, ValueError, KeyError, ImportError) as exc:
            raise KafkaSecurityError(f"SASL mechanism {mechanism_name}: {exc} (see {ENV}SASL_*)") from None
        handshake = self.call(SaslHandshakeRequest(version=1, mechanism=mechanism_name))
        if not handshake.mechanisms:
            raise KafkaSecurityError(
                f"Kafka at {self.where} offers no SASL on this listener: check {ENV}SECURITY_PROTOCOL and the bootstrap address"
            )
        if handshake.error_code or mechanism_name not in handshake.mechanisms:
            raise KafkaSecurityError(
                f"Kafka at {self.where} does not offer SASL mechanism {mechanism_name} "
                f"(it offers {', '.join(handshake.mechanisms)}): check {ENV}SASL_MECHANISM"
            )
        while not mechanism.is_done():
            answer = self.call(SaslAuthenticateRequest(version=1, auth_bytes=mechanism.auth_bytes()))
            if answer.error_code:
                raise KafkaAuthError(self._auth_message(mechanism_name, answer.error_message))
            try:
                mechanism.receive(answer.auth_bytes)
            except (ValueError, KeyError, IndexError) as exc:  # SCRAM: a malformed answer, or a server proof that does not verify
                raise KafkaSecurityError(
                    f"Kafka at {self.where} gave a SASL {mechanism_name} answer that does not verify ({exc!r}): "
                    f"it may not be the broker that holds these credentials; check the bootstrap address"
                ) from None
        if not mechanism.is_authenticated():
            raise KafkaAuthError(self._auth_message(mechanism_name, "the broker's final answer did not verify"))

    def _auth_message(self, mechanism: str, detail: str | None) -> str:
        user = self.kafka.sasl_plain_username
        who = f" for user {user!r}" if user is not None else ""
        return (
            f"Kafka authentication failed{who} at {self.where} (SASL {mechanism}: {detail or 'rejected'}): "
            f"check {ENV}SASL_PLAIN_USERNAME / {ENV}SASL_PLAIN_PASSWORD"
        )


def check_security(kafka: KafkaSettings, options: dict, retry_after_s: float = 1.0) -> None:
    """Raise KafkaAuthError / KafkaSecurityError if the first reachable bootstrap server refuses
    this client's security set-up; return quietly when it accepts it or no server is
    reachable (then the client's own bootstrap waits for one: connect_timeout_ms on a
    process's first contact, see workers/kafka_clients.py).

    One login attempt per call. Only an answer that does not name its cause (a listener
    that closes the connection) is tried once more, after ``retry_after_s``: a broker going
    down in between looks the same.
    """
    timeout_s = min(PROBE_TIMEOUT_S, kafka.request_timeout_ms / 1000)
    protocol = kafka.security_protocol
    for attempt in (1, 2):
        for host, port in _servers(kafka):
            try:
                probe = _Probe(kafka, options, host, port, timeout_s)
            except OSError:
                continue  # not reachable (yet): try the next one
            try:
                probe.run()
                return
            except KafkaSecurityError:
                raise
            except _Unanswered as exc:
                if attempt == 2:
                    raise KafkaSecurityError(
                        f"Kafka at {host}:{port} {exc} when spoken to with security protocol {protocol}: "
                        f"the listener probably expects {EXPECTS[protocol]}; check {ENV}SECURITY_PROTOCOL and the bootstrap address"
                    ) from None
                break  # try again after a pause
            except Errors.SaslAuthenticationFailedError as exc:
                raise KafkaAuthError(f"Kafka authentication failed at {host}:{port}: {exc}") from None
            except OSError as exc:  # ssl.SSLError included: certificates, TLS versions
                if protocol not in ("SSL", "SASL_SSL"):
                    return  # a network error that says nothing about security: the client's own retries handle it
                raise KafkaSecurityError(
                    f"TLS with Kafka at {host}:{port} failed ({exc or exc.__class__.__name__}): check {ENV}SECURITY_PROTOCOL "
                    f"and {ENV}SSL_CAFILE / {ENV}SSL_CERTFILE / {ENV}SSL_KEYFILE"
                ) from None
            finally:
                probe.close()
        else:
            return  # no server reachable
        time.sleep(retry_after_s)
