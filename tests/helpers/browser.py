"""Opens an HTML file in real headless Chromium (Debian's ``chromium``; `.ci/run` installs it when missing) and
reports what a reader would see go wrong: images that did not load, console errors, uncaught exceptions and failed
resource requests.

Chromium is driven through its DevTools protocol over ``--remote-debugging-pipe`` (NUL-terminated JSON on fds 3
and 4), so nothing beyond the standard library is needed and no port is opened. The page is loaded with
``Page.navigate``; once ``load`` has fired (every ``<img>`` has then finished, loaded or failed) the images are read
from the DOM (``complete``, ``naturalWidth``).
"""

from __future__ import annotations

import fcntl
import html.parser
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

INSTALL_HINT = ("headless Chromium is needed to check the HTML reports: `.ci/run` installs Debian's package when "
                "it is missing (as root: `apt-get install -y --no-install-recommends chromium`)")

# Every image after `load`: its source, whether the browser finished it and its decoded size (0 when it failed)
IMAGES_JS = ("Array.from(document.images).map(i => ({src: i.getAttribute('src'), url: i.currentSrc || i.src, "
             "complete: i.complete, width: i.naturalWidth, height: i.naturalHeight}))")


class BrowserError(RuntimeError):
    """Chromium is missing, did not start or did not answer."""


@dataclass
class PageCheck:
    """What Chromium saw of one page: ``img_tags`` counted in the file itself, ``images`` from the DOM after
    ``load``, console errors (console.error/assert, uncaught exceptions, the browser's own error log entries) and
    failed requests."""

    url: str
    img_tags: int
    images: list[dict[str, Any]]
    console_errors: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)
    navigation_error: str = ""

    @property
    def broken_images(self) -> list[str]:
        return [i["src"] for i in self.images if not (i["complete"] and i["width"] > 0 and i["height"] > 0)]

    def problems(self) -> list[str]:
        """Each thing wrong with the page, as one line; empty when every image loaded and nothing failed."""
        out = [f"navigation failed: {self.navigation_error}"] if self.navigation_error else []
        if self.img_tags == 0:
            out.append("the page has no <img> tag")
        if len(self.images) != self.img_tags:
            out.append(f"the file has {self.img_tags} <img> tags but the browser's DOM {len(self.images)} images")
        out += [f"image did not load: {src}" for src in self.broken_images]
        out += [f"console error: {message}" for message in self.console_errors]
        out += [f"request failed: {request}" for request in self.failed_requests]
        return out


