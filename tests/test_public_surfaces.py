"""Public surfaces (as httpx checks its own): each package's ``__init__`` says in ``__all__`` what other packages
may use, names or modules; the code outside a package uses only that, and imports no private name ``_x`` from
another package. Facts stated once: one connection set-up, one node selector matcher, one config resolution."""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("driver", "controller")

SURFACES = {
    "driver": ["api", "cli", "cliopts", "errors", "inventory", "kubeletapi", "logfmt", "nvml", "plugin", "slices"],
    "driver.api": ["config", "constants", "deviceclasses", "kube", "messages", "naming", "nodeselector", "objects",
                   "quantity"],
    "driver.nvml": ["BACKENDS", "DeviceInfo", "FakeGpuProfile", "MigDeviceInfo", "MigMode", "NvmlBackend", "NvmlError", "Placement", "ProfileError", "errors", "events", "fake", "interface", "load_profile", "models", "open_backend", "profile", "profile_from_spec", "real"],
    "driver.plugin": ["main", "sockets", "telemetry"],
    "controller": ["allocator", "cli", "operator", "sandbox", "simulate", "webhook"],
    "controller.allocator": ["AllocatedState", "AllocationError", "Allocator", "DeviceID", "Features", "NOTHING", "Node", "NodeChoice", "STRATEGIES", "SliceIndex", "Strategy", "Unavailable", "cel", "copy_claim_with_tolerations", "devicetaints", "explain", "get_strategy", "nodeselector", "pools", "search", "types"],
    "controller.operator": ["capacity", "claims", "controller", "main", "nodefit", "taintrules"],
    "controller.sandbox": ["apiserver", "main"],
    "controller.sandbox.apiserver": ["FEATURES", "RESOURCES", "ApiError", "ApiServer", "Resource"],
    "controller.simulate": ["SimulateError", "main"],
}


def _files() -> list[Path]:
    return [p for d in SOURCES for p in sorted((ROOT / d).rglob("*.py")) if "kubeletapi" not in p.parts]


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


PACKAGES = {_module(p) for p in _files() if p.name == "__init__.py"}


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_each_package_says_what_others_may_use(package: str) -> None:
    mod = importlib.import_module(package)
    assert package in SURFACES, f"{package}/__init__.py: add __all__ (what other packages may use) and list it here"
    assert mod.__all__ == SURFACES[package]
    for name in mod.__all__:      # every name is there, or is a module of the package
        assert hasattr(mod, name) or importlib.util.find_spec(f"{package}.{name}") is not None, f"{package}.{name}"


def _imports(mod: str, is_package: bool, source: str):
    """(line, imported module, name or None) of every import in a module's source, relative ones resolved."""
    package = mod if is_package else mod.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                yield node.lineno, target, alias.name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, None


def _violations(mod: str, is_package: bool, source: str, where: str) -> list[str]:
    out = []
    for line, target, name in _imports(mod, is_package, source):
        if target.split(".")[0] not in SOURCES:
            continue
        at = f"{where}:{line}: {target}" + (f" import {name}" if name else "")
        parts = target.split(".") + ([name] if name else [])
        for i in range(1, len(parts)):
            pkg = ".".join(parts[:i])
            if pkg not in PACKAGES or mod == pkg or mod.startswith(pkg + "."):
                continue              # the importer's own package: anything goes
            used = parts[i]
            if used.startswith("_"):
                out.append(f"{at}: {used} is private to {pkg}")
            elif used not in SURFACES.get(pkg, []) and used != "*":
                out.append(f"{at}: {pkg} does not offer {used} (its __all__: {SURFACES.get(pkg)})")
            if pkg + "." + used not in PACKAGES:
                break                 # a name or a plain module: what the module offers is checked below
        home = target if target in PACKAGES else target.rpartition(".")[0]
        if name and name.startswith("_") and not name.startswith("__") and not (mod == home or mod.startswith(home + ".")) \
                and f"{at}: {name} is private to {home}" not in out:
            out.append(f"{at}: {name} is private to {target}")
    return out


def _file_violations(path: Path) -> list[str]:
    return _violations(_module(path), path.name == "__init__.py", path.read_text(), str(path.relative_to(ROOT)))


def test_code_outside_a_package_uses_only_its_surface_and_no_private_names() -> None:
    found = [v for p in _files() for v in _file_violations(p)]
    assert found == []


def test_the_check_sees_a_private_import_and_an_unoffered_module() -> None:
    probe = ("from driver.plugin.prepare import PrepareError\n"           # not offered by driver.plugin
             "from driver.api.kube import _status\n"                      # private to driver.api.kube
             "from controller.sandbox.apiserver.store import Store\n"    # not offered by the apiserver package
             "from .apiserver import ApiServer\n"                         # offered
             "from .validation import admit\n"                            # the importer's own package
             "from controller.allocator import Allocator\n")              # offered
    found = _violations("controller.sandbox.probe", False, probe, "probe.py")
    assert [f.split(": ", 2)[2].split(" (")[0] for f in found] == [
        "driver.plugin does not offer prepare", "_status is private to driver.api.kube",
        "controller.sandbox.apiserver does not offer store"]


def test_facts_stated_once() -> None:
    """The connection set-up, node selector matching and opaque-config resolution each have one home."""
    homes = {"load_kube_config": "driver/api/kube.py", "load_incluster_config": "driver/api/kube.py",
             "def node_matches": "driver/api/nodeselector.py", "def resolve(": "driver/api/config.py",
             "def config_applies": "driver/api/config.py", "def pod_claim_names": "driver/api/objects.py",
             "class PartitaError": "driver/errors.py"}
    for needle, home in homes.items():
        where = sorted(str(p.relative_to(ROOT)) for p in _files() if needle in p.read_text())
        assert where == [home], (needle, where)
