"""``--push-to-hub``: upload a written output folder to a Hugging Face Hub repo.

The only place omnimerge talks to the network, and only when asked: inputs are never downloaded
(hub ids resolve from the local cache, see ``checkpoints/checkpoint.py``).
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import OmnimergeError

_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")


def check_repo_id(repo: str) -> str:
    """Fail before any work on a repo id the Hub would refuse."""
    if not _REPO_ID.match(repo) or "--" in repo or ".." in repo or len(repo.split("/")[-1]) > 96 or "@" in repo:
        raise OmnimergeError(f"--push-to-hub {repo!r}: not a Hub repo id; write NAME or ORG/NAME (letters, digits, "
                             "'-', '_', '.'; no '--' or '..')")
    return repo


def push_folder(folder: str | Path, repo: str, *, private: bool = False) -> str:
    """Create ``repo`` (a model repo; kept as it is if it exists) and upload ``folder`` to it in one commit.

    Uses the token of ``hf auth login`` or ``HF_TOKEN``. Returns the repo's URL.
    """
    import huggingface_hub

    folder = Path(folder)
    check_repo_id(repo)
    try:
        url = huggingface_hub.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        huggingface_hub.upload_folder(repo_id=repo, folder_path=str(folder), repo_type="model",
                                      commit_message=f"Upload {folder.name} written by omnimerge")
    except Exception as e:  # noqa: BLE001 - network, auth and Hub errors alike
        raise OmnimergeError(
            f"{folder} was written, but uploading it to the Hub repo '{repo}' failed: {e}. Log in with "
            f"`hf auth login` (or set HF_TOKEN) and upload it with `hf upload {repo} {folder}`"
        ) from None
    return str(url)
