"""The dashboard's files (broker/static: plain HTML, JS and CSS, no build
step, no CDN), read once from the package and served from memory by
http.py: `/` and `/static/<name>`. Content-Security-Policy keeps the page
to its own origin: nothing it shows can load or run anything else."""

from __future__ import annotations

from importlib import resources

TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}
HEADERS = {
    "Cache-Control": "no-cache",  # revalidated each load: a new broker's page, never a stale one
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def load() -> dict[str, tuple[bytes, str]]:
    """name → (content, content type) of every file in broker/static."""
    files: dict[str, tuple[bytes, str]] = {}
    for entry in resources.files("broker").joinpath("static").iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1] if "." in entry.name else ""
        if entry.is_file() and suffix in TYPES:
            files[entry.name] = (entry.read_bytes(), TYPES[suffix])
    return files
