"""The client certificate identities a front end names to the engine for a forwarded
call (``workers: N``, ``transport/grpc/forward.py``): a legal metadata value whatever
the certificate holds, read back as exactly the identities written."""

from __future__ import annotations

import pytest

from mandant.transport.grpc.forward import decode_identities, encode_identities

TRICKY = [
    ["CN=acme-client", "spiffe://test/acme"],
    ["CN=x\nCN=acme-client"],  # one identity, not two
    ["CN=caf\u00e9", "CN=\ufffd"],  # non-ASCII (a decoded name, or a replaced byte)
    ["CN=a,O=b", 'URI:"quoted"', ""],
]


@pytest.mark.parametrize("identities", TRICKY)
def test_identities_travel_as_printable_ascii_and_come_back_unchanged(
    identities: list[str],
) -> None:
    value = encode_identities(identities)
    assert all(0x20 <= ord(char) <= 0x7E for char in value)
    assert decode_identities(value) == identities


def test_no_value_is_no_identity_and_anything_else_is_refused() -> None:
    assert decode_identities(None) == [] and decode_identities("") == []
    for bad in ('{"CN": "x"}', "[1]", '"CN=x"'):
        with pytest.raises(ValueError):
            decode_identities(bad)
