"""Render docs/api.md, the API reference, from the docstrings and signatures of glide_hf's public names.

Public means listed in a module's `__all__` (for the package itself: its exports, errors apart). Each class shows its
constructor (for a dataclass of flags, a table of its fields and their help), its docstring, and the public methods
with a docstring that glide_hf defines for it; each function its signature and docstring. Docstrings are written in
Transformers' format (`Args:` / `Returns:` sections with indented entries), turned into Markdown lists here.

Run from the repository root after changing a public signature or docstring:

    python docs/generate_api.py           # rewrite docs/api.md
    python docs/generate_api.py --check   # exit 1 if docs/api.md is out of date (what the tests check)
"""

import argparse
import dataclasses
import importlib
import inspect
import re
import sys
from pathlib import Path

API_PATH = Path(__file__).resolve().parent / "api.md"
# (module, names or None for its `__all__`, one-line description); in the order of the page.
MODULES = (
    ("glide_hf", ("GlideConfig", "GlidePreTrainedModel", "GlideForCausalLM", "GlideModel"), "the model classes"),
    ("glide_hf.engine", None, "the GLIDE engine behind `GlideForCausalLM.generate`"),
    ("glide_hf.tree_attention", None, "split tree attention for the engine's verify forward"),
    ("glide_hf.trainer", None, "training: `glide-hf train` and `train_glide`"),
    ("glide_hf.data", None, "training data: formats, masking, packing, Anchor-Offset"),
    ("glide_hf.distill", None, "self-distillation data: `glide-hf distill-data`"),
    ("glide_hf.lora", None, "LoRA on the draft layer"),
    ("glide_hf.convert", None, "LongSpec checkpoint conversion: `glide-hf convert-longspec`"),
    ("glide_hf.model_card", None, "model cards"),
    ("glide_hf.bench", None, "acceptance and speed evaluation: `glide-hf bench`"),
    ("glide_hf.draft_vocab", None, "the draft's vocabulary: `glide-hf draft-vocab`"),
    ("glide_hf.loss", None, "the training loss"),
    ("glide_hf.configuration_glide", ("check_target_compatibility", "target_shape"), "config helpers"),
    ("glide_hf.modeling_glide", ("check_target_model", "default_generation_config", "read_target_kv"),
     "model helpers"),
    ("glide_hf.errors", None, "typed errors"),
    ("glide_hf.cli", ("main",), "the `glide-hf` command"),
)  # fmt: skip
SECTION_HEADERS = re.compile(r"^(Args|Arguments|Attributes|Returns|Raises|Example|Examples):\s*$")
# A `Raises:` entry starts with the exception's name: "`ValueError`: ..." or "`DataFormatError` (...)".
EXCEPTION_ENTRY = re.compile(r"^`\w+(Error|Exception|Warning)`")
# Module paths dropped from rendered annotations: the class name says enough.
QUALIFIED_NAME = re.compile(r"\b(?:transformers|glide_hf|typing|collections\.abc|pathlib|peft)(?:\.\w+)*\.(\w+)")
LINE_LENGTH = 119


def render() -> str:
    """The whole of docs/api.md."""
    parts = [
        "# API reference",
        "",
        "Generated from the docstrings by [`docs/generate_api.py`](generate_api.py): edit the docstrings, then run "
        "`python docs/generate_api.py`. The guides show these names at work: [quickstart](quickstart.md), "
        "[inference](inference.md), [training](training.md), [checkpoint format](checkpoint-format.md).",
        "",
    ]
    parts += [f"- [`{module}`](#{_anchor(module)}): {description}" for module, _, description in MODULES]
    for module_name, names, _ in MODULES:
        module = importlib.import_module(module_name)
        parts += ["", f"## `{module_name}`", ""]
        intro = _first_paragraph(module.__doc__)
        if intro:
            parts += [_render_docstring(intro), ""]
        for name in names if names is not None else module.__all__:
            parts += _render_object(module_name, name, getattr(module, name))
    return "\n".join(parts).rstrip() + "\n"


