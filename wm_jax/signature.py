"""Signed video sidecars: an HMAC-SHA256 over what the sidecar says, so `wm verify` can
vouch for the provenance as well as for the video's bytes.

* **Key.** HMAC key = SHA-256(domain | the watermark key, 8 bytes little-endian): the one
  key a user already holds, so a video and its sidecar answer to the same key. The
  project's DEFAULT_KEY is public: under it a signature catches any edit made without
  re-signing, but anyone who reads this file can re-sign. Authenticity needs a private key
  (`wm generate --key K`, `wm verify --key K`); a signature under another key fails.
* **What is signed.** Each field of the sidecar except `signature`, and each field of its
  `provenance` (as `provenance.<name>`), gets the SHA-256 of its canonical JSON (sorted
  keys, no whitespace, UTF-8). The HMAC covers the canonical JSON of that
  {field: digest} map, so the video's hash (`sha256`) is inside it. Verification names
  the fields whose digest no longer matches, and fails on the HMAC when the digests
  themselves were edited or another key signed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

ALGORITHM = "HMAC-SHA256"
_KEY_DOMAIN = b"wm_jax.sidecar.hmac.v1"


def canonical(value: Any) -> bytes:
    """The one byte string of a JSON value: sorted keys, no whitespace, UTF-8. (A NaN can
    only be in an edited sidecar: `watermark.write_manifest` refuses them.)"""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def signing_key(key: int) -> bytes:
    return hashlib.sha256(_KEY_DOMAIN + key.to_bytes(8, "little")).digest()


def field_digests(sidecar: dict[str, Any]) -> dict[str, str]:
    """{field: sha256 of its canonical JSON} for the sidecar's fields (not `signature`) and
    those of its `provenance`."""
    fields = {name: value for name, value in sidecar.items() if name != "signature"}
    provenance = fields.get("provenance")
    if isinstance(provenance, dict):
        fields.update({f"provenance.{name}": value for name, value in provenance.items()})
    return {name: hashlib.sha256(canonical(value)).hexdigest() for name, value in sorted(fields.items())}


def sign(sidecar: dict[str, Any], key: int) -> dict[str, Any]:
    """The `signature` entry of a sidecar (its other fields final)."""
    digests = field_digests(sidecar)
    mac = hmac.new(signing_key(key), canonical(digests), hashlib.sha256).hexdigest()
    return {"algorithm": ALGORITHM, "fields": digests, "hmac": mac}


def problems(sidecar: dict[str, Any], key: int) -> list[str]:
    """What is wrong with a sidecar's signature under `key` ([]: every field is as signed)."""
    signature = sidecar.get("signature")
    if not isinstance(signature, dict) or signature.get("algorithm") != ALGORITHM:
        return [f"the sidecar is not signed ({ALGORITHM}): its provenance cannot be vouched for"]
    signed = signature.get("fields")
    signed = signed if isinstance(signed, dict) else {}
    found = []
    expected = hmac.new(signing_key(key), canonical(signed), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, str(signature.get("hmac", ""))):
        found.append(
            "signature does not verify under this key: the sidecar was signed with another key, "
            "or its signed digests were edited"
        )
    actual = field_digests(sidecar)
    edited = sorted(name for name in set(signed) | set(actual) if signed.get(name) != actual.get(name))
    found += [f"field '{name}' differs from what was signed (edited, added or removed)" for name in edited]
    return found
