"""``${NAME}`` references in the configuration file: expanded from the environment on
load, an unset variable refused with its field path, values never echoed."""

from __future__ import annotations

from pathlib import Path

import pytest

from mandant.config import load_config
from mandant.errors import ConfigError

HASH_A = "sha256:" + "a" * 64
HASH_B = "sha256:" + "b" * 64

CONFIG = """
server:
  grpc_port: ${GRPC_PORT}
  admin_keys: ["${ADMIN_HASH}"]
limits:
  store: redis
  url: "redis://:${REDIS_PASSWORD}@redis:6379/0"
tenants:
  - id: acme
    api_keys: ["${ACME_HASH}"]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mandant.yaml"
    path.write_text(text)
    return path


def test_references_are_replaced_by_the_environment(tmp_path: Path) -> None:
    env = {
        "GRPC_PORT": "9001",
        "ADMIN_HASH": HASH_A,
        "REDIS_PASSWORD": "s3cret",
        "ACME_HASH": HASH_B,
    }
    config = load_config(write(tmp_path, CONFIG), env)
    assert config.server.grpc_port == 9001  # a whole-value reference parses as its field
    assert config.server.admin_keys == (HASH_A,)
    assert config.limits.url == "redis://:s3cret@redis:6379/0"
    assert config.tenants[0].api_keys == (HASH_B,)


def test_the_process_environment_is_the_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MANDANT_TEST_ACME_HASH", HASH_A)
    path = write(tmp_path, 'tenants: [{id: acme, api_keys: ["${MANDANT_TEST_ACME_HASH}"]}]')
    assert load_config(path).tenants[0].api_keys == (HASH_A,)


def test_unset_variables_are_refused_with_their_field_paths(tmp_path: Path) -> None:
    env = {"GRPC_PORT": "9001", "REDIS_PASSWORD": "s3cret"}
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, CONFIG), env)
    assert caught.value.errors == [
        ("server.admin_keys.0", "environment variable ADMIN_HASH is not set"),
        ("tenants.0.api_keys.0", "environment variable ACME_HASH is not set"),
    ]


def test_an_expanded_value_is_validated_and_never_echoed(tmp_path: Path) -> None:
    path = write(tmp_path, 'tenants: [{id: acme, api_keys: ["${ACME_HASH}"]}]')
    with pytest.raises(ConfigError) as caught:
        load_config(path, {"ACME_HASH": "plain-key-not-a-hash"})
    assert [field for field, _ in caught.value.errors] == ["tenants.0.api_keys"]
    assert "plain-key-not-a-hash" not in str(caught.value)


def test_a_redis_url_its_password_breaks_is_refused_without_the_password(
    tmp_path: Path,
) -> None:
    """A password with a '/' (common in base64) ends the URL's host part early: the URL
    cannot be read. check-config passed it and ``serve`` failed to start, printing the
    password in the words of redis-py's error."""
    env = {"GRPC_PORT": "9001", "ADMIN_HASH": HASH_A, "ACME_HASH": HASH_B}
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, CONFIG), {**env, "REDIS_PASSWORD": "Hunter2Secret/Part2+x"})
    assert [field for field, _ in caught.value.errors] == ["limits"]
    assert "not a Redis URL that can be read" in str(caught.value)
    assert "Hunter2Secret" not in str(caught.value)
    encoded = load_config(
        write(tmp_path, CONFIG), {**env, "REDIS_PASSWORD": "Hunter2Secret%2FPart2"}
    )
    assert encoded.limits.url == "redis://:Hunter2Secret%2FPart2@redis:6379/0"


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("${}", "'${}' is not a variable reference (letters, digits, _)"),
        ("${1ABC}", "'${1ABC}' is not a variable reference (letters, digits, _)"),
        ("redis://${HOST", "'${' without a closing '}' (write '$${' for a literal '${')"),
    ],
)
def test_malformed_references_are_refused(tmp_path: Path, value: str, reason: str) -> None:
    path = write(tmp_path, f'limits: {{url: "{value}"}}')
    with pytest.raises(ConfigError) as caught:
        load_config(path, {"HOST": "redis"})
    assert caught.value.errors == [("limits.url", reason)]


def test_escapes_and_plain_dollars_stay_literal(tmp_path: Path) -> None:
    path = write(tmp_path, 'limits: {url: "redis://:pa$$w$rd@h/$${NOT_EXPANDED}"}')
    config = load_config(path, {"NOT_EXPANDED": "x"})
    assert config.limits.url == "redis://:pa$$w$rd@h/${NOT_EXPANDED}"


def test_values_are_not_expanded_twice(tmp_path: Path) -> None:
    path = write(tmp_path, 'limits: {url: "redis://:${PASSWORD}@h"}')
    config = load_config(path, {"PASSWORD": "${OTHER}", "OTHER": "no"})
    assert config.limits.url == "redis://:${OTHER}@h"


def test_a_file_that_is_not_utf8_is_a_configuration_error(tmp_path: Path) -> None:
    """A Latin-1 comment (an editor's choice) raised UnicodeDecodeError out of
    check-config and ``serve`` as a traceback, and out of a SIGHUP reload."""
    path = tmp_path / "mandant.yaml"
    path.write_bytes(b"tenants: []\n# caf\xe9\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, {})
    assert caught.value.errors == [("(file)", "not UTF-8 text (byte 0xe9 at offset 17)")]


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("tenants: []\nserver: {}\ntenants: [{id: acme}]\n", "line 3, column 1: key 'tenants'"),
        (
            "tenants:\n  - id: acme\n    quota: {rows_per_day: 5}\n    quota: {rows_per_day: 9}\n",
            "line 4, column 5: key 'quota' given twice in one mapping (first at line 3)",
        ),
    ],
    ids=["a section", "a tenant's setting"],
)
def test_a_key_given_twice_is_refused(tmp_path: Path, text: str, where: str) -> None:
    """PyYAML keeps the last of two equal keys: a second ``tenants:`` dropped the first
    list, a tenant's second ``quota:`` its first, and the file checked "ok"."""
    with pytest.raises(ConfigError) as refused:
        load_config(write(tmp_path, text))
    assert where in str(refused.value)


def test_a_yaml_error_says_where_without_the_file_s_text(tmp_path: Path) -> None:
    """PyYAML's message quotes the line, which may hold a secret; it went to the log
    when a reload was refused."""
    text = 'limits:\n  store: redis\n  url: "redis://:s3cret@redis:6379/0\ntenants: []\n'
    with pytest.raises(ConfigError) as refused:
        load_config(write(tmp_path, text))
    message = str(refused.value)
    assert "(yaml): line" in message and "quoted scalar" in message
    assert "s3cret" not in message


def test_merge_keys_still_override(tmp_path: Path) -> None:
    """``<<: *base`` brings keys that the mapping may give again (an override, not a
    key given twice)."""
    text = (
        "tenants:\n"
        "  - {id: a, rate_limit: &limits {requests_per_s: 5, burst: 5}}\n"
        "  - {id: b, rate_limit: {<<: *limits, burst: 9}}\n"
    )
    a, b = load_config(write(tmp_path, text)).tenants
    assert (a.rate_limit.burst, b.rate_limit.burst) == (5, 9)
    assert b.rate_limit.requests_per_s == 5


def test_a_character_yaml_does_not_take_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as refused:
        load_config(write(tmp_path, "tenants: []\nb: \x07\n"))
    assert "#x0007 at offset 15" in str(refused.value)