def _render_object(module_name: str, name: str, obj) -> list[str]:
    if inspect.isclass(obj):
        return _render_class(module_name, name, obj)
    if callable(obj):
        return [f"### `{module_name}.{name}`", "", _code(_signature_line(f"def {name}", obj)), "",
                _render_docstring(_own_doc(obj)), ""]  # fmt: skip
    text = repr(obj)
    return [f"### `{module_name}.{name}`", "", _code(f"{name} = {text}" if len(text) < 200 else f"{name} = ..."), ""]


def _render_class(module_name: str, name: str, cls) -> list[str]:
    lines = [f"### `{module_name}.{name}`", ""]
    bases = ", ".join(base.__name__ for base in cls.__bases__ if base is not object)
    header = f"class {name}({bases})" if bases else f"class {name}"
    help_fields = _help_fields(cls)
    if help_fields:
        lines += [_code(f"@dataclass\n{header}"), "", _render_docstring(_own_doc(cls)), ""]
        lines += ["| field | type | default | help |", "| --- | --- | --- | --- |"]
        for field in help_fields:
            help_text = field.metadata["help"].replace("|", "\\|").replace("\n", " ")
            type_text = _annotation(field.type).replace("|", "\\|")  # a pipe would split the table cell
            lines.append(f"| `{field.name}` | `{type_text}` | {_default(field)} | {help_text} |")
        lines.append("")
    elif issubclass(cls, BaseException):
        lines += [_code(header), "", _render_docstring(_own_doc(cls)), ""]
        return lines
    else:
        lines += [_code(_signature_line(f"class {name}", cls, own_fields_only=True)), "",
                  _render_docstring(_own_doc(cls)), ""]  # fmt: skip
    inherited = [base.__name__ for base in cls.__mro__[1:] if base.__module__.startswith("glide_hf") and
                 _public_methods(base)]  # fmt: skip
    if inherited:
        lines += [f"Also has the methods of {', '.join(f'`{base}`' for base in inherited)}.", ""]
    for method_name, method in _public_methods(cls):
        doc = _own_doc(method)
        if isinstance(method, property):
            lines += [f"#### `{name}.{method_name}` (property)", "", _render_docstring(doc), ""]
            continue
        function = method.__func__ if isinstance(method, (classmethod, staticmethod)) else method
        prefix = "@classmethod\ndef" if isinstance(method, classmethod) else "def"
        lines += [f"#### `{name}.{method_name}`", "", _code(_signature_line(f"{prefix} {method_name}", function)), "",
                  _render_docstring(doc), ""]  # fmt: skip
    return lines


def _public_methods(cls) -> list[tuple[str, object]]:
    """The public methods and properties with a docstring that `cls` itself defines, in definition order."""
    methods = []
    for method_name, member in vars(cls).items():
        function = member.__func__ if isinstance(member, (classmethod, staticmethod)) else member
        if method_name.startswith("_") or not (inspect.isfunction(function) or isinstance(member, property)):
            continue
        if _own_doc(member):
            methods.append((method_name, member))
    return methods


def _help_fields(cls) -> list:
    """The fields of a dataclass whose fields carry `metadata["help"]` (a CLI schema), else []."""
    if not dataclasses.is_dataclass(cls):
        return []
    fields = dataclasses.fields(cls)
    return list(fields) if fields and all("help" in field.metadata for field in fields) else []


def _default(field) -> str:
    if field.default is not dataclasses.MISSING:
        return f"`{field.default!r}`"
    if field.default_factory is not dataclasses.MISSING:
        return f"`{field.default_factory()!r}`"
    return "required"


def _signature_line(prefix: str, obj, own_fields_only: bool = False) -> str:
    """`prefix(parameters) -> return`, one parameter per line when it would not fit on one."""
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return f"{prefix}(...)"
    parameters = list(signature.parameters.values())
    inherits_fields = any(dataclasses.is_dataclass(base) for base in getattr(obj, "__mro__", ())[1:])
    if own_fields_only and dataclasses.is_dataclass(obj) and inherits_fields:
        # A config dataclass inherits Transformers' generic fields: list the class's own, the rest as **kwargs.
        own = set(vars(obj).get("__annotations__", {}))
        parameters = [parameter for parameter in parameters if parameter.name in own]
        parameters = [parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY) for parameter in parameters]
        parameters.append(inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD))
    rendered, star_done = [], False
    for parameter in parameters:
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY and not star_done:
            rendered.append("*")
        star_done = star_done or parameter.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.VAR_POSITIONAL)
        rendered.append(_parameter(parameter))
    returns = ""
    if signature.return_annotation is not inspect.Signature.empty and not prefix.startswith("class"):
        returns = f" -> {_annotation(signature.return_annotation)}"
    one_line = f"{prefix}({', '.join(rendered)}){returns}"
    if len(one_line.splitlines()[-1]) <= LINE_LENGTH:
        return one_line
    return f"{prefix}(\n" + "".join(f"    {item},\n" for item in rendered) + f"){returns}"


