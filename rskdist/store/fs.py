"""URLs, filesystems, retries and errors of object stores.

Every request to a store goes through `Store.call`: a failure that may pass (a refused or
reset connection, a timeout, a 5xx) is retried with exponential backoff, `retries` attempts
in all, then raised as `StoreUnavailable`; a failure that will not pass (no such bucket or
object, access denied, no credentials) is raised at once as `StoreError` naming the URL
and the fix. Nothing here reads or prints credentials: the filesystem finds them itself.
"""

from __future__ import annotations

import os
import posixpath
import time
from typing import Any, Callable

DEFAULT_RETRIES = 5
DEFAULT_BACKOFF_S = 0.5
MAX_BACKOFF_S = 8.0
# S3: one attempt per request inside botocore (our loop does the retrying, with our bounds);
# connecting to a dead endpoint fails within seconds, a read waits at most a minute.
S3_OPTIONS = {"config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"}, "connect_timeout": 5,
                                "read_timeout": 60}}


class StoreError(ValueError):
    """A store URL that cannot be used as given (missing bucket or object, refused credentials)."""


class StoreUnavailable(RuntimeError):
    """The store stopped answering: every retry of a request failed."""


def is_url(path: str | os.PathLike) -> bool:
    """A store URL (`s3://b/x`, `gs://`, `https://`, ...); plain paths and `file://` are local."""
    text = str(path)
    return "://" in text and not text.startswith("file://")


def local_path(path: str | os.PathLike) -> str:
    """A local path with any `file://` prefix removed."""
    text = str(path)
    return text[len("file://"):] if text.startswith("file://") else text


def join(base: str, *parts: str) -> str:
    """`base/part/...` for a URL (always `/`) or a local path."""
    return posixpath.join(base, *parts) if is_url(base) else os.path.join(local_path(base), *parts)


