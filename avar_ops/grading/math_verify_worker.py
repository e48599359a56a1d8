"""Worker process for `avar_ops.grading.latex_checker`: runs math-verify on one pair at a time.

It is started as a script (``python math_verify_worker.py``), not imported through the package, so that a
fresh worker only pays for importing math-verify, not torch. Protocol, one JSON object per line:

- on start it writes ``{"ready": true}`` (or ``{"ready": false, "error": …}`` when math-verify is missing);
- for every request ``{"id": n, "pred": str, "gold": str}`` on stdin it writes
  ``{"id": n, "status": "correct" | "incorrect" | "error", "detail": str}``.

math-verify's own timeouts rely on SIGALRM; they are switched off here because the parent enforces a hard
deadline by killing this process. It exits when stdin closes, so it never outlives its parent.
"""

import json
import sys


def _parse(parse, text: str) -> list:
    # math-verify looks for math delimiters: read bare "2\\sqrt{2}" as a whole, not as the number 2 it starts with
    if "$" not in text and "\\boxed" not in text:
        parsed = parse("$%s$" % text, parsing_timeout=None)
        if parsed:
            return parsed
    return parse(text, parsing_timeout=None)


def _answer(verify, parse, pred: str, gold: str) -> tuple:
    gold_parsed = _parse(parse, gold)
    pred_parsed = _parse(parse, pred)
    if not gold_parsed:
        return "error", "the reference could not be parsed: %r" % gold[:200]
    if not pred_parsed:
        return "incorrect", "the prediction could not be parsed"
    ok = verify(gold_parsed, pred_parsed, timeout_seconds=None, raise_on_error=True)
    return ("correct" if ok else "incorrect"), ""


def main() -> int:
    out = sys.stdout
    try:
        import logging

        # math-verify warns on every call that its timeout is disabled; the parent owns the deadline.
        logging.disable(logging.WARNING)
        from math_verify import parse, verify
    except Exception as exc:  # reported to the parent, which turns it into one clear error
        out.write(json.dumps({"ready": False, "error": "%s: %s" % (type(exc).__name__, exc)}) + "\n")
        out.flush()
        return 1
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        request = json.loads(line)
        try:
            status, detail = _answer(verify, parse, request["pred"], request["gold"])
        except Exception as exc:  # a checker failure is a result to count, not a crash of the worker
            status, detail = "error", "%s: %s" % (type(exc).__name__, str(exc)[:200])
        out.write(json.dumps({"id": request["id"], "status": status, "detail": detail}) + "\n")
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