def _parameter(parameter: inspect.Parameter) -> str:
    text = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**"}.get(parameter.kind, "")
    text += parameter.name
    if parameter.annotation is not inspect.Parameter.empty:
        text += f": {_annotation(parameter.annotation)}"
    if parameter.default is not inspect.Parameter.empty:
        default = parameter.default
        text += f" = {_annotation(default) if inspect.isclass(default) else repr(default)}"
    return text


def _annotation(annotation) -> str:
    if isinstance(annotation, str):
        text = annotation
    elif inspect.isclass(annotation) and not getattr(annotation, "__args__", None):
        text = (
            annotation.__qualname__
            if annotation.__module__ == "builtins"
            else (f"{annotation.__module__}.{annotation.__qualname__}")
        )
    else:
        text = inspect.formatannotation(annotation)
    return QUALIFIED_NAME.sub(r"\1", text).replace("NoneType", "None")


def _render_docstring(doc: str) -> str:
    """Transformers-style docstring text as Markdown: section names in bold, entries indented by 4 as list items,
    deeper lines as their continuation, code fences kept (dedented). A `Returns:` entry, and a `Raises:` entry until
    the next exception name, go on at the same indent: those lines continue it."""
    out, fence_indent, section, in_entry = [], None, None, False
    for line in doc.splitlines():
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if fence_indent is not None:
            out.append(line[fence_indent:] if line[:fence_indent].strip() == "" else line)
            if stripped.startswith("```"):
                fence_indent = None
            continue
        if stripped.startswith("```"):
            fence_indent = indent
            out.append(stripped)
        elif indent == 0 and SECTION_HEADERS.match(stripped):
            section, in_entry = SECTION_HEADERS.match(stripped).group(1), False
            out += ["", f"**{stripped}**", ""]
        elif not stripped or indent == 0:
            in_entry = False
            out.append(stripped)
        elif indent > 4 or (in_entry and _continues_entry(section, stripped)):
            out.append(f"  {stripped}")
        else:
            in_entry = True
            out.append(f"- {stripped}")
    text = "\n".join(out)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _continues_entry(section: str | None, line: str) -> bool:
    """Whether `line`, at an entry's indent right after it, goes on with that entry."""
    if section == "Returns":
        return True
    if section == "Raises":
        return not EXCEPTION_ENTRY.match(line)
    return False


def _own_doc(obj) -> str:
    """The object's own docstring, cleaned; not one inherited from a parent class as `inspect.getdoc` gives."""
    if isinstance(obj, (classmethod, staticmethod)):
        obj = obj.__func__
    doc = (
        obj.fget.__doc__
        if isinstance(obj, property)
        else obj.__dict__.get("__doc__")
        if inspect.isclass(obj)
        else (obj.__doc__)
    )
    return inspect.cleandoc(doc) if doc else ""


def _first_paragraph(doc: str | None) -> str:
    return inspect.cleandoc(doc).split("\n\n")[0] if doc else ""


def _code(text: str) -> str:
    return f"```python\n{text}\n```"


def _anchor(module_name: str) -> str:
    return module_name.replace(".", "").replace("_", "_").lower()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="Exit 1 if docs/api.md differs from the docstrings.")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if API_PATH.read_text(encoding="utf-8") != text:
            print(f"{API_PATH} is out of date: run `python docs/generate_api.py`.", file=sys.stderr)
            return 1
        return 0
    API_PATH.write_text(text, encoding="utf-8")
    print(f"wrote {API_PATH}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
