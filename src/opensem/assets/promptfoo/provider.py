"""promptfoo provider for OpenSEM: returns the answer the model under test gave to one golden item.

The answers were generated in batches by `opensem judge` before promptfoo started. promptfoo only ever
sees an opaque key per test (`t0001`, ...); this file looks the answer up by that key in the file named
by OPENSEM_ANSWERS (or, for an extra row such as "+ retrieval", the file its config names), so no text
from the golden set travels through promptfoo's templating.
"""

import json
import os

_ANSWERS = {}


def call_api(prompt, options, context):
    path = ((options or {}).get("config") or {}).get("answers") or os.environ["OPENSEM_ANSWERS"]
    if path not in _ANSWERS:
        with open(path, encoding="utf-8") as fh:
            _ANSWERS[path] = json.load(fh)
    key = context["vars"]["key"]
    answers = _ANSWERS[path]
    if key not in answers:
        return {"error": f"no answer recorded for {key}"}
    return {"output": answers[key]}
