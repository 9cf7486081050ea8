"""README.md and docs/*.md: their links resolve, the commands and code they name exist, the README stays short.

Read as text (no markdown library): fenced code blocks and HTML comments are left out where headings and
links are looked for, and inline code spans are masked where links are, so `[--flip]` is no link. Anchors
are GitHub's heading slugs.
"""

from __future__ import annotations

import glob
import os
import re
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, 'README.md')
PAGES = [README] + sorted(glob.glob(os.path.join(ROOT, 'docs', '*.md')))
MAX_README_LINES = 200
QUICK_START = ['make demo', 'make test']

FENCE = re.compile(r'^```.*?^```[ \t]*$', re.M | re.S)
COMMENT = re.compile(r'<!--.*?-->', re.S)
INLINE_CODE = re.compile(r'`[^`\n]*`')
LINK = re.compile(r'!?\[([^\]]*)\]\(([^)\s]+)\)')
HEADING = re.compile(r'^(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$', re.M)
EXTERNAL = ('http://', 'https://', 'mailto:')


def _read(path: str) -> str:
  with open(path, encoding='utf-8') as f:
    return f.read()


def _prose(text: str) -> str:
  """The text without fenced code blocks and HTML comments (what GitHub renders as headings and links)."""
  return FENCE.sub('', COMMENT.sub('', text))


def slug(heading: str) -> str:
  """GitHub's anchor for a heading: its text without markup, lower case, punctuation dropped, spaces -> '-'."""
  text = re.sub(r'\[([^\]]*)\]\([^)]*\)', r'\1', heading)  # a link's text
  text = text.replace('`', '').replace('*', '').strip().lower()
  return re.sub(r'[^\w\- ]', '', text).replace(' ', '-')


def anchors(path: str) -> set[str]:
  """Every heading anchor of a markdown file (repeated headings get -1, -2, ... as on GitHub)."""
  seen: dict[str, int] = {}
  out = set()
  for _, heading in HEADING.findall(_prose(_read(path))):
    base = slug(heading)
    n = seen.get(base, 0)
    seen[base] = n + 1
    out.add(base if n == 0 else f'{base}-{n}')
  return out


def links(path: str) -> list[tuple[str, str]]:
  """(text, target) of every link and image in a markdown file, outside code."""
  prose = INLINE_CODE.sub(lambda m: 'x' * len(m.group()), _prose(_read(path)))
  return [(text, target) for text, target in LINK.findall(prose)]


def test_the_pages_exist_and_link_somewhere():
  names = {os.path.basename(p) for p in PAGES[1:]}
  assert {'data.md', 'training.md', 'evaluation.md', 'converting.md', 'export.md', 'performance.md',
          'architecture.md'} <= names
  linked = {os.path.normpath(os.path.join(ROOT, t.split('#')[0])) for _, t in links(README)}
  assert set(PAGES[1:]) <= linked, 'every docs/ page is linked from the README'


@pytest.mark.parametrize('page', PAGES, ids=lambda p: os.path.relpath(p, ROOT))
def test_links_and_images_resolve(page):
  found = links(page)
  assert found or page != README
  for text, target in found:
    if target.startswith(EXTERNAL):
      continue
    path, _, anchor = target.partition('#')
    resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
    where = f'{os.path.relpath(page, ROOT)}: [{text}]({target})'
    assert os.path.commonpath([resolved, ROOT]) == ROOT, f'{where} points outside the repository'
    assert os.path.exists(resolved), f'{where}: {os.path.relpath(resolved, ROOT)} does not exist'
    if anchor:
      assert resolved.endswith('.md'), f'{where}: an anchor into a file that is not markdown'
      assert anchor in anchors(resolved), f'{where}: no heading #{anchor} in {os.path.relpath(resolved, ROOT)}'


def test_slugs_are_githubs():
  assert slug("The demo's time") == 'the-demos-time'
  assert slug('The two input/output conventions') == 'the-two-inputoutput-conventions'
  assert slug('Convolutions: direct before the pools (pool ties)') == 'convolutions-direct-before-the-pools-pool-ties'
  assert slug('`kpjax.export` and [docs](x.md)') == 'kpjaxexport-and-docs'


