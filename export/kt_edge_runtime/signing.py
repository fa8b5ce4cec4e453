"""Ed25519 signatures of a bundle's manifest (``manifest.json.sig``), made with ``cryptography``.

The manifest lists the sha256 of every bundle file, so a valid signature over its exact bytes vouches for
the whole bundle: whoever holds the private key wrote it, and nothing changed since.
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path

from .atomic import write_bytes

SIGNATURE_NAME = "manifest.json.sig"


class SignatureError(Exception):
    """A key that cannot be used, or a manifest its signature does not vouch for."""


def _read_key(path: str | os.PathLike, private: bool):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SignatureError(f"cannot read key {path}: {exc.strerror or exc}") from None
    try:
        if private:
            key = serialization.load_pem_private_key(data, password=None)
        else:
            key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        kind = "unencrypted PEM private" if private else "PEM public"
        raise SignatureError(f"{path} is not an {kind} key: {exc}") from None
    wanted = ed25519.Ed25519PrivateKey if private else ed25519.Ed25519PublicKey
    if not isinstance(key, wanted):
        raise SignatureError(f"{path} is not an Ed25519 key")
    return key


def load_private_key(path: str | os.PathLike):
    """An Ed25519 private key from an unencrypted PEM file (``openssl genpkey -algorithm ed25519``)."""
    return _read_key(path, private=True)


def sign_manifest(bundle_dir: str | os.PathLike, private_key) -> Path:
    """Write manifest.json.sig: the base64 Ed25519 signature of manifest.json's bytes."""
    root = Path(bundle_dir)
    signature = private_key.sign((root / "manifest.json").read_bytes())
    target = root / SIGNATURE_NAME
    write_bytes(target, base64.b64encode(signature) + b"\n")
    return target


def check_signature(bundle_dir: str | os.PathLike, manifest_bytes: bytes, public_key: str | os.PathLike) -> None:
    """Raise SignatureError unless manifest_bytes carry a valid signature by public_key's private key."""
    from cryptography.exceptions import InvalidSignature

    key = _read_key(public_key, private=False)
    path = Path(bundle_dir) / SIGNATURE_NAME
    if not path.is_file():
        raise SignatureError(f"bundle is not signed ({SIGNATURE_NAME} missing) and a public key was given")
    try:
        signature = base64.b64decode(path.read_bytes().strip(), validate=True)
        key.verify(signature, manifest_bytes)
    except (InvalidSignature, binascii.Error, ValueError):
        raise SignatureError(f"{SIGNATURE_NAME} is not a signature of this manifest by the key {public_key}") from None
