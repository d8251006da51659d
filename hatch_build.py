"""Hatchling build hook: generate the ``corral.v1`` gRPC stubs from ``proto/`` at build/install time.

Runs ``grpc_tools.protoc`` (``grpcio-tools`` is in ``[build-system].requires``) into ``router/corral/v1/``
for every target: wheels (``pip install .``), editable installs (``pip install -e .``) and sdists. The
generated files are git-ignored, so for wheels they are added explicitly with ``force_include`` (hatchling
otherwise skips VCS-ignored files), together with the ``.proto`` sources.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


def _load_protogen(root: Path) -> Any:
    path = root / "router" / "corral" / "router" / "protogen.py"
    spec = importlib.util.spec_from_file_location("_corral_protogen", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class CustomBuildHook(BuildHookInterface):  # type: ignore[type-arg]
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        root = Path(self.root)
        proto_root = root / "proto"
        if not (proto_root / "corral" / "v1").is_dir():
            return  # building from an sdist that already carries generated stubs
        protogen = _load_protogen(root)
        files = protogen.generate(proto_root, root / "router")
        if self.target_name == "wheel" and version != "editable":
            force = build_data.setdefault("force_include", {})
            for f in files:
                force[str(f)] = f"corral/v1/{f.name}"
            for p in protogen.proto_files(proto_root):
                force[str(p)] = f"corral/v1/{p.name}"
        elif self.target_name == "sdist":
            build_data.setdefault("artifacts", []).extend(str(f.relative_to(root)) for f in files)
