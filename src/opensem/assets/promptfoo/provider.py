"""promptfoo provider for OpenSEM: returns the answer the model under test gave to a golden item.

The answers were generated in batches by `opensem judge` before promptfoo started; this file only looks
them up by the test's `id` variable, so no question text travels through promptfoo's templating.
"""

import json
import os

_ANSWERS = {}


def call_api(prompt, options, context):
    path = (options.get("config") or {}).get("answers_file") or os.environ["OPENSEM_ANSWERS"]
    if path not in _ANSWERS:
        with open(path, encoding="utf-8") as fh:
            _ANSWERS[path] = json.load(fh)
    item_id = context["vars"]["id"]
    answers = _ANSWERS[path]
    if item_id not in answers:
        return {"error": f"no answer recorded for {item_id}"}
    return {"output": answers[item_id]}
