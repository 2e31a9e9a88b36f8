"""Stock agents against a running ``mars-ray serve``: the official ``openai`` client,
nothing MARS-specific on the client side (issue 12's acceptance scenario).

1. ``--walkaway`` agents send Ray Serve's ``x-session-id``, run one turn each, all at
   once, and never come back (no ``DELETE``). Beyond the admission window they queue
   until the first ones expire (``session_idle_timeout_s``); all must be answered.
2. ``--headerless`` agents send no id at all and resend their growing conversation
   for ``--turns`` turns; each must be one session (``x-session-id`` answers), distinct
   per agent.
3. Once every walked-away session has expired, a newcomer is answered at once.

    mars-ray serve --gpus 2 --time-scale 20 --session-idle-timeout-s 60 &
    python scripts/stock_clients.py --url http://127.0.0.1:8000

Prints JSON figures; exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from typing import Any

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families


def _ask(client: openai.OpenAI, messages: list[dict[str, str]], **extra: Any) -> tuple[str, str]:
    raw = client.chat.completions.with_raw_response.create(
        model="mars-sim",
        messages=messages,  # type: ignore[arg-type]
        max_tokens=8,
        **extra,
    )
    return raw.parse().choices[0].message.content or "", raw.headers["x-session-id"]


def _metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    for family in text_string_to_metric_families(text):
        if family.name == name:
            return sum(s.value for s in family.samples if s.name.endswith("_total"))
    return 0.0


def _in_threads(num: int, target: Any) -> float:
    started = time.monotonic()
    threads = [threading.Thread(target=target, args=(i,)) for i in range(num)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key", default="unused")
    parser.add_argument("--walkaway", type=int, default=40)
    parser.add_argument("--headerless", type=int, default=40)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--expiry-wait-s", type=float, default=300.0)
    args = parser.parse_args()
    client = openai.OpenAI(base_url=f"{args.url}/v1", api_key=args.api_key, max_retries=0)
    results: dict[str, Any] = {}

    walked: dict[int, str] = {}
    errors: list[str] = []

    def walkaway(i: int) -> None:
        try:
            _, sid = _ask(
                client,
                [{"role": "user", "content": f"agent {i}: run the test suite"}],
                extra_headers={"x-session-id": f"walkaway-{i}-{time.time_ns()}"},
                timeout=args.expiry_wait_s,
            )
            walked[i] = sid
        except Exception as exc:  # reported, not raised: every agent is counted
            errors.append(f"walkaway {i}: {exc!r}")

    expired_before = _metric(args.url, "mars_sessions_expired")
    results["walkaway_wall_s"] = round(_in_threads(args.walkaway, walkaway), 2)
    results["walkaway_answered"] = len(walked)

    seen: dict[int, list[str]] = {}

    def headerless(i: int) -> None:
        messages = [
            {"role": "system", "content": "You are a coding agent. Answer with one command."},
            {"role": "user", "content": f"task {i // 2}: fix the failing test"},  # pairs alike
        ]
        seen[i] = []
        try:
            for step in range(args.turns):
                answer, sid = _ask(client, messages, timeout=args.expiry_wait_s)
                seen[i].append(sid)
                messages += [
                    {"role": "assistant", "content": answer},
                    {"role": "user", "content": f"output of step {step}: 3 passed, 1 failed"},
                ]
        except Exception as exc:
            errors.append(f"headerless {i}: {exc!r}")

    results["headerless_wall_s"] = round(_in_threads(args.headerless, headerless), 2)
    complete = [sids for sids in seen.values() if len(sids) == args.turns]
    results["headerless_complete"] = len(complete)
    results["headerless_one_session_each"] = sum(len(set(sids)) == 1 for sids in complete)
    results["headerless_distinct_sessions"] = len({sids[0] for sids in complete})

    deadline = time.monotonic() + args.expiry_wait_s
    while time.monotonic() < deadline:
        if _metric(args.url, "mars_sessions_expired") - expired_before >= args.walkaway:
            break
        time.sleep(0.5)
    results["walkaway_expired"] = int(_metric(args.url, "mars_sessions_expired") - expired_before)
    started = time.monotonic()
    _ask(client, [{"role": "user", "content": "newcomer"}], timeout=args.expiry_wait_s)
    results["newcomer_after_expiry_s"] = round(time.monotonic() - started, 3)
    results["errors"] = errors
    print(json.dumps(results, indent=2))
    ok = (
        not errors
        and results["walkaway_answered"] == args.walkaway
        and results["walkaway_expired"] >= args.walkaway
        and results["headerless_one_session_each"] == args.headerless
        and results["headerless_distinct_sessions"] == args.headerless
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
