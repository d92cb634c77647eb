"""Text that came from the other side (a server, a custom target): made inert before anyone sees it.

A served model's API is the party under suspicion, and everything it says can reach a terminal,
the history, a JSON report or a hook's environment: error bodies, failure reasons built from its
values, output and model names, header values. ``clean`` is the one function that neutralises
such text; the clients apply it where a failure reason is born (``clients.http``), ``verify``
again to whatever any ``Target`` returns, and the CLI once more when it prints (with rich markup
escaped there, the one place markup means anything).

What ``clean`` does, so the result is one line of visible, non-executable text:

* every control or format character is written as an escape: C0 and C1 controls (ESC and so
  every ANSI sequence, ``\\r``, ``\\b``, NUL, DEL, ``\\x9b``...), line and paragraph separators,
  bidirectional overrides and isolates (U+202A-U+202E, U+2066-U+2069, LRM/RLM/ALM), zero-width
  characters, surrogates, private-use and unassigned code points: ``\\x1b``, ``\\n``,
  ``\\u202e``;
* runs of white space (any Unicode space) become one space, so padding cannot push text onto
  a line of its own;
* the result is cut to ``limit`` characters (``…`` marks a cut).

Rich markup (``[bold green]``) is not touched here: stored and JSON text keeps its brackets as
sent, and the CLI escapes markup when it prints (``rich.markup.escape``).
"""

from __future__ import annotations

import unicodedata

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_UNSAFE = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def _escape(ch: str) -> str:
    if ch in _NAMED:
        return _NAMED[ch]
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def clean(text: object, limit: int = 300) -> str:
    """``text`` as one line of inert, visible text of at most ``limit`` characters (see the module doc)."""
    raw = text if isinstance(text, str) else str(text)
    out: list[str] = []
    space = False
    for ch in raw:
        if ch == " " or (ch not in _NAMED and unicodedata.category(ch) == "Zs"):
            space = True
            continue
        piece = _escape(ch) if ch in _NAMED or unicodedata.category(ch) in _UNSAFE else ch
        if space and out:
            out.append(" ")
        space = False
        out.append(piece)
        if len(out) > limit:  # cheap early stop for huge inputs; exact cut below
            break
    line = "".join(out)
    if len(line) > limit:
        line = line[: max(0, limit - 1)] + "…"
    return line


def is_clean(text: str) -> bool:
    """True when ``text`` holds no character ``clean`` would escape (tests and assertions)."""
    return not any(ch in _NAMED or unicodedata.category(ch) in _UNSAFE for ch in text)


# Characters a hook's environment may carry: nothing a shell gives a meaning to, even unquoted
# or under eval (no $ ` \ " ' ; & | < > ( ) { } [ ] * ? ! ~ # and no line breaks).
ENV_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 _.,:/=+@%-")


def env_text(text: object, limit: int = 1000) -> str:
    """``text`` for a hook's environment: ``clean``, then every character outside ``ENV_SAFE`` as ``_``.

    What a hook does with a variable is not ours to know (``echo $TAMPERPROBE_SUMMARY`` unquoted
    globs ``*`` and ``?``; ``eval`` runs ``$(...)``), and a server's words reach the summary, so
    only letters, digits, space and ``_.,:/=+@%-`` pass (a redacted ``***`` shows as ``___``).
    """
    line = clean(text, limit)
    return "".join(ch if ch in ENV_SAFE else "_" for ch in line)
