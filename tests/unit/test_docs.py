"""The docs do not rot: README.md and docs/*.md link only to what is in the repository, and every command they
show still runs as written, checked through the CLI's own parser in this process.

What "composes" means here: the command line parses (its subcommand and options exist, through the click
command's `make_context`), and its Hydra overrides compose into a config that passes the config checks
(`rredcot config show OVERRIDES`, exit status 0). Training, evaluation and comparison themselves are the
integration tests' business. Only `rredcot.cli` is imported: the package behind it may change its layout.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from rredcot.cli import app

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
DOCS = REPO / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
README_MAX_LINES = 250
# The docs' plug-in example lives here as a user would keep it: pairsum.py beside conf/task/pairsum.yaml.
PLUGIN_DIR = REPO / "tests" / "assets" / "plugin"
SHELL_LANGS = {"", "bash", "sh", "shell", "console"}

# What a placeholder in a shown command stands for (the docs' own notation), and what is put in its place:
# anything that composes. None drops the token.
PLACEHOLDERS = {
    "[OVERRIDES...]": None,  # "any overrides": none is one choice
    "...": None,  # "and so on"
    "[...]": "[]",  # a list left open (plugins=[...]): the empty list
    "RUN": "runs/example",  # a run directory made by `rredcot train`
    "RUN_DIR": "runs/example",
    "RUN_DIR_OR_CHECKPOINT": "runs/example/checkpoints/step_000150",
    "DIR_A": "runs/example_a",
    "DIR_B": "runs/example_b",
}
# Commands shown in the docs that cannot compose offline, each with its reason (the whole line, as shown).
# Empty today: `resume=true run_dir=...`, `checkpoint=RUN`, `rollout=vllm` and local model/data paths all
# compose without the run, the GPU or the files, because composing reads none of them.
ALLOWED: dict[str, str] = {}


# ---------------------------------------------------------------------------------------------- markdown


def _outside_fences(text: str):
    """(line number, line) of the prose: fenced code blocks left out."""
    fenced = False
    for n, line in enumerate(text.split("\n"), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            yield n, line


def code_blocks(text: str):
    """(language, line number of its first line, lines) of every fenced code block."""
    lang, start, lines = None, 0, []
    for n, line in enumerate(text.split("\n"), 1):
        fence = re.match(r"\s*```\s*([\w+-]*)", line)
        if fence and lang is None:
            lang, start, lines = fence.group(1).lower(), n + 1, []
        elif fence:
            yield lang, start, lines
            lang = None
        elif lang is not None:
            lines.append(line)


LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def links(page: Path) -> list[tuple[int, str]]:
    """(line number, target) of every markdown link and image in the prose (not in code spans or blocks)."""
    found = []
    for n, line in _outside_fences(page.read_text()):
        line = re.sub(r"(`+).*?\1", "", line)  # code spans are shown, not linked
        found += [(n, m.group(1)) for m in LINK.finditer(line)]
        found += [(n, m.group(1)) for m in re.finditer(r"<(https?://[^>\s]+)>", line)]
    return found


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text lowercased, punctuation dropped, spaces -> hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@cache
def anchors(page: Path) -> frozenset[str]:
    """The anchors GitHub gives the headings of `page` (a repeated heading gets -1, -2, ...)."""
    seen: dict[str, int] = {}
    out = set()
    for _, line in _outside_fences(page.read_text()):
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            s = slug(m.group(1))
            out.add(s if s not in seen else f"{s}-{seen[s]}")
            seen[s] = seen.get(s, 0) + 1
    return frozenset(out)


def _page_id(page: Path) -> str:
    return str(page.relative_to(REPO))


# ------------------------------------------------------------------------------------------------- links


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_every_link_in_the_docs_opens_a_file_of_the_repository_at_a_heading_it_has(page):
    broken = []
    for n, target in links(page):
        if re.match(r"(https?|mailto):", target):
            continue
        path, _, anchor = target.partition("#")
        if path.startswith("/") or re.match(r"\w+:", path):
            broken.append(f"{page.name}:{n}: {target} is absolute; link relative to {page.name}")
            continue
        dest = (page.parent / path).resolve() if path else page
        if not dest.is_relative_to(REPO):
            broken.append(f"{page.name}:{n}: {target} leaves the repository")
        elif not dest.exists():
            broken.append(f"{page.name}:{n}: {target}: no such file ({dest.relative_to(REPO)})")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
            broken.append(
                f"{page.name}:{n}: {target}: {dest.name} has no heading with the anchor #{anchor} "
                f"(its anchors: {', '.join(sorted(anchors(dest))) if dest.suffix == '.md' else 'none'})"
            )
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_no_link_points_at_the_shared_folder(page):
    text = page.read_text()
    assert "../shared" not in text, f"{page.name} names ../shared: it is not part of the repository"
    bad = [
        f"{page.name}:{n}: {t}"
        for n, t in links(page)
        if "../shared" in t or re.search(r"(^|/)shared(/|$|#)", re.sub(r"^https?://[^/]+", "", t))
    ]
    assert not bad, "links into the shared folder (not part of the repository):\n" + "\n".join(bad)


def test_the_readme_is_a_short_front_door_that_links_every_docs_page():
    text = README.read_text()
    assert len(text.splitlines()) <= README_MAX_LINES, (
        f"README.md has {len(text.splitlines())} lines; move detail into docs/"
    )
    linked = {(README.parent / t.partition("#")[0]).resolve() for _, t in links(README)}
    missing = [p.name for p in DOCS.glob("*.md") if p.resolve() not in linked]
    assert not missing, f"README.md links no docs page {missing}: a page the README does not link is not found"


@pytest.mark.parametrize("page", sorted(DOCS.glob("*.md")), ids=_page_id)
def test_every_docs_page_links_back_to_the_readme(page):
    assert any((page.parent / t.partition("#")[0]).resolve() == README for _, t in links(page)), page.name


# ---------------------------------------------------------------------------------------- shown commands


def shell_lines(page: Path):
    """(line number, command line) in the shell blocks of `page`, `\\` continuations joined."""
    for lang, start, lines in code_blocks(page.read_text()):
        if lang not in SHELL_LANGS:
            continue
        joined, first = "", None
        for n, line in enumerate(lines, start):
            first = n if first is None else first
            if line.rstrip().endswith("\\"):
                joined += line.rstrip()[:-1] + " "
                continue
            yield first, joined + line
            joined, first = "", None


def segments(line: str) -> list[list[str]]:
    """The simple commands of a shell line (split at && ; |), comments dropped, leading VAR=value dropped."""
    lex = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lex.whitespace_split, lex.commenters = True, "#"
    out: list[list[str]] = [[]]
    for tok in lex:
        if set(tok) <= set(";&|"):
            out.append([])
        else:
            out[-1].append(tok)
    for seg in out:
        while seg and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", seg[0]):
            seg.pop(0)
    return [seg for seg in out if seg]


def rredcot_argv(seg: list[str]) -> list[str] | None:
    """The arguments after `rredcot` in a simple command: `rredcot ...`, `.venv/bin/rredcot ...`, or a
    launcher running `-m rredcot ...` (python, torchrun, accelerate launch); None for anything else."""
    if Path(seg[0]).name == "rredcot":
        return seg[1:]
    for i, tok in enumerate(seg[:-1]):
        if tok == "-m":
            return seg[i + 2 :] if seg[i + 1] == "rredcot" else None
    return None


def substitute(argv: list[str]) -> list[str]:
    """The placeholders replaced by what composes (PLACEHOLDERS); `[X]` (an optional X) becomes X."""
    out = []
    for tok in argv:
        if re.fullmatch(r"\[[^\[\]]*=.*\]", tok) and tok != "[...]":
            tok = tok[1:-1]
        key, eq, value = tok.rpartition("=")
        if tok in PLACEHOLDERS:
            tok = PLACEHOLDERS[tok]
        elif eq and value in PLACEHOLDERS and PLACEHOLDERS[value] is not None:
            tok = f"{key}={PLACEHOLDERS[value]}"
        if tok is not None:
            out.append(tok)
    return out


def collect():
    """Every checked command of the docs: (id, the line as shown, kind, argv)."""
    found = []
    for page in PAGES:
        for n, line in shell_lines(page):
            try:
                segs = segments(line)
            except ValueError as e:
                if "rredcot" in line or "scripts/" in line:
                    found.append((f"{_page_id(page)}:{n}", line.strip(), "untokenizable", [str(e)]))
                continue
            for seg in segs:
                argv = rredcot_argv(seg)
                script = next((t for t in seg[:5] if t.startswith("scripts/")), None)
                if argv is not None:
                    found.append((f"{_page_id(page)}:{n}", line.strip(), "rredcot", substitute(argv)))
                elif script and (Path(script).name in ("sweep.py", "seeds.py") or script.endswith(".sbatch")):
                    found.append(
                        (
                            f"{_page_id(page)}:{n}",
                            line.strip(),
                            Path(script).name,
                            substitute(seg[seg.index(script) + 1 :]),
                        )
                    )
    return found


COMMANDS = collect()
ROOT = typer.main.get_command(app)


def _usage_errors() -> tuple[type[Exception], ...]:
    """Click's UsageError: typer's own copy of click (typer >= 0.2x vendors it) and/or click itself."""
    import importlib

    found = []
    for module in ("typer._click.exceptions", "click.exceptions"):
        try:
            found.append(importlib.import_module(module).UsageError)
        except (ImportError, AttributeError):
            pass
    return tuple(found)


USAGE_ERRORS = _usage_errors()


class ParseError(Exception):
    """The command line does not parse: an unknown subcommand or option, or a missing value."""


def parse(argv: list[str]) -> tuple[str, dict]:
    """Parse `rredcot ARGV` with the CLI's own click commands (`make_context`, nothing runs): the command's
    path (`train`, `config show`, ...) and its parsed parameters; ParseError when it does not parse."""
    cmd, ctx, path, args = ROOT, None, [], list(argv)
    try:
        while hasattr(cmd, "list_commands"):  # a group: the next word names its subcommand
            ctx = cmd.context_class(cmd, info_name=" ".join(["rredcot", *path]), parent=ctx)
            if not args:
                raise ParseError(f"`rredcot {' '.join(path)}` needs a subcommand")
            name, args = args[0], args[1:]
            sub = cmd.get_command(ctx, name)
            if sub is None:
                raise ParseError(f"no such command {name!r} (commands: {', '.join(cmd.list_commands(ctx))})")
            cmd, path = sub, [*path, name]
        ctx = cmd.make_context(" ".join(path), args, parent=ctx)
    except USAGE_ERRORS as e:
        raise ParseError(e.format_message()) from None
    return " ".join(path), ctx.params


def invocation(argv: list[str]) -> list[str]:
    """What shows that `rredcot ARGV` composes: `config show` and `list` run as shown (they only compose);
    train / eval / credit / compare parse, and their overrides go through `config show`."""
    command, params = parse(argv)
    if command in ("config show", "list"):
        return argv
    if command == "compare" and params["runs"]:
        return []  # run directories, not overrides: parsing was the check
    return ["config", "show", *(params.get("overrides") or params.get("args") or [])]


def needs_plugin(argv: list[str]) -> bool:
    """A plug-in is imported into the registries for good, so those lines run in a process of their own."""
    return any(t.startswith("plugins=") and t != "plugins=[]" for t in argv)


@cache
def composes(argv: tuple[str, ...]) -> tuple[int, str]:
    """(exit status, output) of `rredcot ARGV` through the CLI app, in this process."""
    old = Path.cwd()
    os.chdir(REPO)
    try:
        result = CliRunner().invoke(app, list(argv))
    finally:
        os.chdir(old)
    return result.exit_code, result.output[-3000:] + (f"\n{result.exception!r}" if result.exception else "")


_CHILD = """
import json, sys
from typer.testing import CliRunner
from rredcot.cli import app
out = []
for argv in json.loads(sys.argv[1]):
    r = CliRunner().invoke(app, argv)
    out.append([r.exit_code, r.output[-3000:] + ("\\n" + repr(r.exception) if r.exception else "")])
