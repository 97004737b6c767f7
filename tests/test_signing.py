"""Signatures on the negatives topic: what verifies, what is refused, how keys are made and checked."""
from __future__ import annotations

import stat

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pipeline.errors import ConfigError
from schemas.messages import H_SIGNATURE
from schemas.settings import BankSettings
from workers.cli import main as cli
from workers.signing import (
    SIGNATURE_BYTES,
    NegativeSigner,
    NegativeVerifier,
    SignatureRefused,
    generate_keypair,
    keys_from_settings,
    signed_bytes,
)

TOPIC = "ood.negatives"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    private, public = generate_keypair(tmp_path_factory.mktemp("keys"))
    return NegativeSigner.from_file(private), NegativeVerifier.from_file(public)


def test_a_signed_record_and_tombstone_verify_with_the_public_key_alone(pair):
    signer, verifier = pair
    for value in (b'{"id": 4294967297}', None):
        headers = signer.sign(TOPIC, b"4294967297", value)
        assert [k for k, _ in headers] == [H_SIGNATURE] and len(headers[0][1]) == SIGNATURE_BYTES
        verifier.check(TOPIC, b"4294967297", value, headers)  # no exception


@pytest.mark.parametrize(
    "change",
    ["value", "key", "topic", "tombstone-for-empty", "empty-for-tombstone", "key-into-value"],
)
def test_a_signature_covers_topic_key_value_and_the_tombstone_flag(pair, change):
    signer, verifier = pair
    key, value = b"4294967297", b"payload"
    signed = {"tombstone-for-empty": (TOPIC, key, b""), "empty-for-tombstone": (TOPIC, key, None)}.get(change, (TOPIC, key, value))
    headers = signer.sign(*signed)
    presented = {
        "value": (TOPIC, key, b"payload!"),
        "key": (TOPIC, b"4294967298", value),
        "topic": ("other.negatives", key, value),
        "tombstone-for-empty": (TOPIC, key, None),
        "empty-for-tombstone": (TOPIC, key, b""),
        "key-into-value": (TOPIC, b"42949672", b"97payload"),  # the same bytes, split elsewhere
    }[change]
    with pytest.raises(SignatureRefused, match="bad signature"):
        verifier.check(*presented, headers)


def test_unsigned_misframed_and_foreign_signatures_are_refused(pair):
    signer, verifier = pair
    key, value = b"4294967297", b"payload"
    good = signer.sign(TOPIC, key, value)
    cases = {
        "unsigned": ([], "unsigned"),
        "other header only": ([("x-other", b"1")], "unsigned"),
        "empty": ([(H_SIGNATURE, b"")], "0 bytes"),
        "null": ([(H_SIGNATURE, None)], "0 bytes"),
        "short": ([(H_SIGNATURE, good[0][1][:63])], "63 bytes"),
        "twice": (good + good, "2 'x-signature' headers"),
        "another key": (NegativeSigner(Ed25519PrivateKey.generate()).sign(TOPIC, key, value), "bad signature"),
    }
    for name, (headers, why) in cases.items():
        with pytest.raises(SignatureRefused, match=why):
            verifier.check(TOPIC, key, value, headers)


def test_length_prefixes_keep_every_record_distinct():
    assert signed_bytes(TOPIC, b"12", b"3") != signed_bytes(TOPIC, b"1", b"23")
    assert signed_bytes(TOPIC, b"1", None) != signed_bytes(TOPIC, b"1", b"")
    assert signed_bytes(TOPIC, None, b"x") == signed_bytes(TOPIC, b"", b"x")  # Kafka cannot tell these apart either


def test_keygen_writes_a_private_key_only_its_owner_reads_and_never_overwrites(tmp_path, capsys):
    assert cli(["keygen", str(tmp_path / "keys")]) == 0
    out = capsys.readouterr().out
    private, public = tmp_path / "keys" / "negatives-signing.pem", tmp_path / "keys" / "negatives-verify.pem"
    assert f"INTERNEG_BANK__SIGNING_KEY={private}" in out and f"INTERNEG_BANK__VERIFY_KEY={public}" in out
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in private.read_bytes() and b"PRIVATE" not in public.read_bytes()
    before = private.read_bytes()
    assert cli(["keygen", str(tmp_path / "keys")]) == 2  # one error line, the pair untouched
    assert "exists" in capsys.readouterr().err and private.read_bytes() == before


def test_settings_with_keys_that_are_not_one_pair_are_refused(tmp_path):
    first, second = generate_keypair(tmp_path / "a"), generate_keypair(tmp_path / "b")
    with pytest.raises(ConfigError, match="not one key pair"):
        keys_from_settings(BankSettings(signing_key=first[0], verify_key=second[1]))
    signer, verifier = keys_from_settings(BankSettings(signing_key=first[0]))  # the verify key follows from the signing key
    assert verifier.fingerprint() == NegativeVerifier.from_file(first[1]).fingerprint()
    assert keys_from_settings(BankSettings()) == (None, None)
    with pytest.raises(ConfigError, match="not a PEM public key"):
        keys_from_settings(BankSettings(verify_key=first[0]))
    with pytest.raises(ConfigError, match="cannot read"):
        keys_from_settings(BankSettings(signing_key=tmp_path / "missing.pem"))


def test_an_inversion_worker_that_cannot_sign_for_its_verifying_followers_does_not_start(tiny_settings, tiny_bundle_dir):
    from workers.inversion_worker import InversionWorker

    settings = tiny_settings.model_copy(deep=True)
    settings.worker.bundle = tiny_bundle_dir
    settings.bank.signing_key = None  # the verify key stays set
    with pytest.raises(ConfigError, match="no INTERNEG_BANK__SIGNING_KEY"):
        InversionWorker(settings)
