"""Shared fixtures: a zoo of tiny real-architecture checkpoints, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from omnimerge.tiny import build_tiny, make_expert


class Zoo:
    """Builds tiny models on first use and caches them for the session."""

    def __init__(self, root: Path):
        self.root = root
        self._built: dict[str, Path] = {}

    def _once(self, name: str, make) -> Path:
        if name not in self._built:
            self._built[name] = make(self.root / name)
        return self._built[name]

    def base(self, family: str, **kw) -> Path:
        tag = "-".join(f"{k}{v}" for k, v in sorted(kw.items()))
        return self._once(f"{family}-base{tag}", lambda p: build_tiny(family, p, seed=0, **kw))

    def expert(self, family: str, i: int) -> Path:
        return self._once(f"{family}-expert{i}",
                          lambda p: make_expert(self.base(family), p, seed=100 + i, scale=0.02))

    def experts(self, family: str, n: int = 3) -> list[Path]:
        return [self.expert(family, i) for i in range(1, n + 1)]

    def on_backbone(self, family: str, text_family: str, i: int = 1) -> Path:
        """A `family` model 'trained from' the text LLM `base(text_family)`: that language model plus
        noise on its layers, with encoders of its own (as vision/audio LLMs share one base LLM)."""
        def make(p: Path) -> Path:
            raw = build_tiny(family, p.with_name(p.name + "-raw"), seed=i, backbone=self.base(text_family))
            return make_expert(raw, p, seed=200 + i, scale=0.02)

        return self._once(f"{family}-on-{text_family}{i}", make)

    def text(self, family: str, **kw) -> Path:
        """A text LLM built with another seed than the VLMs (a 'different' model of the same shape)."""
        tag = "-".join(f"{k}{v}" for k, v in sorted(kw.items()))
        return self._once(f"{family}-text{tag}", lambda p: build_tiny(family, p, seed=7, **kw))


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> Zoo:
    return Zoo(tmp_path_factory.mktemp("zoo"))


def leftovers(folder: Path) -> list[str]:
    """Temporary folders omnimerge would have left beside an output."""
    return sorted(p.name for p in folder.iterdir() if ".omnimerge-" in p.name)
