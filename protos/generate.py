"""Regenerate the Python modules for every `.proto` in this folder.

    python -m fedge.protos.generate           # write the generated modules
    python -m fedge.protos.generate --check   # exit 1 if the checked-in modules are stale (CI)
"""

from __future__ import annotations

import argparse
import filecmp
import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _generate(out_dir: Path) -> list[Path]:
    from grpc_tools import protoc  # dev dependency: only needed to regenerate

    protos = sorted(HERE.glob("*.proto"))
    include = Path(protoc.__file__).resolve().parent / "_proto"
    args = ["protoc", f"-I{HERE}", f"-I{include}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}", *map(str, protos)]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    written = []
    for path in sorted(out_dir.glob("*_pb2*.py*")):
        text = path.read_text()
        # Generated modules import siblings as top-level modules; make them package-relative.
        text = re.sub(r"^import (\w+_pb2) as ", r"from . import \1 as ", text, flags=re.MULTILINE)
        text = re.sub(r"^import (\w+_pb2)$", r"from . import \1", text, flags=re.MULTILINE)
        path.write_text(text)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        fresh = _generate(Path(tmp))
        if args.check:
            stale = [p.name for p in fresh if not (HERE / p.name).exists() or not filecmp.cmp(p, HERE / p.name, shallow=False)]
            if stale:
                print(f"stale generated protobuf modules: {stale}; run python -m fedge.protos.generate", file=sys.stderr)
                return 1
            print(f"generated protobuf modules are up to date ({len(fresh)} files)")
            return 0
        for p in fresh:
            (HERE / p.name).write_text(p.read_text())
            print(f"wrote protos/{p.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
