"""The GitHub Pages workflow (.github/workflows/book.yml) publishes the book that CI builds: the same
`jupyter-book build` command as .ci/run (and the README), the HTML directory that command writes, and a
deploy job that waits for the build."""
import pathlib
import re

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / ".github" / "workflows" / "book.yml"
CI_SCRIPT = ROOT / ".ci" / "run"
README = ROOT / "README.md"


def build_commands(shell: str) -> list[str]:
    """Every `jupyter-book build ...` command in shell text, whitespace-normalized. Comment lines are
    skipped, continuation lines joined, and a line is split at `&&`, `||` and `;`, so that the build in
    `pip install ... && jupyter-book build .` is found too."""
    shell = re.sub(r"\\\n", " ", shell)
    commands = []
    for line in shell.splitlines():
        if line.lstrip().startswith("#"):
            continue
        for part in re.split(r"&&|\|\||;", line):
            words = part.split()
            if words[:2] == ["jupyter-book", "build"]:
                commands.append(" ".join(words))
    return commands


def the_build_command(shell: str, where: str) -> str:
    commands = build_commands(shell)
    assert len(commands) == 1, f"{where}: expected one `jupyter-book build` command, found {commands}"
    return commands[0]


@pytest.fixture(scope="module")
def workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text(encoding="utf-8"))


def steps(workflow: dict, job: str) -> list[dict]:
    return workflow["jobs"][job]["steps"]


def workflow_shell(workflow: dict) -> str:
    return "\n".join(s["run"] for job in workflow["jobs"] for s in steps(workflow, job) if "run" in s)


def test_build_command_extraction():
    script = ("set -e\n# jupyter-book build . (a comment)\n"
              "pip install -e . && jupyter-book  build .  -W \\\n  --keep-going\n")
    assert build_commands(script) == ["jupyter-book build . -W --keep-going"]
    # a difference in the options is a difference
    other = "jupyter-book build . -W\n"
    assert the_build_command(script, "a") != the_build_command(other, "b")
    assert build_commands("echo jupyter-book build .\n") == []
    with pytest.raises(AssertionError, match="expected one"):
        the_build_command(script + other, "both")


def test_workflow_builds_the_book_as_ci_does(workflow):
    ci = the_build_command(CI_SCRIPT.read_text(encoding="utf-8"), ".ci/run")
    assert the_build_command(workflow_shell(workflow), WORKFLOW.name) == ci


def test_readme_builds_the_book_as_ci_does():
    ci = the_build_command(CI_SCRIPT.read_text(encoding="utf-8"), ".ci/run")
    assert set(build_commands(README.read_text(encoding="utf-8"))) == {ci}


def test_workflow_installs_as_the_readme_does(workflow):
    run = [step["run"].split() for step in steps(workflow, "build") if "run" in step]
    assert "pip install -r requirements.txt && pip install -e .".split() in run


def test_workflow_uploads_the_built_html(workflow):
    build = steps(workflow, "build")
    uploads = [s for s in build if s.get("uses", "").startswith("actions/upload-pages-artifact@")]
    assert len(uploads) == 1
    assert pathlib.PurePosixPath(uploads[0]["with"]["path"]) == pathlib.PurePosixPath("_build/html")
    builds = [i for i, s in enumerate(build) if build_commands(s.get("run", ""))]
    assert builds and builds[0] < build.index(uploads[0]), "the upload must follow the build"


def test_deploy_job_depends_on_build(workflow):
    deploy = workflow["jobs"]["deploy"]
    needs = deploy["needs"]
    assert "build" in ([needs] if isinstance(needs, str) else needs)
    assert any(s.get("uses", "").startswith("actions/deploy-pages@") for s in deploy["steps"])
    assert deploy["environment"]["name"] == "github-pages"


def test_workflow_triggers_and_permissions(workflow):
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads the bare key `on` as True
    assert triggers["push"]["branches"] == ["main"]
    assert "workflow_dispatch" in triggers
    assert workflow["permissions"]["pages"] == "write"
    assert workflow["permissions"]["id-token"] == "write"
