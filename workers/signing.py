"""Ed25519 signatures on the negatives topic: the bank changes only by the inversion worker's hand.

Kafka's ACLs decide who may write to ``ood.negatives``; a signature decides whether a
follower believes a record, whatever path it took there (a mis-set ACL, a restored backup,
a scoring worker's credentials, which may read the topic but hold only the public key).
The inversion worker signs every negative and every tombstone with the private key;
every follower checks the signature before the record can touch its bank.

What is signed binds the record to its place: the topic name (a record copied to another
deployment's topic does not verify there), the key (the negative's id) and the value, with
a tombstone distinguishable from an empty value. Each part is length-prefixed, so no two
different records sign the same bytes.

Keys are PEM files (``interneg keygen DIR``): the private key (PKCS#8) for the inversion
worker only, the public key (SubjectPublicKeyInfo) for everyone else.
"""
from __future__ import annotations

import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from pipeline.errors import ConfigError
from schemas.messages import H_SIGNATURE

DOMAIN = b"interneg/ood.negatives/v1"
SIGNATURE_BYTES = 64
SIGNING_KEY_FILE = "negatives-signing.pem"
VERIFY_KEY_FILE = "negatives-verify.pem"


class SignatureRefused(ValueError):
    """A negatives record without a valid signature of the deployment's key."""


def signed_bytes(topic: str, key: bytes | None, value: bytes | None) -> bytes:
    parts = [DOMAIN, topic.encode(), key or b"", b"\x00" if value is None else b"\x01" + value]
    return b"".join(len(part).to_bytes(8, "big") + part for part in parts)


def _load_key(path: Path, what: str, form: str, load, expected: type):
    """The Ed25519 key ``load`` reads from the PEM file at ``path``; ConfigError naming the file otherwise."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None
    try:
        key = load(data)
    except (ValueError, TypeError):
        raise ConfigError(f"{path}: not {form} {what} (make one with 'interneg keygen')") from None
    if not isinstance(key, expected):
        raise ConfigError(f"{path}: an Ed25519 {what} is needed, this is {type(key).__name__}")
    return key


class NegativeVerifier:
    def __init__(self, public_key: Ed25519PublicKey):
        self.public_key = public_key

    @classmethod
    def from_file(cls, path: Path) -> "NegativeVerifier":
        return cls(_load_key(path, "public key", "a PEM", serialization.load_pem_public_key, Ed25519PublicKey))

    def fingerprint(self) -> str:
        raw = self.public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return raw.hex()[:16]

    def check(self, topic: str, key: bytes | None, value: bytes | None, headers) -> None:
        """Raise SignatureRefused unless the record carries one valid signature."""
        signatures = [v for k, v in headers or () if k == H_SIGNATURE]
        if not signatures:
            raise SignatureRefused(f"unsigned (no '{H_SIGNATURE}' header)")
        if len(signatures) > 1:
            raise SignatureRefused(f"{len(signatures)} '{H_SIGNATURE}' headers")
        signature = signatures[0] or b""
        if len(signature) != SIGNATURE_BYTES:
            raise SignatureRefused(f"signature of {len(signature)} bytes, Ed25519 has {SIGNATURE_BYTES}")
        try:
            self.public_key.verify(signature, signed_bytes(topic, key, value))
        except InvalidSignature:
            raise SignatureRefused("bad signature: not made with this deployment's signing key, or the record was altered") from None


class NegativeSigner:
    def __init__(self, private_key: Ed25519PrivateKey):
        self.private_key = private_key

    @classmethod
    def from_file(cls, path: Path) -> "NegativeSigner":
        return cls(_load_key(path, "private key", "an unencrypted PEM", lambda data: serialization.load_pem_private_key(data, password=None),
                             Ed25519PrivateKey))

    def sign(self, topic: str, key: bytes | None, value: bytes | None) -> list[tuple[str, bytes]]:
        """The headers that carry the signature of this record."""
        return [(H_SIGNATURE, self.private_key.sign(signed_bytes(topic, key, value)))]

    def verifier(self) -> NegativeVerifier:
        return NegativeVerifier(self.private_key.public_key())


def generate_keypair(directory: Path) -> tuple[Path, Path]:
    """A fresh key pair in ``directory``: (signing key, readable by its owner only; verify key).

    Refuses to overwrite: a new key pair makes every negative on the topic unverifiable.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    private_path, public_path = directory / SIGNING_KEY_FILE, directory / VERIFY_KEY_FILE
    for path in (private_path, public_path):
        if path.exists():
            raise ConfigError(f"{path} exists: remove it first (the negatives it signed would no longer verify)")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
    public_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return private_path, public_path


def keys_from_settings(bank) -> tuple[NegativeSigner | None, NegativeVerifier | None]:
    """(signer, verifier) of BankSettings: the verify key, or else the signing key's public half.

    Both set: they must be one pair, or this worker would refuse its own negatives.
    """
    signer = NegativeSigner.from_file(bank.signing_key) if bank.signing_key is not None else None
    verifier = NegativeVerifier.from_file(bank.verify_key) if bank.verify_key is not None else None
    if signer is not None and verifier is not None and signer.verifier().fingerprint() != verifier.fingerprint():
        raise ConfigError(f"{bank.signing_key} and {bank.verify_key} are not one key pair: the workers would refuse every negative")
    if verifier is None and signer is not None:
        verifier = signer.verifier()
    return signer, verifier
