"""Dependencies point one way: no dplib module imports from a layer above its own.

The layers, bottom to top, are the ones CONTRIBUTING.md lists; a module may import from its own
layer and the layers below. Imports are read with `ast` from every module under dplib/, those inside
functions included (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "dplib"

# Bottom to top. Each entry is a top-level module or package of dplib (its submodules go with it).
LAYERS = [
    ("foundations", {"metrics", "seeds", "files"}),  # pure tensor functions; seed derivation; atomic file writes
    ("models", {"models", "lm"}),  # loading models; what dplib reads from a model
    ("targets", {"targets"}),  # target distributions
    ("answers", {"answers"}),  # targets over answer strings, and scoring them
    ("optim", {"optim"}),  # optimisers: never touch the disk, print or plot
    # results is a leaf (run directories, run.json): the runner, its cells and the store write
    # runs through it, so it sits below them (not after the runner, as issue 12 first drew it).
    ("results", {"results"}),
    ("runner", {"cells", "methods", "store", "executors", "ray_executor", "runner", "proposers", "designs"}),  # studies
    ("analysis", {"analysis", "findings"}),  # statistics on results tables
    ("plotting", {"plotting"}),  # tidy table in, Figure out
    ("apps", {"notebooks", "playground", "__main__"}),  # entry points
]
# The package itself (dplib/__init__.py) is the public façade: it may import any layer, and no module may import it.

# Order inside dplib.targets, bottom to top (its __init__ re-exports them all).
TARGETS_LAYERS = [
    {"batch"},
    {"tempering"},
    {"random_targets", "outlier_targets", "lm_targets", "tokenizer_bytes"},
    {"vocabulary"},
]
# Order inside dplib.lm, bottom to top (its __init__ re-exports the public names).
LM_LAYERS = [
    {"config", "tokens"},  # ModelStructureError, the configure overrides, text_config; special/allowed ids
    {"head"},  # the output layer and its logit transforms, logits_width
    {"decoder"},  # body, embeddings, position limit
    {"forward", "norms", "frames", "identity", "verify"},  # hot path; final norm, layers; prompt frame; fingerprint; check
]
# Order inside dplib.models, bottom to top (its __init__ re-exports the public names).
MODELS_LAYERS = [
    {"device", "cache", "tiny"},  # "auto" device/dtype; the cache directory and atomic writes; tiny test models
    {"conversion"},  # the GGUF conversion cache, ModelLoadError
    {"loading"},  # load_model, the embedded registry, list_models
]
# Every package whose modules are ordered: (package, its layers). A module may import its own group and those before it,
# never the package itself (its __init__ imports them all).
# The packages split by job (issue 12), bottom to top.
SPLIT_LAYERS = {
    "answers": [{"sets"}, {"strings"}],  # answer sets and their targets; scoring strings
    "analysis": [{"stats"}, {"hierarchy", "labels"}],  # bins, bootstrap, comparisons; the hierarchy; token tables
    "findings": [{"rows"}, {"claims"}, {"text"}],  # the verdict row and checks; the verdicts; prose
    "notebooks": [{"params"}, {"checks"}, {"index"}, {"execute"}],  # parameters; checks; the index; running
}
PACKAGE_LAYERS = [("targets", TARGETS_LAYERS), ("lm", LM_LAYERS), ("models", MODELS_LAYERS),
                  *SPLIT_LAYERS.items()]
# dplib.optim modules that import no other optim module: the shared types and the generic solver harness.
OPTIM_FOUNDATIONS = {"common", "lockstep", "bound_objective"}

# Upward imports that exist today and are allowed, each with its reason: (importer, imported).
EXCEPTIONS: set[tuple[str, str]] = set()


def module_names() -> dict[str, Path]:
    """{"dplib.targets.batch": path, "dplib.targets": path of its __init__, ...} for every module."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports_of(source: str, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The dplib modules that `source` (the text of module `module`) imports, relative imports resolved."""
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            # `from pkg import sub` imports the submodule pkg.sub; `from pkg import name` imports pkg
            found |= {f"{name}.{a.name}" if f"{name}.{a.name}" in known else name for a in node.names}
    return {name for name in found if name == "dplib" or name.startswith("dplib.")}


def top(module: str) -> str:
    """The top-level component: "dplib.optim.bound" → "optim"; the package itself → "dplib"."""
    return module.split(".")[1] if "." in module else "dplib"


