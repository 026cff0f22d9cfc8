"""Is a server up? One probe for MLflow, Prefect and the stack's own components."""

from __future__ import annotations

import urllib.error
import urllib.request
from urllib.parse import urlparse


def health_problem(url: str, timeout: float = 5) -> str | None:
    """None when GET ``url`` answers 200; else what went wrong, worded to follow the server's name."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            if response.status == 200:
                return None
            return f"answered {urlparse(url).path} with {response.status}"
    except urllib.error.HTTPError as e:
        return f"answered {urlparse(url).path} with {e.code}"
    except (OSError, ValueError) as e:  # URLError, refused connections, timeouts, a malformed URL
        return f"is not reachable ({getattr(e, 'reason', e)})"
