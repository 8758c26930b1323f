"""The model card (README.md) written beside a merged model or adapter; the Hub reads its YAML header.

The header's ``base_model`` names each input by its Hub repo id when it came from the Hugging Face
cache (or was named by one), else by its folder's name; ``base_model_relation`` says how the
output relates to them (``merge``, or ``adapter`` for a LoRA adapter over its base).
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

_CACHE_FOLDER = re.compile(r"^models--(.+?)--(.+)$")  # <cache>/models--org--name/snapshots/<rev>
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def hub_id(spec: str | None, path: Path | str | None = None) -> str | None:
    """The Hub repo id of an input named ``spec`` and found at ``path``; None for a local folder."""
    if path is not None:
        parts = Path(path).parts
        for i in range(len(parts) - 2):
            m = _CACHE_FOLDER.match(parts[i])
            if m and parts[i + 1] == "snapshots":
                return f"{m.group(1)}/{m.group(2)}"
        return None
    if spec and _HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return spec.partition("@")[0]
    return None


def input_name(spec: str, path: Path | str | None = None) -> str:
    """How the card names an input: its Hub id, else its folder's name."""
    return hub_id(spec, path) or Path(path if path is not None else spec.partition("@")[0]).name


def card_header(base_models: list[str], relation: str, library: str, tags: list[str]) -> str:
    header = {"base_model": list(dict.fromkeys(base_models)), "base_model_relation": relation,
              "library_name": library, "tags": list(dict.fromkeys(tags))}
    return "---\n" + yaml.safe_dump(header, sort_keys=False).strip() + "\n---\n"


def _names(specs: list[str], paths: dict | None) -> list[str]:
    return [input_name(s, (paths or {}).get(s)) for s in specs]


def model_card(*, method: str, reference: str, base: str | None, models: list[str], skeleton: str,
               recipe_yaml: str, components: dict[str, str], paths: dict | None = None) -> str:
    """``paths``: where each spec of the recipe was found (hub ids resolve to the cache)."""
    header = card_header(_names(([base] if base else []) + models, paths), "merge", "transformers",
                         ["merge", "omnimerge", method.replace("_", "-")])
    lines = [
        header,
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


def adapter_card(*, base: str, rank: str, summary: dict, paths: dict | None = None, method: str | None = None,
                 reference: str = "", models: list[str] = (), recipe_yaml: str = "",
                 components: dict[str, str] | None = None, extracted_from: str | None = None) -> str:
    """The card of a LoRA adapter over ``base``: a merge written with ``--as-lora`` (``method`` and the
    recipe given) or a fine-tune's difference from its base (``extracted_from``)."""
    tags = ["merge", "omnimerge", method.replace("_", "-"), "lora"] if method else ["omnimerge", "lora", "extracted"]
    lines = [card_header(_names([base], paths), "adapter", "peft", tags)]
    fit = (f"rank rule `{rank}`: r = {summary['r']} (per module {summary['ranks']['min']}–{summary['ranks']['max']}), "
           f"relative error of the update {summary['relative_error']:.2%}")
    if method:
        lines += ["# Merged model as a LoRA adapter", "",
                  f"The difference between a merge made with [omnimerge](https://pypi.org/project/omnimerge/) using "
                  f"**{method}** ({reference}) and its base, written as a PEFT LoRA adapter over the base "
                  f"({fit}).", "",
                  f"- Base: `{base}`",
                  "- Models: " + ", ".join(f"`{m}`" for m in models)]
        if components:
            lines.append("- Components: " + ", ".join(f"{c}: {p}" for c, p in components.items()))
    else:
        lines += ["# LoRA adapter extracted from a fine-tune", "",
                  f"The difference between `{extracted_from}` and its base `{base}`, written as a PEFT LoRA adapter "
                  f"with [omnimerge](https://pypi.org/project/omnimerge/) `extract` ({fit})."]
    lines += ["", "```python", "from peft import PeftModel", "",
              "model = PeftModel.from_pretrained(base_model, \"<this folder or repo>\")", "```", ""]
    if recipe_yaml:
        lines += ["## Recipe", "", "```yaml", recipe_yaml.strip(), "```", ""]
    return "\n".join(lines)
