"""Synthetic recall tasks: one module per task, each with a seeded generator, a training config
(``configs/lm/task/<name>.yaml``) and exact-match evaluation (:mod:`domains.lm.tasks.common`).

    python -m domains.lm task task=<name> model=<preset>      train, then print accuracy per setting

=====================  ==========================================================================
module                 task
=====================  ==========================================================================
selective_copying      Mamba paper (Gu & Dao 2023) sec. 4.1.1: data tokens scattered among noise,
                       copied in order after the context.
induction_heads        Mamba paper sec. 4.1.2: recall the token that followed a trigger token, at
                       lengths far beyond the training length.
mqar                   Zoology (Arora et al. 2023): multi-query associative recall over key-value
                       pairs.
phonebook              NVIDIA's Mamba-based LM study (Waleffe et al. 2024) in synthetic form: names
                       -> phone numbers, retrieve the queried numbers.
=====================  ==========================================================================
"""

from __future__ import annotations

TASKS = ("selective_copying", "induction_heads", "mqar", "phonebook")

from domains.lm.tasks.common import (  # noqa: E402
    Score,
    TaskBatch,
    evaluate_settings,
    load_task,
    run_task,
    score_model,
    score_predictions,
    seeded,
)

__all__ = ["TASKS", "Score", "TaskBatch", "evaluate_settings", "load_task", "run_task", "score_model",
           "score_predictions", "seeded"]