print("@@" + json.dumps(out))
"""


def _plugin_invocations() -> list[list[str]]:
    wanted = []
    for *_, kind, argv in COMMANDS:
        try:
            inv = invocation(argv) if kind == "rredcot" else None
        except ParseError:
            continue
        if inv and needs_plugin(inv) and inv not in wanted:
            wanted.append(inv)
    return wanted


_child: dict = {}


def _start_plugin_child() -> None:
    """Start the plug-in lines' process (once), so that it runs while this process composes the others."""
    if "proc" in _child or not (wanted := _plugin_invocations()):
        return
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), COLUMNS="200")
    _child.update(
        wanted=wanted,
        proc=subprocess.Popen(
            [sys.executable, "-c", _CHILD, json.dumps(wanted)],
            cwd=PLUGIN_DIR,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ),
    )


@pytest.fixture(scope="module", autouse=True)
def _plugin_child():
    _start_plugin_child()
    yield
    if "proc" in _child and _child["proc"].poll() is None:  # only part of the module ran
        _child["proc"].kill()
        _child["proc"].communicate()


@cache
def plugin_results() -> dict[tuple[str, ...], tuple[int, str]]:
    """Every plug-in line's invocation, run in one fresh process from the plug-in's directory (as the docs
    say: `plugins=[pairsum.py] 'hydra.searchpath=[file://conf]'` beside pairsum.py and conf/)."""
    _start_plugin_child()
    if "proc" not in _child:
        return {}
    stdout, stderr = _child["proc"].communicate(timeout=300)
    assert "@@" in stdout, f"the plug-in check process failed:\n{stdout[-3000:]}\n{stderr[-3000:]}"
    results = json.loads(stdout.rsplit("@@", 1)[1])
    return {tuple(inv): tuple(r) for inv, r in zip(_child["wanted"], results)}


