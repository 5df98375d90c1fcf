"""Copy the model-definition code into an export folder so that it loads where lmstack is not installed.

transformers' remote-code loader copies the module named in `auto_map` plus the files it imports with
`from .name import ...` from the same folder, and nothing else. So the bundler:

1. starts from the entry modules (`lmstack.export.configuration_lmstack`, `...modeling_lmstack`) and
   follows, with `ast`, every import of `lmstack.*` / `lmstack_kernels.*` (top level and inside
   functions, absolute and relative);
2. writes each module it reaches as one flat file: `lmstack.model.lm` -> `lmstack_model_lm.py`
   (a package's `__init__.py` takes the package's name), the entry modules keep their own names;
3. rewrites those imports to flat relative ones: `from lmstack.model.lm import LM` ->
   `from .lmstack_model_lm import LM`; `from lmstack.model.mixers import attention` (a submodule) ->
   `from . import lmstack_model_mixers_attention as attention`. A class or function imported from a
   package is imported from the module that defines it, so package `__init__`s are bundled only
   when something defined there is used;
4. drops imports under `if TYPE_CHECKING:` (never run, but transformers would require them), and
   guards optional third-party imports (anything but the standard library, torch and transformers'
   own dependencies, e.g. `import triton`) that are not already inside a `try`: on ImportError the
   name is bound to a stub that lets decorators such as `@triton.jit` run at import time and raises a
   clear ImportError when a kernel is launched, so a torch-only environment loads the model and uses
   the PyTorch paths. (transformers also refuses to load remote code whose unguarded imports are
   missing.)
5. lists every bundled module in each entry file (`if False: from .name import *`) so that the
   remote-code loader copies them all, including those imported as `from . import name`.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import sys
from dataclasses import dataclass, field
from pathlib import Path

from lmstack.errors import LMStackError

INTERNAL_ROOTS = ("lmstack", "lmstack_kernels")
ENTRY_MODULES = {
    "lmstack.export.configuration_lmstack": "configuration_lmstack",
    "lmstack.export.modeling_lmstack": "modeling_lmstack",
}
# Importable wherever the export loads (transformers requires them); everything else gets guarded.
ALWAYS_AVAILABLE = {
    "torch",
    "transformers",
    "huggingface_hub",
    "safetensors",
    "tokenizers",
    "packaging",
    "yaml",
}
STUB_MODULE = "lmstack_optional_import"

_STUB_SOURCE = '''"""Stand-in for an optional package that is not installed (written by `lmstack export`).

