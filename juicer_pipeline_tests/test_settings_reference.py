"""docs/settings.md is generated from settings.py's field descriptions, and stays so."""
from __future__ import annotations

from pathlib import Path

from juicer_pipeline import settings_reference
from juicer_pipeline.settings import JuicerSettings

REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "settings.md"


def test_docs_settings_md_is_the_generated_reference():
    assert REFERENCE.exists(), f"{REFERENCE} is missing; generate it with: {settings_reference.REGENERATE}"
    assert REFERENCE.read_text(encoding="utf-8") == settings_reference.render(), (
        f"docs/settings.md is stale (settings.py changed since it was generated); regenerate it with: "
        f"{settings_reference.REGENERATE}")


def test_every_settings_section_and_field_is_described():
    missing = []
    for name, model in settings_reference.sections():
        if not (model.__doc__ or "").strip():
            missing.append(f"[{name}] (class docstring)")
        missing += [f"{name}.{key}" for key, field in model.model_fields.items() if not (field.description or "").strip()]
    assert not missing, f"settings without a description (add one in juicer_pipeline/settings.py): {missing}"


def test_the_reference_names_every_key_with_its_default_and_hash_status():
    text = settings_reference.render()
    defaults = JuicerSettings()
    for name, model in settings_reference.sections():
        assert f"## [{name}]" in text
        section = text.split(f"## [{name}]", 1)[1].split("\n## ", 1)[0]
        for key in model.model_fields:
            row = next((line for line in section.splitlines() if line.startswith(f"| `{key}` |")), None)
            assert row is not None, f"{name}.{key} has no row in the reference"
            hashed = row.split(" | ")[3]
            assert hashed == ("no" if key in model._unhashed else "yes"), row
    # a default as TOML writes it, and pipes escaped so the table keeps its columns
    assert f"| `budget_full_steps` | `int`, ≥ 1 | `{defaults.training.budget_full_steps}` | yes |" in text
    assert '`"world"` | yes | world \\| file:&lt;path>' in text


def test_check_reports_a_stale_file_with_the_command_to_regenerate(tmp_path, capsys):
    stale = tmp_path / "settings.md"
    stale.write_text(settings_reference.render() + "\nedited by hand\n", encoding="utf-8")
    assert settings_reference.main(["--check", str(stale)]) == 1
    assert "make docs" in capsys.readouterr().err
    assert settings_reference.main(["--write", str(stale)]) == 0
    assert settings_reference.main(["--check", str(stale)]) == 0
