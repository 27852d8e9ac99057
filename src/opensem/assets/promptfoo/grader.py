"""promptfoo grader for OpenSEM: asks the judge (running inside `opensem judge`) to score one answer.

It sends the test's opaque key and the output promptfoo saw; the judge looks the question, the golden
answer and the model's answer up on its own side and checks that the output is the one it recorded.
Every request carries the run's secret token (OPENSEM_JUDGE_TOKEN) and never goes through a proxy.
Returns the raw 1-5 score; `pass` is score >= the configured threshold. A judge failure raises, so
promptfoo records an error for the test instead of a zero.
"""

import json
import os
import urllib.request

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 only, never a proxy


def get_assert(output, context):
    test = context.get("test") or {}
    body = json.dumps({"key": context["vars"]["key"], "output": output}).encode("utf-8")
    req = urllib.request.Request(
        os.environ["OPENSEM_JUDGE_URL"],
        data=body,
        headers={"Content-Type": "application/json", "X-OpenSEM-Token": os.environ["OPENSEM_JUDGE_TOKEN"]},
    )
    with _OPENER.open(req, timeout=600) as resp:
        verdict = json.loads(resp.read().decode("utf-8"))
    if verdict.get("error"):
        raise RuntimeError("JUDGE_ERROR: " + verdict["error"])
    threshold = float((test.get("metadata") or {}).get("pass_threshold", 4))
    return {
        "pass": verdict["score"] >= threshold,
        "score": verdict["score"],
        "reason": verdict["reason"],
        "namedScores": {"judge": verdict["score"]},
    }
