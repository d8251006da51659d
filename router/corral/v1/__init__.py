"""corral.v1: generated gRPC/protobuf stubs of ``proto/corral/v1`` (engine and router services).

The ``*_pb2*.py`` modules are generated at build/install time (see ``hatch_build.py``). In a source
checkout whose stubs are missing or older than the ``.proto`` files, they are regenerated here on first
import when ``grpc_tools`` is importable (or run ``python -m corral.router.protogen``).
"""

from __future__ import annotations


def _ensure() -> None:
    from pathlib import Path

    here = Path(__file__).resolve().parent
    repo_proto = here.parents[1].parent / "proto" / "corral" / "v1"
    if not repo_proto.is_dir():
        return  # installed wheel: stubs shipped pre-generated
    try:
        from corral.router.protogen import ensure_generated
    except ImportError:  # pragma: no cover
        return
    ensure_generated()


_ensure()
