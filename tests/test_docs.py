"""The manual stays true: every ```python block of README.md and docs/*.md runs (each page's blocks
in order, in one namespace, in a fresh working directory), every relative link resolves to a file
(and a #fragment to a heading of it), every `noisekernels ...` line of a shell block parses with the
command's own parser, and every `make TARGET` a page names is a target of the Makefile.

A block that cannot run in the tests is fenced ```python no-run REASON; the reason is required."""

import argparse
import glob
import os
import re
import shlex

import pytest

from noisekernels import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ([os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
         + [os.path.join(ROOT, "docs", "audits", "README.md")])
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```\s*$", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _ids(paths):
    return [os.path.relpath(p, ROOT) for p in paths]


def blocks(page):
    """(info string, body) of each fenced block of a page, in order."""
    with open(page) as f:
        text = f.read()
    return [(info.strip(), body) for info, body in FENCE.findall(text)]


def _prose(page):
    """The page without its fenced blocks (links and headings live in the prose)."""
    with open(page) as f:
        return FENCE.sub("", f.read())


def anchor(heading):
    """GitHub's fragment for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page):
    return {anchor(line.lstrip("#")) for line in _prose(page).splitlines() if line.startswith("#")}


def test_pages_exist():
    names = {os.path.basename(p) for p in PAGES[1:]}
    assert {"README.md", "noise-layers.md", "engine.md", "attacks.md", "certification.md", "cli.md",
            "reproduction.md", "benchmarks.md", "backends.md"} <= names


def test_anchor_matches_github():
    assert anchor("Results JSON") == "results-json"
    assert anchor("Loading a trained run: `load_model(run_dir, device=\"cpu\")`") == \
        "loading-a-trained-run-load_modelrun_dir-devicecpu"
    assert anchor("The demo") == "the-demo"


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_python_blocks_run(page, tmp_path, monkeypatch, capsys):
    code = []
    for info, body in blocks(page):
        words = info.split()
        if not words or words[0] != "python":
            continue
        if words[1:2] == ["no-run"]:
            assert len(words) > 2, f"{page}: a ```python no-run block must say why it cannot run"
            continue
        assert len(words) == 1, f"{page}: unknown python fence options {words[1:]}"
        code.append(body)
    if not code:
        pytest.skip("no python blocks")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    for i, body in enumerate(code):
        try:
            exec(compile(body, f"{os.path.relpath(page, ROOT)} block {i + 1}", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"{os.path.relpath(page, ROOT)}, python block {i + 1} failed: "
                                 f"{type(e).__name__}: {e}\n{body}") from e


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_relative_links_resolve(page):
    here = os.path.dirname(page)
    for target in LINK.findall(_prose(page)):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        resolved = os.path.normpath(os.path.join(here, path)) if path else page
        assert os.path.exists(resolved), f"{os.path.relpath(page, ROOT)} links to {target}: no such file"
        if fragment:
            assert resolved.endswith(".md"), f"{target}: a fragment into a file that is not markdown"
            assert fragment in anchors(resolved), \
                f"{os.path.relpath(page, ROOT)} links to {target}: no heading with that fragment"


def command_lines(page):
    """The argument lists of the noisekernels command lines in a page's shell blocks."""
    found = []
    for info, body in blocks(page):
        if info not in ("bash", "sh", "shell"):
            continue
        for line in body.splitlines():
            words = shlex.split(line, comments=True)
            for start in range(len(words)):
                if words[start] == "noisekernels" and (start == 0 or words[start - 1] == "-m"):
                    found.append(words[start + 1:])
                    break
    return found


def make_targets(page):
    with open(page) as f:
        return set(re.findall(r"`make ([a-z][\w-]*)", f.read())) | {
            word for info, body in blocks(page) if info in ("bash", "sh", "shell")
            for word in re.findall(r"^make ([a-z][\w-]*)", body, re.M)}


def strict_parser():
    """cli.parser() with abbreviations refused, so a page must spell every flag out in full."""
    parser = cli.parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                sub.allow_abbrev = False
    return parser


def test_shell_blocks_use_known_commands_and_flags():
    parser = strict_parser()
    checked = 0
    for page in PAGES:
        for argv in command_lines(page):
            try:
                parser.parse_args(argv)
            except SystemExit as e:
                raise AssertionError(f"{os.path.relpath(page, ROOT)}: `noisekernels {shlex.join(argv)}` does "
                                     f"not parse (exit {e.code}): see the usage error above") from None
            checked += 1
    assert checked >= 20  # the CLI and reproduction pages hold that many


def test_parser_check_rejects_misspelt_and_abbreviated_flags(capsys):
    parser = strict_parser()
    parser.parse_args(["attack", "runs/x", "--judge-n", "5"])
    for argv in (["attack", "runs/x", "--judge", "5"], ["attack", "runs/x", "--judge_n", "5"],
                 ["train", "--defense", "nope"], ["evaluate", "runs/x"]):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)


def test_make_targets_exist():
    with open(os.path.join(ROOT, "Makefile")) as f:
        defined = set(re.findall(r"^([a-z][\w-]*):", f.read(), re.M))
    for page in PAGES:
        missing = make_targets(page) - defined
        assert not missing, f"{os.path.relpath(page, ROOT)} names make targets {sorted(missing)} the Makefile lacks"
    assert {"demo", "test"} <= make_targets(PAGES[0])  # the front page's two commands
