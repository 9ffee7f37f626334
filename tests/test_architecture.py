"""The layout is the architecture: imports only go down the layers, and what a tuner kind is lives in its own file.

Layers, lowest first (a module may import its own layer and those below it, never one above, not even inside a
function):

0. ``fileio``, ``extras``: file helpers; optional dependencies (import one or name the extra that installs it).
1. ``backbone``: the frozen ViT, its blocks and hook contract, bypass mode and its feature cache.
2. ``tuners``: the tuner protocol, registry and kinds.
3. ``checkpoint``: file formats (hub layout, tuner-only files, converters, merge, the load report).
4. ``head``, ``backbone_config``, ``network`` (and its saved forms, ``network_files``): the plain-torch classifier.
5. the ModelScope glue: ``compat``, ``location`` (local folder or hub id, named before any download),
   ``registration``, ``model``, ``pipeline``, ``preprocessing``, ``data``, ``training``, ``deploy`` (ONNX export, the web demo), ``segmentation`` (the dense task on the same network,
   with its model, pipeline, trainer and metric).
6. the entry points: ``cli``, ``demo``, the package itself.
"""
import ast
import os

import pytest

from modelscope_utuning.tuners import tuner_kinds

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'modelscope_utuning')
LAYERS = [('fileio', 'extras'), ('backbone',), ('tuners',), ('checkpoint',),
          ('head', 'backbone_config', 'network', 'network_files'),
          ('compat', 'location', 'registration', 'model', 'multitask', 'pipeline', 'preprocessing', 'data', 'training',
           'deploy', 'segmentation'),
          ('cli', 'demo', 'demo_setup', 'demo_stages', 'demo_segmentation', '__main__', '__init__')]


def layer_of(module: str) -> int:
    """``modelscope_utuning.tuners.adapter`` -> 2."""
    top = module.split('.')[1] if '.' in module else '__init__'
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f'{module}: not in any layer; add it to LAYERS')


def modules():
    for folder, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith('.py'):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, '.')
                yield path, rel[:-len('.__init__')] if rel.endswith('.__init__') else rel


def imports(path: str, module: str):
    """Absolute names of the package's modules that ``path`` imports (anywhere in the file)."""
    package = module if path.endswith('__init__.py') else module.rsplit('.', 1)[0]
    tree = ast.parse(open(path, encoding='utf-8').read())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split('.')
                base = base[:len(base) - node.level + 1]
                target = '.'.join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ''
            if target.startswith('modelscope_utuning'):
                names = [f'{target}.{a.name}' for a in node.names]
                yield from (n if os.path.exists(os.path.join(os.path.dirname(ROOT), *n.split('.')) + '.py')
                            or os.path.isdir(os.path.join(os.path.dirname(ROOT), *n.split('.'))) else target
                            for n in names)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith('modelscope_utuning'):
                    yield a.name


ALL = sorted(modules(), key=lambda m: m[1])


@pytest.mark.parametrize('path,module', ALL, ids=[m for _, m in ALL])
def test_imports_only_go_down(path, module):
    mine = layer_of(module)
    up = sorted({t for t in imports(path, module) if t != 'modelscope_utuning' and layer_of(t) > mine})
    assert not up, f'{module} (layer {mine}) imports from higher layers: {up}'


def _string_constants(path: str):
    tree = ast.parse(open(path, encoding='utf-8').read())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and n.body
                  and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.value


# Where a kind's name may appear outside its own file, and why.
ALLOWED = {('modelscope_utuning.model', 'lora'): 'merge_lora() / has_lora() are LoRA by name (public API)'}
USERS = ('modelscope_utuning.demo', 'modelscope_utuning.demo_segmentation')  # write configurations: use tuners only


def test_kind_names_and_legacy_keys_live_in_their_own_file():
    kinds = tuner_kinds()
    facts = {}
    for kind, cls in kinds.items():
        for word in (kind,) + tuple(cls.legacy_keys):
            facts[word] = cls.__module__
    leaks = []
    for path, module in ALL:
        if module in USERS:
            continue
        for value in set(_string_constants(path)):
            owner = facts.get(value)
            if owner and owner != module and (module, value) not in ALLOWED:
                leaks.append(f'{module}: {value!r} (owned by {owner})')
    assert not leaks, 'tuner knowledge outside its file:\n  ' + '\n  '.join(sorted(leaks))


MAX_LINES = 400  # issue 20: a module a newcomer reads in one sitting; past this it is doing two jobs


@pytest.mark.parametrize('path,module', ALL, ids=[m for _, m in ALL])
def test_no_module_is_over_the_line_limit(path, module):
    n = sum(1 for _ in open(path, encoding='utf-8'))
    assert n <= MAX_LINES, f'{module}: {n} lines (> {MAX_LINES}): split it by job'


def test_the_hook_contract_is_a_leaf():
    """backbone/hooks.py is what blocks and tuners both read: it imports nothing of the package, and an OP's
    context carries the frozen parts a tuner may borrow instead of the Block itself."""
    path = os.path.join(ROOT, 'backbone', 'hooks.py')
    assert not list(imports(path, 'modelscope_utuning.backbone.hooks'))
    from modelscope_utuning.backbone.hooks import OpContext
    assert 'block' not in OpContext.__slots__


def _function_level_imports_of_the_package(path: str):
    """(line number, statement) of each import of the package's own modules inside a function of ``path``."""
    found = {}
    for fn in ast.walk(ast.parse(open(path, encoding='utf-8').read())):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom):
                    ours = node.level > 0 or (node.module or '').split('.')[0] == 'modelscope_utuning'
                elif isinstance(node, ast.Import):
                    ours = any(a.name.split('.')[0] == 'modelscope_utuning' for a in node.names)
                else:
                    continue
                if ours:
                    found[node.lineno] = node
    return sorted(found.items())


def test_every_lazy_import_of_the_package_says_why():
    """A module imports the package's modules at its top. One that imports them inside a function says why, in a
    comment on the import's line or a comment line just above it: a cycle (``# cycle: a imports b at import
    time``) or an import kept light or optional (``# optional: ...``, ``# keeps ... light``). Lazy imports that
    hide no cycle are dead weight: they hide a module's dependencies and move import errors to run time."""
    silent = []
    for path, module in ALL:
        lines = open(path, encoding='utf-8').read().splitlines()
        for lineno, node in _function_level_imports_of_the_package(path):
            own = lines[lineno - 1:node.end_lineno]  # an import statement holds no string: '#' starts a comment
            above = lines[lineno - 2].strip() if lineno > 1 else ''
            if not any('#' in line for line in own) and not above.startswith('#'):
                silent.append(f'{module}:{lineno}: {ast.unparse(node)}')
    assert not silent, ('imports of the package inside a function with no comment saying why (hoist them to the '
                        'top of the module unless that makes a cycle):\n  ' + '\n  '.join(silent))
