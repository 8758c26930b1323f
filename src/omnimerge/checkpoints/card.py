"""The model card (README.md) written beside a merged model; the Hub reads its YAML header."""

from __future__ import annotations

import yaml


def model_card(*, method: str, reference: str, base: str | None, models: list[str], skeleton: str,
               recipe_yaml: str, components: dict[str, str]) -> str:
    base_models = list(dict.fromkeys(([base] if base else []) + models))
    header = {
        "base_model": base_models,
        "library_name": "transformers",
        "tags": ["merge", "omnimerge", method.replace("_", "-")],
    }
    lines = [
        "---",
        yaml.safe_dump(header, sort_keys=False).strip(),
        "---",
        "",
        "# Merged model",
        "",
        f"This model was merged with [omnimerge](https://pypi.org/project/omnimerge/) using **{method}** "
        f"({reference}).",
        "",
        f"- Architecture (skeleton): `{skeleton}`",
    ]
    if base:
        lines.append(f"- Base: `{base}`")
    lines.append("- Models: " + ", ".join(f"`{m}`" for m in models))
    lines.append("- Components: " + ", ".join(f"{c}: {p}" for c, p in components.items()))
    lines += ["", "## Recipe", "", "```yaml", recipe_yaml.strip(), "```", ""]
    return "\n".join(lines)
