"""promptfoo grader for OpenSEM: asks the judge (running inside `opensem judge`) to score one answer.

Returns the raw 1-5 score; `pass` is score >= the configured threshold. A judge failure raises, so
promptfoo records an error for the test instead of a zero.
"""

import json
import os
import urllib.request


def get_assert(output, context):
    test = context.get("test") or {}
    body = json.dumps({"id": context["vars"]["id"], "output": output}).encode("utf-8")
    req = urllib.request.Request(os.environ["OPENSEM_JUDGE_URL"], data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as resp:
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
