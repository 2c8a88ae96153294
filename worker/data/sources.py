"""Where stories come from: ``prepare``'s ``source`` (``slm prepare --source``) → input files.

- ``hub:v2`` / ``hub:v1``: ``TinyStoriesV2-GPT4-{train,valid}.txt`` /
  ``TinyStories-{train,valid}.txt`` from the ``roneneldan/TinyStories`` dataset on the Hugging
  Face hub (downloaded once, resumably, and cached by huggingface_hub);
- a folder holding ``*train*.txt`` and ``*valid*.txt`` files, named as on the hub; train files are
  concatenated in name order, and so are valid files;
- one text file, or an ``http(s)://`` URL of one, split story by story between train and val
  (the rule: ``worker.data.encoding.goes_to_val``).

A URL is a client's choice (a train job's ``data.source``) fetched from inside the network, so a
download may reach only public addresses, unless ALLOWED_DATA_HOSTS names the host: every address
the name resolves to is checked, at every redirect (followed here, at most ``MAX_REDIRECTS``), and
the connection goes to the address that was checked, not to a second lookup (DNS rebinding). It
is bounded by MAX_DOWNLOAD_BYTES and DOWNLOAD_TIMEOUT_S. Proxy variables are not used: a proxy
would resolve the name itself, past the check.
"""

from __future__ import annotations

import base64
import http.client
import ipaddress
import socket
import ssl
import sys
import threading
import time
from contextlib import closing, suppress
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import SplitResult, unquote, urljoin, urlsplit

from tqdm import tqdm

from contract.datasets import SourceFile
from contract.jobs import redact_url
from contract.settings import Settings
from worker.data.manifest import BOTH, DataError, file_sha256

HUB_REPO = "roneneldan/TinyStories"
HUB_FILES = {
    "v1": {"train": "TinyStories-train.txt", "val": "TinyStories-valid.txt"},
    "v2": {"train": "TinyStoriesV2-GPT4-train.txt", "val": "TinyStoriesV2-GPT4-valid.txt"},
}
_DOWNLOAD_BLOCK = 1 << 20
MAX_REDIRECTS = 5
_IDLE_TIMEOUT_S = 60.0  # a server silent this long is given up on, whatever time is left
_REDIRECTS = (301, 302, 303, 307, 308)


@dataclass(frozen=True)
class DownloadRules:
    """What an http(s) source may reach and cost: ALLOWED_DATA_HOSTS (``name`` or
    ``name:port``, lower case), MAX_DOWNLOAD_BYTES, DOWNLOAD_TIMEOUT_S."""

    allowed_hosts: frozenset[str]
    max_bytes: int
    timeout_s: float

    @classmethod
    def from_settings(cls, settings: Settings) -> DownloadRules:
        return cls(
            frozenset(settings.allowed_data_hosts),
            settings.max_download_bytes,
            settings.download_timeout_s,
        )


@dataclass(frozen=True)
class Input:
    """One text file to tokenize, as a source resolves to."""

    path: Path
    name: str  # the file's own name (a download's, a hub file's), not where it lies locally
    split: str  # "train", "val" or BOTH
    temporary: bool = False  # a download, deleted when preparation ends


def resolve(
    source: str, out_dir: Path, quiet: bool, rules: DownloadRules | None = None
) -> list[Input]:
    """The files ``source`` names; a URL is downloaded to ``out_dir`` first, under ``rules``
    (default: the environment's Settings)."""
    if source.startswith("hub:"):
        return _from_hub(source)
    if source.startswith(("http://", "https://")):
        name = PurePosixPath(urlsplit(source).path).name or "download.txt"
        part = out_dir / f"{name}.part"
        rules = rules or DownloadRules.from_settings(Settings())
        return [Input(download(source, part, rules, quiet), name, BOTH, True)]
    return _from_path(Path(source))


def _from_hub(source: str) -> list[Input]:
    files = HUB_FILES.get(source.removeprefix("hub:"))
    if files is None:
        raise DataError(f"unknown hub source {source!r}: use {' or '.join(_hub_sources())}")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise DataError(
            "hub sources need huggingface_hub: pip install 'slm[worker]'; or pass --source "
            "a local file or folder, or an http(s) URL"
        ) from None
    inputs = []
    for split, name in files.items():
        try:
            path = hf_hub_download(HUB_REPO, name, repo_type="dataset")
        except Exception as error:  # huggingface_hub raises HTTP, network and cache errors alike
            raise DataError(
                f"cannot fetch {name} from the Hugging Face hub ({HUB_REPO}): {error} — "
                f"without the hub, pass --source a local file or folder, or an http(s) URL"
            ) from None
        inputs.append(Input(Path(path), name, split))
    return inputs


def _hub_sources() -> list[str]:
    return [f"hub:{version}" for version in HUB_FILES]