def endpoint_hint(url: str) -> str:
    """Where the requests went (the endpoint is no secret; keys are never named)."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return f" (endpoint {endpoint})" if url.startswith("s3://") and endpoint else ""


class Store:
    """One store URL prefix: its fsspec filesystem (opened lazily, again after a fork) and
    requests with bounded retries. Picklable (DataLoader workers rebuild the filesystem)."""

    def __init__(self, url: str, *, retries: int = DEFAULT_RETRIES, backoff_s: float = DEFAULT_BACKOFF_S):
        if retries < 1:
            raise ValueError(f"store: retries must be >= 1, got {retries}")
        self.url, self.retries, self.backoff_s = url.rstrip("/"), retries, backoff_s
        self._fs, self._pid = None, None

    @property
    def fs(self):
        if self._fs is None or self._pid != os.getpid():
            import fsspec

            protocol = self.url.split("://", 1)[0]
            try:
                options = S3_OPTIONS if protocol in ("s3", "s3a") else {}
                # Its own instance: endpoint and credentials are read now, not from an older cached one.
                self._fs = fsspec.filesystem(protocol, skip_instance_cache=True, **options)
            except (ImportError, ValueError) as err:
                raise StoreError(f"{self.url}: no filesystem for {protocol}:// ({err}); install its fsspec "
                                 f"package (s3fs for s3://, gcsfs for gs://, adlfs for az://)") from err
            self._pid = os.getpid()
        return self._fs

    def path(self, url: str) -> str:
        """The filesystem's own path of a URL under this store (bucket/key for S3)."""
        return self.fs._strip_protocol(url)

    def call(self, what: str, url: str, fn: Callable[..., Any], *args, **kwargs) -> Any:
        """fn(*args, **kwargs), retried while the store may come back; `what` and `url` name
        the request in errors ("read", "s3://b/x")."""
        delay, start = self.backoff_s, time.monotonic()
        for attempt in range(1, self.retries + 1):
            try:
                return fn(*args, **kwargs)
            except (StoreError, StoreUnavailable):
                raise
            except FileNotFoundError as err:
                raise StoreError(f"{what} {url}: not found{endpoint_hint(url)}: no such bucket or object ({err}); "
                                 f"check the URL, or write the data there first") from err
            except PermissionError as err:
                raise StoreError(f"{what} {url}: access denied{endpoint_hint(url)} ({err}); check the credentials "
                                 f"in the environment or profile (AWS_ACCESS_KEY_ID / AWS_PROFILE / the instance "
                                 f"role) and the bucket's policy") from err
            except Exception as err:  # noqa: BLE001 - connection errors of botocore/aiohttp/gcsfs share no base class
                if _no_credentials(err):
                    raise StoreError(f"{what} {url}: no credentials found ({type(err).__name__}); set them in the "
                                     f"environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), a profile "
                                     f"(AWS_PROFILE) or an instance role, never in the config") from err
                if attempt == self.retries:
                    raise StoreUnavailable(
                        f"{what} {url}: the store did not answer{endpoint_hint(url)} after {attempt} tries over "
                        f"{time.monotonic() - start:.0f} s (last error: {type(err).__name__}: {err}); "
                        f"check the connection, then rerun the same command to resume from the last checkpoint"
                    ) from err
                time.sleep(delay)
                delay = min(2 * delay, MAX_BACKOFF_S)

    # Common requests ------------------------------------------------------------------
    def cat(self, url: str, start: int | None = None, end: int | None = None) -> bytes:
        return self.call("read", url, self.fs.cat_file, self.path(url), start=start, end=end)

    def listing(self, url: str) -> dict[str, int | None]:
        """{name: size} of the objects directly under `url` (fresh, not from a listing cache);
        the size is None where the listing does not give one (an HTTP server's folder page:
        `size` asks the object itself)."""
        self.fs.invalidate_cache(self.path(url))
        try:
            entries = self.call("list", url, self.fs.ls, self.path(url), detail=True)
        except StoreError as err:
            if isinstance(err.__cause__, FileNotFoundError) and self.exists(self.url):
                return {}  # an empty "folder": S3 has none
            raise
        return {posixpath.basename(e["name"].rstrip("/")): None if e.get("size") is None else int(e["size"])
                for e in entries if e.get("type") == "file"}

    def size(self, url: str) -> int | None:
        """The size of one object, as the store reports it (an HTTP HEAD for https://)."""
        size = self.call("check", url, self.fs.info, self.path(url)).get("size")
        return None if size is None else int(size)

    def check_ranges(self, url: str, size: int) -> None:
        """The store answers a ranged read with those bytes alone, else a StoreError: an HTTP
        server may ignore the Range header and send the whole object, which `ranged` reading
        (data.read_mode) would then take for a broken image, request after request."""
        if size < 2:
            return
        got = len(self.cat(url, start=1, end=2))
        if got != 1:
            raise StoreError(f"{url}: the server answered a request for 1 byte (bytes 1-1) with {got} bytes: it "
                             f"does not serve byte ranges; read these shards with data.read_mode=stage (each "
                             f"shard fetched whole into the node-local cache)")

    def check_bucket(self, what: str) -> None:
        """The URL's bucket (or top folder) exists and answers with these credentials, else a
        StoreError naming it; `what` names the setting in the message."""
        scheme, rest = self.url.split("://", 1)
        bucket = f"{scheme}://{rest.split('/', 1)[0]}"
        try:  # not fs.exists: it answers False for refused credentials too
            self.call("check", bucket, self.fs.info, self.path(bucket))
        except StoreError as err:
            if not isinstance(err.__cause__, FileNotFoundError):
                raise StoreError(f"{what}: {err}") from err.__cause__
            raise StoreError(f"{what}: {bucket} not found{endpoint_hint(bucket)}; create it, or point {what} at "
                             f"an existing bucket") from err.__cause__

    def exists(self, url: str) -> bool:
        return bool(self.call("check", url, self.fs.exists, self.path(url)))

    def put(self, local: str, url: str) -> None:
        self.call("upload", url, self.fs.put_file, local, self.path(url))

    def put_text(self, url: str, text: str) -> None:
        self.call("upload", url, self.fs.pipe_file, self.path(url), text.encode())

    def get(self, url: str, local: str) -> None:
        self.call("download", url, self.fs.get_file, self.path(url), local)

    def remove(self, url: str) -> None:
        self.call("delete", url, self.fs.rm, self.path(url), recursive=True)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_fs"], state["_pid"] = None, None
        return state


def _no_credentials(err: Exception) -> bool:
    return type(err).__name__ in ("NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError")
