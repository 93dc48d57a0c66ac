"""The shipped model: where it is, and its fingerprint without importing torch (for -V).

weights/default.json records the SHA-256 of weights/default.pt and its fingerprint. Where
the weights no longer match the record, the fingerprint is computed by loading them (slow).
After replacing the weights, rewrite the record: python -m bfn_codec.shipped
"""
import hashlib
import json
import os

PATH = os.path.join(os.path.dirname(__file__), "weights", "default.pt")
RECORD = os.path.join(os.path.dirname(__file__), "weights", "default.json")


def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def recorded_fingerprint():
    """The fingerprint in the record, where it matches the weights (else None)."""
    try:
        with open(RECORD) as f:
            record = json.load(f)
        return record["fingerprint"] if record["sha256"] == _sha256(PATH) else None
    except (OSError, ValueError, KeyError):
        return None


def fingerprint():
    """The shipped model's fingerprint (None where this installation ships none)."""
    if not os.path.isfile(PATH):
        return None
    if recorded := recorded_fingerprint():
        return recorded
    from .model import load_weights
    return load_weights(PATH)[1]


def write_record():
    from .model import load_weights
    with open(RECORD, "w") as f:
        json.dump({"sha256": _sha256(PATH), "fingerprint": load_weights(PATH)[1]}, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    write_record()
    print(f"{RECORD}: {recorded_fingerprint()}")