def check_composes(argv: list[str], where: str, line: str) -> None:
    if not argv:
        return
    code, out = plugin_results()[tuple(argv)] if needs_plugin(argv) else composes(tuple(argv))
    assert code == 0, f"{where}: `{line}` does not compose: `rredcot {shlex.join(argv)}` exited {code}\n{out}"


@pytest.mark.parametrize(
    "where,line,kind,argv",
    [c for c in COMMANDS if c[2] == "rredcot"],
    ids=[c[0] for c in COMMANDS if c[2] == "rredcot"],
)
def test_every_rredcot_command_shown_in_the_docs_composes(where, line, kind, argv):
    if line in ALLOWED:
        pytest.skip(ALLOWED[line])
    try:
        inv = invocation(argv)
    except ParseError as e:
        pytest.fail(f"{where}: `{line}` does not parse: {e}")
    check_composes(inv, where, line)


def sweep_runs(argv: list[str]) -> list[list[str]]:
    """scripts/sweep.py: each `--variant NAME OVERRIDES...`'s overrides, then everything after `--`."""
    shared = argv[argv.index("--") + 1 :] if "--" in argv else []
    head = argv[: argv.index("--")] if "--" in argv else argv
    variants, i = [], 0
    while i < len(head):
        if head[i] == "--variant":
            j = i + 2
            while j < len(head) and not head[j].startswith("--"):
                j += 1
            variants.append(head[i + 2 : j])
            i = j
        else:
            i += 1
    assert variants, "a sweep needs at least one --variant NAME [OVERRIDES...]"
    return [[*v, *shared] for v in variants]


