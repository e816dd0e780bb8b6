"""Files the defaults need, shipped inside the package (found with importlib.resources, so a wheel install
has them): the verifier rule rewards and the unsafe-term list."""

from importlib.resources import files

VERIFIERS = str(files(__name__) / "verifiers.py")
"""The shipped verifier rules (task_correct, task_similarity, refusal, identity), by path: rule rewards are
loaded from files, so that a config can name its own the same way."""
UNSAFE_TERMS = str(files(__name__) / "unsafe_terms.txt")
"""The shipped unsafe-term list of the filter stage."""
