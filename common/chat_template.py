"""A model's own tokenizer files and chat template, rendered as transformers renders them.

Both daemons stand on this: neuron's kernel engine renders and encodes its
prompts with it, and cortex counts the same prompts exactly with it
(cortex/budget/exact_count.py), so the two cannot drift apart.

The template is rendered with jinja2 the way transformers'
`apply_chat_template` does: an immutable sandboxed environment with
`trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension, a
`{% generation %}` block that renders its body, a `tojson` filter that
keeps non-ASCII text, `raise_exception` and `strftime_now`, and the special
tokens (`bos_token`, `eos_token`, ...) as variables.

The files are a directory's `tokenizer.json` (read by the `tokenizers`
library) and `tokenizer_config.json`, whose `chat_template` is a string or
a list of named templates (transformers uses "default"), else a sibling
`chat_template.jinja`. Every load error is a `TokenizerFilesError` whose
message names the file and the field.

The same files travel over HTTP as one JSON document (`tokenizer_document`):
neuron serves its kernel models' files at the URL its `/v1/models` entry
advertises, with the document's sha256, and cortex, which may run on
another host, fetches it once per sha256 and loads it from the bytes
(`files_from_document`) with the same checks as `load_files`:

    {"tokenizer_json": "<tokenizer.json's text>",
     "tokenizer_config": {<tokenizer_config.json, its chat_template the one the engine renders>}}
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
from tokenizers import Tokenizer

LIMIT_TEMPLATE_CHARS = 1 << 20
LIMIT_RENDERED_CHARS = 64 << 20
LIMIT_CONFIG_BYTES = 64 << 20  # tokenizer_config.json: a few KB in practice, big only with inlined vocabularies
# The tokenizer document neuron serves and cortex fetches: tokenizer.json runs to a few MB (Llama 3:
# 9 MB, Qwen 2: 7 MB), the largest vocabularies to about 35 MB (Gemma 3).
LIMIT_DOCUMENT_BYTES = 64 << 20
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


class ChatTemplateError(ValueError):
    """The chat template refused these messages (raise_exception) or failed to render them."""


class TokenizerFilesError(ValueError):
    """A tokenizer file is missing or unreadable, or its chat template does not compile; names the file."""


# -- the template ---------------------------------------------------------------------------------


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` renders its body (transformers tracks it; we need not)."""

    tags = {"generation"}

    def parse(self, parser: Any) -> Any:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def compile_template(source: str) -> jinja2.Template:
    """The compiled template, or jinja2.TemplateError."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def token_text(value: Any) -> str | None:
    """A special token in tokenizer_config.json: a string or an AddedToken object."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def special_tokens(tokenizer_config: dict[str, Any]) -> dict[str, str]:
    """`bos_token`, `eos_token`, ... as the template sees them (only those the config sets)."""
    found = {}
    for key in SPECIAL_TOKEN_KEYS:
        text = token_text(tokenizer_config.get(key))
        if text is not None:
            found[key] = text
    return found


class ChatTemplate:
    """A compiled chat template and the special tokens it is rendered with. Immutable: thread-safe."""

    def __init__(self, source: str, specials: dict[str, str], *, where: str = "tokenizer_config.json") -> None:
        if len(source) > LIMIT_TEMPLATE_CHARS:
            raise TokenizerFilesError(f"{where}: field 'chat_template' is over {LIMIT_TEMPLATE_CHARS} characters")
        try:
            self._template = compile_template(source)
        except jinja2.TemplateError as exc:
            raise TokenizerFilesError(f"{where}: field 'chat_template' does not compile: {exc}") from None
        self.source = source
        self.special_tokens = dict(specials)

    def render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
               add_generation_prompt: bool = True) -> str:
        """The prompt text, or ChatTemplateError."""
        try:
            text = self._template.render(messages=messages, tools=tools, documents=None,
                                         add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"chat template: {exc}") from None
        except (TypeError, KeyError, AttributeError, IndexError, ValueError) as exc:
            raise ChatTemplateError(f"chat template cannot render these messages: {exc!r}") from None
        if len(text) > LIMIT_RENDERED_CHARS:
            raise ChatTemplateError(f"rendered prompt is over {LIMIT_RENDERED_CHARS} characters")
        return text


# -- the files ------------------------------------------------------------------------------------


def read_tokenizer(path: str, what: str = "tokenizer.json") -> Tokenizer:
    """`tokenizer.json` as a `tokenizers.Tokenizer`; errors name `what`."""
    if not os.path.isfile(path):
        raise TokenizerFilesError(f"{what}: file not found at {path}")
    try:
        return Tokenizer.from_file(path)
    except Exception as exc:  # tokenizers raises a bare Exception on a bad file
        raise TokenizerFilesError(f"{what}: cannot load {path}: {exc}") from None