class _ImgCounter(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def handle_starttag(self, tag: str, attrs) -> None:
        self.count += tag == "img"

    handle_startendtag = handle_starttag


def count_img_tags(text: str) -> int:
    parser = _ImgCounter()
    parser.feed(text)
    parser.close()
    return parser.count


def chromium_binary() -> str:
    """The ``chromium`` on PATH; ``BrowserError`` with the install hint when there is none."""
    path = shutil.which("chromium")
    if path is None:
        raise BrowserError(f"`chromium` is not on PATH: {INSTALL_HINT}")
    return path


class _Pipe:
    """The DevTools protocol over Chromium's debugging pipe: commands answered by id, events kept in order."""

    def __init__(self, process: subprocess.Popen, write_fd: int, read_fd: int, stderr_path: Path) -> None:
        self.process, self.write_fd, self.read_fd, self.stderr_path = process, write_fd, read_fd, stderr_path
        self.buffer, self.next_id, self.events = b"", 0, []

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.read_fd], [], [], left)[0]:
                raise BrowserError(f"Chromium did not answer in time{self._stderr()}")
            chunk = os.read(self.read_fd, 1 << 20)
            if not chunk:
                raise BrowserError(f"Chromium closed its debugging pipe (exit {self.process.poll()}){self._stderr()}")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def _stderr(self) -> str:
        text = self.stderr_path.read_text(errors="replace")[-3000:] if self.stderr_path.exists() else ""
        return f"; its stderr:\n{text}" if text else ""

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             deadline: float | None = None) -> dict[str, Any]:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.write_fd, json.dumps(message).encode() + b"\0")
        deadline = deadline or time.monotonic() + 30
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise BrowserError(f"{method} failed: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def wait_for(self, method: str, deadline: float, **params: Any) -> dict[str, Any]:
        """The first event ``method`` (kept or coming) whose params include ``params``."""
        def matches(event: dict[str, Any]) -> bool:
            return event.get("method") == method and all(event["params"].get(k) == v for k, v in params.items())

        for event in self.events:
            if matches(event):
                return event
        while True:
            event = self._read_message(deadline)
            if "method" in event:
                self.events.append(event)
                if matches(event):
                    return event


TRAMPOLINE = ("import os, sys; r, w = int(sys.argv[1]), int(sys.argv[2]); os.dup2(r, 3); os.dup2(w, 4); "
              "os.close(r); os.close(w); os.execv(sys.argv[3], sys.argv[3:])")


def _high_fd(fd: int) -> int:
    """A copy of ``fd`` numbered 10 or more (closing ``fd``), so moving it onto 3 or 4 cannot clobber the other."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return high


def _launch(profile: Path) -> tuple[subprocess.Popen, int, int]:
    """Starts Chromium with its debugging pipe on fds 3 (commands in) and 4 (replies out); returns the process and
    this side's write and read ends."""
    to_browser_r, to_browser_w = os.pipe()
    from_browser_r, from_browser_w = os.pipe()
    to_browser_r, from_browser_w = _high_fd(to_browser_r), _high_fd(from_browser_w)
    flags = ["--headless=new", "--remote-debugging-pipe", f"--user-data-dir={profile}", "--no-first-run",
             "--no-default-browser-check", "--disable-gpu", "--disable-dev-shm-usage", "--disable-extensions",
             "--disable-background-networking", "--disable-component-update", "--disable-sync", "--mute-audio",
             "--enable-logging=stderr", "--v=0",
             # our own local page; root (CI) refuses the sandbox and containers often lack its user namespaces
             "--no-sandbox"]
    # a small Python puts the pipe ends on fds 3 and 4 and execs Chromium (no preexec_fn: not safe with threads;
    # no sh: dash cannot name fds above 9)
    with open(profile / "stderr.log", "wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", TRAMPOLINE, str(to_browser_r), str(from_browser_w), chromium_binary(),
             *flags, "about:blank"], pass_fds=(to_browser_r, from_browser_w), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
    os.close(to_browser_r)
    os.close(from_browser_w)
    return process, to_browser_w, from_browser_r


def check_page(path: str | Path, timeout: float = 90) -> PageCheck:
    """Loads ``path`` in headless Chromium and returns what it saw (``PageCheck.problems()`` lists what went wrong).
    Raises ``BrowserError`` when Chromium is missing or does not start or answer within ``timeout`` seconds."""
    path = Path(path).resolve()
    url = path.as_uri()
    img_tags = count_img_tags(path.read_text())
    deadline = time.monotonic() + timeout
    with tempfile.TemporaryDirectory(prefix="chromium-check-") as tmp:
        process, write_fd, read_fd = _launch(Path(tmp))
        pipe = _Pipe(process, write_fd, read_fd, Path(tmp) / "stderr.log")
        try:
            targets = pipe.send("Target.getTargets", deadline=deadline)["targetInfos"]
            page = next((t for t in targets if t["type"] == "page"), None)
            target = page["targetId"] if page else pipe.send("Target.createTarget", {"url": "about:blank"},
                                                             deadline=deadline)["targetId"]
            session = pipe.send("Target.attachToTarget", {"targetId": target, "flatten": True},
                                deadline=deadline)["sessionId"]
            for domain in ("Runtime", "Log", "Network", "Page"):
                pipe.send(f"{domain}.enable", session=session, deadline=deadline)
            pipe.send("Page.setLifecycleEventsEnabled", {"enabled": True}, session=session, deadline=deadline)
            navigation = pipe.send("Page.navigate", {"url": url}, session=session, deadline=deadline)
            if not navigation.get("errorText"):  # `load` of this navigation's document, not of about:blank
                pipe.wait_for("Page.lifecycleEvent", deadline, name="load", loaderId=navigation["loaderId"])
            images = pipe.send("Runtime.evaluate", {"expression": IMAGES_JS, "returnByValue": True},
                               session=session, deadline=deadline)["result"]["value"]
            check = PageCheck(url, img_tags, images, navigation_error=navigation.get("errorText", ""))
            _collect(check, pipe.events, session)
            try:
                pipe.send("Browser.close", deadline=time.monotonic() + 10)
            except BrowserError:
                pass  # it may close the pipe before answering
            process.wait(timeout=30)
            return check
        finally:
            os.close(write_fd)
            os.close(read_fd)
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)  # the session we started: Chromium and its helpers
                process.wait(timeout=30)


def _collect(check: PageCheck, events: list[dict[str, Any]], session: str) -> None:
    """Console errors and failed requests from the page session's events."""
    urls = {}
    for event in events:
        if event.get("sessionId") != session:
            continue
        method, params = event["method"], event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            args = params.get("args", [])
            check.console_errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in args))
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            check.console_errors.append(details.get("exception", {}).get("description") or details.get("text", ""))
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            check.console_errors.append(f"{entry.get('text', '')} ({entry.get('url', '')})")
        elif method == "Network.requestWillBeSent":
            urls[params["requestId"]] = params["request"]["url"]
        elif method == "Network.loadingFailed" and not params.get("canceled"):
            check.failed_requests.append(f"{urls.get(params['requestId'], '?')}: {params.get('errorText', '')}")
        elif method == "Network.responseReceived" and params["response"].get("status", 0) >= 400:
            check.failed_requests.append(f"{params['response']['url']}: HTTP {params['response']['status']}")


__all__ = ["INSTALL_HINT", "BrowserError", "PageCheck", "check_page", "chromium_binary", "count_img_tags"]
