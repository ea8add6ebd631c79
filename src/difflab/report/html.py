"""The page (index.html) and its Markdown twin (report.md), from the section records.

A record is ``{"id", "title", "status", "blocks": [...], "numbers": {...}}``; a block is
``{"kind": "text" | "pre" | "command" | "missing", "text"}`` or
``{"kind": "figure", "file", "caption"}`` (``file`` relative to the report folder)."""
from __future__ import annotations

from collections.abc import Sequence
from html import escape

CSS = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.4}"
       "pre{background:#f4f4f4;padding:.6em;overflow-x:auto}figure{margin:1em 0}"
       "figcaption{font-size:.9em;color:#333;margin-top:.3em}img{max-width:100%;image-rendering:pixelated}"
       ".missing{border-left:4px solid #c60;padding:.3em .8em;background:#fff6ec}"
       ".command{font-family:monospace;font-size:.9em;color:#225}")


def render_html(records: Sequence[dict], title: str = "difflab course report") -> str:
    out = ["<!DOCTYPE html>", "<html lang=\"en\">", "<head>", "<meta charset=\"utf-8\">",
           f"<title>{escape(title)}</title>", f"<style>{CSS}</style>", "</head>", "<body>", f"<h1>{escape(title)}</h1>",
           "<ul>"]
    out += [f"<li><a href=\"#{escape(r['id'])}\">{escape(r['title'])}</a> ({escape(r['status'])})</li>" for r in records]
    out.append("</ul>")
    for r in records:
        out.append(f"<section id=\"{escape(r['id'])}\" data-status=\"{escape(r['status'])}\">")
        out.append(f"<h2>{escape(r['title'])}</h2>")
        for b in r["blocks"]:
            k = b["kind"]
            if k == "text":
                out.append(f"<p>{escape(b['text'])}</p>")
            elif k == "pre":
                out.append(f"<pre>{escape(b['text'])}</pre>")
            elif k == "command":
                out.append(f"<p class=\"command\">Reproduce: <code>{escape(b['text'])}</code></p>")
            elif k == "missing":
                out.append(f"<p class=\"missing\">{escape(b['text'])}</p>")
            elif k == "figure":
                out.append(f"<figure><img src=\"{escape(b['file'])}\" alt=\"{escape(b['caption'])}\">"
                           f"<figcaption>{escape(b['caption'])}</figcaption></figure>")
            else:
                raise ValueError(f"unknown block kind {k!r}")
        out.append("</section>")
    out += ["</body>", "</html>", ""]
    return "\n".join(out)


def render_markdown(records: Sequence[dict], title: str = "difflab course report") -> str:
    out = [f"# {title}", ""]
    for r in records:
        out += [f"## {r['title']}", "", f"status: {r['status']}", ""]
        for b in r["blocks"]:
            k = b["kind"]
            if k == "text":
                out += [b["text"], ""]
            elif k == "pre":
                out += ["```", b["text"], "```", ""]
            elif k == "command":
                out += [f"Reproduce: `{b['text']}`", ""]
            elif k == "missing":
                out += [f"> {b['text']}", ""]
            elif k == "figure":
                out += [f"![{b['caption']}]({b['file']})", "", f"*{b['caption']}*", ""]
    return "\n".join(out)
