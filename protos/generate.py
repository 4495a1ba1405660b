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
PROTOS = ("protos/common.proto", "protos/device.proto", "protos/admin.proto")


def generate(out_dir: pathlib.Path) -> list[pathlib.Path]:
    grpc_include = pathlib.Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{ROOT}",
        f"-I{grpc_include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(ROOT / p) for p in PROTOS),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")
    return sorted((out_dir / "protos").glob("*_pb2*.py*"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if committed code is stale")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        generated = generate(pathlib.Path(tmp))
        stale = []
        for path in generated:
            committed = ROOT / "protos" / path.name
            if not committed.exists() or committed.read_bytes() != path.read_bytes():
                stale.append(path.name)
                if not args.check:
                    committed.write_bytes(path.read_bytes())
    if args.check and stale:
        print(f"stale generated code: {', '.join(stale)}; run `python -m protos.generate`")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
