"""The package layout: every o3lite module imports only its own layer and those below."""

import ast
import pathlib

import pytest

import o3lite

ROOT = pathlib.Path(o3lite.__file__).parent
# model and parallel are both just above errors and never import each other.
SAME_RANK = {"parallel": "model"}


def _rank(layer: str) -> int:
  return o3lite.LAYERS.index(SAME_RANK.get(layer, layer))


def _imports(path: pathlib.Path) -> list[str]:
  """The o3lite layers a module imports (`from o3lite.x import y`, `from o3lite import x`)."""
  layers = []
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("o3lite"):
      parts = node.module.split(".")
      if len(parts) > 1:
        layers.append(parts[1])
      else:
        layers += [alias.name for alias in node.names]
    elif isinstance(node, ast.Import):
      layers += [a.name.split(".")[1] for a in node.names
                 if a.name.startswith("o3lite.")]
  return layers


def test_every_module_sits_in_a_layer():
  for path in ROOT.rglob("*.py"):
    rel = path.relative_to(ROOT)
    if rel.name == "__init__.py" and len(rel.parts) == 1:
      continue
    layer = rel.parts[0].removesuffix(".py")
    assert layer in o3lite.LAYERS, f"{rel}: not in o3lite.LAYERS"


def test_lower_layers_never_import_higher_ones():
  found = 0
  for path in ROOT.rglob("*.py"):
    rel = path.relative_to(ROOT)
    if len(rel.parts) == 1 and rel.name == "__init__.py":
      continue
    layer = rel.parts[0].removesuffix(".py")
    for imported in _imports(path):
      found += 1
      assert _rank(imported) <= _rank(layer), f"{rel} ({layer}) imports {imported}"
      if imported != layer:
        assert _rank(imported) < _rank(layer), f"{rel} ({layer}) imports {imported}"
  assert found > 50  # The walk really saw the package's imports.


# Top-level folders beside the package that the library must never import: configs are
# read by the entry points (config_flags), benchmarks import the library, not the reverse.
OUTSIDE = ("configs", "bench")


def _outside_imports(source: str) -> list[str]:
  """The `configs` / `bench` modules a source imports, at any depth in its tree."""
  names = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      names += [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      names.append(node.module)
  return [n for n in names if n.split(".")[0] in OUTSIDE]


def test_the_package_never_imports_configs_or_bench():
  assert _outside_imports("import configs.rl\nfrom bench import common\n"
                          "def f():\n  from configs import rl\n  import bench.common\n"
                          "import benchmarks, configsx\nfrom o3lite import configs\n") == [
                              "configs.rl", "bench", "configs", "bench.common"]
  paths = sorted(ROOT.rglob("*.py"))
  assert len(paths) > 50
  for path in paths:
    found = _outside_imports(path.read_text())
    assert not found, f"{path.relative_to(ROOT)} imports {found}"


def test_a_registry_names_what_it_holds():
  from o3lite import errors  # pylint: disable=g-import-not-at-top
  from o3lite.registry import Registry  # pylint: disable=g-import-not-at-top
  table = Registry("search strategy")
  table.register("beam")(len)
  assert table.lookup("beam") is len and sorted(table) == ["beam"]
  with pytest.raises(ValueError, match="^search strategy 'beam' is registered twice$"):
    table.register("beam")(len)
  with pytest.raises(errors.ConfigError,
                     match=r"^unknown search strategy 'bean'; registered: \['beam'\]$"):
    table.lookup("bean")
