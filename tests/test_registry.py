"""The one Registry: duplicates, did-you-mean errors, every plug-in kind on it, eager loading,
logger names = module names."""

from __future__ import annotations

import importlib
import logging
import pkgutil
import subprocess
import sys
import textwrap

import pytest

import fortify
from fortify.errors import ConfigError, FortifyError
from fortify.registry import Registry, plugin_registry


def test_register_get_available_and_duplicates():
    reg: Registry[int] = Registry("widget")
    assert reg.register("alpha", 1) == 1
    reg.register("beta", 2)
    reg.register("alpha", 1)  # the same object again (a reloaded module) is fine
    reg.register("aardvark", 0)
    assert reg.get("beta") == 2 and reg.available() == ["aardvark", "alpha", "beta"]
    assert reg.in_order() == ["alpha", "beta", "aardvark"]
    assert "alpha" in reg and "gamma" not in reg and len(reg) == 3
    with pytest.raises(ConfigError, match="widget 'alpha' is registered twice"):
        reg.register("alpha", 3)
    assert reg.get("alpha") == 1
    reg.register("alpha", 3, replace=True)
    assert reg.get("alpha") == 3
    with pytest.raises(FortifyError, match="unknown widget 'alpah'. Did you mean: alpha?"):
        reg.get("alpah")
    with pytest.raises(ConfigError, match="non-empty string"):
        reg.register("", 4)


def test_plugin_registry_checks_the_contract():
    import types

    ok = types.ModuleType("fake_ok")
    ok.NAME, ok.HELP, ok.add_arguments, ok.run = "ok", "help", print, print
    bad = types.ModuleType("fake_bad")
    bad.NAME = "bad"
    reg = plugin_registry("thing", [ok])
    assert reg.get("ok") is ok
    with pytest.raises(ConfigError, match="fake_bad lacks HELP, add_arguments, run"):
        plugin_registry("thing", [ok, bad])


REGISTRIES = [
    # (module:registry, names it must hold), lightest package first
    ("fortify.models.registry:MODELS", {"resnet18", "small-cnn", "wrn-34-10"}),
    ("fortify.models.sources:SOURCES", {"torchvision", "timm", "python"}),
    ("fortify.data.registry:READERS", {"cifar10", "digits", "fashion-mnist"}),
    ("fortify.defenses.registry:DEFENCES", {"fsr", "fpd", "fd", "cas", "cifs"}),
    (
        "fortify.train.objectives.base:OBJECTIVES",
        {"standard", "at", "trades", "mart", "fpd"},
    ),
    (
        "fortify.evaluate.registry:SUITES",
        {"paper", "quick", "autoattack", "full", "pgd10", "adaptive", "ood"},
    ),
    ("fortify.evaluate.corruptions:CORRUPTIONS", {"gaussian_noise", "fog", "saturate"}),
    ("fortify.importers:PLUGINS", {"fsr-release", "model", "robustbench"}),
    ("fortify.exporters:PLUGINS", {"robustbench"}),
    ("fortify.replicate:PLUGINS", {"fsr-table1", "rift-table1", "fpd-table"}),
]


def test_every_registry_is_a_registry_filled_at_import():
    """In a fresh interpreter, importing a registry's module already fills it (its package's
    ``__init__`` imports every plug-in module; nothing is loaded lazily). Each registry is
    checked right after its own import, before the later ones are imported."""
    code = textwrap.dedent(
        f"""
        import importlib
        from fortify.registry import Registry
        for where, names in {[(w, sorted(n)) for w, n in REGISTRIES]!r}:
            module, attr = where.split(":")
            reg = getattr(importlib.import_module(module), attr)
            assert isinstance(reg, Registry), (where, type(reg))
            missing = [n for n in names if n not in reg]
            assert not missing, (where, missing)
        print("ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.mark.parametrize("package", ["fortify.importers", "fortify.exporters", "fortify.replicate"])
def test_every_plugin_module_is_registered(package):
    """A plug-in module added to the package but not to its ``__init__`` would be invisible."""
    pkg = importlib.import_module(package)
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{package}.{info.name}")
        if hasattr(mod, "NAME") and hasattr(mod, "run"):
            assert pkg.PLUGINS.get(mod.NAME) is mod, info.name


def test_broken_plugin_module_fails_loudly_not_as_unknown_name():
    """An import error inside a plug-in module surfaces as that error (no suppression)."""
    code = textwrap.dedent(
        """
        import sys

        class Finder:
            def find_spec(self, name, path=None, target=None):
                if name == "fortify.evaluate.ood":
                    raise ImportError("ood is broken: missing dependency xyz")
                return None
        sys.meta_path.insert(0, Finder())
        try:
            import fortify.evaluate
        except ImportError as exc:
            print("raised:", exc)
        else:
            print("no error; suites:", sorted(fortify.evaluate.available_suites()))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert "raised: ood is broken: missing dependency xyz" in out.stdout, out.stdout + out.stderr


def _all_modules() -> list[str]:
    names = []
    for info in pkgutil.walk_packages(fortify.__path__, "fortify."):
        names.append(info.name)
    return sorted(names)


def test_logger_names_are_module_names():
    """Every module-level ``log`` / ``logger`` of src/fortify is ``logging.getLogger(__name__)``."""
    modules = _all_modules()
    assert len(modules) > 80 and "fortify.evaluate.driver" in modules
    wrong, seen = [], 0
    for name in modules:
        mod = importlib.import_module(name)
        for attr in ("log", "logger"):
            obj = getattr(mod, attr, None)
            if isinstance(obj, logging.Logger):
                seen += 1
                if obj.name != mod.__name__:
                    wrong.append(f"{name}.{attr} = getLogger({obj.name!r})")
    assert seen > 40
    assert not wrong, "\n".join(wrong)
