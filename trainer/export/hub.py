"""Publish an exported folder on the Hugging Face Hub with `huggingface_hub`.

The token comes from `HF_TOKEN` or the user's `huggingface-cli login`; this module never
prints, logs or writes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from trainer.errors import RunError


class PushError(RunError):
    """The folder cannot be pushed as asked."""


@dataclass
class PushPlan:
    repo_id: str
    revision: str | None
    files: list[tuple[str, int]]
    """(path in the repo, size in bytes)."""

    def describe(self) -> str:
        total = sum(size for _, size in self.files)
        lines = [f"would upload {len(self.files)} files ({total / 2**20:.1f} MiB) to {self.repo_id}"
                 + (f" (revision {self.revision})" if self.revision else "")]
        lines += [f"  {path}  {size:,} bytes" for path, size in self.files]
        return "\n".join(lines)


def plan_push(folder: str | Path, repo_id: str, revision: str | None = None) -> PushPlan:
    folder = Path(folder)
    if not (folder / "modules.json").exists():
        raise PushError(f"{folder}: not an exported model folder (no modules.json); run embtrain export first")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise PushError(f"--repo-id {repo_id!r} must look like USER/NAME or ORG/NAME")
    files = sorted(
        (str(p.relative_to(folder)), p.stat().st_size)
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    return PushPlan(repo_id, revision, files)


def push(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str = "Upload model trained with embtrain",
) -> str:
    """Create the repo if needed and upload the folder in one commit; returns the commit or PR URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    plan = plan_push(folder, repo_id, revision)
    api = HfApi()  # token: HF_TOKEN or the saved login
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and not create_pr:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            revision=revision,
            create_pr=create_pr,
            commit_message=commit_message,
            allow_patterns=[path for path, _ in plan.files],
        )
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        hint = " (check HF_TOKEN or run `huggingface-cli login`)" if status in (401, 403) else ""
        raise PushError(f"push to {repo_id} failed: HTTP {status}{hint}") from None
    except network_errors() as exc:
        raise PushError(
            f"push to {repo_id} failed: cannot reach the Hub at {api.endpoint} ({type(exc).__name__}: {exc}); "
            "check the network connection, a proxy or HF_ENDPOINT"
        ) from None
    return commit.pr_url or commit.commit_url


def network_errors() -> tuple[type[BaseException], ...]:
    """What the Hub client raises when the Hub cannot be reached: OSError for requests-based
    versions of huggingface_hub (and offline mode), the HTTP library's transport errors for later ones."""
    import importlib

    errors: list[type[BaseException]] = [OSError]
    for module in ("httpx", "httpx2"):  # huggingface_hub >= 1.0 speaks HTTP through httpx (or its fork)
        try:
            errors.append(importlib.import_module(module).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(errors)