def read_tokenizer_config(path: str, what: str = "tokenizer_config.json") -> dict[str, Any]:
    """`tokenizer_config.json` as a dict; errors name `what`."""
    try:
        if os.path.getsize(path) > LIMIT_CONFIG_BYTES:
            raise TokenizerFilesError(f"{what}: {path} is over {LIMIT_CONFIG_BYTES} bytes")
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except FileNotFoundError:
        raise TokenizerFilesError(f"{what}: file not found at {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerFilesError(f"{what}: cannot read {path}: {exc}") from None
    if not isinstance(value, dict):
        raise TokenizerFilesError(f"{what}: must hold a JSON object")
    return value


def template_source(tokenizer_config: dict[str, Any], directory: str | None,
                    what: str = "tokenizer_config.json") -> str | None:
    """The chat template's source: the config's `chat_template` (its "default" if named), else
    `chat_template.jinja` in `directory`, else None."""
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates: transformers uses "default"
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    jinja_path = os.path.join(directory, "chat_template.jinja") if directory is not None else None
    if template is None and jinja_path is not None and os.path.isfile(jinja_path):
        try:
            with open(jinja_path, encoding="utf-8") as f:
                template = f.read(LIMIT_TEMPLATE_CHARS + 1)
        except (OSError, UnicodeDecodeError) as exc:
            raise TokenizerFilesError(f"chat_template.jinja: cannot read {jinja_path}: {exc}") from None
    if template is not None and not isinstance(template, str):
        raise TokenizerFilesError(f"{what}: field 'chat_template' must be a string")
    return template


@dataclass(frozen=True)
class TokenizerFiles:
    """What a model's tokenizer files hold: the tokenizer, its config, and the compiled template (if any)."""

    tokenizer: Tokenizer
    config: dict[str, Any]
    template: ChatTemplate | None
    tokenizer_path: str  # where tokenizer.json came from: its path, or what a document loader was told
    config_path: str | None


def _with_template(tokenizer: Tokenizer, config: dict[str, Any], directory: str | None, config_what: str,
                   tokenizer_path: str, config_path: str | None) -> TokenizerFiles:
    source = template_source(config, directory, config_what)
    template = ChatTemplate(source, special_tokens(config), where=config_what) if source is not None else None
    return TokenizerFiles(tokenizer, config, template, tokenizer_path, config_path)


def load_files(tokenizer_path: str, config_path: str | None = None, *, tokenizer_what: str = "tokenizer.json",
               config_what: str = "tokenizer_config.json") -> TokenizerFiles:
    """Load `tokenizer_path` and `config_path` (default: the sibling tokenizer_config.json, which may
    be absent; a path given explicitly must exist), compiling the chat template. The `*_what` names
    go into every error message (a config key, say)."""
    tokenizer = read_tokenizer(tokenizer_path, tokenizer_what)
    directory = os.path.dirname(tokenizer_path) or "."
    explicit = config_path is not None
    config_path = config_path if explicit else os.path.join(directory, "tokenizer_config.json")
    assert config_path is not None
    if explicit or os.path.isfile(config_path):
        config = read_tokenizer_config(config_path, config_what)
    else:
        config, config_path = {}, None
    return _with_template(tokenizer, config, os.path.dirname(config_path) if config_path else directory, config_what,
                          tokenizer_path, config_path)


def files_from_strings(tokenizer_json: str, config: dict[str, Any] | None = None, *,
                       tokenizer_what: str = "tokenizer.json", config_what: str = "tokenizer_config.json") -> TokenizerFiles:
    """`load_files` from tokenizer.json's text and tokenizer_config.json's object (None: none), with the
    same checks and errors; there is no directory, so no chat_template.jinja beside them."""
    if len(tokenizer_json) > LIMIT_DOCUMENT_BYTES:
        raise TokenizerFilesError(f"{tokenizer_what}: over {LIMIT_DOCUMENT_BYTES} characters")
    try:
        tokenizer = Tokenizer.from_str(tokenizer_json)
    except Exception as exc:  # tokenizers raises a bare Exception on a bad file
        raise TokenizerFilesError(f"{tokenizer_what}: cannot load: {exc}") from None
    config = {} if config is None else config
    if not isinstance(config, dict):
        raise TokenizerFilesError(f"{config_what}: must hold a JSON object")
    return _with_template(tokenizer, config, None, config_what, tokenizer_what, None)


def tokenizer_document(tokenizer_json: str, config: dict[str, Any]) -> bytes:
    """tokenizer.json's text and tokenizer_config.json's object as the one JSON document neuron serves
    (compact UTF-8; the caller bounds it by LIMIT_DOCUMENT_BYTES). UnicodeEncodeError on a lone surrogate."""
    assert isinstance(tokenizer_json, str) and isinstance(config, dict)
    body = {"tokenizer_json": tokenizer_json, "tokenizer_config": config}
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def document_sha256(document: bytes) -> str:
    """What neuron advertises and cortex checks: the hex sha256 of the document's bytes as served."""
    return hashlib.sha256(document).hexdigest()


def files_from_document(document: bytes, *, what: str = "tokenizer document") -> TokenizerFiles:
    """A `tokenizer_document` back into TokenizerFiles; every error a TokenizerFilesError naming `what`."""
    if len(document) > LIMIT_DOCUMENT_BYTES:
        raise TokenizerFilesError(f"{what}: over {LIMIT_DOCUMENT_BYTES} bytes")
    try:
        body = json.loads(document)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise TokenizerFilesError(f"{what}: not a JSON document: {exc}") from None
    if not isinstance(body, dict):
        raise TokenizerFilesError(f"{what}: must hold a JSON object")
    text, config = body.get("tokenizer_json"), body.get("tokenizer_config")
    if not isinstance(text, str):
        raise TokenizerFilesError(f"{what}: field 'tokenizer_json' must be tokenizer.json's text")
    if not isinstance(config, dict):
        raise TokenizerFilesError(f"{what}: field 'tokenizer_config' must be tokenizer_config.json's object")
    return files_from_strings(text, config, tokenizer_what=f"{what}: tokenizer_json",
                              config_what=f"{what}: tokenizer_config")
