"""`mmvq submit` ships code, never the secrets a working directory collects.

The upload set is what Ray's own packager zips from the runtime_env that submit hands to the
job client (the same calls as ``JobSubmissionClient.submit_job``, minus the HTTP upload)."""

import json
import shutil
import zipfile
from pathlib import Path

import pytest

from workflows.cli import main
from workflows.submit import SECRET_EXCLUDES, plan_upload, working_dir_excludes

REPO = Path(__file__).resolve().parents[2]
# Built at run time so this file itself holds no private-key marker.
PEM = "-----BEGIN " + "PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END " + \
    "PRIVATE KEY-----\n"
NAMED_SECRETS = [".env", ".env.production", "basic_auth.ini", "server.pem", "tls.key",
                 "mlflow.db", "infra/local/basic_auth.db", ".mlflow/token", ".aws/credentials",
                 "conf/credentials", ".ssh/id_ed25519", ".netrc", "deploy/id_rsa"]
CODE = ["pipeline/__init__.py", "pipeline/stage.py", "mmvq/model.py", "workflows/demo.yaml",
        "README.md", "conf/settings.json", "tests/test_x.py"]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A repository copy with code, secrets by name, keys by content and links out."""
    monkeypatch.delenv("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", raising=False)
    monkeypatch.delenv("RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES", raising=False)
    root = tmp_path / "repo"
    for rel in CODE:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(f"# {rel}\n" * 3)
    shutil.copy(REPO / "workflows" / "demo.yaml", root / "workflows" / "demo.yaml")
    (root / "conf" / "settings.json").write_text('{"type": "settings", "lr": 0.1}')
    for rel in NAMED_SECRETS:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("SECRET\n")
    key = json.dumps({"type": "service_account", "client_email": "x@y.iam", "private_key": PEM})
    (root / "gcp-sa.json").write_text(key)
    (root / "deploy_key").write_text(PEM)  # no telling name: found by its content
    outside = tmp_path / "home"
    (outside / ".aws").mkdir(parents=True)
    (outside / ".aws" / "config").write_text("SECRET\n")
    (outside / "notes.txt").write_text("SECRET\n")
    (root / "cloud").symlink_to(outside / ".aws")
    (root / "notes.txt").symlink_to(outside / "notes.txt")
    (root / "docs").mkdir()
    (root / "docs" / "readme.md").symlink_to(root / "README.md")  # stays inside: uploaded
    (root / "scratch.log").write_text("ignored by git\n")
    (root / ".gitignore").write_text("scratch.log\n")
    return root


def _ray_zip(runtime_env: dict, tmp_path: Path) -> dict[str, int]:
    """What Ray's job client would upload for ``runtime_env``: names and sizes in its zip."""
    from ray._private.runtime_env.packaging import create_package
    from ray._private.runtime_env.working_dir import upload_working_dir_if_needed

    target = tmp_path / "package.zip"

    def upload(working_dir, excludes, is_file=False):
        create_package(working_dir, target, include_gitignore=True, excludes=excludes)

    upload_working_dir_if_needed(dict(runtime_env), include_gitignore=True, upload_fn=upload)
    with zipfile.ZipFile(target) as package:
        return {i.filename: i.file_size for i in package.infolist() if not i.is_dir()}


@pytest.fixture
def submitted(monkeypatch):
    """Replaces Ray's job client; collects what each submit would send."""
    specs: list[dict] = []

    class Client:
        def __init__(self, address):
            self.address = address

        def submit_job(self, **spec):
            specs.append(spec)
            return "raysubmit_test"

    monkeypatch.setattr("ray.job_submission.JobSubmissionClient", Client)
    return specs


def _submit(root: Path, *extra: str) -> int:
    from workflows import submit

    argv = ["submit", str(root / "workflows" / "demo.yaml"), "--address", "http://head:8265",
            "--no-wait", *extra]
    original = submit.submit_workflow
    # The CLI submits the repository it lives in; point it at the copy.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(submit, "submit_workflow",
                      lambda *a, **k: original(*a, **k, repo_root=root))
        return main(argv)


def test_submit_uploads_the_code_and_no_secret(workdir, submitted, tmp_path, capsys):
    assert _submit(workdir) == 0
    [spec] = submitted
    uploaded = _ray_zip(spec["runtime_env"], tmp_path)

    leaked = [name for name in uploaded if (workdir / name).read_bytes().find(b"SECRET") >= 0
              or "PRIVATE KEY" in (workdir / name).read_text(errors="replace")]
    assert leaked == []
    assert set(uploaded) == {*CODE, "docs/readme.md", ".gitignore"}
    out = capsys.readouterr().out
    assert "not uploaded: cloud/ (a link to" in out and "outside the working directory" in out
    assert "not uploaded: deploy_key (holds a PEM private key)" in out
    assert "not uploaded: gcp-sa.json (holds a PEM private key)" in out
    assert ".env, .env.production," in out  # named, never shown


def test_printed_count_and_size_are_what_ray_zips(workdir, submitted, tmp_path, capsys):
    assert _submit(workdir) == 0
    uploaded = _ray_zip(submitted[0]["runtime_env"], tmp_path)
    count, size = len(uploaded), sum(uploaded.values())
    assert count == len(CODE) + 2
    assert (f"mmvq submit: uploading {count} files, {size} bytes ({size / 2**20:.1f} MiB) "
            f"from {workdir} as the job's working directory") in capsys.readouterr().out


def test_exclude_leaves_out_more_and_cannot_re_include(workdir, submitted, tmp_path, capsys):
    assert _submit(workdir, "--exclude", "tests/", "--exclude", "*.md") == 0
    uploaded = _ray_zip(submitted[0]["runtime_env"], tmp_path)
    assert set(uploaded) == set(CODE) - {"tests/test_x.py", "README.md"} | {".gitignore"}
    assert f"uploading {len(uploaded)} files, {sum(uploaded.values())} bytes" in (
        capsys.readouterr().out)

    assert _submit(workdir, "--exclude", "!.env") == 2
    assert "--exclude '!.env': a '!' pattern would re-include files" in capsys.readouterr().err
    assert len(submitted) == 1


def test_plan_upload_lists_exactly_what_ray_zips(workdir, tmp_path):
    upload = plan_upload(workdir, working_dir_excludes())
    uploaded = _ray_zip({"working_dir": str(workdir), "excludes": list(upload.excludes)},
                        tmp_path)
    assert dict(upload.files) == uploaded and upload.total_bytes == sum(uploaded.values())
    assert [rel for rel, _ in upload.withheld] == ["cloud/", "deploy_key", "gcp-sa.json",
                                                    "notes.txt"]


def test_the_repository_ships_its_code_without_its_virtualenv():
    files = dict(plan_upload(REPO, working_dir_excludes()).files)
    assert "workflows/submit.py" in files and "workflows/demo.yaml" in files
    assert not [n for n in files if n.startswith((".venv/", ".git/", "runs/"))]


def test_secret_patterns_cover_the_documented_names():
    for pattern in (".env*", "*.pem", "*.key", "basic_auth.ini", "*.db", ".mlflow*", ".aws/",
                    "credentials"):
        assert pattern in SECRET_EXCLUDES
