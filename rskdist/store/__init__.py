"""Object stores (S3, GCS, HTTP, ... through fsspec) for shards and run folders.

`fs` says which paths are URLs, opens one filesystem per process, retries requests with
backoff and turns the store's failures into clear errors; `cache` stages whole shards into
a node-local folder; `mirror` keeps a run folder on a store in step with its local staging
copy. Credentials and endpoints come from the store's standard places only (for S3: the
AWS_* environment variables including AWS_ENDPOINT_URL, profiles, instance roles).
"""

from .fs import StoreError, StoreUnavailable, is_url, join, local_path

__all__ = ["StoreError", "StoreUnavailable", "is_url", "join", "local_path"]
