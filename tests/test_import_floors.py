"""The package's structure (issue 20): no import cycle, no private name shared.

Read from the source with `ast`, imports inside functions included: a cycle
through a lazy import is still a cycle in the design.
"""

import ast
import os
import re

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGE = os.path.join(ROOT, "keras_lora")


def modules():
    """{module name: file path} of every module of keras_lora."""
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                found[module.removesuffix(".__init__")] = path
    return found


def import_graph():
    """{module: set of keras_lora modules it imports} (the root package aside:
    it binds the public names and imports everything)."""
    found = modules()
    graph = {}
    for module, path in found.items():
        if module == "keras_lora":
            continue
        package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[
                        : len(package.split(".")) - node.level + 1
                    ]
                    base = ".".join([*parts, base] if base else parts)
                for alias in node.names:
                    name = f"{base}.{alias.name}"
                    targets.add(name if name in found else base)
        graph[module] = {
            t for t in targets if t in found and t not in (module, "keras_lora")
        }
    return graph


def cycles(graph):
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert "keras_lora.transform" in graph["keras_lora.named_adapters"]  # it reads
    assert cycles(graph) == []


def test_no_module_uses_another_modules_private_name():
    names = "|".join(m.rpartition(".")[2] for m in modules() if m != "keras_lora")
    pattern = re.compile(rf"\b({names})\._[a-z]\w*")
    offenders = []
    for module, path in modules().items():
        own = module.rpartition(".")[2]
        for number, line in enumerate(open(path), 1):
            for match in pattern.finditer(line):
                if match.group(1) != own and not line.lstrip().startswith("#"):
                    offenders.append(f"{module}:{number}: {match.group(0)}")
    assert offenders == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_model_level_code_uses_the_layers_public_protocol():
    """No `._lora_*` member of a layer is read outside keras_lora/layers."""
    offenders = []
    for module, path in modules().items():
        if module.startswith("keras_lora.layers"):
            continue
        for number, line in enumerate(open(path), 1):
            if re.search(r"\._lora_[a-z]", line):
                offenders.append(f"{module}:{number}: {line.strip()}")
    assert offenders == []
