"""Regenerates the committed Python code of the wire protocol: `python -m protos.generate`.

`--check` compares instead of writing, and exits 1 when the committed code is stale.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTOS = (
    "protos/common.proto",
    "protos/device.proto",
    "protos/admin.proto",
    "protos/secagg.proto",
)


def generate(root: pathlib.Path, out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Runs protoc over the .proto files under `root`, writing into `out_dir`."""
    grpc_include = pathlib.Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{root}",
        f"-I{grpc_include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(root / p) for p in PROTOS),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")
    return sorted((out_dir / "protos").glob("*_pb2*.py*"))


def stale_files(root: pathlib.Path, write: bool = False) -> list[str]:
    """Names of generated files under `root/protos` that differ from a fresh generation."""
    stale = []
    with tempfile.TemporaryDirectory() as tmp:
        for path in generate(root, pathlib.Path(tmp)):
            committed = root / "protos" / path.name
            if not committed.exists() or committed.read_bytes() != path.read_bytes():
                stale.append(path.name)
                if write:
                    committed.write_bytes(path.read_bytes())
    return stale


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if committed code is stale")
    args = parser.parse_args()
    stale = stale_files(ROOT, write=not args.check)
    if args.check and stale:
        print(f"stale generated code: {', '.join(stale)}; run `python -m protos.generate`")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