def seeds_overrides(argv: list[str]) -> list[str]:
    """scripts/seeds.py: the overrides, once --seeds INT... and --out DIR are taken out. argparse's
    `--seeds` takes every word after it, so an override placed right after the seeds would be read as one."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--out":
            i += 2
        elif argv[i] == "--seeds":
            i += 1
            while i < len(argv) and not argv[i].startswith("--"):
                assert re.fullmatch(r"-?\d+", argv[i]), (
                    f"--seeds would swallow {argv[i]!r}: put overrides before --seeds"
                )
                i += 1
        else:
            out.append(argv[i])
            i += 1
    return out


def slurm_overrides(argv: list[str]) -> list[str]:
    """scripts/slurm/*.sbatch [--dry-run] RUN_DIR [OVERRIDES...]: the overrides."""
    argv = argv[1:] if argv[:1] == ["--dry-run"] else argv
    assert argv and "=" not in argv[0], "the SLURM scripts take RUN_DIR before the overrides"
    return argv[1:]


SCRIPTED = [c for c in COMMANDS if c[2] not in ("rredcot",)]


@pytest.mark.parametrize("where,line,kind,argv", SCRIPTED, ids=[c[0] for c in SCRIPTED])
def test_every_sweep_seeds_and_slurm_command_in_the_docs_passes_overrides_that_compose(where, line, kind, argv):
    assert kind != "untokenizable", f"{where}: `{line}` is not a shell command line: {argv[0]}"
    if line in ALLOWED:
        pytest.skip(ALLOWED[line])
    runs = (
        sweep_runs(argv)
        if kind == "sweep.py"
        else [seeds_overrides(argv) if kind == "seeds.py" else slurm_overrides(argv)]
    )
    for overrides in runs:
        check_composes(["config", "show", *overrides], where, line)


def test_every_repository_file_a_shown_command_names_exists():
    missing = []
    for page in PAGES:
        for n, line in shell_lines(page):
            try:
                segs = segments(line)
            except ValueError:
                continue
            for tok in (t.partition("=")[2] if re.match(r"[A-Z_]+=", t) else t for seg in segs for t in seg):
                if re.fullmatch(r"(conf|scripts|tests|docs|rredcot)/[\w./-]+", tok) and not (REPO / tok).exists():
                    missing.append(f"{_page_id(page)}:{n}: {tok}")
    assert not missing, "shown commands name files the repository does not have:\n" + "\n".join(missing)


def test_the_docs_show_the_commands_this_test_checks():
    kinds = [c[2] for c in COMMANDS]
    assert kinds.count("rredcot") >= 25 and {"sweep.py", "seeds.py"} <= set(kinds), kinds
    assert all(any(c[1] == line for c in COMMANDS) for line in ALLOWED), "an ALLOWED line is no longer in the docs"


def test_the_command_check_catches_an_unknown_option_an_unknown_key_and_a_bad_placeholder():
    with pytest.raises(ParseError, match="no-such-option"):
        invocation(["compare", "--no-such-option"])
    with pytest.raises(ParseError, match="trian"):
        invocation(["trian", "debug=fast"])
    with pytest.raises(ParseError):
        invocation(["compare", "--seeds"])
    assert invocation(["compare", "--seeds", "5", "algo=grpo"]) == ["config", "show", "algo=grpo"]
    assert invocation(["config", "show", "algo=grpo"]) == ["config", "show", "algo=grpo"]
    assert composes(("config", "show", "no_such.key=1"))[0] != 0
    assert substitute(["credit", "[checkpoint=RUN]", "[OVERRIDES...]"]) == ["credit", "checkpoint=runs/example"]
    assert sweep_runs(["--out", "o", "--variant", "a", "x=1", "--variant", "b", "--", "y=2"]) == [
        ["x=1", "y=2"],
        ["y=2"],
    ]
    assert seeds_overrides(["algo=grpo", "--seeds", "0", "1"]) == ["algo=grpo"]
    with pytest.raises(AssertionError, match="swallow"):
        seeds_overrides(["--seeds", "0", "1", "algo=grpo"])  # argparse would read algo=grpo as a seed and stop


def test_anchors_are_the_ones_github_gives_headings():
    assert slug("See the credit: `rredcot credit`") == "see-the-credit-rredcot-credit"
    assert (
        slug("Choosing RREDCoT's settings on dev (hard level, 5 seeds each)")
        == "choosing-rredcots-settings-on-dev-hard-level-5-seeds-each"
    )
    assert slug("Your own task and verifier (plug-ins)") == "your-own-task-and-verifier-plug-ins"
    assert slug("GRPO conventions (same numbers as TRL)") == "grpo-conventions-same-numbers-as-trl"
    assert sum(len(links(p)) for p in PAGES) >= 40, "the link check found almost no links"
