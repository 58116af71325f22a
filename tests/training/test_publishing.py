"""metadata.json's provenance: the git commit recorded is the package's own, or none."""

from __future__ import annotations

import subprocess

import pytest

from kwanzaa_adapter.training.publishing import PACKAGE_DIR, git_commit


def git(directory, *args) -> str:
    done = subprocess.run(["git", "-C", str(directory), *args], capture_output=True, text=True, check=True)
    return done.stdout.strip()


def make_repository(directory):
    directory.mkdir(parents=True, exist_ok=True)
    git(directory, "init", "-q")
    (directory / "notes.txt").write_text("another project\n")
    git(directory, "add", "notes.txt")
    git(directory, "-c", "user.email=a@example.com", "-c", "user.name=A", "commit", "-q", "-m", "other")
    return git(directory, "rev-parse", "HEAD")


def test_commit_is_the_packages_not_the_working_directorys(tmp_path, monkeypatch):
    try:
        ours = git(PACKAGE_DIR, "rev-parse", "HEAD")
        git(PACKAGE_DIR, "ls-files", "--error-unmatch", "__init__.py")
    except subprocess.CalledProcessError:
        pytest.skip("the package is not installed from a git checkout")
    other = make_repository(tmp_path / "elsewhere")
    monkeypatch.chdir(tmp_path / "elsewhere")
    recorded = git_commit()
    assert recorded.removesuffix("-dirty") == ours and other not in recorded


def test_package_in_no_repository_records_none(tmp_path):
    package = tmp_path / "site-packages" / "kwanzaa_adapter"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    assert git_commit(package) is None


def test_package_untracked_inside_another_repository_records_none(tmp_path):
    """A virtual environment inside a user's project: the project's commit is not the package's."""
    make_repository(tmp_path / "project")
    package = tmp_path / "project" / ".venv" / "site-packages" / "kwanzaa_adapter"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    assert git_commit(package) is None


def test_uncommitted_change_to_the_package_is_marked_dirty(tmp_path):
    make_repository(tmp_path / "checkout")
    package = tmp_path / "checkout" / "kwanzaa_adapter"
    package.mkdir()
    (package / "__init__.py").write_text("")
    git(tmp_path / "checkout", "add", ".")
    git(tmp_path / "checkout", "-c", "user.email=a@example.com", "-c", "user.name=A", "commit", "-q", "-m", "pkg")
    head = git(package, "rev-parse", "HEAD")
    assert git_commit(package) == head
    (package / "__init__.py").write_text("changed = True\n")
    assert git_commit(package) == f"{head}-dirty"
