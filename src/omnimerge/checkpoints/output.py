"""The output folder: built in a temporary folder beside OUT and renamed into place at the end."""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path

from ..errors import OmnimergeError
from .sources import confined_files

# Files of a model folder that describe the model but hold no weights: copied from the skeleton.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
_SKIP = {"model.safetensors.index.json", "pytorch_model.bin.index.json", "README.md", "omnimerge.yaml",
         "report.json", "adapter_config.json", ".gitattributes"}
TOKENIZER_PATTERNS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab*", "merges.txt",
                      "*.model", "*.tiktoken", "chat_template*")


def shard_filenames(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def _is_tokenizer_file(name: str) -> bool:
    return any(Path(name).match(p) for p in TOKENIZER_PATTERNS)


def describing_files(folder: Path) -> list[Path]:
    """The non-weight files of a model folder, each checked to lie inside it (a link that leaves the
    folder would copy a file of the user's, e.g. a key, into the output)."""
    files = [p for p in sorted(folder.iterdir())
             if p.is_file() and p.name not in _SKIP and p.suffix not in _WEIGHT_SUFFIXES and not p.name.startswith(".")]
    return confined_files(folder, files, "a file to copy into the output")


def model_files(skeleton: Path, tokenizer_source: Path) -> dict[str, Path]:
    """Every non-weight file to copy: config, processor, template, generation config, and the
    tokenizer files (from ``tokenizer_source`` when it is not the skeleton)."""
    own_tokenizer = tokenizer_source == skeleton
    files = {p.name: p for p in describing_files(skeleton) if own_tokenizer or not _is_tokenizer_file(p.name)}
    if not own_tokenizer:
        files |= {p.name: p for p in describing_files(tokenizer_source) if _is_tokenizer_file(p.name)}
    return files


class OutputFolder:
    """``with OutputFolder(out, force) as tmp: ...`` writes into ``tmp``; ``commit()`` moves it to ``out``."""

    def __init__(self, out: str | Path, force: bool, protect: list[Path] = ()):
        self.out = Path(out).absolute()
        self.force = force
        self.tmp: Path | None = None
        self._committed = False
        self._check(protect)

    def _check(self, protect) -> None:
        out = self.out
        for p in protect:
            p = Path(p).resolve()
            if out.resolve() == p or out.resolve() in p.parents:
                raise OmnimergeError(f"output {out} is, or contains, the input {p}; choose another output folder")
        if out.exists():
            if not out.is_dir():
                raise OmnimergeError(f"output {out} exists and is a file; choose a folder name")
            if any(out.iterdir()) and not self.force:
                raise OmnimergeError(f"output {out} exists and is not empty; pass --force to replace it")
        parent = out.parent
        if not parent.is_dir():
            raise OmnimergeError(f"cannot write {out}: its parent folder {parent} does not exist")
        if not os.access(parent, os.W_OK):
            raise OmnimergeError(f"cannot write {out}: no write permission in {parent}")

    def check_space(self, nbytes: int) -> None:
        free = shutil.disk_usage(self.out.parent).free
        need = int(nbytes * 1.01) + (16 << 20)
        if free < need:
            raise OmnimergeError(
                f"not enough disk space for {self.out}: the merge writes about {nbytes / 1e9:.2f} GB, "
                f"{free / 1e9:.2f} GB are free on that disk; free some space or choose another output folder"
            )

    def __enter__(self) -> Path:
        self.tmp = self.out.parent / f".{self.out.name}.omnimerge-tmp-{uuid.uuid4().hex[:8]}"
        self.tmp.mkdir()
        return self.tmp

    def commit(self) -> None:
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.omnimerge-old-{uuid.uuid4().hex[:8]}"
            os.rename(self.out, old)
        os.rename(self.tmp, self.out)
        self._committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def __exit__(self, *exc) -> None:
        if not self._committed and self.tmp is not None:
            remove_tree(self.tmp)


def remove_tree(path: Path, tries: int = 20) -> None:
    """Remove a folder even while another process is still finishing a file in it: a file created
    during a removal makes the last rmdir fail, so the removal is repeated until the folder is gone."""
    for _ in range(tries):
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.lexists(path):
            return
        time.sleep(0.05)


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
