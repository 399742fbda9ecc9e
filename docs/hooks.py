"""MkDocs hooks (`hooks:` in mkdocs.yml).

- The reference pages are generated at build time, so they cannot drift from the code:
  `reference/config.md` from the pydantic schema, `reference/cli.md` from the argparse parsers
  (`reference_gen.py`). Each committed page holds a marker that is replaced; a page without its
  marker fails the build.
- `benchmarks/RESULTS.md` lives beside the benchmarks, outside `docs/`; it is added to the site as
  `benchmarks/RESULTS.md`. The pages link to it by its path in the repository (a link that works on
  GitHub too), and those links are pointed at the site's copy here. Any other link that leaves
  `docs/` is left alone, so MkDocs reports it (and `--strict` fails).
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File

import reference_gen  # beside this file: MkDocs puts this folder on sys.path while it loads a hook

ROOT = reference_gen.ROOT
# files of the repository outside docs/ that the site carries: repository path -> page path in the site
MIRRORED = {"benchmarks/RESULTS.md": "benchmarks/RESULTS.md"}
GENERATED = {
    "reference/config.md": (reference_gen.CONFIG_MARKER, reference_gen.config_reference_markdown),
    "reference/cli.md": (reference_gen.CLI_MARKER, reference_gen.cli_reference_markdown),
}
_LINK = re.compile(r"(\]\()([^)\s#]+)((?:#[^)\s]*)?\))")


def on_files(files, config):
    for repo_path, uri in MIRRORED.items():
        files.append(File.generated(config, uri, abs_src_path=str(ROOT / repo_path)))
    return files


def _relink(markdown: str, page, config) -> str:
    """Relative links are written from where the page's file lies in the repository; point those
    at a mirrored file (or, from a mirrored page, into docs/) at its place in the site."""
    source = Path(page.file.abs_src_path).resolve()
    docs_dir = Path(config["docs_dir"]).resolve()
    here = posixpath.dirname(page.file.src_uri)

    def relink(m: re.Match) -> str:
        target = m[2]
        if "://" in target or target.startswith(("/", "mailto:")):
            return m[0]
        real = (source.parent / target).resolve()
        if real.is_relative_to(docs_dir):
            uri = real.relative_to(docs_dir).as_posix()
        elif real.is_relative_to(ROOT) and real.relative_to(ROOT).as_posix() in MIRRORED:
            uri = MIRRORED[real.relative_to(ROOT).as_posix()]
        else:
            return m[0]
        return m[1] + posixpath.relpath(uri, here or ".") + m[3]

    return _LINK.sub(relink, markdown)


def _code_pipes(markdown: str) -> str:
    """In a table row, GitHub needs `\\|` for a pipe inside a code span; Python-Markdown's tables
    never split inside a code span and would show the backslash: drop it there."""
    def row(line: str) -> str:
        if not line.lstrip().startswith("|"):
            return line
        return re.sub(r"(`+)(.+?)\1", lambda m: m[1] + m[2].replace("\\|", "|") + m[1], line)

    return "\n".join(row(line) for line in markdown.split("\n"))


def on_page_markdown(markdown, page, config, files):
    generated = GENERATED.get(page.file.src_uri)
    if generated is not None:
        marker, make = generated
        if marker not in markdown:
            raise ValueError(f"{page.file.src_uri} must hold the line {marker} (replaced by the generated reference)")
        markdown = markdown.replace(marker, make())
    return _code_pipes(_relink(markdown, page, config))