def _from_path(path: Path) -> list[Input]:
    if path.is_file():
        return [Input(path, path.name, BOTH)]
    if not path.is_dir():
        raise DataError(
            f"{path}: no such file or folder (a source is a text file, a folder of "
            f"*train*.txt and *valid*.txt files, an http(s) URL, or "
            f"{' / '.join(_hub_sources())})"
        )
    val = sorted(p for p in path.glob("*valid*.txt") if p.is_file())
    train = sorted(p for p in path.glob("*train*.txt") if p.is_file() and p not in val)
    for files, pattern in ((train, "*train*.txt"), (val, "*valid*.txt")):
        if not files:
            raise DataError(
                f"{path} holds no {pattern} file: a folder source needs train and valid files "
                f"named as on the hub (TinyStoriesV2-GPT4-train.txt, "
                f"TinyStoriesV2-GPT4-valid.txt); to split a single file, pass the file itself"
            )
    return [Input(p, p.name, "train") for p in train] + [Input(p, p.name, "val") for p in val]


def check_url(source: str, rules: DownloadRules) -> None:
    """Refuse (DataError) an http(s) source whose host ``rules`` keep the worker from, before
    anything is written for it; the download checks again, at every redirect."""
    if source.startswith(("http://", "https://")):
        _address(urlsplit(source), rules, redact_url(source))


def download(url: str, part: Path, rules: DownloadRules, quiet: bool = True) -> Path:
    """Stream ``url`` into ``part`` and return it. A ``part`` left by a dropped connection or
    a time-out is resumed with an HTTP range request where the server allows; a body shorter
    than its Content-Length is an error, never a silently short file; one over the size cap is
    deleted. Messages show the URL without its credentials (``redact_url``)."""
    deadline = time.monotonic() + rules.timeout_s
    shown = redact_url(url)
    have = part.stat().st_size if part.is_file() else 0
    connection, response = _get(url, have, rules, deadline)
    with closing(connection), response:
        part.parent.mkdir(parents=True, exist_ok=True)  # once the host is allowed and answers
        if response.status == 416 and have:  # the part is stale (the file changed): start over
            part.unlink()
            return download(url, part, rules, quiet)
        if response.status >= 400:
            raise DataError(f"{shown}: HTTP {response.status} {response.reason}")
        if response.status != 206:  # a server that ignores ranges sends the whole file
            have = 0
        length = response.headers.get("Content-Length", "")
        expected = have + int(length) if length.isdigit() else None
        if expected is not None and expected > rules.max_bytes:
            part.unlink(missing_ok=True)
            raise DataError(_too_large(shown, rules))
        received = have
        with (
            part.open("ab" if have else "wb") as handle,
            tqdm(
                total=expected,
                initial=have,
                unit="B",
                unit_scale=True,
                desc=f"downloading {part.name.removesuffix('.part')}",
                file=sys.stderr,
                disable=quiet,
            ) as bar,
        ):
            while block := _read(connection, response, shown, rules, deadline, received):
                received += len(block)
                if received > rules.max_bytes:  # a server that sent no (or a false) length
                    part.unlink()
                    raise DataError(_too_large(shown, rules))
                handle.write(block)
                bar.update(len(block))
    if expected is not None and received != expected:
        raise DataError(
            f"{shown}: the connection dropped mid-way ({received:,} of {expected:,} bytes); "
            f"run again to resume"
        )
    return part


def _too_large(shown: str, rules: DownloadRules) -> str:
    return f"{shown}: larger than MAX_DOWNLOAD_BYTES ({rules.max_bytes:,} bytes)"