def _package_dirs() -> dict[str, str]:
  """Installed package name -> folder in the checkout, for the packages pyproject.toml maps elsewhere."""
  with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
    return tomllib.load(f)['tool']['setuptools'].get('package-dir', {})


def module_file(name: str) -> str | None:
  """The checkout's file that `python -m name` runs or `import name` reads (a package: its __init__.py),
  without importing it; None if there is none."""
  parts = name.split('.')
  for package, folder in sorted(_package_dirs().items(), key=lambda kv: -len(kv[0])):
    if name == package or name.startswith(package + '.'):
      parts = folder.split('/') + name[len(package):].lstrip('.').split('.')
      parts = [p for p in parts if p]
      break
  base = os.path.join(ROOT, *parts)
  for candidate in (base + '.py', os.path.join(base, '__init__.py')):
    if os.path.isfile(candidate):
      return candidate
  return None


def _runnable(name: str) -> bool:
  path = module_file(name)
  return path is not None and (not path.endswith('__init__.py')
                               or os.path.isfile(os.path.join(os.path.dirname(path), '__main__.py')))


@pytest.mark.parametrize('page', PAGES, ids=lambda p: os.path.relpath(p, ROOT))
def test_commands_named_exist(page):
  text = COMMENT.sub('', _read(page))  # placeholders for what is still to come are comments
  modules = re.findall(r'\bpython3? -m ([\w.]+)', text)
  scripts = re.findall(r'\b(?:python3?|bash) ((?:benchmarks|examples|\.ci)/[\w./-]+)', text)
  assert modules or page != README
  for name in modules:
    if name in ('pip', 'pytest', 'venv'):
      continue
    assert _runnable(name), f'{os.path.relpath(page, ROOT)} names `python -m {name}`, which is no module here'
  for script in scripts:
    assert os.path.isfile(os.path.join(ROOT, script)), f'{os.path.relpath(page, ROOT)} names {script}'


def _defines(path: str, name: str) -> bool:
  return re.search(rf'\b{re.escape(name)}\b', _read(path)) is not None


@pytest.mark.parametrize('page', PAGES, ids=lambda p: os.path.relpath(p, ROOT))
def test_code_named_exists(page):
  """Every repository path and every `kpjax.x.y` name in inline code is a file, or a name its module has."""
  where = os.path.relpath(page, ROOT)
  spans = [s.strip('`') for s in INLINE_CODE.findall(COMMENT.sub('', _read(page)))]
  for span in spans:
    for path in re.findall(r'(?<![\w./<-])((?:kpjax|convert|configs|benchmarks|examples|tests|docs|\.ci)/[\w./-]*)',
                           span):
      assert os.path.exists(os.path.join(ROOT, path.rstrip('.'))), f'{where} names {path}, which does not exist'
    for dotted in re.findall(r'(?<![\w./])(kpjax(?:\.\w+)+)', span):
      parts = dotted.split('.')
      k = next((k for k in range(len(parts), 0, -1) if module_file('.'.join(parts[:k]))), 0)
      assert k > 1 or dotted == 'kpjax', f'{where} names {dotted}: no such module'
      module = module_file('.'.join(parts[:k]))
      for attribute in parts[k:]:
        assert _defines(module, attribute), f'{where} names {dotted}: {os.path.relpath(module, ROOT)} has no {attribute}'


def test_readme_is_short_and_starts_with_the_quick_start():
  text = _read(README)
  assert len(text.splitlines()) <= MAX_README_LINES
  headings = HEADING.findall(_prose(text))
  assert headings[0][0] == '#' and headings[1] == ('##', 'Quick start')
  section = text[text.index('## Quick start'):]
  block = FENCE.search(section).group()
  commands = [line.split('#')[0].strip() for line in block.splitlines()[1:-1]]
  assert [c for c in commands if c] == QUICK_START
  makefile = _read(os.path.join(ROOT, 'Makefile'))
  for target in ('demo', 'test'):
    assert re.search(rf'^{target}:', makefile, re.M), f'the Makefile has no {target} target'