Attribute access, indexing and calls return further stand-ins, so that module-level uses such as
`@triton.jit` or `tl.constexpr` annotations do not fail at import; calling one with a tensor argument
(a kernel launch) raises ImportError naming the missing package.
"""


class MissingModule:
    def __init__(self, name):
        object.__setattr__(self, "_name", name)

    def __getattr__(self, attr):
        if attr.startswith("__") and attr.endswith("__"):
            raise AttributeError(attr)
        return MissingModule(f"{self._name}.{attr}")

    def __getitem__(self, item):
        return self

    def __call__(self, *args, **kwargs):
        import torch

        if any(isinstance(a, torch.Tensor) for a in (*args, *kwargs.values())):
            raise ImportError(f"{self._name}: this code path needs a package that is not installed")
        if len(args) == 1 and callable(args[0]) and not kwargs:
            return MissingModule(f"{self._name}({getattr(args[0], '__name__', 'fn')})")
        return self

    def __bool__(self):
        return False

    def __repr__(self):
        return f"<missing optional package: {self._name}>"
'''


class BundleError(LMStackError):
    """The model code cannot be bundled (e.g. an import form the bundler cannot rewrite)."""


@dataclass
class Bundle:
    """The result of `bundle_code`: flat file name -> source, and the third-party imports guarded."""

    files: dict[str, str] = field(default_factory=dict)
    modules: dict[str, str] = field(default_factory=dict)  # dotted module name -> flat file stem
    guarded: set[str] = field(default_factory=set)

    def write(self, out_dir: str | Path) -> list[Path]:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for name, source in sorted(self.files.items()):
            path = out / name
            path.write_text(source)
            paths.append(path)
        return paths


def _is_internal(module: str) -> bool:
    return module.split(".")[0] in INTERNAL_ROOTS


def _flat_name(module: str) -> str:
    return ENTRY_MODULES.get(module, module.replace(".", "_"))


def _module_file(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        raise BundleError(f"cannot bundle module '{module}': no Python source file found")
    return Path(spec.origin)


def _is_package(module: str) -> bool:
    return _module_file(module).name == "__init__.py"


def _is_submodule(package: str, name: str) -> bool:
    if not _is_package(package):
        return False
    try:
        return importlib.util.find_spec(f"{package}.{name}") is not None
    except (ImportError, ValueError):
        return False


def _defining_module(module: str, name: str) -> str:
    """Where `name` (imported from `module`) is defined, for classes and functions; else `module`."""
    try:
        obj = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return module
    home = getattr(obj, "__module__", None)
    if (inspect.isclass(obj) or inspect.isfunction(obj)) and home and _is_internal(home) and home != module:
        try:
            if getattr(importlib.import_module(home), name, None) is obj:
                return home
        except ImportError:
            pass
    return module


def _resolve_relative(current: str, is_package: bool, level: int, module: str | None) -> str:
    parts = current.split(".")
    base = parts if is_package else parts[:-1]
    if level - 1 > len(base) - 1:
        raise BundleError(f"{current}: relative import beyond the top-level package")
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _imports_internal(node: ast.AST) -> bool:
    if isinstance(node, ast.ImportFrom):
        return node.level > 0 or _is_internal(node.module or "")
    return isinstance(node, ast.Import) and any(_is_internal(a.name) for a in node.names)


def _under_type_checking(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """Inside the body of `if TYPE_CHECKING:` / `if typing.TYPE_CHECKING:`."""
    while node in parents:
        parent = parents[node]
        if isinstance(parent, ast.If) and node in parent.body:
            test = parent.test
            name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)
            if name == "TYPE_CHECKING":
                return True
        node = parent
    return False


def _stdlib(name: str) -> bool:
    return name in sys.stdlib_module_names or name == "__future__"


def _inside_try(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.Try | getattr(ast, "TryStar", ast.Try)):
            return True
    return False


class _Rewriter:
    def __init__(self, module: str, source: str, path: Path) -> None:
        self.module = module
        self.source = source
        self.path = path
        self.is_package = path.name == "__init__.py"
        self.lines = source.splitlines(keepends=True)
        self.edits: list[tuple[int, int, str]] = []  # (first line, last line) 1-based inclusive -> text
        self.imports: set[str] = set()  # internal modules this one needs
        self.guarded: set[str] = set()
        self.uses_stub = False

    def fail(self, node: ast.AST, msg: str) -> None:
        raise BundleError(f"{self.path}:{node.lineno}: {msg}")

    def whole_lines(self, node: ast.stmt) -> str:
        """The indentation of `node`, which must occupy whole lines (no `;`-joined statements)."""
        first, last = self.lines[node.lineno - 1], self.lines[node.end_lineno - 1]
        indent = first[: node.col_offset]
        rest = last[node.end_col_offset :].strip()
        if indent.strip() or (rest and not rest.startswith("#")):
            self.fail(node, "put each import on its own line so that it can be rewritten for the export")
        return indent

    def rewrite_internal(self, node: ast.Import | ast.ImportFrom) -> None:
        indent = self.whole_lines(node)
        out = []
        if isinstance(node, ast.Import):
            for alias in node.names:
                if not _is_internal(alias.name):
                    out.append(f"import {alias.name}" + (f" as {alias.asname}" if alias.asname else ""))
                    continue
                if alias.asname is None:
                    self.fail(
                        node, f"'import {alias.name}' binds the package name; use 'from ... import ...'"
                    )
                _module_file(alias.name)
                self.imports.add(alias.name)
                out.append(f"from . import {_flat_name(alias.name)} as {alias.asname}")
        else:
            target = (
                node.module
                if node.level == 0
                else _resolve_relative(self.module, self.is_package, node.level, node.module)
            )
            by_home: dict[str, list[str]] = {}  # names imported from each defining module, in order
            for alias in node.names:
                bound = alias.asname or alias.name
                if alias.name == "*":
                    self.imports.add(target)
                    out.append(f"from .{_flat_name(target)} import *")
                elif _is_submodule(target, alias.name):
                    sub = f"{target}.{alias.name}"
                    self.imports.add(sub)
                    out.append(f"from . import {_flat_name(sub)} as {bound}")
                else:
                    home = _defining_module(target, alias.name)
                    self.imports.add(home)
                    rename = f" as {alias.asname}" if alias.asname else ""
                    by_home.setdefault(home, []).append(f"{alias.name}{rename}")
            out += [f"from .{_flat_name(home)} import {', '.join(names)}" for home, names in by_home.items()]
        self.edits.append((node.lineno, node.end_lineno, "".join(f"{indent}{line}\n" for line in out)))

    def guard_optional(self, node: ast.Import | ast.ImportFrom) -> None:
        indent = self.whole_lines(node)
        text = "".join(self.lines[node.lineno - 1 : node.end_lineno]).strip()
        names = []
        if isinstance(node, ast.Import):
            for alias in node.names:
                root = alias.name.split(".")[0]
                # `import a.b` binds `a`; `import a.b as c` binds `c` to `a.b`.
                names.append((alias.asname, alias.name) if alias.asname else (root, root))
                self.guarded.add(root)
        else:
            for alias in node.names:
                if alias.name == "*":
                    self.fail(node, f"'from {node.module} import *' of an optional package cannot be guarded")
                names.append((alias.asname or alias.name, f"{node.module}.{alias.name}"))
            self.guarded.add(node.module.split(".")[0])
        self.uses_stub = True
        body = [
            f"{indent}try:\n",
            f"{indent}    {text}\n",
            f"{indent}except ImportError:  # optional (lmstack export)\n",
        ]
        body += [f"{indent}    {bound} = _MissingModule({full!r})\n" for bound, full in names]
        self.edits.append((node.lineno, node.end_lineno, "".join(body)))

    def run(self) -> str:
        tree = ast.parse(self.source, filename=str(self.path))
        parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom) and _under_type_checking(node, parents):
                # Never executed, but transformers would still require the package: drop it.
                indent = self.whole_lines(node)
                self.edits.append(
                    (node.lineno, node.end_lineno, f"{indent}pass  # type-checking import (lmstack export)\n")
                )
            elif _imports_internal(node):
                self.rewrite_internal(node)
            elif isinstance(node, ast.Import | ast.ImportFrom) and not _inside_try(node, parents):
                roots = (
                    {a.name.split(".")[0] for a in node.names}
                    if isinstance(node, ast.Import)
                    else {node.module.split(".")[0]}
                )
                if any(not _stdlib(r) and r not in ALWAYS_AVAILABLE for r in roots):
                    self.guard_optional(node)
        lines = list(self.lines)
        for first, last, text in sorted(self.edits, reverse=True):
            lines[first - 1 : last] = [text]
        result = "".join(lines)
        if self.uses_stub:
            result = self._insert_after_header(
                result, f"from .{STUB_MODULE} import MissingModule as _MissingModule\n"
            )
        return result

    @staticmethod
    def _insert_after_header(source: str, text: str) -> str:
        """Insert `text` after the module docstring and `from __future__` imports."""
        tree = ast.parse(source)
        at = 0
        for node in tree.body:
            is_doc = (
                isinstance(node, ast.Expr)
                and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)
            )
            is_future = isinstance(node, ast.ImportFrom) and node.module == "__future__"
            if (is_doc and node is tree.body[0]) or is_future:
                at = node.end_lineno
            else:
                break
        lines = source.splitlines(keepends=True)
        return "".join(lines[:at] + [text] + lines[at:])


def bundle_code(entries: tuple[str, ...] = tuple(ENTRY_MODULES)) -> Bundle:
    """Collect and rewrite the model code reachable from `entries` (dotted module names)."""
    bundle = Bundle()
    todo, seen = list(entries), set()
    any_stub = False
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        if module == "lmstack":  # its __init__ registers the Auto classes and pulls in everything
            raise BundleError(
                "the model code imports from the 'lmstack' package root; import from the defining "
                "module instead (e.g. 'from lmstack.errors import LMStackError')"
            )
        path = _module_file(module)
        rewriter = _Rewriter(module, path.read_text(), path)
        source = rewriter.run()
        flat = _flat_name(module)
        if f"{flat}.py" in bundle.files:
            raise BundleError(f"two modules flatten to the same file name {flat}.py")
        bundle.files[f"{flat}.py"] = source
        bundle.modules[module] = flat
        bundle.guarded |= rewriter.guarded
        any_stub |= rewriter.uses_stub
        todo.extend(sorted(rewriter.imports - seen))
    if any_stub:
        bundle.files[f"{STUB_MODULE}.py"] = _STUB_SOURCE
        bundle.modules[STUB_MODULE] = STUB_MODULE
    manifest = "".join(
        f"    from .{stem} import *  # noqa: F401, F403\n"
        for module, stem in sorted(bundle.modules.items(), key=lambda kv: kv[1])
        if module not in ENTRY_MODULES
    )
    if manifest:
        block = (
            "\n\n# Every module bundled by `lmstack export`, named so that transformers' remote-code loader\n"
            "# copies them all (it follows only `from .name import` lines); never executed.\n"
            f"if False:  # pragma: no cover\n{manifest}"
        )
        for module in entries:
            bundle.files[f"{_flat_name(module)}.py"] = (
                bundle.files[f"{_flat_name(module)}.py"].rstrip("\n") + block
            )
    return bundle
