"""The documentation agrees with the code (issue 6, item 1): every Python snippet in README.md, docs/, the model card
template and the stage configs' README parses, imports names that exist and calls glide_hf and Transformers
functions with arguments their signatures take; every `glide-hf` and `python examples/...` command line in them uses
flags the command has; and docs/api.md lists the signatures `docs/generate_api.py` renders from the code today."""

import ast
import contextlib
import importlib
import importlib.util
import inspect
import io
import re
import shlex
import sys
from pathlib import Path

import pytest
from transformers import GenerationConfig

from glide_hf import GlideForCausalLM
from glide_hf.cli import main as cli_main
from glide_hf.engine import glide_generate

REPO_ROOT = Path(__file__).resolve().parents[1]
GUIDES = [path for path in (REPO_ROOT / "docs").glob("*.md") if path.name != "api.md"]
OTHER_DOCS = ["README.md", "model_cards/template.md", "examples/configs/README.md"]
DOC_FILES = sorted([REPO_ROOT / name for name in OTHER_DOCS] + GUIDES)
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", flags=re.MULTILINE | re.DOTALL)
# Calls whose result is a `GlideForCausalLM`, so that later `name.method(...)` calls can be checked.
DRAFT_FACTORIES = {"from_pretrained", "from_target", "train_glide", "convert_longspec", "merge_and_unload"}
DRAFT_PASSTHROUGH = {"to", "eval", "train", "cuda", "float", "bfloat16"}


def code_blocks(path: Path, language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(path.read_text(encoding="utf-8")) if lang == language]


def doc_id(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT))


# --- Python snippets -------------------------------------------------------------------------------------------------


def strip_doctest(code: str) -> str:
    if ">>> " not in code:
        return code
    lines = [line[4:] for line in code.splitlines() if line.startswith((">>> ", "... "))]
    return "\n".join(lines)


class SnippetChecker(ast.NodeVisitor):
    """Resolves names imported in snippets and checks each call it can resolve against the callee's signature."""

    def __init__(self) -> None:
        self.names: dict[str, object] = {}  # imported name -> object
        self.drafts: set[str] = set()  # variables holding a GlideForCausalLM
        self.problems: list[str] = []

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.module and node.module.split(".")[0] in ("glide_hf", "transformers"):
            module = importlib.import_module(node.module)
            for alias in node.names:
                if not hasattr(module, alias.name):
                    self.problems.append(f"line {node.lineno}: `{node.module}` has no `{alias.name}`")
                else:
                    self.names[alias.asname or alias.name] = getattr(module, alias.name)

    def visit_Assign(self, node: ast.Assign) -> None:
        self.generic_visit(node)
        if self.returns_draft(node.value):
            self.drafts.update(target.id for target in node.targets if isinstance(target, ast.Name))

    def returns_draft(self, node: ast.AST) -> bool:
        if not isinstance(node, ast.Call):
            return False
        func = node.func
        if isinstance(func, ast.Name):
            return func.id in DRAFT_FACTORIES and func.id in self.names
        if isinstance(func, ast.Attribute):
            if func.attr in DRAFT_PASSTHROUGH or func.attr == "merge_and_unload":
                return self.is_draft(func.value) or (func.attr == "merge_and_unload")
            if isinstance(func.value, ast.Name) and self.names.get(func.value.id) is GlideForCausalLM:
                return func.attr in DRAFT_FACTORIES
        return False

    def is_draft(self, node: ast.AST) -> bool:
        return (isinstance(node, ast.Name) and node.id in self.drafts) or self.returns_draft(node)

    def visit_Call(self, node: ast.Call) -> None:
        self.generic_visit(node)
        func = node.func
        if isinstance(func, ast.Name) and func.id in self.names:
            self.check(node, self.names[func.id], func.id)
        elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in self.names:
            owner = self.names[func.value.id]
            if inspect.isclass(owner) and hasattr(owner, func.attr):
                self.check(node, getattr(owner, func.attr), f"{func.value.id}.{func.attr}")
        elif isinstance(func, ast.Attribute) and self.is_draft(func.value):
            if func.attr == "generate":
                self.check_draft_generate(node)
            elif not hasattr(GlideForCausalLM, func.attr):
                self.problems.append(f"line {node.lineno}: `GlideForCausalLM` has no `{func.attr}`")

    def check(self, node: ast.Call, callee, name: str) -> None:
        if not callable(callee):
            return
        try:
            signature = inspect.signature(callee)
        except (TypeError, ValueError):
            return
        if any(isinstance(arg, ast.Starred) for arg in node.args):
            return
        keywords = {keyword.arg: None for keyword in node.keywords if keyword.arg is not None}
        try:
            signature.bind_partial(*([None] * len(node.args)), **keywords)
        except TypeError as error:
            self.problems.append(f"line {node.lineno}: `{name}(...)`: {error}")

    def check_draft_generate(self, node: ast.Call) -> None:
        # `GlideForCausalLM.generate` passes its **kwargs to the engine and the target's generation config.
        allowed = set(inspect.signature(GlideForCausalLM.generate).parameters)
        allowed |= set(inspect.signature(glide_generate).parameters) | set(GenerationConfig().to_dict())
        for keyword in node.keywords:
            if keyword.arg is not None and keyword.arg not in allowed:
                self.problems.append(f"line {node.lineno}: `draft.generate` takes no `{keyword.arg}`")


