"""``corral validate`` gives the apiserver's verdict: every fixture, offline and against a real apiserver.

Table-driven: each YAML file below is validated offline (``corral.api.validation.validate_paths``, what
``corral validate`` runs) and sent to a real kube-apiserver with Corral's CRDs installed, as kubectl sends it:
the document's own YAML text (the server converts it, so YAML quirks are the server's), a create with
``fieldValidation=Strict`` (kubectl's default) and ``dryRun=All`` (nothing is stored, so names may repeat).
The verdicts, accepted or rejected, must be identical.

* ``tests/data/invalid/*.yaml``: one object each; rejected by both. The ``# expect-server:`` header is a
  substring of the apiserver's message (``-``: not checkable server-side). An apiVersion/kind the server
  does not serve is rejected at discovery, as kubectl rejects it ("no matches for kind ...").
* ``tests/data/valid/*.yaml`` and ``manifests/examples/*.yaml``: accepted by both, and the spec the
  apiserver would store (CRD defaults applied) equals the one ``corral validate`` builds (model defaults).
* ``tests/data/invalid-cross/*.yaml``: several objects that are only wrong *together* (a pin naming an
  adapter the pool lacks, two policies for one pool): the apiserver sees one object at a time, so each
  object alone must be accepted by both; the combination is rejected offline only (``# expect-server: -``,
  until the admission webhook exists; ``tests/unit/test_api_invalid.py`` checks the offline message).

* plain YAML scalars where YAML readers differ (``y``, ``1e3``, ``0o10``, ``1:20``, ``~``, ...) in a number, a
  boolean and a string field: same verdict and the same stored value.

A file's verdict is "accepted" when every object in it is.

Known, deliberate differences (no fixture): ``corral validate`` requires ``metadata.name`` (Corral objects
refer to each other by name) where the apiserver also takes ``generateName`` alone; and it checks a
``status`` written in the file, which the apiserver drops on create (status subresource) unless a field in
it is unknown. ``test_verdicts_agree_summary`` prints the
table (``-s``) and the count of agreeing fixtures.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml
from corral.api.models import ModelPool, RoutingPolicy
from corral.api.validation import validate_paths, validate_text
from kubernetes import client
from kubernetes.dynamic.exceptions import ResourceNotFoundError

if TYPE_CHECKING:
    from conftest import K8sCluster

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"
CRD_DIR = REPO / "manifests" / "crds"


def _files(directory: Path) -> list[Path]:
    return sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")])


INVALID = _files(DATA / "invalid")
VALID = [*_files(DATA / "valid"), *_files(REPO / "manifests" / "examples")]
CROSS = _files(DATA / "invalid-cross")


def headers(path: Path) -> dict[str, str]:
    """``# key: value`` comment lines at the top of a file (until the first non-comment line)."""
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        if not stripped.startswith("#"):
            break
        key, sep, value = stripped.lstrip("#").strip().partition(":")
        if sep:
            out[key.strip().lower()] = value.strip()
    return out


def documents(text: str) -> list[str]:
    """The YAML documents of a file as text (split at ``---`` lines; comment-only parts dropped)."""
    parts = re.split(r"(?m)^---[ \t]*$", text)
    return [p for p in parts if any(ln.strip() and not ln.lstrip().startswith("#") for ln in p.splitlines())]


def _top(doc: str, key: str) -> str | None:
    """A top-level scalar (``apiVersion``, ``kind``) read without parsing: some fixtures cannot be parsed
    by PyYAML at all (2000 levels of nesting), yet the apiserver must see them."""
    m = re.search(rf"(?m)^{key}:[ \t]*['\"]?([^'\"\s#]+)", doc)
    return m.group(1) if m else None


def _namespace(doc: str) -> str:
    m = re.search(r"(?m)^metadata:[ \t]*\n(?:[ \t]+.*\n)*?[ \t]+namespace:[ \t]*['\"]?([^'\"\s#]+)", doc)
    return m.group(1) if m else "default"


# ------------------------------------------------------------------------------------------- the server


@dataclass
class ServerVerdict:
    accepted: bool
    status: int
    message: str
    raw: bytes = b""
    """The response body: the object as the apiserver would store it (defaults applied) when accepted."""

    def stored(self) -> dict[str, Any]:
        return dict(json.loads(self.raw))