def _read(
    connection: _PinnedHTTP,
    response: http.client.HTTPResponse,
    shown: str,
    rules: DownloadRules,
    deadline: float,
    received: int,
) -> bytes:
    """The next block of the body (empty at its end); each read waits no longer than the time
    left, so a server that drips bytes cannot stretch the download past DOWNLOAD_TIMEOUT_S."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise DataError(_timed_out(shown, rules))
    connection.socket.settimeout(min(left, _IDLE_TIMEOUT_S))
    try:
        return response.read1(_DOWNLOAD_BLOCK)  # one receive, where read() would wait for all
    except (http.client.HTTPException, OSError):
        if time.monotonic() >= deadline:
            raise DataError(_timed_out(shown, rules)) from None
        raise DataError(
            f"{shown}: the connection dropped mid-way ({received:,} bytes in); run again to resume"
        ) from None


def _timed_out(shown: str, rules: DownloadRules) -> str:
    return (
        f"{shown}: not downloaded within DOWNLOAD_TIMEOUT_S ({rules.timeout_s:g} s); "
        f"run again to resume"
    )


def _get(
    url: str, have: int, rules: DownloadRules, deadline: float
) -> tuple[_PinnedHTTP, http.client.HTTPResponse]:
    """The response to GET ``url`` (from byte ``have``), redirects followed, each hop's host
    checked (``_address``) and connected to at the address checked."""
    shown, first = redact_url(url), urlsplit(url)
    for _ in range(MAX_REDIRECTS + 1):
        target = urlsplit(url)
        if target.scheme not in ("http", "https") or not target.hostname:
            raise DataError(f"{shown}: redirected to a URL that is not http(s)")
        address = _address(target, rules, shown)
        headers = {"User-Agent": "slm", "Accept-Encoding": "identity"}
        if have:
            headers["Range"] = f"bytes={have}-"
        # Credentials in the URL go to its own host only, never to where it redirects.
        if first.username is not None and target.netloc == first.netloc:
            secret = f"{unquote(first.username)}:{unquote(first.password or '')}"
            headers["Authorization"] = "Basic " + base64.b64encode(secret.encode()).decode()
        left = deadline - time.monotonic()
        if left <= 0:
            raise DataError(_timed_out(shown, rules))
        kind = _PinnedHTTPS if target.scheme == "https" else _PinnedHTTP
        timeout = min(left, _IDLE_TIMEOUT_S)
        connection = kind(target.hostname, _port(target), address, timeout, deadline)
        try:
            connection.request("GET", _path(target), headers=headers)
            response = connection.getresponse()
        except (http.client.HTTPException, OSError, ValueError):
            connection.close()
            # One message for every way a connection fails (refused, timed out, reset, TLS):
            # a client who names hosts and ports must not learn which of them listen.
            raise DataError(
                f"could not download {shown}: no HTTP answer (the connection failed or timed out)"
            ) from None
        location = response.headers.get("Location")
        if response.status not in _REDIRECTS or not location:
            return connection, response
        response.close()
        connection.close()
        url = urljoin(url, location)
    raise DataError(f"{shown}: more than {MAX_REDIRECTS} redirects")


def _port(target: SplitResult) -> int:
    try:
        port = target.port
    except ValueError:
        raise DataError(f"{redact_url(target.geturl())}: the port is not a number") from None
    return port or (443 if target.scheme == "https" else 80)


def _path(target: SplitResult) -> str:
    return (target.path or "/") + (f"?{target.query}" if target.query else "")


def _address(target: SplitResult, rules: DownloadRules, shown: str) -> str:
    """The address to connect to for ``target``'s host. A host not in ALLOWED_DATA_HOSTS must
    resolve to public addresses only; it is refused, with one message whatever the reason, so
    a refusal tells nothing of what lies inside."""
    host = target.hostname or ""
    port = _port(target)
    allowed = {host, f"{host}:{port}", f"[{host}]:{port}"} & rules.allowed_hosts
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses = [str(info[4][0]) for info in found]
    except (OSError, UnicodeError):  # socket.gaierror: the name does not resolve
        addresses = []
    if not allowed and not (addresses and all(map(_public, addresses))):
        raise DataError(
            f"{shown}: refused: {host} has no public address (it does not resolve, or it "
            f"resolves to a loopback, private, link-local, multicast or reserved one); a host "
            f"the worker may reach anyway must be listed in ALLOWED_DATA_HOSTS"
        )
    if not addresses:
        raise DataError(f"could not download {shown}: {host} does not resolve")
    return addresses[0]


# NAT64's well-known prefix (RFC 6052): 64:ff9b::10.0.0.1 reaches 10.0.0.1 through a gateway.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _public(address: str) -> bool:
    """Whether ``address`` and every IPv4 address it carries (IPv4-mapped, 6to4, Teredo, NAT64)
    are global unicast addresses."""
    ip = ipaddress.ip_address(address.partition("%")[0])  # an IPv6 zone is no part of it
    carried: list[ipaddress.IPv4Address] = []
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        else:
            carried += [ip.sixtofour] if ip.sixtofour is not None else []
            carried += list(ip.teredo) if ip.teredo is not None else []
            if ip in _NAT64:
                carried.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return all(each.is_global and not each.is_multicast for each in (ip, *carried))


class _PinnedHTTP(http.client.HTTPConnection):
    """A connection to ``address``, the one checked, with ``host`` in its Host header. Its
    ``socket`` stays reachable once the response owns it (http.client drops ``sock`` then).

    At ``deadline`` a timer shuts the socket down, whatever is reading it: a read's own timeout
    restarts with every byte, so a server dripping its headers or chunk sizes could otherwise
    hold the worker past DOWNLOAD_TIMEOUT_S."""

    def __init__(self, host: str, port: int, address: str, timeout: float, deadline: float):
        super().__init__(host, port, timeout=timeout)
        self.address = address
        self._expiry = threading.Timer(max(0.0, deadline - time.monotonic()), self._expire)
        self._expiry.daemon = True

    def connect(self) -> None:
        self.sock = self.socket = socket.create_connection((self.address, self.port), self.timeout)
        self._expiry.start()

    def _expire(self) -> None:
        with suppress(OSError):
            self.socket.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._expiry.cancel()
        super().close()


class _PinnedHTTPS(_PinnedHTTP):
    """As ``_PinnedHTTP``, in TLS: the certificate is checked against ``host``."""

    def connect(self) -> None:
        super().connect()
        tls = ssl.create_default_context()
        self.sock = self.socket = tls.wrap_socket(self.sock, server_hostname=self.host)


def describe(item: Input) -> SourceFile:
    size = item.path.stat().st_size
    if size == 0:
        raise DataError(f"{item.path} is empty")
    return SourceFile(item.name, item.split, size, file_sha256(item.path))
