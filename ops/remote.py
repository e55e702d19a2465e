"""Check that the DVC remote answers before a push or pull, and say in one line why not.

``dvc push`` against bad credentials prints "failed to connect to s3 (...) - Forbidden:
An error occurred (403) when calling the HeadObject operation", then "N files failed to
upload"; an unreachable endpoint retries for ~10 s first. ``make push`` / ``make pull``
run this check first, so the user reads which remote, which endpoint and what to fix:

    python -m ops.remote check [-r REMOTE]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from trafficdet.errors import PipelineError, run_stage

CREDENTIAL_HINTS = {
    "s3": "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or `dvc remote modify --local {name} access_key_id ...` "
    "and `secret_access_key ...`",
    "gs": "GOOGLE_APPLICATION_CREDENTIALS, or `dvc remote modify --local {name} credentialpath ...`",
    "ssh": "`dvc remote modify --local {name} user ...` and `keyfile ...` (or `password ...`)",
}


def describe(name: str, config: dict) -> str:
    where = config["url"]
    if config.get("endpointurl"):
        where += f" at {config['endpointurl']}"
    return f"DVC remote '{name}' ({where})"


def check_remote(repo_root: Path = Path("."), name: str | None = None) -> str:
    """Reach the remote with the user's credentials; return its description or raise one clear error."""
    from dvc.config import NoRemoteError
    from dvc.repo import Repo

    with Repo(str(repo_root)) as repo:
        try:
            remote = repo.cloud.get_remote(name)
        except NoRemoteError:
            raise PipelineError(
                f"{repo_root.resolve()}: no DVC remote set; add one with `dvc remote add -d storage s3://<bucket>/<prefix>` "
                "(see docs/remote-and-releases.md)"
            ) from None
        config = repo.config["remote"][remote.name]
        label = describe(remote.name, config)
        scheme = config["url"].split("://", 1)[0] if "://" in config["url"] else "local"
        try:
            if not remote.fs.exists(remote.path) and scheme in ("s3", "gs", "azure"):
                bucket = remote.path.split("/", 1)[0]
                if not remote.fs.exists(bucket):
                    raise FileNotFoundError(f"bucket {bucket!r} does not exist")
        except PermissionError as err:
            hint = CREDENTIAL_HINTS.get(scheme, "the remote's credentials").format(name=remote.name)
            raise PipelineError(f"{label}: access denied ({err}): check the credentials: {hint}") from None
        except FileNotFoundError as err:
            raise PipelineError(f"{label}: {str(err).lower() or 'not found'}: create it, or fix the remote's url") from None
        except Exception as err:  # botocore, aiohttp, paramiko and OSError all signal connection failures differently
            if type(err).__name__ in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError") or isinstance(
                err, (ConnectionError, TimeoutError)
            ):
                raise PipelineError(f"{label}: cannot connect ({err}): is the endpoint up, and is its URL right?") from None
            raise PipelineError(f"{label}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
    return label


def main() -> None:
    parser = argparse.ArgumentParser(description="Check that the DVC remote is reachable with your credentials.")
    parser.add_argument("command", choices=["check"])
    parser.add_argument("-r", "--remote", default=None, help="remote name (default: the repo's default remote)")
    args = parser.parse_args()
    print(f"{check_remote(Path('.'), args.remote)}: reachable, credentials accepted")


if __name__ == "__main__":
    run_stage(main)