def server_verdict(cluster: K8sCluster, doc: str) -> ServerVerdict:
    """What the apiserver says to one YAML document, created as kubectl would (Strict, here dry-run)."""
    api_version, kind = _top(doc, "apiVersion"), _top(doc, "kind")
    assert api_version and kind, f"document without apiVersion/kind:\n{doc[:300]}"
    try:
        res = cluster.resource(api_version, kind)
    except ResourceNotFoundError:
        return ServerVerdict(False, 404, f'no matches for kind "{kind}" in version "{api_version}"')
    ns = _namespace(doc) if res.namespaced else None
    query = [("fieldValidation", "Strict"), ("fieldManager", "corral-parity"), ("dryRun", "All")]
    api = cluster.api_client
    method, url, head, body, post = api.param_serialize(
        "POST",
        res.path(namespace=ns),
        query_params=query,
        header_params={"Content-Type": "application/yaml", "Accept": "application/json"},
        body=doc,
        auth_settings=["BearerToken"],
    )
    resp = api.call_api(method, url, header_params=head, body=body, post_params=post, _request_timeout=60)
    raw = resp.read()
    assert resp.status < 500, f"apiserver error HTTP {resp.status}: {raw[:2000]!r}"
    if resp.status in (200, 201):  # not decoded here: it may nest deeper than Python's json allows
        return ServerVerdict(True, resp.status, "", raw)
    return ServerVerdict(False, resp.status, str(json.loads(raw).get("message", "")))


def _established(cluster: K8sCluster, name: str) -> bool:
    crd = client.ApiextensionsV1Api(cluster.api_client).read_custom_resource_definition(name)
    conds = {c.type: c for c in (crd.status.conditions if crd.status else None) or []}
    for bad in ("NonStructuralSchema",):
        if bad in conds and conds[bad].status == "True":
            raise AssertionError(f"CRD {name}: {conds[bad].message}")
    est = conds.get("Established")
    return est is not None and est.status == "True"


@pytest.fixture(scope="module")
def crds(k8s_cluster: K8sCluster) -> K8sCluster:
    """Corral's CRDs (manifests/crds) applied and Established."""
    names = []
    for f in _files(CRD_DIR):
        for doc in yaml.safe_load_all(f.read_text()):
            res = k8s_cluster.apply(doc)
            assert res.status in (200, 201), f"{f.name}: HTTP {res.status}: {res.message}"
            names.append(doc["metadata"]["name"])
    for n in names:
        k8s_cluster.wait_until(lambda n=n: _established(k8s_cluster, n), timeout=60, what=f"{n} Established")
    k8s_cluster.dynamic.resources.invalidate_cache()
    return k8s_cluster


def _pruned(value: Any) -> Any:
    """``value`` without empty lists/maps (pydantic writes a default ``pin: []``, the apiserver omits it)."""
    if isinstance(value, dict):
        out = {k: _pruned(v) for k, v in value.items()}
        return {k: v for k, v in out.items() if v not in ({}, [])}
    if isinstance(value, list):
        return [_pruned(v) for v in value]
    return value


def assert_same_defaults(obj: ModelPool | RoutingPolicy, verdict: ServerVerdict, what: str) -> None:
    """The spec the apiserver stores (CRD defaults applied) is the spec ``corral validate`` builds (pydantic
    defaults applied): one set of defaults, so the runtime sees what ``kubectl get`` shows."""
    mine = _pruned(obj.to_k8s()["spec"])
    theirs = _pruned(verdict.stored()["spec"])
    assert mine == theirs, f"{what}: defaults differ\n offline:   {mine}\n apiserver: {theirs}"


# ------------------------------------------------------------------------------------------ the table

RESULTS: dict[str, tuple[bool, bool]] = {}
"""fixture -> (offline accepted, apiserver accepted), filled by the tests below."""


def _record(name: str, offline: bool, server: bool) -> None:
    RESULTS[name] = (offline, server)


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


@pytest.mark.parametrize("path", INVALID, ids=[p.name for p in INVALID])
def test_invalid_rejected_by_both(crds: K8sCluster, path: Path) -> None:
    head = headers(path)
    expect = head.get("expect-server")
    assert expect, f"{path.name}: missing '# expect-server: <substring>' header (or '-')"
    docs = documents(path.read_text())
    assert len(docs) == 1, f"{path.name}: expected one object, found {len(docs)}"
    offline = validate_paths([path]).ok
    server = server_verdict(crds, docs[0])
    _record(_rel(path), offline, server.accepted)
    assert offline == server.accepted, (
        f"{path.name}: offline {'accepts' if offline else 'rejects'}, the apiserver "
        f"{'accepts' if server.accepted else 'rejects'} (HTTP {server.status}: {server.message})"
    )
    assert not server.accepted, f"{path.name}: both accept a fixture of tests/data/invalid"
    if expect != "-":
        assert expect in server.message, (
            f"{path.name}: apiserver rejected it (HTTP {server.status}) but its message lacks "
            f"{expect!r}:\n{server.message}"
        )


@pytest.mark.parametrize("path", VALID, ids=[p.name for p in VALID])
def test_valid_accepted_by_both(crds: K8sCluster, path: Path) -> None:
    report = validate_paths([path])
    verdicts = [server_verdict(crds, d) for d in documents(path.read_text())]
    server = all(v.accepted for v in verdicts)
    _record(_rel(path), report.ok, server)
    why = "; ".join(f"HTTP {v.status}: {v.message}" for v in verdicts if not v.accepted)
    assert report.ok == server, (
        f"{path.name}: offline {'accepts' if report.ok else 'rejects'}, the apiserver "
        f"{'accepts' if server else 'rejects'} ({why or [str(p) for p in report.problems]})"
    )
    assert server, f"{path.name}: both reject it: {why}; offline: {[str(p) for p in report.problems]}"
    for obj, verdict in zip(report.objects, verdicts, strict=True):
        assert_same_defaults(obj, verdict, path.name)