def layer_index(module: str) -> int:
    for i, (_, members) in enumerate(LAYERS):
        if top(module) in members:
            return i
    raise KeyError(module)


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every (importer → imported) edge that goes up a layer, as readable lines."""
    bad = []
    for importer, imported in sorted(graph.items()):
        for dep in sorted(imported):
            if (importer, dep) in EXCEPTIONS or importer == "dplib":
                continue
            if dep == "dplib":
                bad.append(f"{importer} imports the package dplib itself (import the module it needs)")
            elif layer_index(dep) > layer_index(importer):
                bad.append(f"{importer} (layer {LAYERS[layer_index(importer)][0]!r}) imports {dep} "
                           f"(layer {LAYERS[layer_index(dep)][0]!r}, above it)")
    return bad


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: imports_of(path.read_text(encoding="utf-8"), name, path.name == "__init__.py", set(modules))
            for name, path in modules.items()}


def test_every_module_has_a_layer(graph):
    missing = sorted({top(m) for m in graph if top(m) != "dplib"} - set().union(*(m for _, m in LAYERS)))
    assert not missing, (f"dplib modules {missing} are in no layer: add each to LAYERS in tests/test_layering.py "
                         "and to the dependency order in CONTRIBUTING.md, below every module that imports it.")


def test_no_module_imports_from_a_layer_above_it(graph):
    bad = upward_imports(graph)
    assert not bad, ("upward imports (move the shared code down a layer, or pass it in as an argument):\n"
                     + "\n".join(bad))


def package_violations(graph: dict[str, set[str]], package: str, layers: list[set[str]]) -> list[str]:
    """Imports inside dplib.<package> that go up its own order, or import the package itself."""
    prefix = f"dplib.{package}."
    level = {name: i for i, group in enumerate(layers) for name in group}
    return [f"{m} imports {d}" for m in sorted(graph) if m.startswith(prefix)
            for d in sorted(graph[m]) if d == f"dplib.{package}"
            or (d.startswith(prefix) and level[d.split(".")[2]] > level[m.split(".")[2]])]


@pytest.mark.parametrize("package, layers", PACKAGE_LAYERS, ids=[p for p, _ in PACKAGE_LAYERS])
def test_package_submodules_import_only_downwards(graph, package, layers):
    prefix = f"dplib.{package}."
    names = {m.split(".")[2] for m in graph if m.startswith(prefix)}
    assigned = set().union(*layers)
    assert names <= assigned, (f"dplib.{package} modules {sorted(names - assigned)} are in no group: add each to "
                               f"{package.upper()}_LAYERS in tests/test_layering.py, above every module it imports")
    assert assigned <= names, f"{package.upper()}_LAYERS names modules that do not exist: {sorted(assigned - names)}"
    bad = package_violations(graph, package, layers)
    assert not bad, bad


@pytest.mark.parametrize("module, source, bad", [
    ("dplib.lm.config", "from .frames import PromptFrame", True),  # up the package's order
    ("dplib.lm.decoder", "from . import verify", True),
    ("dplib.lm.forward", "from .. import lm", True),  # the package itself: a cycle through its __init__
    ("dplib.lm.forward", "from .head import output_layer", False),
    ("dplib.models.conversion", "from .cache import cache_dir", False),
    ("dplib.models.cache", "def f():\n    from .loading import load_model", True),  # lazy imports count
])
def test_the_package_check_catches_an_upward_import(module, source, bad):
    known = set(module_names())
    package = module.split(".")[1]
    graph = {module: imports_of(source, module, False, known)}
    assert bool(package_violations(graph, package, dict(PACKAGE_LAYERS)[package])) == bad, graph


def test_optim_foundations_import_no_other_optim_module(graph):
    bad = [f"dplib.optim.{m} imports {d}" for m in sorted(OPTIM_FOUNDATIONS)
           for d in sorted(graph[f"dplib.optim.{m}"]) if d == "dplib.optim" or d.startswith("dplib.optim.")]
    assert not bad, bad


@pytest.mark.parametrize("module, source, upward", [
    ("dplib.targets.batch", "from ..runner import run_sweep", True),
    ("dplib.targets.batch", "def f():\n    from ..optim import optimize_soft", True),  # lazy imports count
    ("dplib.metrics", "import dplib.plotting", True),
    ("dplib.optim.soft", "from .. import targets", False),
    ("dplib.optim.soft", "from . import bound", False),  # the same layer
    ("dplib.runner", "from dplib import results", False),
    ("dplib.lm", "import dplib", True),
])
def test_the_check_catches_an_upward_import(module, source, upward):
    known = set(module_names())
    graph = {module: imports_of(source, module, False, known)}
    assert bool(upward_imports(graph)) == upward, graph


def public_names_defined_in(package) -> dict[str, str]:
    """{name: submodule} for every public function, class and constant a submodule of `package` defines."""
    found = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        tree = ast.parse(Path(module.__file__).read_text())
        assigned = {t.id for node in tree.body if isinstance(node, ast.Assign | ast.AnnAssign)
                    for t in (node.targets if isinstance(node, ast.Assign) else [node.target]) if isinstance(t, ast.Name)}
        for name, value in vars(module).items():
            # a constant has no __module__: it is this module's when this module assigns it (not imports it)
            defined_here = (getattr(value, "__module__", module.__name__) == module.__name__
                            and (hasattr(value, "__module__") or name in assigned))
            if not name.startswith("_") and defined_here and not inspect.ismodule(value) \
                    and (callable(value) or name.isupper()):
                found[name] = info.name
    return found


@pytest.mark.parametrize("package", [f"dplib.{p}" for p, _ in PACKAGE_LAYERS])
def test_the_package_reexports_every_public_name_of_its_modules(package):
    """Callers import from the package (`lm.X`, `from dplib.models import X`), never from its parts."""
    pkg = importlib.import_module(package)
    names = public_names_defined_in(pkg)
    missing = sorted(f"{module}.{name}" for name, module in names.items() if name not in pkg.__all__)
    assert not missing, f"add to {package}'s imports and __all__: {missing}"
    assert all(getattr(pkg, name) is getattr(importlib.import_module(f"{package}.{module}"), name)
               for name, module in names.items())
    assert all(hasattr(pkg, name) for name in pkg.__all__)
