"""The documentation (mkdocs.yml, docs/, README.md) against the code, without Ray.

- The site builds with `mkdocs build --strict`: a broken internal link or anchor is a warning
  (mkdocs.yml, `validation:`), and --strict fails on any warning.
- The generated references cover the schema (every leaf key, with type, default and bounds) and
  the command line (every subcommand and option).
- What the pages tell you to type exists: every `docrl ...` line of a ```bash block is accepted by
  the real argparse parser and its --config file plus KEY=VALUE overrides load through the real
  config loader; every dotted config key named in backticks is a key of the schema; every ```yaml
  block made of config sections validates; every `make X` is a target of the Makefile.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
sys.path.insert(0, str(DOCS))
import reference_gen  # noqa: E402  (docs/reference_gen.py: the generator the MkDocs hook uses)

from cluster.config import ConfigError, DocRLConfig, load_config  # noqa: E402


def pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md")) + [ROOT / "README.md"]


def _name(page: Path) -> str:
    return str(page.relative_to(ROOT))


# ---------------------------------------------------------------------------------------------
# Markdown pieces


_FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w-]*)[ \t]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
                    re.MULTILINE | re.DOTALL)


def code_blocks(text: str, lang: str | None = None) -> list[str]:
    """The bodies of fenced code blocks (of one language), their indentation removed."""
    out = []
    for m in _FENCE.finditer(text):
        if lang is None or m["lang"] == lang:
            indent = len(m["indent"])
            out.append("\n".join(line[indent:] for line in m["body"].split("\n")))
    return out


def code_spans(text: str) -> list[str]:
    """Inline code outside fenced blocks (a span may wrap over a line break)."""
    prose = _FENCE.sub("", text)
    return [m[2].replace("\n", " ") for m in re.finditer(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", prose, re.DOTALL)]


# ---------------------------------------------------------------------------------------------
# The site builds, strictly


def test_site_builds_with_strict_link_and_anchor_checks(tmp_path):
    mkdocs = Path(sys.executable).parent / "mkdocs"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([str(mkdocs), "build", "--strict", "-d", str(tmp_path / "site")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout}\n{done.stderr}"
    site = tmp_path / "site"
    # the hook ran: the references are generated, RESULTS.md is carried
    assert 'id="trainer.total_steps"' in (site / "reference" / "config" / "index.html").read_text()
    assert "docrl feedback export" in (site / "reference" / "cli" / "index.html").read_text()
    assert (site / "benchmarks" / "RESULTS" / "index.html").exists()


# ---------------------------------------------------------------------------------------------
# The generated references


def _leaves(model, prefix=""):
    for name, info in model.model_fields.items():
        path = f"{prefix}.{name}" if prefix else name
        sub = reference_gen._section_type(info.annotation)
        if sub is not None:
            yield from _leaves(sub, path)
        else:
            yield path


def _row(markdown: str, key: str) -> list[str]:
    (line,) = [line for line in markdown.split("\n") if f"`{key}` |" in line]
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]]


def test_config_reference_lists_every_leaf_key():
    markdown = reference_gen.config_reference_markdown()
    keys = list(_leaves(DocRLConfig))
    assert len(keys) > 150
    missing = [k for k in keys if f"`{k}`" not in markdown]
    assert not missing, f"keys missing from the generated config reference: {missing}"
    assert sorted(reference_gen.leaf_keys()) == sorted(keys)


def test_config_reference_rows_carry_type_default_bounds_and_help():
    markdown = reference_gen.config_reference_markdown()
    _, kind, default, bounds, _ = _row(markdown, "trainer.total_steps")
    assert (kind, default, bounds) == ("integer", "`10`", "&gt;= 0")
    _, kind, default, bounds, _ = _row(markdown, "ray.placement_strategy")
    assert kind == "string" and default == '`"PACK"`'
    assert bounds == 'one of `"PACK"`, `"SPREAD"`, `"STRICT_PACK"`, `"STRICT_SPREAD"`'
    # defaults are a default config's, not the section class's: evaluation samples greedily
    assert _row(markdown, "rollout.eval_sampling.temperature")[2] == "`0.0`"
    assert _row(markdown, "rollout.sampling.temperature")[2] == "`1.0`"
    assert _row(markdown, "rollout.sampling.temperature")[3] == "&gt;= 0.0, &lt;= 2.0"
    # help text from the source: a trailing comment, and the comment lines above a field
    assert "where &quot;tiny&quot; models are built" in _row(markdown, "run.models_dir")[4] or \
        'where "tiny" models are built' in _row(markdown, "run.models_dir")[4]
    assert _row(markdown, "trainer.init_from")[4].startswith("Where training starts: a run checkpoint")
    # a section's docstring, and a section that is null by default
    assert "Supervised warm start before RL" in markdown
    assert "`serve.ingress.autoscaling.max_replicas`" in markdown


def test_cli_reference_lists_every_command_and_option():
    markdown = reference_gen.cli_reference_markdown()
    parser = reference_gen.build_parser()
    commands = list(reference_gen.subcommands(parser))
    words = [w for w, _, _ in commands]
    for expected in ("docrl train", "docrl serve", "docrl index", "docrl feedback export", "docrl feedback migrate"):
        assert expected in words
    for w, _, p in commands:
        assert f"`{w}` {{#{w.replace(' ', '-')}}}" in markdown
        for action in p._actions:
            for option in [] if action.dest == "help" else action.option_strings:
                assert option in markdown, f"{w}: {option} missing from the CLI reference"


# ---------------------------------------------------------------------------------------------
# Config keys named in the pages


SECTIONS = list(DocRLConfig.model_fields)
_KEY = re.compile(rf"(?<![\w./$-])(?:{'|'.join(SECTIONS)})(?:\.[A-Za-z_]\w*)+")
_FILE_SUFFIXES = {"py", "json", "jsonl", "yaml", "yml", "md", "png", "db", "txt", "html", "js", "css", "sh", "toml"}


def _python_module(package: str, name: str) -> bool:
    """Whether `package.name` is a Python module (`reward.group`, `ray.util`), found without importing."""
    spec = importlib.util.find_spec(package)
    return bool(spec and spec.submodule_search_locations and any(
        (Path(d) / f"{name}.py").exists() or (Path(d) / name).is_dir() for d in spec.submodule_search_locations))


def config_key_problem(token: str) -> str | None:
    """None when `token` names a config key or section (or is a Python module path or a file
    name that only looks like one); else what is wrong with it."""
    parts = token.split(".")
    model = DocRLConfig
    for i, part in enumerate(parts):
        if model is None:  # inside a mapping or list value: its own keys are not the schema's
            return None
        info = model.model_fields.get(part)
        if info is None:
            if i == 1 and _python_module(parts[0], part):
                return None
            if i == len(parts) - 1 and part in _FILE_SUFFIXES and len(parts) == 2:
                return None
            return f"{'.'.join(parts[:i]) or 'the config'} has no key {part!r}"
        sub = reference_gen._section_type(info.annotation)
        if sub is not None:
            model = sub
        elif reference_gen._list_item_section(info.annotation) or "dict" in str(info.annotation):
            model = None
        elif i < len(parts) - 1:
            return f"{'.'.join(parts[:i + 1])} is a value, not a section"
    return None


def test_config_keys_named_in_the_pages_exist():
    problems, seen = [], 0
    for page in pages():
        for span in code_spans(page.read_text()):
            for m in _KEY.finditer(span):
                token = m[0]
                if span[m.start() - 1:m.start()] == '"' == span[m.end():m.end() + 1]:
                    continue  # a JSON string such as "feedback.timeline" (an object type), not a key
                seen += 1
                problem = config_key_problem(token)
                if problem:
                    problems.append(f"{_name(page)}: `{span}`: {problem}")
    assert seen > 100  # the pattern finds the keys the pages name
    assert not problems, "\n".join(problems)


def test_config_key_check_tells_keys_from_other_dotted_names():
    assert config_key_problem("rollout.max_image_pixels") is None
    assert config_key_problem("trainer.warm_start") is None  # a section
    assert config_key_problem("reward.components.user") is None  # a key inside a mapping value
    assert config_key_problem("reward.group") is None  # reward/group.py
    assert config_key_problem("ray.util.metrics") is None  # Ray's module
    assert "no key 'totl_steps'" in config_key_problem("trainer.totl_steps")
    assert "is a value" in config_key_problem("trainer.total_steps.x")
    assert _KEY.findall("trainer.init_from=runs/x <run.output_dir>/index runs/tiny/feedback/feedback.db") == \
        ["trainer.init_from", "run.output_dir"]


def test_yaml_blocks_of_config_sections_load(tmp_path):
    checked = 0
    for page in pages():
        for i, block in enumerate(code_blocks(page.read_text(), "yaml")):
            import yaml

            tree = yaml.safe_load(block)
            if not (isinstance(tree, dict) and tree and set(tree) <= set(SECTIONS)):
                continue
            path = tmp_path / f"{page.stem}-{i}.yaml"
            path.write_text(block)
            try:
                load_config(path)
            except ConfigError as e:
                pytest.fail(f"{_name(page)}: a yaml block does not load:\n{block}\n{e}")
            checked += 1
    assert checked >= 2


# ---------------------------------------------------------------------------------------------
# `docrl` commands in ```bash blocks


def _placeholders(line: str, tmp: Path) -> str:
    line = re.sub(r"\[((?:--?|[\w.]+=)[^\[\]]*)\]", r"\1", line)  # [--index DIR], [serve.port=8000]: optional parts
    return line.replace("$PWD", str(ROOT))


_WORDS = {"C": "configs/tiny.yaml", "X": "configs/tiny.yaml", "OUT": "OUT_DIR", "DIR": "SOME_DIR"}


def docrl_commands(page: Path, tmp: Path) -> list[tuple[str, list[str]]]:
    """(the line as written, argv after `docrl`) of every docrl command in the page's bash blocks:
    continuations joined, comments and shell operators dropped, placeholders filled in."""
    out = []
    for block in code_blocks(page.read_text(), "bash"):
        for line in block.replace("\\\n", "").split("\n"):
            if not re.search(r"\bdocrl\b|cluster\.cli", line.split("#")[0]):
                continue
            lexer = shlex.shlex(_placeholders(line, tmp), posix=True, punctuation_chars=True)
            lexer.whitespace_split, lexer.commenters = True, "#"
            tokens, command = list(lexer), []
            commands = [command]
            for token in tokens:
                if token in ("&&", "||", ";", "|", "&"):
                    commands.append(command := [])
                else:
                    command.append(token)
            for words in commands:
                for i, word in enumerate(words):
                    if word == "docrl" or word.endswith("/docrl"):
                        start = i + 1
                    elif words[i:i + 2] == ["-m", "cluster.cli"]:
                        start = i + 2
                    else:
                        continue
                    out.append((line.strip(), [_WORDS.get(w, w) for w in words[start:]]))
                    break
    return out


def docrl_command_problem(argv: list[str]) -> str | None:
    """None when the real parser accepts `argv` and its config and overrides load. The
    KEY=VALUE handling is `cluster.cli.main`'s: overrides may follow options."""
    parser = reference_gen.build_parser()
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            args, rest = parser.parse_known_args(argv)
        except SystemExit:
            return f"the docrl parser refuses it: {err.getvalue().strip().splitlines()[-1]}"
    extra = [r for r in rest if "=" in r and not r.startswith("-")]
    if len(extra) != len(rest) or (extra and not hasattr(args, "overrides")):
        return f"unrecognized arguments: {' '.join(r for r in rest if r not in extra) or ' '.join(extra)}"
    if hasattr(args, "config"):
        try:
            load_config(args.config, list(args.overrides) + extra)
        except ConfigError as e:
            return f"its config does not load: {e}"
    return None


