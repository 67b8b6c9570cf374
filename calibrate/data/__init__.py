"""Small text tasks bundled with the package, with their provenance in ``calibrate/data/README.md``.

``load_task("debian_summaries", split)`` gives English Debian package descriptions and their one-line
synopses, split 0.4 / 0.4 / 0.2 into train / calibration / test by a seeded permutation;
``format_prompt`` turns a text into a chat prompt ("Summarize in one sentence: ..."). Needs numpy only.
"""

from calibrate.data._tasks import INSTRUCTION, SPLITS, TASKS, Task, format_prompt, load_task

__all__ = ["INSTRUCTION", "SPLITS", "TASKS", "Task", "format_prompt", "load_task"]
