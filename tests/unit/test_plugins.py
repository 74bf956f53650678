"""The registry: in-process plugins, duplicate names, broken entry points, a real third-party package."""

import sys
import textwrap
from pathlib import Path

import pytest

from harmbench_ft import Defense, hookimpl, plugins
from harmbench_ft.errors import PluginError, UsageError
from tests.conftest import fake_distribution

REPO = Path(__file__).resolve().parents[2]


class Dummy(Defense):
    name = "dummy-defense"


class DummyPlugin:
    @hookimpl
    def hft_register_defenses(self, register):
        register(Dummy)


def test_inline_plugin_registers_and_unregisters():
    plugins.register_plugin(DummyPlugin(), name="dummy")
    try:
        assert "dummy-defense" in plugins.get_registry().names("defenses")
    finally:
        plugins.unregister_plugin("dummy")
    assert "dummy-defense" not in plugins.get_registry().names("defenses")


def test_duplicate_name_is_an_error_naming_both_sources():
    class Clash(Defense):
        name = "sft"

    class ClashPlugin:
        @hookimpl
        def hft_register_defenses(self, register):
            register(Clash)

    plugins.register_plugin(ClashPlugin(), name="clash")
    try:
        with pytest.raises(PluginError) as err:
            plugins.get_registry()
        assert "'sft'" in str(err.value) and "'clash'" in str(err.value) and "hft-bench" in str(err.value)
    finally:
        plugins.unregister_plugin("clash")


def test_misspelled_hookimpl_is_an_error():
    class Typo:
        @hookimpl
        def hft_register_defences(self, register):  # British spelling: no such hook
            pass

    with pytest.raises(Exception, match="hft_register_defences"):
        plugins.register_plugin(Typo(), name="typo")
    plugins.pm.unregister(name="typo")


def test_unknown_name_lists_known_ones():
    with pytest.raises(UsageError, match="known: .*sft"):
        plugins.get_registry().get("defenses", "no-such-defense")


def test_broken_plugin_is_reported_and_does_not_break_the_others(tmp_path, monkeypatch):
    fake_distribution(tmp_path, "broken-plugin", "[hft_bench]\nbroken = no_such_module_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        plugins.load_plugins(rescan=True)
        failures = plugins.load_failures()
        assert any("no_such_module_anywhere" in f.entry_point and f.distribution == "broken-plugin 0.1.0" for f in failures)
        assert "sft" in plugins.get_registry().names("defenses")
        with pytest.raises(UsageError, match="failed to load: broken"):
            plugins.get_registry().get("defenses", "missing")
    finally:
        sys.path.remove(str(tmp_path))
        plugins.load_plugins(rescan=True)


def test_example_third_party_package_is_discovered_through_its_entry_point(tmp_path, monkeypatch):
    example = REPO / "examples" / "hft-bench-example-defense"
    fake_distribution(tmp_path, "hft-bench-example-defense", "[hft_bench]\nexample-l2-anchor = hft_bench_example_defense\n")
    monkeypatch.syspath_prepend(str(example))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        plugins.load_plugins(rescan=True)
        registry = plugins.get_registry()
        entry = registry.entries["defenses"]["example-l2-anchor"]
        assert entry.distribution == "hft-bench-example-defense 0.1.0"
        described = {row["distribution"]: row for row in plugins.describe_plugins()}
        assert described["hft-bench-example-defense 0.1.0"]["defenses"] == ["example-l2-anchor"]
    finally:
        for path in (str(tmp_path), str(example)):
            if path in sys.path:
                sys.path.remove(path)
        plugins.pm.unregister(name="example-l2-anchor")
        plugins.load_plugins(rescan=True)


def test_a_plugin_whose_hook_raises_or_is_misspelled_breaks_only_itself(tmp_path, monkeypatch, capsys):
    """Issue 17: neither may break commands that do not use them (`run --defense sft`, `judge`)."""
    from harmbench_ft.cli import main

    (tmp_path / "raising_plugin.py").write_text(textwrap.dedent("""
        from harmbench_ft import Defense, hookimpl

        class Half(Defense):
            name = "half-registered"

        @hookimpl
        def hft_register_defenses(register):
            register(Half)
            raise RuntimeError("boom while registering")
    """))
    (tmp_path / "typo_plugin.py").write_text("from harmbench_ft import hookimpl\n\n@hookimpl\ndef hft_register_defences(register):\n    pass\n")
    fake_distribution(tmp_path, "raising-plugin", "[hft_bench]\nraising = raising_plugin\n")
    fake_distribution(tmp_path, "typo-plugin", "[hft_bench]\ntypo = typo_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        plugins.load_plugins(rescan=True)
        registry = plugins.get_registry()
        assert "sft" in registry.names("defenses") and "keyword" in registry.names("judges")
        assert "half-registered" not in registry.names("defenses")  # a plugin that failed registers nothing
        failures = {f.distribution: f.error for f in plugins.load_failures()}
        assert "boom while registering" in failures["raising-plugin 0.1.0"]
        assert "hft_register_defences" in failures["typo-plugin 0.1.0"]
        rows = tmp_path / "rows.jsonl"
        rows.write_text('{"prompt": "a", "response": "b"}\n')
        assert main(["judge", str(rows)]) == 0
        with pytest.raises(UsageError, match="failed to load: .*typo = typo_plugin.*raising"):
            registry.get("defenses", "half-registered")
    finally:
        sys.path.remove(str(tmp_path))
        for name in ("raising", "typo"):
            if plugins.pm.has_plugin(name):
                plugins.pm.unregister(name=name)
        plugins.load_plugins(rescan=True)
