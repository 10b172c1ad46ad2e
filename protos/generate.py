"""Generate the Python stubs for Mandant's protos into the client package.

    python protos/generate.py            # write the stubs
    python protos/generate.py --check    # exit 1 if the committed stubs drift

The generated modules register their descriptors in a private descriptor pool
(``mandant_client._proto.POOL``) instead of protobuf's process-wide default pool.
Triton's client ships its own ``inference.*`` messages in the default pool, and two
definitions of the same symbols in one pool refuse to load; with a pool of our own,
Mandant and ``tritonclient`` live in one process (the Triton backend needs exactly
that).  Only the pool changes: message names, field numbers and method paths
(``/inference.GRPCInferenceService/ModelInfer``) are those of the .proto files.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
TARGET = ROOT / "clients" / "python" / "mandant_client" / "_proto"
FILES = ["model_config.proto", "grpc_service.proto", "admin.proto"]


def _rewrite(name: str, text: str) -> str:
    if name.endswith("_pb2.py"):
        text = text.replace(
            "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile(",
            "DESCRIPTOR = _pool.POOL.AddSerializedFile(",
        )
        text = text.replace(
            "from google.protobuf.internal import builder as _builder\n",
            "from google.protobuf.internal import builder as _builder\n"
            "from mandant_client._proto import _pool\n",
        )
        text = text.replace("_sym_db = _symbol_database.Default()\n", "")
    if name.endswith(("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")):
        text = re.sub(
            r"^import (\w+_pb2) as (\w+)$",
            r"from mandant_client._proto import \1 as \2",
            text,
            flags=re.M,
        )
    return text


def generate(out: Path) -> None:
    for proto in FILES:
        args = [
            "protoc",
            f"-I{PROTOS}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            str(PROTOS / proto),
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {proto}")
    for path in sorted(out.glob("*_pb2*.py*")):
        path.write_text(_rewrite(path.name, path.read_text()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the stubs drift")
    args = parser.parse_args()
    if not args.check:
        generate(TARGET)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        drift = [
            p.name
            for p in sorted(fresh.iterdir())
            if not (TARGET / p.name).exists() or (TARGET / p.name).read_text() != p.read_text()
        ]
    if drift:
        print("generated stubs drift from protos/: " + ", ".join(drift), file=sys.stderr)
        print("run `make protos` and commit the result", file=sys.stderr)
        return 1
    print("generated stubs match protos/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
