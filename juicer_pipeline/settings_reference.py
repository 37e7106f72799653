"""The settings reference, generated from `settings.py`'s own field descriptions.

    python -m juicer_pipeline.settings_reference --write docs/settings.md   # (re)generate it (make docs)
    python -m juicer_pipeline.settings_reference --check                    # exit 1 when docs/settings.md is stale

`render()` walks the sections of `JuicerSettings` in order and writes one Markdown table per
section: key, type (with its bounds), default, whether the key enters the section's hash, and the
field's description. The descriptions live in `settings.py` only; this module adds none.
"""
from __future__ import annotations

import argparse
import inspect
import json
import sys
import types
import typing
from pathlib import Path

from pydantic.fields import FieldInfo

from .settings import CONFIG_ENV, JuicerSettings, _Section

DEFAULT_PATH = Path("docs/settings.md")
REGENERATE = "make docs  (python -m juicer_pipeline.settings_reference --write docs/settings.md)"

_HEADER = f"""# Settings reference

<!-- Generated from juicer_pipeline/settings.py by `make docs`; do not edit by hand. -->

Every key of the settings file, with its default. Defaults need no file; to change them, write
`data/juicer.toml` (or point `{CONFIG_ENV}` at a file) with the sections and keys below. Unknown
keys and impossible values are errors that name the key.

**Hashed** keys enter their section's hash (`config_hash`). A stage that reads a section puts that
hash into its Dagster code version, so after a change (and a code-location reload) the UI marks
exactly those stages unsynced; which stage reads which section is in
[architecture.md](architecture.md#staleness-code-versions). Unhashed keys change how a stage runs or
what a check reports, never an asset's output, so changing one leaves every asset synced.
"""


def sections() -> list[tuple[str, type[_Section]]]:
    """The settings sections, as `JuicerSettings` declares them: (TOML table name, model class)."""
    return [(name, field.annotation) for name, field in JuicerSettings.model_fields.items()]


def render() -> str:
    """The whole reference as Markdown."""
    parts = [_HEADER]
    for name, model in sections():
        parts.append(_render_section(name, model))
    return "\n".join(parts)


def _render_section(name: str, model: type[_Section]) -> str:
    doc = inspect.cleandoc(model.__doc__ or "")
    lines = [f"## [{name}]", ""]
    if doc:
        lines += [" ".join(doc.split()), ""]
    lines += ["| key | type | default | hashed | description |", "|---|---|---|---|---|"]
    for key, field in model.model_fields.items():
        hashed = "no" if key in model._unhashed else "yes"
        cells = [f"`{key}`", _cell(_type_text(field)), _cell(_default_text(field)), hashed,
                 _cell(" ".join((field.description or "").split()))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _type_text(field: FieldInfo) -> str:
    text = _annotation_text(field.annotation)
    bounds = []
    for meta in field.metadata:
        for attr, symbol in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            if getattr(meta, attr, None) is not None:
                bounds.append(f"{symbol} {getattr(meta, attr)}")
        if getattr(meta, "min_length", None) is not None:
            bounds.append(f"at least {meta.min_length} item{'s' if meta.min_length != 1 else ''}")
        if getattr(meta, "pattern", None) is not None:
            bounds.append(f"matching `{meta.pattern}`")
    return f"`{text}`" + (f", {', '.join(bounds)}" if bounds else "")


def _annotation_text(annotation) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("None" if a is type(None) else _annotation_text(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_annotation_text(a) for a in args)}]"
    if annotation is typing.Any:
        return "Any"
    return getattr(annotation, "__name__", str(annotation))


def _default_text(field: FieldInfo) -> str:
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "unset"
    return f"`{_toml(value)}`"


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _cell(text: str) -> str:
    """Text fit for a Markdown table cell: pipes escaped everywhere (GitHub needs it inside code
    spans too), and outside code spans '<' escaped so that `<path>` is not taken for an HTML tag."""
    pieces = text.split("`")
    for i, piece in enumerate(pieces):
        piece = piece.replace("|", "\\|")
        pieces[i] = piece if i % 2 else piece.replace("<", "&lt;")
    return "`".join(pieces)


def check(path: Path = DEFAULT_PATH) -> str | None:
    """None when `path` holds exactly `render()`, else what is wrong and how to fix it."""
    if not path.exists():
        return f"{path} does not exist; generate it with: {REGENERATE}"
    if path.read_text(encoding="utf-8") != render():
        return f"{path} is stale: it differs from juicer_pipeline/settings.py's descriptions; regenerate it with: {REGENERATE}"
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m juicer_pipeline.settings_reference", description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--write", type=Path, metavar="PATH", help="write the reference to PATH")
    mode.add_argument("--check", type=Path, nargs="?", const=DEFAULT_PATH, metavar="PATH",
                      help=f"exit 1 when PATH (default {DEFAULT_PATH}) differs from the generated reference")
    a = p.parse_args(argv)
    if a.write is not None:
        a.write.parent.mkdir(parents=True, exist_ok=True)
        a.write.write_text(render(), encoding="utf-8")
        print(f"wrote {a.write}")
        return 0
    if a.check is not None:
        problem = check(a.check)
        if problem:
            print(f"settings reference: {problem}", file=sys.stderr)
            return 1
        print(f"{a.check} is up to date")
        return 0
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
