"""The shipped verifiers, by the path configs name (`{path: reward/verifiers.py, function: task_correct}`).

The functions live in the package (posttrain/resources/verifiers.py), so that an installed posttrain has
them; this file is the example of a rule-reward file a config names by path. Write your own beside it:
every function takes the prompts (message lists), the completions (text) and the data rows' metadata
columns as keyword lists, and returns one float per completion.
"""

from posttrain.resources.verifiers import identity, refusal, task_correct, task_similarity

__all__ = ["identity", "refusal", "task_correct", "task_similarity"]
