"""`embtrain push` against a local stand-in for the Hub's HTTP API (no network)."""

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from trainer.config import ModelConfig
from trainer.export.sentence_transformers_folder import export
from trainer.model.encoder import Encoder

ROOT = Path(__file__).resolve().parents[3]
TOKEN = "hf_secretTOKENforTESTS1234567890"


class FakeHub(BaseHTTPRequestHandler):
    """The calls an upload makes: create the repo, check the card, ask upload modes, commit."""

    requests: list[dict] = []

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def _reply(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        record = {"path": self.path, "auth": self.headers.get("Authorization")}
        self.requests.append(record)
        base = f"http://{self.server.server_address[0]}:{self.server.server_address[1]}"
        if self.path == "/api/repos/create":
            data = json.loads(raw)
            record["create"] = data
            repo = f"{data.get('organization') or 'me'}/{data['name']}"
            return self._reply(200, {"url": f"{base}/{repo}", "name": repo, "id": repo})
        if self.path == "/api/validate-yaml":  # the client checks the model card's metadata
            record["card"] = json.loads(raw).get("content", "")
            return self._reply(200, {"errors": [], "warnings": []})
        if "/preupload/" in self.path:
            files = json.loads(raw)["files"]
            return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
        if "/branch/" in self.path:
            return self._reply(200, {})
        if self.path.endswith("/discussions"):  # a pull request starts as a discussion
            return self._reply(200, {"num": 1})
        if "/commit/" in self.path:
            lines = [json.loads(line) for line in raw.decode().splitlines() if line.strip()]
            record["files"] = sorted(l["value"]["path"] for l in lines if l.get("key") == "file")
            record["payload"] = raw.decode()
            pr = f"{base}/me/tiny/discussions/1" if "refs%2Fpr%2F1" in self.path or "create_pr=1" in self.path else None
            return self._reply(200, {"commitUrl": f"{base}/me/tiny/commit/{'a' * 40}", "commitOid": "a" * 40, "pullRequestUrl": pr})
        self._reply(404, {"error": f"not in the stand-in: POST {self.path}"})

    def do_GET(self) -> None:
        self.requests.append({"path": self.path, "auth": self.headers.get("Authorization")})
        if self.path.split("?")[0].endswith("/discussions/1"):
            return self._reply(200, {
                "num": 1, "title": "Upload", "isPullRequest": True, "status": "draft",
                "changes": {"base": "refs/heads/main"}, "filesWithConflicts": [], "events": [],
                "createdAt": "2026-01-01T00:00:00.000Z", "repo": {"name": "me/tiny", "type": "model"},
            })
        self._reply(404, {"error": f"not in the stand-in: GET {self.path}"})


@pytest.fixture()
def hub():
    FakeHub.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", FakeHub.requests
    server.shutdown()


@pytest.fixture()
def exported(tmp_path, tiny_model) -> Path:
    source = tmp_path / "model"
    Encoder.from_config(ModelConfig(name_or_path=str(tiny_model), max_seq_length=16)).save_pretrained(source)
    export(source, tmp_path / "st", check=False)
    (tmp_path / "st" / "README.md").write_text("---\nlibrary_name: sentence-transformers\n---\n# tiny\n")
    return tmp_path / "st"


def run_push(folder: Path, endpoint: str, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    command = [sys.executable, "-m", "trainer.cli", "push", str(folder), "--repo-id", "me/tiny", *extra]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_push_uploads_every_file_with_the_token_and_never_prints_it(exported, hub):
    endpoint, requests = hub
    result = run_push(exported, endpoint, "--private")
    assert result.returncode == 0, result.stderr[-3000:] + str(requests)
    assert "pushed" in result.stdout and "/me/tiny/commit/" in result.stdout
    assert TOKEN not in result.stdout + result.stderr
    create = next(r for r in requests if r["path"] == "/api/repos/create")
    assert create["create"].get("private") is True or create["create"].get("visibility") == "private"
    assert all(r["auth"] == f"Bearer {TOKEN}" for r in requests)
    committed = next(r for r in requests if "files" in r)["files"]
    expected = sorted(str(p.relative_to(exported)) for p in exported.rglob("*") if p.is_file())
    assert committed == expected and "model.safetensors" in committed
    payload = next(r for r in requests if "files" in r)["payload"]
    assert TOKEN not in payload  # nor in any uploaded file


def test_push_to_a_branch_and_as_a_pull_request(exported, hub):
    endpoint, requests = hub
    result = run_push(exported, endpoint, "--revision", "v2")
    assert result.returncode == 0, result.stderr[-3000:] + str(requests)
    assert any(r["path"].endswith("/branch/v2") for r in requests)
    assert any("/commit/v2" in r["path"] for r in requests)
    requests.clear()
    result = run_push(exported, endpoint, "--create-pr")
    assert result.returncode == 0, result.stderr[-3000:] + str(requests)
    assert "/me/tiny/discussions/1" in result.stdout


def test_dry_run_lists_files_and_sends_nothing(exported, hub):
    endpoint, requests = hub
    result = run_push(exported, endpoint, "--dry-run")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "would upload" in result.stdout and "model.safetensors" in result.stdout and "README.md" in result.stdout
    assert requests == []


def test_push_refuses_a_folder_that_was_not_exported(tmp_path, hub):
    endpoint, requests = hub
    result = run_push(tmp_path, endpoint)
    assert result.returncode == 2
    assert "not an exported model folder" in result.stderr and requests == []
