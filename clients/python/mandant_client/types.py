"""Small frozen dataclasses that the clients return instead of protobuf messages.

Sequences are plain lists (as the wire has them); treat them as read-only.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TensorMetadata:
    """One input or output of a model: its name, v2 datatype and shape (-1: any size)."""

    name: str
    datatype: str
    shape: list[int]


@dataclass(frozen=True)
class ModelMetadata:
    """What ``ModelMetadata`` reports about a model."""

    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


@dataclass(frozen=True)
class ModelIndexEntry:
    """One model of the repository index, as visible to the calling tenant."""

    name: str
    version: str
    state: str
    reason: str = ""


@dataclass(frozen=True)
class ServerMetadata:
    """The server's name, version and protocol extensions."""

    name: str
    version: str
    extensions: list[str]
