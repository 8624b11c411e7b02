"""One local Ray cluster for a whole demo run: start it, print its address, keep it until told to stop.

    python -m core.demo.ray_host ADDRESS_FILE &     # scripts/demo.sh reads the file, then exports both
    # ADDRESS_FILE: line 1 the cluster's address (RAY_ADDRESS), line 2 its RAY_AUTH_MODE (token or disabled)

Every Ray task of the demo (the embed steps of curate and of the ablation: the Flyte Ray plugin's `ray.init()`
and `core.steps.embed`'s) honours RAY_ADDRESS and joins this cluster instead of starting and stopping a
local one of its own (about 5-10 s each on 2 cores). The cluster is what `ray.init()` starts by itself (same
CPUs, no GPU, no dashboard); this process owns it, so SIGTERM or SIGINT to this process (its id, not a
process-name match, which would hit other users' Ray) shuts it down with `ray.shutdown()`.
"""

from __future__ import annotations

import os
import signal
import sys
import time


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m core.demo.ray_host ADDRESS_FILE", file=sys.stderr)
        return 2
    import ray

    os.environ.pop("RAY_ADDRESS", None)  # start a new cluster, never join one
    t0 = time.time()
    ctx = ray.init(include_dashboard=False, log_to_driver=False)
    address = ctx.address_info["gcs_address"]
    # Ray's local clusters use token authentication by default (the token sits in ~/.ray/auth_token, which the
    # demo's tasks share through HOME); a client joins only with the same RAY_AUTH_MODE.
    auth = os.environ.get("RAY_AUTH_MODE", "")
    if not auth:
        try:
            from ray._private.authentication.authentication_utils import is_token_auth_enabled

            auth = "token" if is_token_auth_enabled() else "disabled"
        except ImportError:  # a Ray without token authentication
            auth = "disabled"
    stop = {"now": False}

    def on_signal(signum, frame):  # noqa: ARG001 (signal handler signature)
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    tmp = args[0] + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{address}\n{auth}\n")
    os.replace(tmp, args[0])  # the file appears complete or not at all
    print(f"ray_host: cluster at {address} up in {time.time() - t0:.1f}s (pid {os.getpid()})", flush=True)
    while not stop["now"]:
        time.sleep(0.2)
    ray.shutdown()
    print("ray_host: cluster stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
