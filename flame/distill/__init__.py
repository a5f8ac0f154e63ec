"""Knowledge distillation: a teacher's next-token distributions as extra targets for the student.

Modules: ``vocab`` (reductions over a vocabulary that may be sharded over tensor-parallel ranks),
``losses`` (forward/reverse KL, generalized JSD, TVD; temperature, top-k, chunking), ``schedule`` (the
weight α of the KD term over the steps), ``teacher`` (finding, checking, building and loading the
teacher on the student's mesh), ``checks`` (the ``[distill]`` section's validation), ``cache`` (the
offline top-k teacher cache, ``python -m flame.distill.cache``).
"""