@pytest.mark.parametrize("path", CROSS, ids=[p.name for p in CROSS])
def test_cross_object_fixture_objects_accepted_alone(crds: K8sCluster, path: Path) -> None:
    assert headers(path).get("expect-server") == "-", f"{path.name}: cross-object fixtures are offline-only"
    docs = documents(path.read_text())
    assert len(docs) >= 2, f"{path.name}: a cross-object fixture holds several objects"
    for i, doc in enumerate(docs, 1):
        offline = validate_text(doc, f"{path.name}#{i}")
        server = server_verdict(crds, doc)
        _record(f"{_rel(path)}#{i}", offline.ok, server.accepted)
        assert offline.ok and server.accepted, (
            f"{path.name} object {i}: alone it must be valid on both sides (offline {offline.problems}, "
            f"apiserver HTTP {server.status}: {server.message})"
        )
        assert_same_defaults(offline.objects[0], server, f"{path.name} object {i}")
    assert not validate_paths([path]).ok, f"{path.name}: offline accepts the combination"


PLAIN_SCALARS = (
    "yes", "on", "On", "y", "Y", "no", "off", "True", "TRUE", "0x10", "0o10", "010", "08", "1_000", ".5",
    "+1", "~", "Null", "1:20", "0b101", "1e3", "1E3", "1.5e3", "-0", ".Inf", "2024-01-01", "'5'", "0.",
    "1_0.5", "+.5", "4.0", "1e400", "-.5", "0x1F", "'true'", "!!str 5",
)  # fmt: skip
"""Plain YAML scalars where YAML readers disagree (YAML 1.1 vs 1.2, PyYAML vs go-yaml)."""


def test_yaml_scalars_read_as_the_apiserver_reads_them(crds: K8sCluster) -> None:
    """Each scalar in a number, a boolean and a string field: same verdict and same stored value."""
    fields = {
        "number": ("  ttftSloMs: {v}\n", lambda spec: spec.get("ttftSloMs")),
        "boolean": (
            "  tenants: {{secretRef: {{name: k}}, isolateCache: {v}}}\n",
            lambda spec: spec.get("tenants", {}).get("isolateCache"),
        ),
        "string": (
            "  tenants: {{secretRef: {{name: k, key: {v}}}}}\n",
            lambda spec: spec.get("tenants", {}).get("secretRef", {}).get("key"),
        ),
    }
    wrong = []
    for kind, (line, pick) in fields.items():
        for v in PLAIN_SCALARS:
            doc = (
                "apiVersion: corral.dev/v1alpha1\nkind: RoutingPolicy\nmetadata: {name: q}\n"
                "spec:\n  poolRef: p\n" + line.format(v=v)
            )
            server = server_verdict(crds, doc)
            report = validate_text(doc, "<t>")
            stored = pick(server.stored()["spec"]) if server.accepted else None
            built = pick(report.objects[0].to_k8s()["spec"]) if report.ok else None
            _record(f"plain scalar {v} as a {kind}", report.ok, server.accepted)
            same_value = stored == built and (type(stored) is type(built) or kind == "number")
            if server.accepted != report.ok or not same_value:
                wrong.append(
                    f"{kind} {v!r}: apiserver {server.accepted} {stored!r}, offline {report.ok} {built!r}"
                )
    assert not wrong, "\n".join(wrong)


def test_verdicts_agree_summary(capsys: pytest.CaptureFixture[str]) -> None:
    """Runs last: the table of verdicts (run with ``-s`` to see it) and the agreement count."""
    expected = len(INVALID) + len(VALID) + sum(len(documents(p.read_text())) for p in CROSS)
    expected += 3 * len(PLAIN_SCALARS)
    if not RESULTS:
        pytest.skip("no parity result recorded (the apiserver tests were skipped)")
    agree = sum(o == s for o, s in RESULTS.values())
    with capsys.disabled():
        print(f"\n{'fixture':<70} offline   apiserver")
        for name, (o, s) in sorted(RESULTS.items()):
            mark = "" if o == s else "   <-- DISAGREE"
            print(f"{name:<70} {'accept' if o else 'reject':<9} {'accept' if s else 'reject'}{mark}")
        print(f"parity: {len(RESULTS)} fixture(s), {agree} agree ({time.strftime('%H:%M:%S')})")
    assert len(RESULTS) == expected, f"only {len(RESULTS)} of {expected} fixtures were compared"
    assert agree == len(RESULTS)
