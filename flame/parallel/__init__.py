"""Everything that applies a parallelism to a model: ``parallelize()`` in its fixed order, tensor parallel
styles and plans machinery, context parallelism (softmax attention and state passing), pipeline split and
schedules, float8. Generic: what differs per model family comes from its adapter (``flame/models/families/``).
"""
