"""The docs match the code: every setting is documented, and the README's two commands exist."""

from pathlib import Path

from pydantic import BaseModel

from pipeline.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parent.parent


def env_names() -> list[str]:
    names = []
    for name, field in Settings.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            names += [f"{ENV_PREFIX}{name.upper()}__{sub.upper()}" for sub in ann.model_fields]
        else:
            names.append(f"{ENV_PREFIX}{name.upper()}")
    return names


def test_every_setting_is_documented() -> None:
    doc = (ROOT / "docs" / "configuration.md").read_text()
    missing = [n for n in env_names() if f"`{n}`" not in doc]
    assert not missing, f"add these to docs/configuration.md: {missing}"


def test_readme_commands_exist_in_the_makefile() -> None:
    readme = (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert "make demo" in readme and "make test" in readme
    assert "\ndemo:" in makefile and "\ntest:" in makefile
    assert "make test" in (ROOT / ".ci" / "run").read_text()