@pytest.mark.parametrize("path", DOC_FILES, ids=doc_id)
def test_python_snippets_parse_and_match_the_signatures_they_call(path):
    checker = SnippetChecker()
    for code in code_blocks(path, "python"):
        try:
            tree = ast.parse(strip_doctest(code))
        except SyntaxError as error:
            pytest.fail(f"{doc_id(path)}: a Python snippet does not parse: {error}\n{code}")
        checker.visit(tree)
    assert not checker.problems, f"{doc_id(path)}:\n" + "\n".join(checker.problems)


def test_snippet_checker_catches_a_wrong_keyword_and_a_wrong_import():
    checker = SnippetChecker()
    checker.visit(ast.parse(
        "from glide_hf import GlideForCausalLM\nfrom glide_hf.lora import glide_lora_configs\n"
        "draft = GlideForCausalLM.from_pretrained('x', target=None).to('cuda')\n"
        "draft.generate(max_new_tokens=5, draft_stratgy='tree')\n"
    ))  # fmt: skip
    assert len(checker.problems) == 2, checker.problems  # `target=` binds to **kwargs of from_pretrained
    assert "glide_lora_configs" in checker.problems[0] and "draft_stratgy" in checker.problems[1]


# --- command lines ---------------------------------------------------------------------------------------------------


def command_lines(path: Path) -> list[list[str]]:
    """Each shell command of the `bash` blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in code_blocks(path, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(shlex.split(line, comments=True))
    return commands


def help_flags(argv_help: list[str], run) -> set[str]:
    output = io.StringIO()
    with contextlib.redirect_stdout(output), pytest.raises(SystemExit):
        run(argv_help)
    flags = set()
    for line in output.getvalue().splitlines():  # option lines: "  --name VALUE, --alias VALUE   help text"
        if line.lstrip().startswith("--"):
            flags.update(re.findall(r"--[\w-]+", re.split(r"\s{2,}", line.strip())[0]))
    return flags


def example_flags(name: str) -> set[str]:
    sys.path.insert(0, str(REPO_ROOT / "examples"))
    try:
        spec = importlib.util.spec_from_file_location(f"example_{name}", REPO_ROOT / "examples" / name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO_ROOT / "examples"))
    return help_flags(["--help"], module.parse_args)


def flags_of(command: list[str]) -> tuple[str, set[str]] | None:
    """`(what, flags it accepts)` for a `glide-hf` or `python examples/...` command, None for other commands."""
    if command[0] == "glide-hf" or "glide_hf.cli" in command:
        start = 1 if command[0] == "glide-hf" else command.index("glide_hf.cli") + 1
        subcommand = command[start]
        return f"glide-hf {subcommand}", help_flags([subcommand, "--help"], cli_main)
    if len(command) > 1 and command[0] == "python" and command[1].startswith("examples/"):
        return command[1], example_flags(Path(command[1]).name)
    return None


@pytest.mark.parametrize("path", DOC_FILES, ids=doc_id)
def test_command_lines_use_flags_the_commands_have(path):
    problems = []
    cache: dict[tuple, tuple] = {}
    for command in command_lines(path):
        key = tuple(command[:3])
        if key not in cache:
            cache[key] = flags_of(command)
        resolved = cache[key]
        if resolved is None:
            continue
        what, known = resolved
        # `accelerate launch --config_file ... -m glide_hf.cli train ...`: only the flags after the module count.
        start = command.index("glide_hf.cli") if "glide_hf.cli" in command else 0
        used = {token.split("=")[0] for token in command[start:] if token.startswith("--")}
        unknown = sorted(used - known)
        if unknown:
            problems.append(f"`{' '.join(command)}`: {what} has no {', '.join(unknown)}")
    assert not problems, f"{doc_id(path)}:\n" + "\n".join(problems)


# --- the API reference -----------------------------------------------------------------------------------------------


def api_outline(text: str) -> list[str]:
    """Headings and signature blocks of docs/api.md: what must change when the API does (docstring wording may
    drift until the next `python docs/generate_api.py`)."""
    outline = [line for line in text.splitlines() if line.startswith("#")]
    return outline + [body for lang, body in FENCE.findall(text) if lang == "python" and not body.startswith(">>>")]


def test_api_reference_lists_the_current_public_signatures():
    spec = importlib.util.spec_from_file_location("generate_api", REPO_ROOT / "docs" / "generate_api.py")
    generate_api = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate_api)
    committed = (REPO_ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    assert api_outline(committed) == api_outline(generate_api.render()), (
        "docs/api.md is out of date with the code: run `python docs/generate_api.py`."
    )