def test_docrl_commands_in_bash_blocks_parse_and_load(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # config paths are written from the repository root
    problems, found = [], []
    for page in pages():
        for line, argv in docrl_commands(page, tmp_path):
            found.append(argv[0] if argv else "")
            problem = docrl_command_problem(argv)
            if problem:
                problems.append(f"{_name(page)}: {line}\n    {problem}")
    assert not problems, "\n".join(problems)
    # the pages show the main commands (a broken extraction would find nothing)
    assert {"train", "serve", "index", "feedback", "search", "retrieval-eval", "config"} <= set(found)


def test_docrl_command_check_refuses_what_would_not_run():
    assert docrl_command_problem(["train", "--config", "configs/tiny.yaml", "trainer.total_steps=20"]) is None
    assert "refuses" in docrl_command_problem(["trian", "--config", "configs/tiny.yaml"])
    assert "unrecognized" in docrl_command_problem(["serve", "--config", "configs/tiny.yaml", "--chekpoint", "x"])
    assert "unknown key" in docrl_command_problem(["train", "--config", "configs/tiny.yaml", "trainer.totl_steps=3"])
    assert "does not load" in docrl_command_problem(["train", "--config", "configs/tiny.yaml", "rollout.sampling.n=0"])
    assert "not found" in docrl_command_problem(["train", "--config", "configs/nope.yaml"])


# ---------------------------------------------------------------------------------------------
# `make` targets


def makefile_targets() -> set[str]:
    targets = set()
    for line in (ROOT / "Makefile").read_text().split("\n"):
        m = re.match(r"^([A-Za-z0-9_.-]+(?:[ \t]+[A-Za-z0-9_.-]+)*)[ \t]*:(?!=)", line)
        if m:
            targets.update(m[1].split())
    return targets - {".PHONY"}


def test_make_targets_named_in_the_pages_exist():
    targets, problems, seen = makefile_targets(), [], set()
    assert {"setup", "demo", "test"} <= targets
    for page in pages():
        text = page.read_text()
        for code in code_spans(text) + code_blocks(text):
            for m in re.finditer(r"(?:^|[\s;&|(])make[ \t]+(?:[A-Z_]+=\S*[ \t]+)*([a-z][\w-]*)", code, re.MULTILINE):
                seen.add(m[1])
                if m[1] not in targets:
                    problems.append(f"{_name(page)}: `{code.strip()[:80]}`: no Makefile target {m[1]!r}")
    assert {"demo", "test"} <= seen
    assert not problems, "\n".join(problems)
