"""Render every file cloudops writes (libvirt XML, daemon configs, cron files) from templates/.

One Jinja2 environment: ``StrictUndefined`` so a missing variable is an error, not an
empty string; autoescaping for XML and HTML templates so a value can never inject markup.
"""

import shlex
from functools import lru_cache

import jinja2

from cloudops import paths
from cloudops.errors import CloudopsError


@lru_cache(maxsize=None)
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(paths.TEMPLATES)),
        undefined=jinja2.StrictUndefined,
        autoescape=jinja2.select_autoescape(enabled_extensions=("xml", "xml.j2", "html", "html.j2")),
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["shell_quote"] = lambda value: shlex.quote(str(value))  # for shell scripts: {{ x | shell_quote }}
    return env


def render(template: str, /, **context) -> str:
    """Render ``templates/<template>``; a missing variable raises CloudopsError naming it."""
    try:
        return environment().get_template(template).render(**context)
    except jinja2.UndefinedError as exc:
        raise CloudopsError(f"template {template}: {exc.message}") from None
    except jinja2.TemplateNotFound:
        raise CloudopsError(f"template {template} not found in {paths.TEMPLATES}") from None
